"""Fake (meta) kernels: shapes, dtypes and strides of the ops' outputs, so
torch.compile / torch.export trace them without running the kernels.

They mirror the C++ output rules: outputs keep the input's layout when it is
dense channels-last (channel innermost), else they are contiguous.
"""
import torch


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


def _group_norm_fake(input, weight, bias, num_groups, eps=1e-5, activation="none"):
    torch._check(input.dim() >= 2, lambda: "gnflex.group_norm: expected input of shape (N, C, *)")
    stats = input.new_empty((input.shape[0], num_groups), dtype=_acc_dtype(input.dtype))
    return _empty_in_native_layout(input), stats, torch.empty_like(stats)


def _group_norm_backward_fake(grad_out, input, mean, rstd, weight, bias, num_groups, activation,
                              output_mask):
    param_dtype = weight.dtype if weight is not None else input.dtype
    channels = input.shape[1]
    dx = _empty_in_native_layout(input) if output_mask[0] else None
    dweight = input.new_empty((channels,), dtype=param_dtype) if output_mask[1] else None
    dbias = input.new_empty((channels,), dtype=param_dtype) if output_mask[2] else None
    return dx, dweight, dbias


def register_fakes(namespace):
    """Register the fake kernels for the ops of `namespace` (gnflex, or the
    namespace of a JIT build)."""
    torch.library.register_fake(f"{namespace}::group_norm")(_group_norm_fake)
    torch.library.register_fake(f"{namespace}::group_norm_backward")(_group_norm_backward_fake)


register_fakes("gnflex")
