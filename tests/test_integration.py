"""Real-data integration: train `tiny` for a few steps on VQA-RAD, evaluate it, and run the sweep
machinery on a one-variant config. Skipped when ../shared/data is absent."""
import json

import pytest

from medvqa.cli import main
from tests.conftest import data_root


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.data
def test_train_tiny_on_vqa_rad_then_eval(isolated_cache, capsys):
    root = data_root("vqa_rad")
    out = isolated_cache / "ck"
    rc = main(["train", "--model", "cmi-mtl", "--preset", "tiny", "--dataset", "vqa-rad", "--root", str(root),
               "--out", str(out), "--workdir", str(isolated_cache / "run"), "--epochs", "1", "--limit", "64", "--json"])
    m = json.loads(capsys.readouterr().out)
    assert rc == 0 and m["best_epoch"] == 1 and m["test"]["n"] == 16
    rc = main(["eval", "--checkpoint", str(out), "--dataset", "vqa-rad", "--root", str(root), "--split", "test", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and r["n"] == 451 and r["vocab"] == 498 and r["vocab_protocol"] == "all"
    assert 0 <= r["overall"] <= 100 and r["n_open"] == 179


@pytest.mark.data
def test_sweep_writes_table(isolated_cache, capsys):
    root = data_root("vqa_rad")
    cfg = isolated_cache / "sweep.json"
    cfg.write_text(json.dumps({"dataset": "vqa-rad", "root": str(root),
                               "common": ["--preset", "tiny", "--epochs", "1", "--limit", "32"],
                               "variants": {"baseline": ["--model", "baseline"],
                                            "w/o CMM": ["--model", "cmi-mtl", "--ablate", "cmm"]}}))
    assert main(["sweep", "--config", str(cfg), "--out", str(isolated_cache / "sw")]) == 0
    md = (isolated_cache / "sw" / "results.md").read_text()
    assert "| baseline |" in md and "| w/o CMM |" in md
    assert len((isolated_cache / "sw" / "results.csv").read_text().splitlines()) == 3
