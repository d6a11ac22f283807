"""Bad input to the app's handlers, at function level (no server): each is refused with a message a
user can act on, and nothing outside an upload is read."""
import json
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from medvqa.app import common
from medvqa.data import DataError


@pytest.fixture(autouse=True)
def _own_temp(tmp_path, monkeypatch):   # unzip_cases keeps one folder per zip content, per process
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(common, "_cases_dir", None)
    (tmp_path / "tmp").mkdir()


def _zip(tmp_path, rows, name="cases.zip", images=("a.png",)):
    z = tmp_path / name
    with zipfile.ZipFile(z, "w") as zf:
        for im in images:
            path = tmp_path / im
            Image.new("RGB", (8, 8)).save(path)
            zf.write(path, im)
        zf.writestr("cases.csv", "image,question,answer\n" + "".join(f"{r},Is it?,yes\n" for r in rows))
    return z


def test_unzip_cases_keeps_rows_inside_the_zip_and_reuses_its_folder(tmp_path):
    good = _zip(tmp_path, ["a.png"])
    first = common.unzip_cases(str(good))
    assert first.is_file() and common.unzip_cases(str(good)) == first   # one folder per distinct zip
    outside = str(tmp_path / "a.png")   # a real file, outside the zip
    for row in ("../../../../../../" + outside.lstrip("/"), outside):
        with pytest.raises(DataError, match="line 2: image .* lies outside the zip"):
            common.unzip_cases(str(_zip(tmp_path, [row], name="bad.zip")))


def test_unzip_cases_refuses_a_zip_that_unpacks_too_large(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "MAX_UNZIPPED", 100)
    with pytest.raises(DataError, match="unpacks to"):
        common.unzip_cases(str(_zip(tmp_path, ["a.png"], name="big.zip")))


