"""Under torchrun, two gloo processes on CPU: the contrastive losses, each process holding part of a batch,
give the loss of one process holding all of it and, after DDP's gradient average, its gradients; and one
rank's diverged loss stops every rank at the same step."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from medvqa.config import get_preset
from medvqa.models.registry import build

SHARES = (slice(0, 5), slice(5, 12))   # unequal, as CMDPI's group sampler makes them


def _case():
    torch.manual_seed(0)
    preset = get_preset("tiny")
    model = build("cmi-mtl", preset, 7, ahead_vocab=[0, 1, 2, 3])
    d = preset.cmi_mtl.d
    z, t = torch.randn(12, preset.cmi_mtl.n_queries, d), torch.randn(12, d)
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8])   # same-image pairs across the cut
    text_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 1, 9, 10, 11])  # one text on two images, across the cut
    return model, z, t, image_ids, text_ids


def _loss_and_grads(model, z, t, image_ids, text_ids):
    loss = model.cmcl_loss(z, t, image_ids, text_ids)
    params = [model.vision_proj.weight, model.text_proj.weight, model.log_tau]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def _rank(rank, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, z, t, ids, text_ids = _case()
        s = SHARES[rank]
        loss, grads = _loss_and_grads(model, z[s], t[s], ids[s], text_ids[s])
        for g in grads:                                        # what DDP does to parameter gradients
            dist.all_reduce(g)
            g /= 2
        results.put((rank, loss.numpy(), [g.numpy() for g in grads]))   # plain arrays: the process exits next
        dist.barrier()          # neither rank tears down gloo while the other still uses it (SIGABRT at exit)
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalisation: gloo's worker threads can still be joinable there, and
    # a loaded machine then aborts the rank after its results are in (1 run in 10 under load; 0 in 20 with this).
    results.close()
    results.join_thread()
    os._exit(0)


def _two_ranks(target, *args) -> list:
    """Run target(rank, port, *args, results) on two spawned ranks -> what they put in `results`. A rank that
    hangs (waiting on the other in a collective) fails the test after 120 s and is killed, never left behind."""
    import queue

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, *args, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=120) for _ in procs]
    except queue.Empty:
        raise AssertionError("a rank did not finish within 120 s (waiting on the other?)") from None
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return got


def test_cmcl_negatives_come_from_every_rank():
    got = dict((r, (loss, grads)) for r, loss, grads in _two_ranks(_rank))
    want_loss, want_grads = _loss_and_grads(*_case())
    local_loss, _ = _loss_and_grads(*[x[SHARES[0]] if torch.is_tensor(x) else x for x in _case()])
    assert not torch.allclose(local_loss, want_loss)           # the test can tell local from global
    for loss, grads in got.values():
        torch.testing.assert_close(torch.from_numpy(loss), want_loss)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-6)


def _fit_rank(rank, port, tmp, results):
    """fit() on one rank of two; rank 1's loss turns NaN at its second step."""
    import torch.distributed as dist

    from medvqa.train.trainer import DivergedError, fit
    from tests.helpers import tiny_data

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        preset, _, _, vocab, ds, _ = tiny_data(tmp / f"rank{rank}")
        preset.train.epochs, preset.train.batch_size = 2, 4
        model = build("baseline", preset, len(vocab))
        calls, forward = [0], model.forward

        def poisoned(batch):
            out = forward(batch)
            calls[0] += model.training
            if rank == 1 and calls[0] >= 2 and model.training:
                out["losses"] = {k: v * float("nan") for k, v in out["losses"].items()}
            return out

        model.forward = poisoned
        try:
            fit(model, ds, None, preset.train, tmp / "run", {"model": "baseline", "answers": vocab.answers})
            results.put((rank, "finished"))
        except DivergedError as e:
            results.put((rank, str(e)))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    results.close()
    results.join_thread()
    os._exit(0)


def test_a_diverged_rank_stops_every_rank_at_the_same_step(tmp_path):
    """One rank's NaN loss alone would leave the other waiting in the gradient all-reduce for ever."""
    got = dict(_two_ranks(_fit_rank, tmp_path))
    assert got[1].startswith("the loss became nan at epoch 1, step 2"), got
    assert got[0].startswith("another rank's loss became non-finite at epoch 1, step 2"), got
