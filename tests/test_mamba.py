import pytest
import torch

from medvqa.models.mamba import Mamba, _scan_parallel, _scan_sequential, selective_scan


@pytest.mark.parametrize("L", [1, 2, 7, 16, 33, 100])
def test_scans_agree_values_and_grads(L):
    torch.manual_seed(L)
    b, E, N = 2, 6, 4
    u = torch.randn(b, L, E, dtype=torch.float64, requires_grad=True)
    delta = torch.nn.functional.softplus(torch.randn(b, L, E, dtype=torch.float64)).requires_grad_()
    A = (-torch.rand(E, N, dtype=torch.float64) * 2).requires_grad_()
    B = torch.randn(b, L, N, dtype=torch.float64, requires_grad=True)
    C = torch.randn(b, L, N, dtype=torch.float64, requires_grad=True)
    D = torch.randn(E, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for mode in ("sequential", "parallel"):
        y = selective_scan(u, delta, A, B, C, D, mode=mode)
        ins = (u, delta, A, B, C, D)
        g = torch.autograd.grad(y.pow(2).sum(), ins, allow_unused=True)  # L=1: A never matters
        g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, ins)]
        outs.append(y)
        grads.append(g)
    # and both against plain autograd through the textbook loop
    dA = torch.exp(delta.unsqueeze(-1) * A)
    dBu = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
    h, hs = torch.zeros_like(dBu[:, 0]), []
    for t in range(L):
        h = dA[:, t] * h + dBu[:, t]
        hs.append(h)
    y = (torch.stack(hs, 1) @ C.unsqueeze(-1)).squeeze(-1) + u * D
    g = torch.autograd.grad(y.pow(2).sum(), ins, allow_unused=True)
    outs.append(y)
    grads.append([torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, ins)])
    for i in (1, 2):
        assert torch.allclose(outs[0], outs[i], atol=1e-10)
        for g0, g1 in zip(grads[0], grads[i]):
            assert torch.allclose(g0, g1, atol=1e-9)


def test_parallel_scan_float32_long():
    torch.manual_seed(0)
    dA = torch.rand(1, 512, 8, 4) * 0.2 + 0.8
    dBu = torch.randn(1, 512, 8, 4)
    assert torch.allclose(_scan_sequential(dA, dBu), _scan_parallel(dA, dBu), atol=1e-4)


def test_mixer_matches_transformers_mamba():
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=32, state_size=8, conv_kernel=4, expand=2, time_step_rank=4,
                      use_bias=False, use_conv_bias=True, hidden_act="silu", num_hidden_layers=1)
    ref = MambaMixer(cfg, layer_idx=0).eval()
    ours = Mamba(32, d_state=8, d_conv=4, expand=2, dt_rank=4).eval()
    ours.load_state_dict(ref.state_dict())          # same parameter names, copied one to one
    x = torch.randn(2, 19, 32)
    with torch.no_grad():
        want = ref(x)
        for mode in ("sequential", "parallel"):
            ours.scan = mode
            assert torch.allclose(ours(x), want, atol=1e-5), mode
