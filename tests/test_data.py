import io
import json

import numpy as np
import pytest
from PIL import Image

from medvqa.data import AnswerVocab, DataError, ImageError, load_image, load_split, normalize_answer
from medvqa.data.datasets import holdout


def test_normalize_answer():
    assert normalize_answer("  The Left  Lung. ") == "left lung"
    assert normalize_answer("Yes") == "yes"
    assert normalize_answer("two") == "2"
    assert normalize_answer("air?") == "air"
    assert normalize_answer("3.4 cm") == "3.4 cm"           # decimal point survives
    assert normalize_answer("mri-flair") == "mri flair"      # inner hyphen splits
    assert normalize_answer("1,000") == "1000"


def _png_bytes(im: Image.Image, fmt="PNG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16", "I", "CMYK"])
def test_load_image_modes(mode):
    a = (np.arange(64 * 48).reshape(48, 64) % 251).astype(np.uint8)
    im = Image.fromarray(a).convert(mode) if mode not in ("I;16", "I") else Image.fromarray((a.astype(np.uint16) * 200)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I" else "PNG")
    out = load_image(_png_bytes(im, fmt))
    assert out.mode == "RGB" and out.size == (64, 48)
    g = np.asarray(out)[..., 0].astype(int)
    assert g.max() > 100 and g.std() > 10  # 16-bit data was rescaled, not clipped to white


def test_load_image_exif_orientation():
    im = Image.new("L", (40, 20), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = load_image(_png_bytes(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_load_image_dicom(tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    px = np.tile(np.linspace(-1000, 1000, 32, dtype=np.float32), (16, 1)).astype(np.int16)
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.WindowCenter, ds.WindowWidth = 0, 400  # soft-tissue window: outside it saturates
    ds.PixelData = px.tobytes()
    ds.save_as(str(tmp_path / "x.dcm"), enforce_file_format=True)
    out = np.asarray(load_image(tmp_path / "x.dcm"))[..., 0]
    assert out.shape == (16, 32)
    assert out[0, 0] == 0 and out[0, -1] == 255          # clipped by the window
    assert 0 < out[0, 16] < 255                          # inside the window: grey
    from pydicom.dataelem import DataElement

    ds[0x00281050] = DataElement(0x00281050, "LO", "abcdef")   # WindowCenter, as a broken writer leaves it
    ds.save_as(str(tmp_path / "bad.dcm"), enforce_file_format=True)
    with pytest.raises(ImageError, match="bad.dcm: DICOM WindowCenter is not a number"):
        load_image(tmp_path / "bad.dcm")


@pytest.mark.parametrize("payload,msg", [(b"", "empty"), (b"not an image at all", "not a readable image"),
                                         (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "not a readable image")])
def test_load_image_bad(payload, msg):
    with pytest.raises(ImageError, match=msg):
        load_image(payload, name="upload.png")


def test_load_image_missing(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "nope.jpg")


def _rad_fixture(root, records, split_file="testset.json"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (80, 80, 80)).save(root / "images" / "a.jpg")
    (root / split_file).write_text(json.dumps(records))


def test_ovqa_reader_and_bad_records(tmp_path):
    ok = {"qid": 1, "image_name": "a.jpg", "image_organ": "HAND", "answer": "Yes", "answer_type": "CLOSED ",
          "question_type": "ABN", "question": "Is there a fracture?"}
    bad = [dict(ok, qid=2, question="  "), dict(ok, qid=3, image_name="missing.jpg"),
           dict(ok, qid=4, answer_type="MAYBE"), "not a record"]
    _rad_fixture(tmp_path, [ok, *bad])
    sp = load_split("ovqa", tmp_path, "test")
    assert [r.qid for r in sp.records] == ["1"]
    assert sp.records[0].answer_type == "CLOSED" and sp.records[0].organ == "HAND"
    assert len(sp.problems) == 4
    assert any("record 2: empty question" in p for p in sp.problems)
    assert any("record 3: image" in p and "not found" in p for p in sp.problems)


def test_missing_root_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="root not found"):
        load_split("vqa-rad", tmp_path / "nope", "test")
    (tmp_path / "testset.json").write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        load_split("vqa-rad", tmp_path, "test")


def test_folder_csv(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "cases.csv").write_text("image,question,answer\na.png,Is this normal?,no\na.png,Which organ?,Liver\n")
    sp = load_split("folder", tmp_path, "test")
    assert [r.answer_type for r in sp.records] == ["CLOSED", "OPEN"]  # inferred from yes/no


def test_vocab_and_holdout():
    from medvqa.data import Record

    recs = [Record(str(i), f"img{i % 5}", "q?", a, "OPEN") for i, a in enumerate(["y", "x", "x", "z", "y", "x"])]
    v = AnswerVocab.build(recs[:4])
    assert v.answers == ["x", "y", "z"]                  # by frequency, then alphabetically
    assert v.encode("z") == 2 and v.encode("zzz") == -1
    assert v.oov([Record("x", "i", "q", "zzz", "OPEN")]) == 1
    train, held = holdout(recs, 0.5, seed=0)
    assert len(held) == 3 and len(train) == 3 and not {r.qid for r in train} & {r.qid for r in held}
    assert holdout(recs, 0.5, seed=0)[1] == held                             # fixed by the seed


def test_folder_split_column(tmp_path):
    from medvqa.data import dataset_splits

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = ["image,question,answer,split"] + [f"a.png,Question {i}?,{'yes' if i % 2 else 'liver'},{s}"
                                              for i, s in enumerate(["train"] * 6 + ["test"] * 2)]
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    assert dataset_splits("folder", tmp_path) == ("train", "test")
    assert len(load_split("folder", tmp_path, "train")) == 6 and len(load_split("folder", tmp_path, "test")) == 2
