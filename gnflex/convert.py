"""Convert an existing model to GroupNormFlex layers."""
import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import nn

from .config import GNConfig
from .modules import GroupNormFlex

# Activation modules a GroupNorm in an nn.Sequential can absorb.
_FUSABLE = {nn.ReLU: "relu", nn.SiLU: "silu"}


def _fusable_activation(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None  # ours is the exact (erf) GELU
    for cls, name in _FUSABLE.items():
        if isinstance(module, cls):
            return name
    return None


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` changed: (module name, old module, new module) per
    replacement, and the names of activations fused into the norm before them."""

    replaced: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    fused: List[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.replaced)} module(s) replaced, {len(self.fused)} activation(s) fused"]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self.replaced]
        lines += [f"  {name}: fused into the preceding norm (now nn.Identity)" for name in self.fused]
        return "\n".join(lines)


def _factory(module: nn.Module):
    p = next(module.parameters(recurse=False), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _from_groupnorm(gn: nn.GroupNorm, activation: str) -> GroupNormFlex:
    has_bias = gn.affine and gn.bias is not None
    new = GroupNormFlex(
        gn.num_channels,
        GNConfig(mode="gn", groups=gn.num_groups, eps=gn.eps, affine=gn.affine, activation=activation),
        bias=has_bias,
        **_factory(gn),
    )
    with torch.no_grad():
        if gn.affine:
            new.weight.copy_(gn.weight)
            if has_bias:
                new.bias.copy_(gn.bias)
    return new


def _from_batchnorm(bn: nn.BatchNorm2d, config: GNConfig) -> GroupNormFlex:
    cfg = config.replace(eps=bn.eps, affine=bn.affine)
    new = GroupNormFlex(bn.num_features, cfg, **_factory(bn))
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
    return new


def convert(
    model: nn.Module,
    *,
    fuse_activations: bool = True,
    batchnorm: bool = False,
    batchnorm_config: Optional[GNConfig] = None,
) -> Tuple[nn.Module, ConversionReport]:
    """Replace normalisation layers of ``model`` (in place) by GroupNormFlex.

    - every ``nn.GroupNorm`` (subclasses included) becomes a GroupNormFlex with
      the same groups, eps, affine, bias, weights, dtype and device: outputs
      are unchanged;
    - ``fuse_activations``: a GroupNorm directly followed by ``nn.ReLU``,
      ``nn.SiLU`` or ``nn.GELU()`` (exact) inside an ``nn.Sequential`` becomes one
      GroupNormFlex with that activation fused, and the activation becomes
      ``nn.Identity`` (indices and state_dict keys stay the same);
    - ``batchnorm``: ``nn.BatchNorm2d`` becomes GroupNormFlex with
      ``batchnorm_config`` (default: GN with automatic groups), keeping eps and
      the affine weights. This changes what the layer computes (no running
      statistics): the model needs fine-tuning or training.

    Returns ``(model, report)``.
    """
    report = ConversionReport()
    bn_config = batchnorm_config or GNConfig()

    def visit(parent: nn.Module, prefix: str) -> None:
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None:
                continue
            full = f"{prefix}{name}"
            if isinstance(child, nn.GroupNorm):
                activation = "none"
                if fuse_activations and isinstance(parent, nn.Sequential) and i + 1 < len(names):
                    nxt = parent._modules[names[i + 1]]
                    activation = (_fusable_activation(nxt) if nxt is not None else None) or "none"
                    if activation != "none":
                        parent._modules[names[i + 1]] = nn.Identity()
                        report.fused.append(f"{prefix}{names[i + 1]}")
                new = _from_groupnorm(child, activation)
                parent._modules[name] = new
                report.replaced.append((full, repr(child), repr(new)))
            elif batchnorm and isinstance(child, nn.BatchNorm2d):
                new = _from_batchnorm(child, bn_config)
                parent._modules[name] = new
                report.replaced.append((full, repr(child), repr(new)))
            else:
                visit(child, full + ".")

    visit(model, "")
    return model, report
