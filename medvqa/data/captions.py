"""Caption data for CMDPI pretraining (DESIGN §4.3).

The paper pretrains on ROCO captions and PMC-VQA; neither is installable here. So: a JSONL reader
for users who have captions (`{"image": path, "caption": text}` per line, ROCO-style), and a
pseudo-caption corpus built from a dataset's *training* annotations only — never a test record:
  SLAKE:   "<modality> of the <location>: <organs and lesions in the image's detection.json>"
  VQA-RAD: "<modality> of the <organ>, <plane> plane", from the image organ and the train answers
           to open MODALITY / PLANE questions about the same image.
Captions are Records with `extra["caption"] = True` and no answer, so they flow through the
same feature cache and collate as questions.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from medvqa.data.datasets import DataError, Record


def caption_record(image: str, caption: str, i: int, dataset: str) -> Record:
    return Record(qid=f"caption-{i}", image=str(image), question=caption, answer="", answer_type="CAPTION",
                  split="train", dataset=dataset, extra={"caption": True})


def read_captions_jsonl(path) -> tuple[list[Record], list[str]]:
    """-> (caption records, problem lines). Image paths may be relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: caption file not found")
    records, problems = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            image, caption = Path(raw["image"]), str(raw["caption"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            problems.append(f"{path.name} line {n}: needs a JSON object with image and caption ({e})")
            continue
        image = image if image.is_absolute() else path.parent / image
        if not caption:
            problems.append(f"{path.name} line {n}: empty caption")
        elif not image.is_file():
            problems.append(f"{path.name} line {n}: image {image} not found")
        else:
            records.append(caption_record(image, caption, len(records), "captions"))
    return records, problems


def _slake_caption(image: str, recs: list[Record]) -> str:
    det = Path(image).with_name("detection.json")
    labels = []
    if det.is_file():
        for box in json.loads(det.read_text()):
            labels += [k.lower() for k in box if k.lower() not in labels]
    r = recs[0]
    head = f"{r.extra.get('modality') or 'image'} of the {r.organ.lower() or 'body'}"
    return head + (": " + ", ".join(labels) if labels else "")


def _rad_caption(recs: list[Record]) -> str:
    def answers(qtype):
        return sorted({r.answer_norm for r in recs if r.question_type == qtype and r.answer_type == "OPEN"})
    modality, plane = answers("MODALITY"), answers("PLANE")
    text = f"{' / '.join(modality) or 'image'} of the {recs[0].organ.lower() or 'body'}"
    return text + (f", {' / '.join(plane)} plane" if plane else "")


def pseudo_captions(train_records: list[Record]) -> list[Record]:
    """One caption per training image, from training annotations only."""
    if any(r.split == "test" for r in train_records):
        raise ValueError("pseudo-captions must be built from training records only")
    by_image = defaultdict(list)
    for r in train_records:
        by_image[r.image].append(r)
    out = []
    for i, (image, recs) in enumerate(sorted(by_image.items())):
        text = _slake_caption(image, recs) if recs[0].dataset == "slake" else _rad_caption(recs)
        out.append(caption_record(image, text, i, recs[0].dataset))
    return out
