"""Answer vocabulary over normalised answers; published protocol = train + test answers."""
from __future__ import annotations

from collections import Counter


class AnswerVocab:
    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def build(cls, *record_lists) -> "AnswerVocab":
        # Most frequent first, ties alphabetically: deterministic across runs and machines.
        counts = Counter(r.answer_norm for recs in record_lists for r in recs)
        return cls(sorted(counts, key=lambda a: (-counts[a], a)))

    def __len__(self):
        return len(self.answers)

    def __contains__(self, answer_norm: str):
        return answer_norm in self.index

    def encode(self, answer_norm: str) -> int:
        """Class index, or -1 for an answer the vocabulary cannot predict."""
        return self.index.get(answer_norm, -1)

    def oov(self, records) -> int:
        return sum(r.answer_norm not in self.index for r in records)
