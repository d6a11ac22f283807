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
               "--out", str(out), "--workdir", str(isolated_cache / "run"), "--epochs", "1", "--limit", "64", "--json",
               "--report-test"])
    m = json.loads(capsys.readouterr().out)
    assert rc == 0 and m["best_epoch"] == 1 and m["test"]["n"] == 16
    rc = main(["eval", "--checkpoint", str(out), "--dataset", "vqa-rad", "--root", str(root), "--split", "test",
               "--by", "seen", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and r["n"] == 451 and r["vocab"] == 498 and r["vocab_protocol"] == "all"
    assert [g["n"] for g in r["by_seen"].values()] == [340, 111]     # every test image is a train image
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


def test_torchrun_two_cpu_processes(tmp_path):
    """The same `train` command under torchrun (gloo on CPU): ranks shard batches, rank 0 writes."""
    import os
    import subprocess
    import sys

    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 24, n_test=4)
    env = {**os.environ, "MEDVQA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "medvqa",
           "train", "--model", "cmi-mtl", "--preset", "tiny", "--dataset", "folder", "--root", str(tmp_path / "data"),
           "--out", str(tmp_path / "ck"), "--workdir", str(tmp_path / "run"), "--epochs", "2", "--batch-size", "4", "--json",
           "--report-test"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["test"]["n"] == 4
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2   # written once, by rank 0


@pytest.mark.data
def test_cmdpi_pretrain_then_finetune_tiny(isolated_cache, capsys):
    root = data_root("vqa_rad")
    common = ["--model", "cmdpi", "--preset", "tiny", "--dataset", "vqa-rad", "--root", str(root), "--epochs", "1",
              "--limit", "48", "--json"]
    pre = isolated_cache / "pre"
    assert main(["pretrain", *common, "--out", str(pre), "--workdir", str(isolated_cache / "pw"), "--image-pool", "2"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["stage"] == "pretrain" and m["n_captions"] > 0 and m["train_inter"] > 0
    rc = main(["train", *common, "--init", str(pre), "--out", str(isolated_cache / "ft"),
               "--workdir", str(isolated_cache / "fw"), "--report-test"])
    m = json.loads(capsys.readouterr().out)
    assert rc == 0 and m["best_epoch"] == 1 and 0 <= m["test"]["overall"] <= 100
    cfg = json.loads((isolated_cache / "ft" / "config.json").read_text())
    assert cfg["init"] == str(pre) and cfg["similar_images"]["features"] == "pretrained h_I"
    assert cfg["preset"]["cmdpi"]["image_pool"] == 2          # the pretraining's sizes, without the flag
    assert cfg["selection"] == "a held-out 10% of train questions (seed 0)"
    # another --seed keeps the pretraining's held-out slice: its answers were never trained on
    assert main(["train", *common, "--init", str(pre), "--out", str(isolated_cache / "ft2"),
                 "--workdir", str(isolated_cache / "fw2"), "--seed", "3"]) == 0
    capsys.readouterr()
    cfg2 = json.loads((isolated_cache / "ft2" / "config.json").read_text())
    assert cfg2["selection"] == cfg["selection"] and cfg2["preset"]["train"]["seed"] == 3
    # a refit may hold out nothing; another slice would be one the pretraining trained answers on
    assert main(["train", *common, "--init", str(pre), "--out", str(isolated_cache / "ft1"), "--val-fraction", "0.2"]) == 2
    assert "hold out the same slice or none" in capsys.readouterr().err
    assert main(["train", *common, "--init", str(pre), "--out", str(isolated_cache / "ft0"),
                 "--workdir", str(isolated_cache / "fw0"), "--val-fraction", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["selected_on"].startswith("none: all of train")
    assert main(["train", *common, "--init", str(pre), "--out", str(isolated_cache / "ft1"), "--image-pool", "1"]) == 2
    assert "pretrained with 2" in capsys.readouterr().err
    rc = main(["predict", "--checkpoint", str(isolated_cache / "ft"), "--image",
               str(next((root / "images").iterdir())), "--question", "Is this normal?", "--json"])
    assert rc == 0 and "answer" in json.loads(capsys.readouterr().out)
