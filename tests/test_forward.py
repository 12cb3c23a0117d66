"""Forward numerics of torch.ops.gnflex.group_norm against F.group_norm."""
import pytest
import torch

import gnflex
from _helpers import (ACTIVATIONS, DEVICES, DTYPES, LAYOUT_CASES, assert_close_to_ref, make_input, make_params,
                      reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,shape,groups", LAYOUT_CASES, ids=str)
def test_forward_matches_reference(device, dtype, layout, shape, groups):
    x = make_input(shape, dtype, device, layout)
    w, b = make_params(shape[1], dtype, device)
    y, mean, rstd = torch.ops.gnflex.group_norm(x, w, b, groups, 1e-5, "none")
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert_close_to_ref(y, reference(x, groups, w, b), dtype)
    # Statistics: (N, G) in the accumulate dtype.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.shape == (shape[0], groups) and mean.dtype == acc and rstd.dtype == acc
    grouped = x.double().reshape(shape[0], groups, -1)
    ref_mean = grouped.mean(-1)
    ref_rstd = torch.rsqrt(grouped.var(-1, unbiased=False) + 1e-5)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean.double(), ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(rstd.double(), ref_rstd, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_fused_activation(device, dtype, activation, layout):
    x = make_input((2, 24, 7, 9), dtype, device, layout)
    w, b = make_params(24, dtype, device)
    y = gnflex.group_norm(x, 6, w, b, activation=activation)
    assert_close_to_ref(y, reference(x, 6, w, b, activation=activation), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_half_input_with_float32_params(device, dtype):
    x = make_input((2, 16, 6, 6), dtype, device)
    w, b = make_params(16, torch.float32, device)
    y = gnflex.group_norm(x, 4, w, b, activation="silu")
    assert y.dtype == dtype
    assert_close_to_ref(y, reference(x, 4, w, b, activation="silu"), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_without_affine_and_weight_only(device):
    x = make_input((3, 8, 5, 5), torch.float32, device)
    w, _ = make_params(8, torch.float32, device)
    assert_close_to_ref(gnflex.group_norm(x, 2), reference(x, 2), torch.float32)
    assert_close_to_ref(gnflex.group_norm(x, 2, w), reference(x, 2, w), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_output_keeps_native_layout(device, layout):
    for shape in [(2, 8, 5, 5), (2, 8, 3, 4, 5), (2, 8, 10)]:
        x = make_input(shape, torch.float32, device, layout)
        y = gnflex.group_norm(x, 4)
        assert y.stride() == x.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_one_value_per_group(device):
    # Group size 1: variance 0, output = bias.
    x = make_input((3, 4), torch.float32, device)
    w, b = make_params(4, torch.float32, device)
    y = gnflex.group_norm(x, 4, w, b)
    assert_close_to_ref(y, reference(x, 4, w, b), torch.float32)
    torch.testing.assert_close(y, b.expand(3, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.empty(0, 8, 4, 4, device=device)
    y, mean, rstd = torch.ops.gnflex.group_norm(x, None, None, 2, 1e-5, "relu")
    assert y.shape == x.shape and mean.shape == (0, 2) and rstd.shape == (0, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_large_mean_small_std_is_stable(device, layout):
    # fp32 values with mean 1e4 and std 1e-2: the normalised output needs the
    # spread, which naive sums and the folded x*scale+shift form lose.
    g = torch.Generator().manual_seed(0)
    x64 = 1e4 + 1e-2 * torch.randn(4, 32, 16, 16, generator=g, dtype=torch.float64)
    x = make_input(x64.shape, torch.float32, device, layout)
    x.copy_(x64)
    ref = reference(x, 8)  # float64 GroupNorm of the same fp32 values
    y = gnflex.group_norm(x, 8)
    rel = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-3, rel


@pytest.mark.parametrize("activation", ("none", "silu", "gelu"))
@pytest.mark.parametrize("shape,groups", [((2, 64, 40, 40), 8), ((1, 64, 40, 40), 1), ((1, 4, 12293), 2)])
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_bitwise_deterministic_across_runs_and_threads(layout, shape, groups, activation):
    # The second shape switches schedule with the thread count (fused with one
    # thread, two-pass with two); results must not change.
    x = make_input(shape, torch.float32, "cpu", layout)
    w, b = make_params(shape[1], torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.gnflex.group_norm(x, w, b, groups, 1e-5, activation)
        torch.set_num_threads(max(2, threads))
        many = [torch.ops.gnflex.group_norm(x, w, b, groups, 1e-5, activation) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for run in many:
        for a, r in zip(one, run):
            assert torch.equal(a, r)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_layouts_agree(layout):
    x = make_input((2, 32, 12, 12), torch.float32, "cpu", "contiguous")
    other = make_input((2, 32, 12, 12), torch.float32, "cpu", layout)
    other.copy_(x)
    a = gnflex.group_norm(x, 8, activation="gelu")
    b = gnflex.group_norm(other, 8, activation="gelu")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
