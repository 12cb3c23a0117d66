"""Autocast: gnflex's op follows torch's group_norm policy on CPU and CUDA, and
the opt-in half-precision output (set_autocast_half_output)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnflex
from _helpers import CUDA_SKIP, make_input
from gnflex import GroupNormFlex


@pytest.mark.parametrize("input_dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cpu_autocast_matches_torch_policy(input_dtype):
    x = make_input((2, 16, 6, 6), input_dtype)
    norm = GroupNormFlex(16, groups=4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    ref = nn.GroupNorm(4, 16)
    ref.load_state_dict(norm.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = norm(x), ref(x)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1.6e-2, atol=1.6e-2)


def test_cpu_autocast_conv_block_trains():
    block = gnflex.ConvGNAct(3, 16, activation="silu")
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.bfloat16  # conv runs in bf16, GN keeps its input dtype (as torch's)
    y.float().sum().backward()
    assert block.norm.weight.grad.dtype == torch.float32 and torch.isfinite(block.norm.weight.grad).all()


def test_autocast_kernel_registered_for_cuda():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gnflex::group_norm", "AutocastCUDA")


@pytest.mark.cuda
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_cuda_autocast_matches_torch_policy(dtype):
    x = make_input((2, 16, 6, 6), torch.float32, "cuda")
    norm = GroupNormFlex(16, groups=4, device="cuda")
    ref = nn.GroupNorm(4, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        h = x.to(dtype)
        ours, theirs = norm(h), ref(h)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.fixture
def autocast_half_output():
    previous = gnflex.set_autocast_half_output(True)
    yield
    gnflex.set_autocast_half_output(previous)


def test_autocast_half_output_switch(autocast_half_output):
    assert gnflex.autocast_half_output() is True
    assert gnflex.set_autocast_half_output(False) is True and gnflex.autocast_half_output() is False
    with pytest.raises(TypeError, match="enabled must be a bool"):
        gnflex.set_autocast_half_output(1)
    # CPU autocast is unaffected: no cast, as torch.
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    gnflex.set_autocast_half_output(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gnflex.group_norm(x.float(), 4).dtype == torch.float32
        assert gnflex.group_norm(x, 4).dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_cuda_autocast_half_output(autocast_half_output, dtype):
    """Opted in: float32 input and float32 parameters under autocast give the
    autocast dtype, equal to the float32 result rounded once; the backward
    reaches the float32 parameters."""
    x = make_input((2, 16, 6, 6), torch.float32, "cuda")
    norm = GroupNormFlex(16, groups=4, device="cuda", activation="silu")
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    with torch.autocast("cuda", dtype=dtype):
        y = norm(x)
    assert y.dtype == dtype
    expected = F.silu(F.group_norm(x.to(dtype).float(), 4, norm.weight, norm.bias))
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert norm.weight.grad.dtype == torch.float32 and torch.isfinite(norm.weight.grad).all()
