"""Radiologist review records: one row per (reviewer, case, model), in SQLite (WAL) under the
user data dir ($MEDVQA_DATA overrides), so a review survives restarts and several app processes
can write at once. Agreement per model, Cohen's κ between two reviewers, CSV export."""
from __future__ import annotations

import csv
import os
import sqlite3
import time
from pathlib import Path

VERDICTS = ("agree", "disagree", "corrected")
COLUMNS = ("reviewer", "source", "qid", "image", "question", "ground_truth", "model", "model_answer", "verdict",
           "corrected_answer", "comment", "updated")


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

    def _db(self):
        # one short-lived connection per call: safe across Gradio's worker threads
        return sqlite3.connect(self.path, timeout=30)

    def record(self, reviewer: str, source: str, qid: str, model: str, verdict: str, *, image="", question="",
               ground_truth="", model_answer="", corrected_answer="", comment=""):
        reviewer = reviewer.strip()
        if not reviewer:
            raise ValueError("enter a reviewer name first")
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        if verdict == "corrected" and not corrected_answer.strip():
            raise ValueError(f"{model}: a corrected verdict needs the corrected answer")
        row = (reviewer, source, str(qid), image, question, ground_truth, model, model_answer, verdict,
               corrected_answer.strip(), comment.strip(), time.strftime("%Y-%m-%dT%H:%M:%S"))
        with self._db() as db:
            db.execute(f"INSERT OR REPLACE INTO reviews VALUES ({', '.join('?' * len(COLUMNS))})", row)

    def reviewed(self, reviewer: str, source: str) -> set[str]:
        """Case ids this reviewer has recorded for `source` (to resume where they left off)."""
        with self._db() as db:
            return {r[0] for r in db.execute("SELECT DISTINCT qid FROM reviews WHERE reviewer=? AND source=?",
                                             (reviewer.strip(), source))}

    def rows(self, source: str | None = None) -> list[dict]:
        q, args = "SELECT * FROM reviews", ()
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
        """Per model: n and % of verdicts that agree; Cohen's κ (agree vs not) for each pair of
        reviewers over the (case, model) items both reviewed."""
        rows = self.rows(source)
        per_model = {}
        for r in rows:
            m = per_model.setdefault(r["model"], {"n": 0, "agree": 0})
            m["n"] += 1
            m["agree"] += r["verdict"] == "agree"
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
