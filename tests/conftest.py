import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The same variable as the app's (MEDVQA_DATA is the app's user data dir: reviews, fine-tunes).
DATA = Path(os.environ.get("MEDVQA_DATA_ROOT", ROOT.parent / "shared" / "data"))


def data_root(name: str) -> Path:
    """The real dataset folder, or skip the test with the reason."""
    p = DATA / name
    if not p.is_dir():
        pytest.skip(f"real data not found at {p} (set MEDVQA_DATA_ROOT or place ../shared/data beside the repo)")
    return p
