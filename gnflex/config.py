"""GNConfig and the automatic choice of the number of groups."""
import dataclasses
import math
from typing import Sequence, Union

from .activations import canonical

MODES = ("gn", "ln_like", "in_like")
GN_GROUP_PRIORITY = (32, 16, 8, 4, 2, 1)


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def choose_gn_groups(
    num_channels: int,
    priority: Sequence[int] = GN_GROUP_PRIORITY,
    min_channels_per_group: int = 1,
) -> int:
    """Number of groups for ``num_channels`` channels.

    The first ``g`` in ``priority`` with ``num_channels % g == 0`` and
    ``num_channels // g >= min_channels_per_group``.

    The rule is literal: with the default ``min_channels_per_group=1``, C=16
    gives 16 groups and C=8 gives 8 (one channel per group, i.e. InstanceNorm
    for those layers). ``min_channels_per_group=2`` gives the common
    smaller-group practice: C=16 -> 8, C=8 -> 4, C=64 -> 32.

    Raises ValueError when no value qualifies (C < min_channels_per_group, or
    a ``priority`` without 1).
    """
    _check_positive_int(num_channels, "num_channels")
    _check_positive_int(min_channels_per_group, "min_channels_per_group")
    for g in priority:
        _check_positive_int(g, "every priority value")
        if num_channels % g == 0 and num_channels // g >= min_channels_per_group:
            return g
    raise ValueError(
        f"no group count in {tuple(priority)} divides num_channels={num_channels} with at least "
        f"{min_channels_per_group} channels per group"
    )


@dataclasses.dataclass(frozen=True)
class GNConfig:
    """How a GroupNormFlex layer normalises.

    mode:
        ``"gn"``: classic GroupNorm with ``groups`` groups;
        ``"ln_like"``: one group (normalise over C and space, like
        ``GroupNorm(1, C)``); ``"in_like"``: C groups (per-channel, like
        ``GroupNorm(C, C)``, i.e. InstanceNorm with affine).
    groups: an int, or ``"auto"`` for :func:`choose_gn_groups`. Only used by
        mode ``"gn"``; the other modes fix the count themselves.
    eps: added to the variance.
    affine: learnable per-channel weight and bias.
    activation: ``"none"``, ``"relu"``, ``"silu"`` or ``"gelu"`` (aliases
        ``"identity"``, ``"swish"``), fused into the kernel.
    min_channels_per_group: passed to :func:`choose_gn_groups` when
        ``groups="auto"``.
    """

    mode: str = "gn"
    groups: Union[int, str] = "auto"
    eps: float = 1e-5
    affine: bool = True
    activation: str = "none"
    min_channels_per_group: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        # Aliases (identity, swish) are stored under their canonical name.
        object.__setattr__(self, "activation", canonical(self.activation))
        if self.groups != "auto":
            _check_positive_int(self.groups, "groups (or 'auto')")
            if self.mode != "gn":
                raise ValueError(
                    f"groups={self.groups} conflicts with mode={self.mode!r}, which fixes the "
                    "number of groups; use mode='gn' or groups='auto'"
                )
        if not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be a finite non-negative number, got {self.eps!r}")
        _check_positive_int(self.min_channels_per_group, "min_channels_per_group")

    def replace(self, **changes) -> "GNConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def num_groups(self, num_channels: int) -> int:
        """Groups this config gives a layer of ``num_channels`` channels."""
        _check_positive_int(num_channels, "num_channels")
        if self.mode == "ln_like":
            return 1
        if self.mode == "in_like":
            return num_channels
        if self.groups == "auto":
            return choose_gn_groups(num_channels, min_channels_per_group=self.min_channels_per_group)
        if num_channels % self.groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({self.groups})"
            )
        return self.groups


def layer_config(mode: str, num_groups: int, eps: float, affine: bool, activation: str) -> GNConfig:
    """The GNConfig of an existing layer. Its eps may be any value torch's
    group_norm takes (``convert`` copies a model's eps as it is), so an eps
    that GNConfig's own check refuses (negative, NaN, inf: a check for what
    users write) is set without it."""
    groups = num_groups if mode == "gn" else "auto"
    try:
        return GNConfig(mode=mode, groups=groups, eps=eps, affine=affine, activation=activation)
    except ValueError:
        config = GNConfig(mode=mode, groups=groups, affine=affine, activation=activation)
        object.__setattr__(config, "eps", eps)
        return config
