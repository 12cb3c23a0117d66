"""Functional interface, mirroring ``torch.nn.functional.group_norm``."""
from typing import Optional

import torch
from torch import Tensor


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
    return torch.ops.gnflex.group_norm(input, weight, bias, num_groups, eps, activation)