def test_unzip_cases_skips_macos_resource_forks_and_names_the_csv_inside_the_zip(tmp_path):
    """Finder's zips carry __MACOSX/._cases.csv (binary), sorted before cases.csv."""
    z = _zip(tmp_path, ["a.png"], name="mac.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("__MACOSX/._cases.csv", b"\x00\x05\x16\x07\xff\xfe" * 10)
        zf.writestr(".hidden.csv", b"\xff\xfe")
    assert common.unzip_cases(str(z)).relative_to(common._cases_root()).parts[1:] == ("cases.csv",)
    bad = tmp_path / "bad-csv.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("cases.csv", b"image,question\n\xff\xfe\x00")
    with pytest.raises(DataError, match=r"^cases\.csv: not a readable CSV") as e:
        common.unzip_cases(str(bad))
    assert str(tmp_path) not in str(e.value)


def test_unzipped_cases_live_in_a_private_folder_and_the_least_recently_used_go(tmp_path, monkeypatch):
    import os
    import stat

    a, b = _zip(tmp_path, ["a.png"], name="a.zip"), _zip(tmp_path, ["a.png", "a.png"], name="b.zip")
    first = common.unzip_cases(str(a))
    root = common._cases_root()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and first.is_relative_to(root)
    os.utime(first.parent, (1, 1))   # long unused
    monkeypatch.setattr(common, "MAX_UNZIPPED_KEPT", sum(f.stat().st_size for f in first.parent.rglob("*")) + 50)
    second = common.unzip_cases(str(b))
    assert second.is_file() and not first.exists()   # room made by removing the older zip
    with pytest.raises(DataError, match="uploaded in the last hour"):   # b is in use: it stays, a must wait
        common.unzip_cases(str(a))
    common.touch_cases(second.parent / "a.png")
    os.utime(second.parent, (1, 1))                  # a review left long ago
    assert common.unzip_cases(str(a)).is_file() and not second.exists()   # and a unpacks again when sent again


def test_api_files_must_be_uploads():
    """A bare string in an API call would name any file on the server, past Gradio's upload checks."""
    from gradio.utils import get_upload_folder

    uploaded = str(Path(get_upload_folder()) / "0123abcd" / "x.png")
    assert common.api_file({"path": uploaded, "meta": {"_type": "gradio.FileData"}}, "image") == uploaded
    for value, says in (("/etc/passwd", "not a path on the server"), (None, "send the image file"),
                        ({"path": "/etc/passwd"}, "was not uploaded"),
                        ({"path": f"{get_upload_folder()}/../../etc/passwd"}, "was not uploaded"),
                        ({"path": 5}, "send the image file")):
        with pytest.raises(gr.Error, match=says):
            common.api_file(value, "image")


def test_an_unreadable_upload_says_why_in_the_preview(tmp_path):
    from medvqa.app.ask import _preview

    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(gr.Error, match="not a readable image"):
        _preview(str(tmp_path / "text.png"))
    assert _preview(None) == (None, "")


def test_finetune_api_takes_an_upload_not_a_server_path():
    from medvqa.app import finetune

    with pytest.raises(gr.Error, match="not a path on the server"):
        finetune.finetune_api("baseline", "uploaded zip", "/tmp/cases.zip", "tiny", 1, 1e-3, [], 0)


def test_a_zip_python_cannot_unpack_says_so(tmp_path):
    """An encrypted member or a compression zipfile lacks raised RuntimeError / NotImplementedError."""
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("cases.csv", "image,question,answer\n")
    raw = plain.read_bytes()
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    for name, patch in (("encrypted.zip", {local + 6: raw[local + 6] | 1, central + 8: raw[central + 8] | 1}),
                        ("method99.zip", {local + 8: 99, central + 10: 99})):
        b = bytearray(raw)
        for at, v in patch.items():
            b[at] = v
        (tmp_path / name).write_bytes(bytes(b))
        with pytest.raises(DataError, match="cannot be unpacked here"):
            common.unzip_cases(str(tmp_path / name))


def test_a_broken_user_checkpoint_is_passed_over(tmp_path, monkeypatch):
    """One folder with a bad config.json (or no weights) made every Ask fail."""
    import shutil

    from tests.helpers import tiny_checkpoint

    monkeypatch.setenv("MEDVQA_DATA", str(tmp_path / "data"))
    mine = common.user_checkpoints_dir()
    good = shutil.copytree(tiny_checkpoint(tmp_path / "t"), mine / "good")
    dataset = json.loads((good / "config.json").read_text()).get("dataset")
    (mine / "bad-json").mkdir()
    (mine / "bad-json" / "config.json").write_text("{not json")
    (mine / "latin-1").mkdir()
    (mine / "latin-1" / "config.json").write_bytes('{"dataset": "caf\xe9"}'.encode("latin-1"))
    shutil.copytree(good, mine / "no-weights")
    (mine / "no-weights" / "model.safetensors").unlink()
    assert common.checkpoints_for(dataset)[-1] == good


def test_a_damaged_zip_says_so(tmp_path):
    """Corrupt deflate data raised zlib.error out of the handler."""
    z = tmp_path / "deflated.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cases.csv", "image,question,answer\n" + "a.png,Is it?,yes\n" * 200)
    b = bytearray(z.read_bytes())
    start = b.find(b"PK\x03\x04") + 30 + len("cases.csv")
    b[start + 2:start + 12] = b"\xff" * 10
    (tmp_path / "damaged.zip").write_bytes(bytes(b))
    with pytest.raises(DataError, match="cannot be unpacked here .*invalid"):
        common.unzip_cases(str(tmp_path / "damaged.zip"))


def test_ask_refuses_a_dataset_that_is_not_a_name_and_status_survives_a_removed_checkpoint(tmp_path):
    from medvqa.app import finetune
    from medvqa.app.ask import ask_json

    for dataset in (["vqa-rad"], {"a": 1}):   # the API passes JSON through unchanged
        with pytest.raises(gr.Error, match="unknown dataset"):
            ask_json(None, "Is it?", dataset)
    gone = finetune._status_markdown({"status": "done", "name": "run", "out": str(tmp_path / "gone")})
    assert "is no longer there" in gone
