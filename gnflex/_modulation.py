"""Per-sample modulation (AdaGN / FiLM) folded into the op's weight and bias."""
from typing import Optional

import torch
from torch import Tensor


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
