"""How the Python API runs the op: one helper, :func:`group_norm_dispatch`,
used by ``gnflex.group_norm`` and the modules alike. It checks the input as
torch's group_norm does, registers the DTensor sharding rule when a DTensor
shows up, and while ``torch.onnx.export`` traces a model computes with torch's
own functions instead (which both exporters translate)."""
import contextlib
import contextvars
from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from ._distributed import register_if_loaded as _register_sharding_if_loaded
from ._ops import group_norm_op
from .activations import torch_function

# True while gnflex.onnx.export traces a model: the op then stays in the
# graph and gnflex's translation table exports it.
_keep_op_in_onnx = contextvars.ContextVar("gnflex_keep_op_in_onnx", default=False)


@contextlib.contextmanager
def keep_op_in_onnx_export():
    """While active (in this thread or task), ONNX export traces gnflex's op
    itself (gnflex.onnx.export translates it); otherwise the Python API
    switches to torch's ops there."""
    token = _keep_op_in_onnx.set(True)
    try:
        yield
    finally:
        _keep_op_in_onnx.reset(token)


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
        return torch.onnx.is_in_onnx_export() and not _keep_op_in_onnx.get()
    if not _onnx_exporting:
        _onnx_exporting.append(_onnx_export_flags())
    return _onnx_exporting[0]() and not _keep_op_in_onnx.get()


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
    ``torch.ops.gnflex.group_norm`` itself accepts such input. Not for a
    ``torch.fx.Proxy`` (no size to check; the traced graph runs the op)."""
    if num_groups > 0 and input.numel() == num_groups and input.dim() >= 2:
        raise ValueError(
            f"gnflex.group_norm: expected more than 1 value per group (as torch's group_norm), "
            f"got input size {list(input.shape)} with num_groups={num_groups}"
        )


def group_norm_dispatch(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                        activation: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) of the op for the Python API: eager, traced, compiled,
    exported or scripted (TorchScript compiles only the last two lines). The
    common call (a plain tensor, eager) takes the fewest checks first: the
    per-call host time is measured by bench/host_overhead.py."""
    if not torch.jit.is_scripting():
        plain = type(input) is Tensor
        if plain or not isinstance(input, torch.fx.Proxy):
            check_more_than_one_value(input, num_groups)
        if not plain and not torch.compiler.is_compiling():
            _register_sharding_if_loaded()  # a DTensor, maybe
        if in_onnx_export():
            return torch_group_norm_with_stats(input, num_groups, weight, bias, eps, activation)
        return group_norm_op(input, weight, bias, num_groups, eps, activation)
    check_more_than_one_value(input, num_groups)
    return torch.ops.gnflex.group_norm(input, weight, bias, num_groups, eps, activation)
