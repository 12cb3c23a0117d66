"""Reliability: non-finite values, numerical stability, huge tensors, thread safety."""
import threading

import pytest
import torch
import torch.nn.functional as F

import gnflex
from _helpers import DEVICES, grads_of, make_input, make_params, reference


# ---- non-finite values -------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("bad", (float("nan"), float("inf"), float("-inf")))
@pytest.mark.parametrize("activation", ("none", "silu"))
def test_non_finite_values_stay_in_their_group(device, layout, bad, activation):
    # As torch: a NaN or infinity poisons its own group (NaN there), nothing else.
    x = make_input((2, 8, 5, 5), torch.float32, device, layout)
    x[1, 2, 3, 4] = bad  # sample 1, group 1 of 4 (channels 2-3)
    w, b = make_params(8, torch.float32, device)
    dy = torch.randn_like(x)
    act = F.silu if activation == "silu" else (lambda t: t)
    y, dx, dw, db = grads_of(lambda x, w, b: gnflex.group_norm(x, 4, w, b, activation=activation), x, w, b, dy)
    ry, rdx, rdw, rdb = grads_of(lambda x, w, b: act(F.group_norm(x, 4, w, b)), x, w, b, dy)
    bad_group = torch.zeros_like(y, dtype=torch.bool)
    bad_group[1, 2:4] = True
    assert torch.isnan(y[bad_group]).all() and torch.isnan(ry[bad_group]).all()
    assert torch.isfinite(y[~bad_group]).all()
    torch.testing.assert_close(y[~bad_group], ry[~bad_group], rtol=1e-5, atol=1e-5)
    assert torch.isnan(dx[bad_group]).all() and torch.isfinite(dx[~bad_group]).all()
    torch.testing.assert_close(dx[~bad_group], rdx[~bad_group], rtol=1e-4, atol=1e-4)
    # Parameter gradients sum over samples: the poisoned channels are NaN, as in torch.
    assert torch.equal(torch.isnan(dw), torch.isnan(rdw)) and torch.equal(torch.isnan(db), torch.isnan(rdb))


# ---- stability ---------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_large_mean_small_spread_bf16(device, layout):
    # bf16 has 8 significant bits: at mean 100 the spacing is 0.5, so std 2
    # still has spread. Reference: float64 GroupNorm of the same bf16 values.
    g = torch.Generator().manual_seed(3)
    x64 = 100 + 2 * torch.randn(4, 32, 16, 16, generator=g, dtype=torch.float64)
    x = make_input(x64.shape, torch.bfloat16, device, layout)
    x.copy_(x64)
    y = gnflex.group_norm(x, 8)
    ref = reference(x, 8)
    # bf16 output rounding: half an ulp of values up to ~4, i.e. <= 2^-8 relative.
    err = ((y.double() - ref).abs() / (ref.abs() + 1)).max().item()
    assert err <= 8e-3, err


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_near_max_does_not_overflow(device):
    # Squares of 6e4 overflow fp16 (max 65504); statistics accumulate in fp32.
    g = torch.Generator().manual_seed(4)
    x = (6e4 + 500 * torch.randn(2, 16, 8, 8, generator=g)).clamp(max=65000).half().to(device)
    w, b = make_params(16, torch.float16, device)
    dy = torch.randn(x.shape, dtype=torch.float16, device=device)
    y, dx, dw, db = grads_of(lambda x, w, b: gnflex.group_norm(x, 4, w, b), x, w, b, dy)
    for t in (y, dx, dw, db):
        assert torch.isfinite(t).all()
    ref = reference(x, 4, w, b)
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("activation", ("none", "gelu"))
def test_constant_groups_are_finite(device, layout, activation):
    # Variance 0: y = act(bias), gradients finite (rstd = 1/sqrt(eps)), and
    # dweight = sum(dy * x_hat) = 0 as exact math gives it (against float64:
    # torch's float32 mean of a constant group is off by rounding, which
    # rstd = 316 turns into dweight terms of 1e-3).
    x = make_input((2, 8, 4, 4), torch.float32, device, layout)
    with torch.no_grad():
        # Each group's 2 channels share one value: 3.7 * (n * 4 + g).
        per_group = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1, 1, 1) * 3.7
        x.copy_(per_group.expand(2, 4, 2, 4, 4).reshape(2, 8, 4, 4))
    assert (x.reshape(2, 4, -1).std(dim=-1) == 0).all()
    w, b = make_params(8, torch.float32, device)
    dy = torch.randn_like(x)
    act = F.gelu if activation == "gelu" else (lambda t: t)
    out = grads_of(lambda x, w, b: gnflex.group_norm(x, 4, w, b, activation=activation), x, w, b, dy)
    ref = grads_of(lambda x, w, b: act(F.group_norm(x, 4, w, b)), x.double(), w.double(), b.double(), dy.double())
    for a, r in zip(out, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out[2].double(), torch.zeros_like(ref[2]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_backward_with_large_mean_is_as_accurate_as_torch(layout):
    # mean 1e4, std 1e-2 in fp32: the saved float32 mean is off by up to half
    # an ulp (~5e-4) of 1e4, which matters against std 1e-2. torch's backward
    # has the same limit; ours must not be worse.
    g = torch.Generator().manual_seed(5)
    x64 = 1e4 + 1e-2 * torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64)
    x = make_input(x64.shape, torch.float32, "cpu", layout)
    x.copy_(x64)
    w, b = make_params(16, torch.float32)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float32)
    exact = grads_of(lambda x, w, b: F.group_norm(x, 4, w, b), x.double().contiguous(), w.double(), b.double(),
                     dy.double())
    ours = grads_of(lambda x, w, b: gnflex.group_norm(x, 4, w, b), x, w, b, dy)
    theirs = grads_of(lambda x, w, b: F.group_norm(x, 4, w, b), x.contiguous(), w, b, dy.contiguous())

    def rel(a, e):
        return ((a.double() - e).abs().max() / e.abs().max()).item()

    for name, a, t, e in zip(("y", "dx", "dw", "db"), ours, theirs, exact):
        assert rel(a, e) <= max(2 * rel(t, e), 1e-4), (name, rel(a, e), rel(t, e))


