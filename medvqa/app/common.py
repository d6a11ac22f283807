"""What every tab shares: the shipped checkpoints per dataset, the example gallery, the built-in
datasets' folder, the safe unpacking of uploaded case zips and the captioned saliency figure."""
from __future__ import annotations

import atexit
import hashlib
import html
import json
import lzma
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

from medvqa.calibration import percent
from medvqa.data import DataError
from medvqa.predict import SHIPPED, checkpoints_dir

ASSETS = SHIPPED.parent
DATASETS = {"vqa-rad": "VQA-RAD", "slake": "SLAKE", "folder": "your cases (fine-tuned here)"}
N_SLOTS = 4           # model columns: CMI-MTL, CMDPI, baseline, and the newest fine-tuned here
MODEL_ORDER = ("cmi-mtl", "cmdpi", "baseline")   # shown left to right when present
MODEL_TITLES = {"cmi-mtl": "CMI-MTL", "cmdpi": "CMDPI", "baseline": "Baseline"}
BUILTIN = {"vqa-rad": "vqa_rad", "slake": "slake"}   # dataset -> its folder under data_root()


def data_root() -> Path:
    return Path(os.environ.get("MEDVQA_DATA_ROOT", "../shared/data"))


def user_checkpoints_dir() -> Path:
    """Where the Fine-tune tab writes its checkpoints."""
    from medvqa.review import data_dir

    return data_dir() / "checkpoints"


def checkpoints_for(dataset: str) -> list[Path]:
    """Shipped checkpoints trained on `dataset`, papers' models first, then the newest one
    fine-tuned in this app on the same dataset."""
    found = [p for p in (checkpoints_dir() / f"{m}-{dataset}" for m in MODEL_ORDER) if (p / "config.json").is_file()]
    mine = sorted((p.parent for p in user_checkpoints_dir().glob("*/config.json")
                   if (c := _readable(p.parent)) and c.get("dataset") == dataset), key=lambda p: p.stat().st_mtime)
    return found + [mine[-1]] if mine else found


def _readable(ckpt: Path) -> dict | None:
    """A user checkpoint's config, or None when the folder is not a loadable checkpoint (a run killed
    mid-save, a config edited by hand): one broken folder must not take every answer down with it."""
    from medvqa.train.checkpoint import CheckpointError, read_config

    try:
        return read_config(ckpt)
    except (CheckpointError, OSError):
        return None


def model_title(ckpt: Path) -> str:
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    return MODEL_TITLES.get(cfg["model"], cfg["model"])


def saliency_figure(p, im, question: str, method: str, target: str | None = None, opacity: float = 0.5):
    """The map the app shows: `method`'s saliency (Predictor `p`) for `target` (default: the predicted
    answer), blended over the image under a caption naming the method and the answer, with a colour bar."""
    return saliency_figures([p], im, question, [method], [target], opacity)[0]


def saliency_figures(preds, im, question: str, methods, targets, opacity: float = 0.5, predicted=None) -> list:
    """`saliency_figure` of several Predictors at once (medvqa.predict.explain_many: models on one
    backbone share its pass). `predicted`: the models' answers when already known (else one head
    pass each finds them): the map of "the predicted answer" is then the very answer shown."""
    from medvqa.explain import BACKBONE_ONLY, GRADIENT_FREE, captioned
    from medvqa.predict import explain_many

    predicted = predicted or [None if m in GRADIENT_FREE or t else p.answer_batch([im], [question], 1, False)[0].text
                              for p, m, t in zip(preds, methods, targets)]
    cams = explain_many(preds, im, question, methods, [t or a for t, a in zip(targets, predicted)])
    figs = []
    for m, t, a, cam in zip(methods, targets, predicted, cams):
        caption = (f"{m} (the image backbone's: any question, any answer)" if m in BACKBONE_ONLY
                   else f"{m} (question-conditioned, any answer)" if m in GRADIENT_FREE
                   else f"{m} for {'answer' if t else 'predicted answer'} '{t or a}'")
        figs.append(captioned(im, caption, cam, opacity))
    return figs


def examples() -> list[dict]:
    path = ASSETS / "examples" / "examples.json"
    if not path.is_file():
        return []
    out = []
    for e in json.loads(path.read_text()):
        e["path"] = str(ASSETS / "examples" / e["image"])
        out.append(e)
    return out


