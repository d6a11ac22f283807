"""Bad input to the app's handlers, at function level (no server): each is refused with a message a
user can act on, and nothing outside an upload is read."""
import zipfile

import gradio as gr
import pytest
from PIL import Image

from medvqa.app import common
from medvqa.data import DataError


@pytest.fixture(autouse=True)
def _own_temp(tmp_path, monkeypatch):   # unzip_cases names its folders by content, in the temp folder
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
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


def test_api_files_must_be_uploads():
    """A bare string in an API call would name any file on the server, past Gradio's upload checks."""
    assert common.api_file({"path": "/tmp/gradio/x.png"}, "image") == "/tmp/gradio/x.png"
    for value, says in (("/etc/passwd", "not a path on the server"), (None, "send the image file")):
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
