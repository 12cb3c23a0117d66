"""Fake (meta) kernels: shapes, dtypes and strides of the ops' outputs, so
torch.compile / torch.export trace them without running the kernels.

They mirror the C++ output rules: outputs keep the input's layout when it is
dense channels-last (channel innermost), else they are contiguous.
"""

import sys

import torch

from ._distributed import register_if_loaded as register_sharding_if_loaded
from .activations import ACTIVATIONS, ALL_NAMES

_fusion_pass_installed = []

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_channels_last_dense(x):
    """Python twin of is_channels_last_dense in csrc/group_norm_utils.cpp."""
    if x.dim() < 3 or x.stride(1) != 1:
        return False
    expected = x.size(1)
    for d in range(x.dim() - 1, 1, -1):
        if x.size(d) != 1 and x.stride(d) != expected:
            return False
        expected = expected * x.size(d)
    return x.size(0) == 1 or x.stride(0) == expected


def _empty_in_native_layout(x):
    if not x.is_contiguous() and _is_channels_last_dense(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_args(input, weight, bias, num_groups, eps, activation):
    """The checks of check_forward_args in csrc/group_norm_utils.cpp, so fake
    and meta tensors are rejected as the real kernels would reject them."""
    torch._check(input.dim() >= 2, lambda: "gnflex.group_norm: expected input of shape (N, C, *) with at "
                 f"least 2 dims, got {input.dim()} dims with shape {list(input.shape)}")
    torch._check_not_implemented(
        input.dtype in _FLOAT_DTYPES,
        lambda: f"gnflex.group_norm: expected a float32, float64, float16 or bfloat16 input, got {input.dtype}")
    channels = input.shape[1]
    torch._check(channels > 0, lambda: f"gnflex.group_norm: expected num_channels > 0, got input of shape "
                 f"{list(input.shape)}")
    spatial = 1
    for size in input.shape[2:]:
        spatial = spatial * size
    torch._check(spatial > 0, lambda: "gnflex.group_norm: expected non-empty spatial dims, got input of "
                 f"shape {list(input.shape)}")
    torch._check(num_groups > 0, lambda: f"gnflex.group_norm: num_groups must be positive, got {num_groups}")
    torch._check(channels % num_groups == 0, lambda: f"gnflex.group_norm: num_channels ({channels}) must be "
                 f"divisible by num_groups ({num_groups})")
    torch._check(activation in ALL_NAMES, lambda: f"gnflex.group_norm: unknown activation '{activation}'; "
                 f"expected one of {', '.join(repr(a) for a in ACTIVATIONS)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        per_channel = p.dim() == 1 and p.shape[0] == channels
        per_sample = p.dim() == 2 and p.shape[0] == input.shape[0] and p.shape[1] == channels
        torch._check(per_channel or per_sample, lambda: f"gnflex.group_norm: expected {name} of shape "
                     f"[{channels}] (num_channels) or [{input.shape[0]}, {channels}] (per sample), got "
                     f"{list(p.shape)}")
        torch._check(p.device == input.device, lambda: f"gnflex.group_norm: {name} is on {p.device} but input "
                     f"is on {input.device}")
        ok = p.dtype == input.dtype or (p.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16))
        torch._check(ok, lambda: f"gnflex.group_norm: {name} dtype {p.dtype} does not match input dtype "
                     f"{input.dtype} (float32 parameters are allowed with float16/bfloat16 input)")


def _install_fusion_pass_once():
    """gnflex._compile_fusion's Inductor pass, where Inductor is loaded (the
    fake kernel runs before the backend compiles the traced graph)."""
    if not _fusion_pass_installed and "torch._inductor.config" in sys.modules:
        from . import _compile_fusion

        _compile_fusion.install()
        _fusion_pass_installed.append(True)


def _group_norm_fake(input, weight, bias, num_groups, eps=1e-5, activation="none"):
    _install_fusion_pass_once()
    register_sharding_if_loaded()  # compiling DTensor code
    _check_args(input, weight, bias, num_groups, eps, activation)
    stats = input.new_empty((input.shape[0], num_groups), dtype=_acc_dtype(input.dtype))
    return _empty_in_native_layout(input), stats, torch.empty_like(stats)


def _group_norm_backward_fake(grad_out, input, mean, rstd, weight, bias, num_groups, activation,
                              output_mask):
    _check_args(input, weight, bias, num_groups, 0.0, activation)
    torch._check(grad_out.shape == input.shape, lambda: f"gnflex.group_norm_backward: grad_out shape "
                 f"{list(grad_out.shape)} does not match input shape {list(input.shape)}")
    param_dtype = weight.dtype if weight is not None else input.dtype

    def grad_of(param):  # in the parameter's shape: (C,) or per sample (N, C)
        shape = param.shape if param is not None and param.dim() == 2 else (input.shape[1],)
        return input.new_empty(shape, dtype=param_dtype)

    dx = _empty_in_native_layout(input) if output_mask[0] else None
    dweight = grad_of(weight) if output_mask[1] else None
    dbias = grad_of(bias) if output_mask[2] else None
    return dx, dweight, dbias


def register_fakes(namespace):
    """Register the fake kernels for the ops of `namespace` (gnflex, or the
    namespace of a JIT build)."""
    torch.library.register_fake(f"{namespace}::group_norm")(_group_norm_fake)
    torch.library.register_fake(f"{namespace}::group_norm_backward")(_group_norm_backward_fake)


register_fakes("gnflex")