def api_file(value, what: str) -> str:
    """The path of a file sent to an API endpoint as FileData (gradio_client's handle_file), which Gradio
    has checked and copied into its upload folder. Anything else is refused: a bare string, or a dict
    whose path lies outside that folder (Gradio passes a dict without FileData's meta tag through
    unchecked), would name any file on the server."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        if Path(value["path"]).resolve().is_relative_to(Path(get_upload_folder()).resolve()):
            return value["path"]
        raise gr.Error(f"the {what} was not uploaded: send it with gradio_client.handle_file")
    if value is None or isinstance(value, dict):
        raise gr.Error(f"send the {what} file")
    raise gr.Error(f"send the {what} as a file (gradio_client.handle_file), not a path on the server")


MAX_UNZIPPED = 2 * 1024 ** 3        # bytes one cases zip may unpack to (a zip bomb fills the disk)
MAX_UNZIPPED_KEPT = 4 * 1024 ** 3   # bytes of unpacked zips kept at once; the least recently used go first
IN_USE_S = 3600                     # a zip used this recently (a review open on it, a run reading it) stays
_cases_dir: Path | None = None
_cases_lock = threading.Lock()      # one unpacking or removal at a time: a removal must not race a reuse


def _cases_root() -> Path:
    """This process's own folder of unpacked zips (private, unlike a name in the shared temp folder;
    made again if a temp cleaner removed it), removed at exit."""
    global _cases_dir
    if _cases_dir is None or not _cases_dir.is_dir():
        _cases_dir = Path(tempfile.mkdtemp(prefix="medvqa-cases-"))
        atexit.register(shutil.rmtree, _cases_dir, ignore_errors=True)
    return _cases_dir


def _sha1(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _make_room(root: Path, size: int):
    """Remove the least recently used unpacked zips, none used in the last IN_USE_S, until `size` more
    bytes fit in MAX_UNZIPPED_KEPT; refuse the upload when only zips in use would have to go."""
    kept = sorted((d for d in root.iterdir() if d.is_dir() and ".tmp-" not in d.name), key=lambda d: d.stat().st_mtime)
    used = {d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in kept}
    total = sum(used.values())
    for d in kept:
        if total + size <= MAX_UNZIPPED_KEPT or time.time() - d.stat().st_mtime < IN_USE_S:
            break
        shutil.rmtree(d, ignore_errors=True)
        total -= used[d]
    if total + size > MAX_UNZIPPED_KEPT:
        raise DataError(f"the server holds {total / 1e9:.1f} GB of cases uploaded in the last hour; "
                        "try again later, or send a smaller zip")


def touch_cases(image) -> None:
    """Mark the unpacked zip holding `image` as in use (Review, as it shows a case from it)."""
    if _cases_dir is None:
        return
    try:
        rel = Path(image).resolve().relative_to(_cases_dir.resolve())
        os.utime(_cases_dir / rel.parts[0])
    except (ValueError, IndexError, OSError):   # not from a zip, or already gone
        pass


def _cases_csv(dest: Path) -> Path:
    """The zip's case list: cases.csv nearest the top, else the first CSV; macOS's __MACOSX/ and
    dot-files (resource forks named like the CSV) are not candidates."""
    csvs = [p for p in dest.rglob("*.csv")
            if not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(dest).parts)]
    if not csvs:
        raise DataError("the zip holds no CSV of image,question,answer rows")
    return min(csvs, key=lambda p: (p.name != "cases.csv", len(p.parts), str(p)))


def unzip_cases(path: str) -> Path:
    """Extract an uploaded zip safely -> its CSV. Refused: absolute or parent paths among its members, more
    than MAX_UNZIPPED bytes unpacked, and CSV rows whose image lies outside the zip (they would read the
    server's files). One folder per distinct zip (named by its hash), so uploading it again reuses it."""
    from medvqa.data.datasets import csv_rows

    with _cases_lock:
        root = _cases_root()
        dest = root / _sha1(path)
        _unpack(path, root, dest)
    csv_path = _cases_csv(dest)
    where = csv_path.relative_to(dest)
    try:
        rows = csv_rows(csv_path)
    except DataError as e:   # named inside the zip, not by the server's folder
        raise DataError(str(e).replace(str(csv_path), str(where), 1)) from None
    for i, row in enumerate(rows, 2):   # line 1 is the header
        image = str(row.get("image") or "")
        if image and not (csv_path.parent / image).resolve().is_relative_to(dest.resolve()):
            raise DataError(f"{where} line {i}: image {image!r} lies outside the zip; "
                            "give paths inside it, relative to the CSV")
    return csv_path


def _unpack(path: str, root: Path, dest: Path):
    """The zip at `path` into `dest` (kept if there already, then marked as just used)."""
    if dest.is_dir():
        os.utime(dest)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=root))
        try:
            with zipfile.ZipFile(path) as z:
                for name in z.namelist():
                    # a prefix test would let "../dest-x" through
                    if not (tmp / name).resolve().is_relative_to(tmp.resolve()):
                        raise DataError(f"unsafe path in zip: {name}")
                size = sum(i.file_size for i in z.infolist())
                if size > MAX_UNZIPPED:
                    raise DataError(f"the zip unpacks to {size / 1e9:.1f} GB; the limit is {MAX_UNZIPPED / 1e9:.1f} GB")
                _make_room(root, size)
                z.extractall(tmp)
        except zipfile.BadZipFile as e:   # not a zip, or a member failing its CRC
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"the upload is not a readable zip ({e}); expected cases.csv + images") from None
        # encrypted members, a compression zipfile lacks, damaged deflate / bzip2 / lzma data, a full disk
        except (RuntimeError, NotImplementedError, zlib.error, EOFError, lzma.LZMAError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"the zip cannot be unpacked here ({e}): zip the cases again without a password, "
                            "with ordinary (deflate) compression") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(dest)
        except OSError:   # the same zip unpacked by another process meanwhile: use that one
            shutil.rmtree(tmp, ignore_errors=True)


def escape_md(text) -> str:
    """Text from a user or a dataset (question, comment, reviewer name, answer), shown literally in a
    gr.Markdown: its Markdown punctuation backslash-escaped, then <, > and & as HTML entities."""
    return html.escape(re.sub(r"([\\`*_{}\[\]()#+\-.!|~$])", r"\\\1", str(text)), quote=False)


def answer_markdown(a: dict) -> str:
    """One model's answer (Answer.to_dict()) as the app shows it: the honest percent, and under the
    confidence threshold marked uncertain with the runner-up beside it."""
    line = f"**{escape_md(a['answer'])}** ({percent(a['score'])})"
    if a["uncertain"] and len(a["top_k"]) > 1:
        ru, s = a["top_k"][1]
        line += f" · *uncertain*, runner-up: **{escape_md(ru)}** ({percent(s)})"
    elif a["uncertain"]:
        line += " · *uncertain*"
    return line


def top_k_markdown(top_k) -> str:
    """The top answers with their calibrated probabilities, as a small table."""
    rows = ["**Top answers**", "", "| answer | probability |", "|---|---|"]
    return "\n".join(rows + [f"| {escape_md(t)} | {percent(s)} |" for t, s in top_k])
