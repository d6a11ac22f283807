"""Radiologist review records: one row per (reviewer, case, model), in SQLite (WAL) under the
user data dir ($MEDVQA_DATA overrides), so a review survives restarts and several app processes
can write at once. Each row keeps the saliency map the reviewer was shown (a PNG beside the
database, its path and method in the row) and whether they marked it as pointing at the wrong
place. Agreement per model, Cohen's κ between two reviewers, CSV export."""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import sqlite3
import tempfile
import time
from pathlib import Path

VERDICTS = ("agree", "disagree", "corrected")
COLUMNS = ("reviewer", "source", "qid", "image", "question", "ground_truth", "model", "model_answer", "verdict",
           "corrected_answer", "comment", "updated", "map_method", "map_png", "map_wrong")
ADDED = {"map_method": "TEXT DEFAULT ''", "map_png": "TEXT DEFAULT ''",   # columns newer than the first schema,
         "map_wrong": "INTEGER DEFAULT 0"}                                  # added to an older database on open
MAX_COMMENT = 2000   # characters
MAX_SHORT = 200      # characters of a reviewer name, a case id or a corrected answer
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")   # a spreadsheet reads a cell starting so as a formula


def _text(value, what: str, limit: int = MAX_SHORT) -> str:
    """Text from the UI or the API: None is empty; anything else but text, or longer than `limit`, is refused."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"the {what} must be text")
    if len(value.strip()) > limit:
        raise ValueError(f"the {what} has {len(value.strip()):,} characters; at most {limit:,}")
    return value


def data_dir() -> Path:
    if os.environ.get("MEDVQA_DATA"):
        return Path(os.environ["MEDVQA_DATA"])
    import platformdirs

    return Path(platformdirs.user_data_dir("medvqa"))


class ReviewStore:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else data_dir() / "reviews.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"CREATE TABLE IF NOT EXISTS reviews ({', '.join(COLUMNS)}, "
                       "PRIMARY KEY (reviewer, source, qid, model))")
            have = {r[1] for r in db.execute("PRAGMA table_info(reviews)")}
            for col, decl in ADDED.items():
                if col not in have:
                    db.execute(f"ALTER TABLE reviews ADD COLUMN {col} {decl}")

    def _db(self):
        # one short-lived connection per call: safe across Gradio's worker threads
        return sqlite3.connect(self.path, timeout=30)

    @property
    def maps_dir(self) -> Path:
        return self.path.parent / "review-maps"

    def record(self, reviewer: str, source: str, qid: str, model: str, verdict: str, **fields):
        """One verdict; `fields` as in `_checked`."""
        self.record_case(reviewer, source, qid, [{"model": model, "verdict": verdict, **fields}])

    def record_case(self, reviewer: str, source: str, qid: str, verdicts: list[dict]):
        """One case's verdicts (a dict per model: model, verdict and `_checked`'s fields), all or none:
        every one is checked before any map or row is written, and the rows go in one transaction, so a
        refused verdict never leaves the case half recorded (it would then count as reviewed)."""
        # the id is kept as the case list has it (stripped, it would never match the list on resume)
        reviewer, qid = _text(reviewer, "reviewer name").strip(), _text(None if qid is None else str(qid), "case id")
        if not reviewer:
            raise ValueError("enter a reviewer name first")
        if not qid.strip():
            raise ValueError("a case id (qid) is needed")
        checked = [self._checked(**v) for v in verdicts]
        rows, maps = [], []   # maps: (written temporary PNG, its place), moved in only once the rows are committed
        try:
            for r, im in checked:
                r.update(reviewer=reviewer, source=source, qid=qid, map_png="")
                if im is not None:
                    maps.append(self._write_map(im, reviewer, source, qid, r["model"]))
                    r["map_png"] = str(maps[-1][1])
                rows.append(tuple(r[c] for c in COLUMNS))
            with self._db() as db:   # commits all the rows, or rolls all back
                db.executemany(f"INSERT OR REPLACE INTO reviews ({', '.join(COLUMNS)}) "
                               f"VALUES ({', '.join('?' * len(COLUMNS))})", rows)
            for tmp, out in maps:
                os.replace(tmp, out)
        finally:
            for tmp, _ in maps:
                tmp.unlink(missing_ok=True)

    @staticmethod
    def _checked(model: str, verdict: str, *, image="", question="", ground_truth="", model_answer="",
                 corrected_answer="", comment="", map_image=None, map_method="", map_wrong: bool = False):
        """-> (one verdict's columns, its map image), or ValueError. `map_image`: the saliency overlay
        (PIL image) the reviewer was shown, kept as a PNG. None as text (from the API) counts as empty."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        corrected_answer = _text(corrected_answer, "corrected answer").strip()
        comment = _text(comment, "comment", MAX_COMMENT).strip()
        if verdict == "corrected" and not corrected_answer:
            raise ValueError(f"{model}: a corrected verdict needs the corrected answer")
        return dict(image=image, question=question, ground_truth=ground_truth, model=model, model_answer=model_answer,
                    verdict=verdict, corrected_answer=corrected_answer, comment=comment,
                    updated=time.strftime("%Y-%m-%dT%H:%M:%S"), map_method=map_method,
                    map_wrong=int(bool(map_wrong))), map_image

    def _write_map(self, im, *key) -> tuple[Path, Path]:
        """The PNG of (reviewer, source, case, model), written beside its place -> (temporary, place);
        the caller moves it in, replacing the earlier verdict's map."""
        out = self.maps_dir / (hashlib.sha1("\0".join(key).encode()).hexdigest()[:20] + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp.png", dir=out.parent)
        with os.fdopen(fd, "wb") as f:
            im.save(f, format="PNG")
        return Path(tmp), out

    def reviewed(self, reviewer: str, source: str) -> set[str]:
        """Case ids this reviewer has recorded for `source` (to resume where they left off)."""
        with self._db() as db:
            return {r[0] for r in db.execute("SELECT DISTINCT qid FROM reviews WHERE reviewer=? AND source=?",
                                             (_text(reviewer, "reviewer", math.inf).strip(), source))}

    def rows(self, source: str | None = None) -> list[dict]:
        q, args = f"SELECT {', '.join(COLUMNS)} FROM reviews", ()
        if source:
            q, args = q + " WHERE source=?", (source,)
        with self._db() as db:
            return [dict(zip(COLUMNS, r)) for r in db.execute(q + " ORDER BY source, qid, model, reviewer", args)]

    def csv_text(self, source: str | None = None) -> str:
        """The reviews as CSV. Text starting with =, +, -, @, a tab or a carriage return gets a leading
        ' in the export only (the store keeps it as typed), so a spreadsheet shows it rather than running
        it as a formula (e.g. a comment "=HYPERLINK(...)")."""
        f = io.StringIO()
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows({k: "'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else v for k, v in r.items()}
                    for r in self.rows(source))
        return f.getvalue()

    def export_csv(self, out: Path, source: str | None = None) -> Path:
        """`csv_text` written to `out` (whole: through a temp file of its own, then renamed)."""
        out, text = Path(out), self.csv_text(source)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
        with open(fd, "w", newline="", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
        return out

    def summary(self, source: str | None = None) -> dict:
        """Per model: n and % of verdicts that agree, and how many maps were marked wrong; Cohen's κ
        (agree vs not) for each pair of reviewers over the (case, model) items both reviewed."""
        rows = self.rows(source)
        per_model = {}
        for r in rows:
            m = per_model.setdefault(r["model"], {"n": 0, "agree": 0, "map_wrong": 0})
            m["n"] += 1
            m["agree"] += r["verdict"] == "agree"
            m["map_wrong"] += bool(r["map_wrong"])
        for m in per_model.values():
            m["agree_pct"] = round(100 * m["agree"] / m["n"], 1)
        by_reviewer = {}
        for r in rows:
            by_reviewer.setdefault(r["reviewer"], {})[(r["source"], r["qid"], r["model"])] = r["verdict"] == "agree"
        names, kappa = sorted(by_reviewer), {}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                shared = sorted(set(by_reviewer[a]) & set(by_reviewer[b]))
                if shared:
                    kappa[f"{a} vs {b}"] = {"n": len(shared), "kappa": cohen_kappa(
                        [by_reviewer[a][k] for k in shared], [by_reviewer[b][k] for k in shared])}
        return {"models": per_model, "kappa": kappa, "reviewers": names}


def cohen_kappa(a: list[bool], b: list[bool]) -> float | None:
    """κ = (p_o − p_e) / (1 − p_e) for two raters' binary labels; None when p_e = 1 (undefined)."""
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    return None if p_e == 1 else round((p_o - p_e) / (1 - p_e), 3)
