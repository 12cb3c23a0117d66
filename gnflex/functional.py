"""Functional interface, mirroring ``torch.nn.functional.group_norm``."""
from typing import Optional

from torch import Tensor

from ._dispatch import group_norm_dispatch
from ._modulation import modulation_params


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
    return group_norm_dispatch(input, num_groups, weight, bias, eps, activation)[0]


def group_norm_with_stats(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: str = "none",
):
    """Like :func:`group_norm` but also returns the (N, num_groups) mean and rstd."""
    return group_norm_dispatch(input, num_groups, weight, bias, eps, activation)


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
    return group_norm_dispatch(input, num_groups, weight, bias, eps, activation)[0]
