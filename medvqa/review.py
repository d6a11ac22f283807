"""Radiologist review records: one row per (reviewer, case, model), in SQLite (WAL) under the
user data dir ($MEDVQA_DATA overrides), so a review survives restarts and several app processes
can write at once. Each row keeps the saliency map the reviewer was shown (a PNG beside the
database, its path and method in the row) and whether they marked it as pointing at the wrong
place. Agreement per model, Cohen's κ between two reviewers, CSV export."""
from __future__ import annotations

import csv
import hashlib
import os
import sqlite3
import time
from pathlib import Path

VERDICTS = ("agree", "disagree", "corrected")
COLUMNS = ("reviewer", "source", "qid", "image", "question", "ground_truth", "model", "model_answer", "verdict",
           "corrected_answer", "comment", "updated", "map_method", "map_png", "map_wrong")
ADDED = {"map_method": "TEXT DEFAULT ''", "map_png": "TEXT DEFAULT ''",   # columns newer than the first schema,
         "map_wrong": "INTEGER DEFAULT 0"}                                  # added to an older database on open


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

    def record(self, reviewer: str, source: str, qid: str, model: str, verdict: str, *, image="", question="",
               ground_truth="", model_answer="", corrected_answer="", comment="", map_image=None, map_method="",
               map_wrong: bool = False):
        """`map_image`: the saliency overlay (PIL image) the reviewer was shown, kept as a PNG."""
        reviewer = reviewer.strip()
        if not reviewer:
            raise ValueError("enter a reviewer name first")
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        if verdict == "corrected" and not corrected_answer.strip():
            raise ValueError(f"{model}: a corrected verdict needs the corrected answer")
        png = self._save_map(map_image, reviewer, source, str(qid), model) if map_image is not None else ""
        row = (reviewer, source, str(qid), image, question, ground_truth, model, model_answer, verdict,
               corrected_answer.strip(), comment.strip(), time.strftime("%Y-%m-%dT%H:%M:%S"), map_method, png,
               int(bool(map_wrong)))
        with self._db() as db:
            db.execute(f"INSERT OR REPLACE INTO reviews ({', '.join(COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(COLUMNS))})", row)

    def _save_map(self, im, *key) -> str:
        """One PNG per (reviewer, source, case, model), replaced with the verdict; -> its path."""
        out = self.maps_dir / (hashlib.sha1("\0".join(key).encode()).hexdigest()[:20] + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.png")
        im.save(tmp)
        os.replace(tmp, out)
        return str(out)

    def reviewed(self, reviewer: str, source: str) -> set[str]:
        """Case ids this reviewer has recorded for `source` (to resume where they left off)."""
        with self._db() as db:
            return {r[0] for r in db.execute("SELECT DISTINCT qid FROM reviews WHERE reviewer=? AND source=?",
                                             (reviewer.strip(), source))}

    def rows(self, source: str | None = None) -> list[dict]:
        q, args = f"SELECT {', '.join(COLUMNS)} FROM reviews", ()
        if source:
            q, args = q + " WHERE source=?", (source,)
        with self._db() as db:
            return [dict(zip(COLUMNS, r)) for r in db.execute(q + " ORDER BY source, qid, model, reviewer", args)]

    def export_csv(self, out: Path, source: str | None = None) -> Path:
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(self.rows(source))
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
