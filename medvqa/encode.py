"""Encode once: the image backbone in front of every model that reads it.

`backbone(encoders)` is the one `Backbone` of an `Encoders` instance (every Predictor with the same
backbone config and weights shares it). It keeps the tokens of the last few images by content hash,
so the three models' answers, the gradient-free maps and the nearest cases of one ask cost one
backbone pass, and a changed question, target answer or method costs none. Images that miss the
cache go through a micro-batcher: requests arriving within `wait_ms` of each other share one batched
forward, and each gets back its own rows. The forward runs in a requesting thread (the first to find
no batch running leads it), never in a thread of its own: torch's OpenMP team is per thread, and the
caller's team, still spinning after its last op, took a core from a server thread's pass (one
encode 78 ms there against 52 ms in the caller, docs/experiments.md). Each image is encoded independently of the others in its
batch (a ViT has no padding), so batching never changes an answer beyond float rounding.

`Backbone.lock` guards every pass through the backbone: saliency methods hook its blocks and switch
its attention kernel, which must never touch another request's forward.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, wait
from queue import Empty, Queue

import torch

CACHE_IMAGES = 8        # images whose tokens are kept (each: 13 × 257 × 384 fp32 block inputs, about 5 MB)
CACHE_QUESTIONS = 64
MAX_BATCH = 16
WAIT_MS = 5.0           # how long the first request of a batch waits for company


def image_digest(im) -> str:
    """Content hash of a PIL image: the same pixels are the same key whatever file they came from."""
    h = hashlib.sha1(f"{im.mode}{im.size}".encode())
    h.update(im.tobytes())
    return h.hexdigest()


class LRU:
    def __init__(self, size: int):
        self.size, self._d, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key, value):
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self):
        with self._lock:
            self._d.clear()


class Entry(dict):
    """One image's cached pass. Weakly referenceable: an entry a request still holds is found even
    after the LRU let it go (20 concurrent images, 8 kept: no image is encoded twice for one ask)."""


class Backbone:
    """Cached, micro-batched image tokens (and cached single-question inputs) of one Encoders."""

    def __init__(self, encoders, cache_images: int = CACHE_IMAGES, max_batch: int = MAX_BATCH,
                 wait_ms: float = WAIT_MS):
        self.encoders = encoders
        self.lock = threading.RLock()
        self.images, self.questions = LRU(cache_images), LRU(CACHE_QUESTIONS)
        self.max_batch, self.wait_s = max_batch, wait_ms / 1000
        self.batches: list[int] = []          # sizes of the batched forwards run (the bench reads them)
        self._held: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # digest -> Entry still in use
        self._queue: Queue = Queue()
        self._leading = threading.Lock()      # held by the thread running a batch

    # -- image tokens -------------------------------------------------------------------------------
    def encode(self, images) -> list[dict]:
        """RGB PIL images -> per image {"tokens": (1+N, Di) [CLS] then patches, "blocks": (L+1, 1+N, Di)
        the input of each backbone block (the last: the final norm's input)}, from the cache or one
        batched forward shared with concurrent requests."""
        keys = [image_digest(im) for im in images]
        out, pending = [self.images.get(k) or self._held.get(k) for k in keys], {}
        for i, (k, hit) in enumerate(zip(keys, out)):
            if hit is None and k not in pending:
                pending[k] = Future()
                self._queue.put((k, self.encoders.preprocess([images[i]]), pending[k]))   # (1, 3, S, S)
        for f in pending.values():
            while not f.done():   # lead a batch, or wait for the one running (it may not hold ours)
                if self._leading.acquire(blocking=False):
                    self._lead()
                else:
                    wait([f], timeout=self.wait_s)
        for i, k in enumerate(keys):
            if out[i] is None:
                out[i] = pending[k].result()
        return out

    def image_tokens(self, images) -> torch.Tensor:
        """(B, 1+N, Di): the backbone's [CLS] then patch tokens, as the heads read them."""
        return torch.stack([e["tokens"] for e in self.encode(images)])

    def _lead(self):
        """With `_leading` held: run one batch of what is queued (waiting `wait_s` for company), then let go."""
        try:
            batch = [self._queue.get_nowait()]
        except Empty:             # another leader took ours: it is done or running
            self._leading.release()
            return
        try:
            while len(batch) < self.max_batch:
                batch.append(self._queue.get(timeout=self.wait_s))
        except Empty:
            pass
        try:
            self._run(batch)
        finally:
            self._leading.release()

    def _run(self, batch):
        todo = {}
        for k, px, fut in batch:   # the same image twice in one batch: encoded once
            todo.setdefault(k, (px, []))[1].append(fut)
        try:
            entries = self._forward(torch.cat([px for px, _ in todo.values()]))
            for (k, (_, futs)), e in zip(todo.items(), entries):
                self.images.put(k, e)
                self._held[k] = e
                for f in futs:
                    f.set_result(e)
        except Exception as e:  # every waiting request gets the error; the others keep being served
            for _, futs in todo.values():
                for f in futs:
                    f.set_exception(e)

    def _forward(self, px) -> list[dict]:
        with self.lock, torch.no_grad():   # not inference mode: a saliency map may backpropagate from these
            out = self.encoders.image(pixel_values=px, output_hidden_states=True)
        self.batches.append(len(px))
        blocks = torch.stack(out.hidden_states, 1)                                    # (B, L+1, 1+N, Di)
        # clone: a row view would keep the whole batch's storage alive in the cache
        return [Entry(tokens=h.clone(), blocks=b.clone()) for h, b in zip(out.last_hidden_state, blocks)]

    # -- question inputs ----------------------------------------------------------------------------
    def question_inputs(self, questions: list[str]) -> dict:
        """Encoders.question_inputs, cached for single questions (a batch pads to its longest
        question, so only a question alone has one encoding)."""
        if len(questions) != 1:
            return self.encoders.question_inputs(questions)
        hit = self.questions.get(questions[0])
        if hit is None:   # never inference tensors: a saliency map's graph reads them too
            with torch.inference_mode(False), torch.no_grad():
                hit = self.encoders.question_inputs(questions)
            self.questions.put(questions[0], hit)
        return hit

    def clear(self):
        self.images.clear()
        self._held.clear()
        self.questions.clear()


_backbones: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_backbones_lock = threading.Lock()


def backbone(encoders) -> Backbone:
    """The one Backbone of `encoders`."""
    with _backbones_lock:
        if encoders not in _backbones:
            _backbones[encoders] = Backbone(encoders)
        return _backbones[encoders]
