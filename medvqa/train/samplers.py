"""Batch samplers that put rows together by a key: CMDPI's groups, whole images for backbone fine-tuning.

`pairs=True` (head mixup): each batch is [a1, b1, a2, b2, …] where a_i and b_i share a group —
(organ, question type) — so h_mix mixes heads of comparable questions. `pairs=False`
(pretraining): each batch holds one group only (captions apart from VQA rows), so the
contrastive terms see full caption batches.
Under torchrun every rank takes its own share of the same shuffled batches.
"""
from __future__ import annotations

import random
from collections import defaultdict

import torch.distributed as dist


class GroupBatchSampler:
    def __init__(self, groups: list, batch_size: int, pairs: bool, seed: int = 0):
        self.batch_size, self.pairs, self.seed, self.epoch = batch_size, pairs, seed, 0
        self._built = (None, [])                     # (epoch, its batches for this rank)
        self.members = defaultdict(list)
        for i, g in enumerate(groups):
            self.members[g].append(i)
        on = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _pairs(self, idx, rng) -> list[list[int]]:
        """Consecutive shuffled group-mates; an odd one out pairs with a random group-mate (or itself)."""
        if len(idx) % 2:
            idx = idx + [rng.choice(idx[:-1]) if len(idx) > 1 else idx[0]]
        return [idx[k:k + 2] for k in range(0, len(idx), 2)]

    def _batches(self) -> list[list[int]]:
        """This epoch's batches for this rank; built once per epoch (len() and iter() both ask for them)."""
        if self._built[0] == self.epoch:
            return self._built[1]
        batches = self._epoch_batches(random.Random(self.seed * 1000 + self.epoch))
        n = len(batches) // self.world * self.world or len(batches)    # equal count on every rank
        self._built = (self.epoch, batches[self.rank:n:self.world])
        return self._built[1]

    def _epoch_batches(self, rng) -> list[list[int]]:
        groups = []
        for g in sorted(self.members, key=str):
            idx = self.members[g][:]
            rng.shuffle(idx)
            groups.append(idx)
        if self.pairs:
            units = [p for idx in groups for p in self._pairs(idx, rng)]
            rng.shuffle(units)
            per = max(1, self.batch_size // 2)
            batches = [sum(units[k:k + per], []) for k in range(0, len(units), per)]
        else:
            batches = [idx[k:k + self.batch_size] for idx in groups for k in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self):
        return len(self._batches())


class ImageBatchSampler(GroupBatchSampler):
    """Whole images per batch (backbone fine-tuning, medvqa.train.tuning): images in a shuffled
    order, each with all its questions, until a batch holds at least `batch_size` rows, so a tuned
    block runs once per image and step. `images`: each row's image."""

    def __init__(self, images: list, batch_size: int, seed: int = 0):
        super().__init__(images, batch_size, pairs=False, seed=seed)

    def _epoch_batches(self, rng) -> list[list[int]]:
        keys = sorted(self.members, key=str)
        rng.shuffle(keys)
        batches, cur = [], []
        for k in keys:
            cur += self.members[k]
            if len(cur) >= self.batch_size:
                batches, cur = batches + [cur], []
        return batches + ([cur] if cur else [])
