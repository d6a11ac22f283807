"""Readers for VQA-RAD, SLAKE (English), OVQA and a plain CSV/folder of cases.

Every reader returns `(records, problems)`: the good `Record`s and one line per bad record
(file, record id, reason), so callers report what was skipped instead of dropping it silently.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A dataset that cannot be read at all (missing root, unreadable split file)."""


class InputError(ValueError):
    """A question, answer or setting a caller passed that a model or a metric cannot take (an empty
    question, an answer outside the vocabulary, a layer the backbone lacks): the caller's to fix."""


# The VQA evaluation's answer normalisation (punctuation, number words, articles). With it the
# VQA-RAD train+test vocabulary has M3AE's 498 classes and 44 test answers fall outside the
# train-only vocabulary, matching the published protocol; plain lower-casing gives 517 / 47.
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGITS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
           "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_answer(a) -> str:
    """Lower-case, strip punctuation, map number words to digits, drop articles (VQA eval)."""
    a = re.sub(r"\s+", " ", str(a)).strip().lower()
    out = a
    for p in _PUNCT:
        # A mark touching a space (or inside '1,000') is dropped; one inside a word splits it.
        out = out.replace(p, "" if (p + " " in a or " " + p in a or _COMMA_NUMBER.search(a)) else " ")
    out = _PERIOD.sub("", out)
    return " ".join(_DIGITS.get(w, w) for w in out.split() if w not in _ARTICLES)


CLOSED_ANSWERS = {"yes", "no"}


@dataclass
class Record:
    qid: str
    image: str              # absolute path of the image file
    question: str
    answer: str             # raw answer, for display
    answer_type: str        # "OPEN" | "CLOSED"
    organ: str = ""
    question_type: str = ""
    split: str = ""
    dataset: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def answer_norm(self) -> str:
        return normalize_answer(self.answer)


@dataclass
class Split:
    """One split of a dataset, with the lines for the records that were skipped."""
    records: list
    problems: list

    def __len__(self):
        return len(self.records)


