"""Functional interface, mirroring ``torch.nn.functional.group_norm``."""
from typing import Optional

import torch
from torch import Tensor


def check_more_than_one_value(input: Tensor, num_groups: int) -> None:
    """As ``torch.nn.functional.group_norm``: refuse an input whose whole
    normalization would be over single values (N * C * HxW / num_groups == 1,
    e.g. one sample, one channel per group, no spatial extent), which makes
    the output constant. Kept so gnflex's Python API is a drop-in; the op
    ``torch.ops.gnflex.group_norm`` itself accepts such input."""
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
    return torch.ops.gnflex.group_norm(input, weight, bias, num_groups, eps, activation)
