"""Functional interface, mirroring ``torch.nn.functional.group_norm``."""
import contextlib
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from ._distributed import register_if_loaded as _register_sharding_if_loaded
from ._ops import group_norm_op
from .activations import torch_function

_own_onnx_translation = [False]


@contextlib.contextmanager
def keep_op_in_onnx_export():
    """While active, ONNX export traces gnflex's op itself (gnflex.onnx.export
    translates it); otherwise the Python API switches to torch's ops there."""
    saved = _own_onnx_translation[0]
    _own_onnx_translation[0] = True
    try:
        yield
    finally:
        _own_onnx_translation[0] = saved


def _onnx_export_flags():
    """A reader of the flags ``torch.onnx.is_in_onnx_export()`` reads: that
    function imports two modules per call (~1 us of every module call); where
    torch has moved them, the function itself."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return torch.onnx.is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


_onnx_exporting = []  # the reader, made on first use (no torch.onnx import with gnflex)


def in_onnx_export() -> bool:
    """True while ``torch.onnx.export`` traces a model (either exporter), which
    knows torch's group_norm but not gnflex's op."""
    if torch.compiler.is_compiling():  # dynamo knows torch's function, not the flags' modules
        return torch.onnx.is_in_onnx_export() and not _own_onnx_translation[0]
    if not _onnx_exporting:
        _onnx_exporting.append(_onnx_export_flags())
    return _onnx_exporting[0]() and not _own_onnx_translation[0]


def torch_group_norm_with_stats(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                                eps: float, activation: str):
    """The op's results from torch's own functions (F.group_norm + activation;
    mean and rstd from reductions), which every exporter understands."""
    act = torch_function(activation)
    dtype = input.dtype
    if (weight is not None and weight.dim() == 2) or (bias is not None and bias.dim() == 2):
        # Per-sample parameters: broadcast over the spatial dims by hand.
        per_value = [input.shape[0], input.shape[1]] + [1] * (input.dim() - 2)
        y = F.group_norm(input, num_groups, None, None, eps)
        if weight is not None:
            y = y * weight.to(dtype).expand(input.shape[0], input.shape[1]).reshape(per_value)
        if bias is not None:
            y = y + bias.to(dtype).expand(input.shape[0], input.shape[1]).reshape(per_value)
    else:
        y = F.group_norm(input, num_groups, None if weight is None else weight.to(dtype),
                         None if bias is None else bias.to(dtype), eps)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grouped = input.reshape(input.shape[0], num_groups, -1).to(acc)
    var, mean = torch.var_mean(grouped, dim=-1, correction=0)
    return act(y), mean, torch.rsqrt(var + eps)


def check_more_than_one_value(input: Tensor, num_groups: int) -> None:
    """As ``torch.nn.functional.group_norm``: refuse an input whose whole
    normalization would be over single values (N * C * HxW / num_groups == 1,
    e.g. one sample, one channel per group, no spatial extent), which makes
    the output constant. Kept so gnflex's Python API is a drop-in; the op
    ``torch.ops.gnflex.group_norm`` itself accepts such input."""
    if not torch.jit.is_scripting():
        if isinstance(input, torch.fx.Proxy):  # no size to check; the traced graph runs the op
            return
    if input.dim() >= 2 and num_groups > 0 and input.numel() == num_groups:
        raise ValueError(
            f"gnflex.group_norm: expected more than 1 value per group (as torch's group_norm), "
            f"got input size {list(input.shape)} with num_groups={num_groups}"
        )


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: str = "none",
) -> Tensor:
    """GroupNorm of an (N, C, *) tensor followed by an optional fused activation.

    Same arguments and result as ``torch.nn.functional.group_norm``, plus
    ``activation`` in ``"none"``, ``"relu"``, ``"silu"``, ``"gelu"`` (exact
    erf form), applied inside the kernel. Runs gnflex's own kernels for
    float32/float64/float16/bfloat16 in NCHW or channels_last layout.
    """
    return group_norm_with_stats(input, num_groups, weight, bias, eps, activation)[0]


def group_norm_with_stats(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: str = "none",
):
    """Like :func:`group_norm` but also returns the (N, num_groups) mean and rstd."""
    check_more_than_one_value(input, num_groups)
    if type(input) is not Tensor and not torch.compiler.is_compiling():
        _register_sharding_if_loaded()  # a DTensor, maybe
    if in_onnx_export():
        return torch_group_norm_with_stats(input, num_groups, weight, bias, eps, activation)
    return group_norm_op(input, weight, bias, num_groups, eps, activation)


def _per_sample(value: Tensor, input: Tensor, name: str) -> Tensor:
    """scale / shift as (N, C); (N, C, 1, ...) too, the shape diffusers
    broadcasts them in."""
    n, c = input.shape[0], input.shape[1]
    ok = value.dim() >= 2 and value.shape[0] == n and value.shape[1] == c
    for size in value.shape[2:]:
        ok = ok and size == 1
    if not ok:
        raise ValueError(f"gnflex.modulated_group_norm: expected {name} of shape [N, C] = [{n}, {c}] "
                         f"(or [N, C, 1, ...]), got {list(value.shape)}")
    return value.reshape(n, c)


def modulation_params(input: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Optional[Tensor],
                      bias: Optional[Tensor], scale_offset: float = 1.0):
    """The per-sample (N, C) weight and bias that fold a modulation into the
    op: GN(x) * (scale_offset + scale) + shift, with GN's own affine inside,
    is GN without affine times w * (scale_offset + scale) plus
    b * (scale_offset + scale) + shift. Computed in the accumulate dtype;
    autograd takes the gradients of scale and shift through these few
    (N, C) values, and the op's per-sample dweight / dbias come from the
    backward's own pass over x. scale None: no scaling; shift None: no shift."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    if scale is not None:
        factor = _per_sample(scale, input, "scale").to(acc) + scale_offset
        w = factor if w is None else w * factor
        if b is not None:
            b = b * factor
    if shift is not None:
        offset = _per_sample(shift, input, "shift").to(acc)
        b = offset if b is None else b + offset
    return w, b


def modulated_group_norm(
    input: Tensor,
    num_groups: int,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: str = "none",
    scale_offset: float = 1.0,
) -> Tensor:
    """``act(group_norm(input) * (scale_offset + scale) + shift)`` in one kernel.

    The time-conditioned norm of diffusion models (AdaGN; diffusers'
    ``AdaGroupNorm`` and ``ResnetBlock2D`` with
    ``time_embedding_norm="scale_shift"``): ``scale`` and ``shift`` are per
    sample and channel, shape (N, C) or (N, C, 1, ...). ``scale_offset=0``
    gives FiLM's ``group_norm(input) * scale + shift``. ``weight`` / ``bias``
    are GroupNorm's own (C,) affine, applied before the modulation. Gradients
    flow to input, weight, bias, scale and shift.
    """
    weight, bias = modulation_params(input, scale, shift, weight, bias, scale_offset)
    return group_norm_with_stats(input, num_groups, weight, bias, eps, activation)[0]
