import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDVQA_DATA", ROOT.parent / "shared" / "data"))


def data_root(name: str) -> Path:
    """The real dataset folder, or skip the test with the reason."""
    p = DATA / name
    if not p.is_dir():
        pytest.skip(f"real data not found at {p} (set MEDVQA_DATA or place ../shared/data beside the repo)")
    return p