def _load_json_list(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return data


def _make(raw: dict, *, path: Path, idx: int, image: Path, answer_type, organ, qtype,
          split: str, dataset: str, problems: list, extra=None, qid=None) -> Record | None:
    """Validate one record; on failure append a problem line and return None."""
    rid = raw.get("qid", idx) if qid is None else qid
    where = f"{path.name} record {rid}"
    question = str(raw.get("question") or "").strip()
    answer = raw.get("answer")
    if not question:
        problems.append(f"{where}: empty question")
        return None
    if answer is None or not str(answer).strip():
        problems.append(f"{where}: empty answer")
        return None
    atype = str(answer_type or "").strip().upper()
    if not atype:
        atype = "CLOSED" if normalize_answer(answer) in CLOSED_ANSWERS else "OPEN"
    if atype not in ("OPEN", "CLOSED"):
        problems.append(f"{where}: unknown answer type {answer_type!r}")
        return None
    if not image.is_file():
        problems.append(f"{where}: image {image} not found")
        return None
    return Record(qid=str(rid), image=str(image), question=question, answer=str(answer).strip(),
                  answer_type=atype, organ=str(organ or "").strip(), question_type=str(qtype or "").strip(),
                  split=split, dataset=dataset, extra=extra or {})


def _check_root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    return root


def _records(items, path, make) -> Split:
    problems, out = [], []
    for i, raw in enumerate(items):
        if not isinstance(raw, dict):
            problems.append(f"{path.name} record {i}: not a JSON object")
            continue
        r = make(raw, i, problems)
        if r is not None:
            out.append(r)
    return Split(out, problems)


# VQA-RAD and OVQA share the MEVF/M3AE JSON layout.
RAD_FILES = {"train": "trainset.json", "validate": "valset.json", "test": "testset.json"}


def read_rad_layout(root, split: str, dataset: str = "vqa-rad") -> Split:
    root = _check_root(root)
    if split not in RAD_FILES:
        raise DataError(f"{dataset} has splits {', '.join(RAD_FILES)}, not {split!r}")
    path = root / RAD_FILES[split]
    img_dir = next((root / d for d in ("images", "img", "imgs") if (root / d).is_dir()), root / "images")

    def make(raw, i, problems):
        return _make(raw, path=path, idx=i, image=img_dir / str(raw.get("image_name", "")),
                     answer_type=raw.get("answer_type"), organ=raw.get("image_organ"),
                     qtype=raw.get("question_type"), split=split, dataset=dataset, problems=problems,
                     extra={"phrase_type": raw.get("phrase_type", "")})
    return _records(_load_json_list(path), path, make)


SLAKE_FILES = {"train": "train.json", "validate": "validate.json", "test": "test.json"}


def read_slake(root, split: str) -> Split:
    root = _check_root(root)
    if split not in SLAKE_FILES:
        raise DataError(f"slake has splits {', '.join(SLAKE_FILES)}, not {split!r}")
    path = root / SLAKE_FILES[split]
    items = [r for r in _load_json_list(path) if not isinstance(r, dict) or r.get("q_lang", "en") == "en"]

    def make(raw, i, problems):
        return _make(raw, path=path, idx=i, image=root / "imgs" / str(raw.get("img_name", "")),
                     answer_type=raw.get("answer_type"), organ=raw.get("location"),
                     qtype=raw.get("content_type"), split=split, dataset="slake", problems=problems,
                     extra={"modality": raw.get("modality", ""), "img_id": raw.get("img_id")})
    return _records(items, path, make)


def _folder_csv(root) -> Path:
    root = Path(root)
    if root.is_dir():
        csvs = [root / "cases.csv"] if (root / "cases.csv").is_file() else sorted(root.glob("*.csv"))
        if len(csvs) != 1:
            raise DataError(f"{root}: expected cases.csv (or exactly one .csv file) in the folder")
        path = csvs[0]
    elif root.is_file():
        path = root
    else:
        raise DataError(f"{root}: dataset root not found")
    return path


def csv_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None


def read_folder(root, split: str = "test") -> Split:
    """A CSV of image,question,answer[,answer_type][,organ][,question_type][,split] rows.

    `root` is the CSV file itself or a folder holding `cases.csv` (or a single *.csv); image
    paths are relative to the CSV's folder. With a `split` column its rows are filtered by it;
    without one the whole file is the split asked for (a reviewer's case list, or a training set).
    """
    path = _folder_csv(root)
    rows = csv_rows(path)
    if rows and "split" in rows[0]:
        rows = [r for r in rows if (r.get("split") or "").strip().lower() == split]
    need = {"image", "question", "answer"}
    if rows and not need <= set(rows[0]):
        raise DataError(f"{path}: CSV needs the columns image, question, answer")

    def make(raw, i, problems):
        return _make(raw, path=path, idx=i, qid=raw.get("qid") or str(i),
                     image=path.parent / str(raw.get("image", "")), answer_type=raw.get("answer_type"),
                     organ=raw.get("organ"), qtype=raw.get("question_type"), split=split,
                     dataset="folder", problems=problems)
    return _records(rows, path, make)


DATASETS = {
    "vqa-rad": (lambda root, split: read_rad_layout(root, split, "vqa-rad"), ("train", "test")),
    "ovqa": (lambda root, split: read_rad_layout(root, split, "ovqa"), ("train", "validate", "test")),
    "slake": (read_slake, ("train", "validate", "test")),
    "folder": (read_folder, ("train", "validate", "test")),
}


def dataset_splits(name: str, root) -> tuple:
    """The splits a dataset has on disk (OVQA's validation file is optional; a folder CSV has
    the values of its `split` column, or is one training split)."""
    _, splits = DATASETS[name]
    if name == "folder":
        rows = csv_rows(_folder_csv(root))
        if rows and "split" in rows[0]:
            return tuple(s for s in ("train", "validate", "test")
                         if any((r.get("split") or "").strip().lower() == s for r in rows))
        return ("train",)
    if name == "ovqa":
        return tuple(s for s in splits if (Path(root) / RAD_FILES[s]).is_file())
    return splits


def load_split(name: str, root, split: str) -> Split:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    reader, _ = DATASETS[name]
    return reader(root, split)


# The published protocols select the best epoch on validation; VQA-RAD has none, so we hold out
# a fixed, seeded slice of train and never look at the test split for selection. The slice is
# drawn by question, as VQA-RAD's own test split is (all its test images also occur in train):
# a slice drawn by image made validation far harder than the test and picked too-early epochs.
def holdout(records: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    import random

    if fraction <= 0:
        return records, []
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    held = set(idx[: max(1, int(round(fraction * len(records))))])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])