# ---- huge tensors -------------------------------------------------------------
def _available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


@pytest.mark.slow
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_more_than_2_31_elements(layout):
    # 2^31 + 64 fp16 values (4 GiB) in one group: int64 indexing throughout.
    # Each run of 4 values is (-1.5, -0.5, 0.5, 1.5) + 8 * channel, so every
    # group's mean and variance are known exactly.
    if _available_gib() < 13:
        pytest.skip(f"needs ~13 GiB of free memory, {_available_gib():.1f} GiB available")
    C, HxW = 2, 2 ** 30 + 32
    base = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float16)
    if layout == "contiguous":
        x = torch.empty(1, C, HxW, dtype=torch.float16)
        for c in range(C):
            x[0, c].view(-1, 4).copy_(base + 8 * c)
    else:
        x = torch.empty(1, HxW, C, dtype=torch.float16)
        for c in range(C):
            x[0, :, c].view(-1, 4).copy_(base + 8 * c)  # strided view: element c of every row
        x = x.transpose(1, 2)  # (N, C, L) with channels innermost
    assert x.numel() > 2 ** 31
    y, mean, rstd = torch.ops.gnflex.group_norm(x, None, None, 1, 0.0, "none")
    # One group over both channels: mean 4, variance 1.25 + 16.
    assert abs(mean.item() - 4.0) < 1e-4
    assert abs(rstd.item() - (1.25 + 16) ** -0.5) < 1e-5
    expect = ((base - 4.0) / (1.25 + 16) ** 0.5).half()
    tail = y[0, 1, -4:] if layout == "contiguous" else y[0, 1, -4:]
    torch.testing.assert_close(tail, (expect + 8 / (1.25 + 16) ** 0.5).half(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(y[0, 0, :4], expect, rtol=1e-3, atol=1e-3)


# ---- thread safety ------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_concurrent_calls_from_python_threads(device):
    inputs = [make_input((2, 16, 12, 12), torch.float32, device, layout, seed=i)
              for i, layout in enumerate(("contiguous", "channels_last") * 4)]
    w, b = make_params(16, torch.float32, device)

    def run(x):
        x = x.detach().requires_grad_()
        y = gnflex.group_norm(x, 4, w, b, activation="silu")
        (dx,) = torch.autograd.grad(y.square().sum(), x)
        return y.detach(), dx

    expected = [run(x) for x in inputs]
    results = [None] * len(inputs)
    errors = []

    def worker(i):
        try:
            for _ in range(5):
                results[i] = run(inputs[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (y, dx), (ry, rdx) in zip(results, expected):
        assert torch.equal(y, ry) and torch.equal(dx, rdx)
