"""Convert an existing model to GroupNormFlex layers."""
import dataclasses
import functools
from typing import List, Optional, Tuple

import torch
from torch import nn

from ._fx_fusion import ActivationAfterNorm, fuse_in_forward_code, has_hooks, replaced_forward
from .config import GNConfig
from .modules import AdaGroupNorm, GroupNormFlex

# What gnflex computes for a module, keyed by the class whose forward the
# module runs. timm classes are recognised by module path and name, so that
# gnflex does not depend on timm.
_ACTIVATIONS = {nn.Identity: "none", nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu"}
_TIMM_ACTIVATIONS = {"GELU": "gelu", "Swish": "silu", "SwishMe": "silu"}  # exact equivalents
_TIMM_NORMS = ("GroupNorm", "GroupNorm1")  # plain group_norm
_TIMM_NORM_ACTS = ("GroupNormAct", "GroupNorm1Act")  # group_norm -> self.drop -> self.act


def _forward_owner(module: nn.Module) -> type:
    """The class whose ``forward`` ``module`` runs (subclasses may inherit it)."""
    return next(cls for cls in type(module).__mro__ if "forward" in vars(cls))


def _is_timm(cls: type, names) -> bool:
    return cls.__module__.startswith("timm.") and cls.__name__ in names


def _is_diffusers_ada_groupnorm(module: nn.Module) -> bool:
    cls = _forward_owner(module)
    return cls.__module__.startswith("diffusers.") and cls.__name__ == "AdaGroupNorm"


def _activation_name(module: nn.Module) -> Optional[str]:
    """gnflex's name for the activation ``module`` computes, or None (also
    where hooks or an instance-level forward may change what it computes)."""
    if has_hooks(module) or replaced_forward(module):
        return None
    if isinstance(module, ActivationAfterNorm):
        return module.kind
    owner = _forward_owner(module)
    if _is_timm(owner, _TIMM_ACTIVATIONS):
        return _TIMM_ACTIVATIONS[owner.__name__]
    if owner is nn.GELU and module.approximate != "none":
        return None  # ours is the exact (erf) GELU
    return _ACTIVATIONS.get(owner)


def _hooks_skip_reason(module: nn.Module) -> str:
    """Why ``module`` cannot be replaced because of what was added to it (hooks,
    an instance-level forward, here or in a submodule); empty if nothing."""
    if any(has_hooks(m) for m in module.modules()):
        return "has hooks"
    if any(replaced_forward(m) for m in module.modules()):
        return "forward replaced on the instance (e.g. accelerate's add_hook_to_module)"
    return ""


def _groupnorm_activation(gn: nn.GroupNorm) -> Tuple[Optional[str], str]:
    """(activation, "") when a GroupNormFlex computes ``gn``'s whole forward,
    else (None, why not)."""
    owner = _forward_owner(gn)
    reason = _hooks_skip_reason(gn)
    if reason:
        return None, reason
    if owner is nn.GroupNorm:
        return "none", ""
    if not _is_timm(owner, _TIMM_NORMS + _TIMM_NORM_ACTS):
        return None, f"own forward ({owner.__module__}.{owner.__qualname__})"
    if getattr(gn, "_fast_norm", False):
        return None, "timm fast_norm (group_norm in the autocast dtype)"
    if _is_timm(owner, _TIMM_NORMS):
        return "none", ""
    drop, act = getattr(gn, "drop", None), getattr(gn, "act", None)
    if not isinstance(drop, nn.Module) or _forward_owner(drop) is not nn.Identity:
        return None, f"drop {type(drop).__name__} is not nn.Identity"
    activation = _activation_name(act) if isinstance(act, nn.Module) else None
    if activation is None:
        return None, f"activation {act!r} is not one gnflex computes"
    return activation, ""


def _batchnorm_skip_reason(bn: nn.BatchNorm2d) -> str:
    """Why ``bn`` is left alone; empty when it runs nn.BatchNorm2d's forward."""
    owner = _forward_owner(bn)
    reason = _hooks_skip_reason(bn)
    if reason:
        return reason
    if owner not in nn.BatchNorm2d.__mro__:
        return f"own forward ({owner.__module__}.{owner.__qualname__})"
    return ""


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` changed: (module name, old module, new module) per
    replacement, the activations fused into the norm before them (an
    nn.Sequential's activation module name, or "norm + activation" where
    forward code calls them), (module name, reason) per norm layer left
    alone, and (module name, what happened) per module torch.fx traced."""

    replaced: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    fused: List[str] = dataclasses.field(default_factory=list)
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    traced: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"{len(self.replaced)} module(s) replaced, {len(self.fused)} activation(s) fused, "
            f"{len(self.skipped)} left alone"
        ]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self.replaced]
        lines += [f"  {name}: fused into the preceding norm (now nn.Identity)" if "+" not in name
                  else f"  {name}: fused in forward code" for name in self.fused]
        lines += [f"  {name}: left alone: {reason}" for name, reason in self.skipped]
        lines += [f"  {name}: {what}" for name, what in self.traced]
        return "\n".join(lines)


def _factory(module: nn.Module):
    p = next(module.parameters(recurse=False), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _from_ada_groupnorm(ada: nn.Module) -> AdaGroupNorm:
    """gnflex's AdaGroupNorm around diffusers' own act and linear modules (the
    same objects: weights, keys and devices stay)."""
    new = AdaGroupNorm(ada.linear.in_features, ada.linear.out_features // 2, ada.num_groups, eps=ada.eps,
                       device="meta")
    new.act = ada.act
    new.linear = ada.linear
    return new


def _from_groupnorm(gn: nn.GroupNorm, activation: str) -> GroupNormFlex:
    has_bias = gn.affine and gn.bias is not None
    config = GNConfig(mode="gn", groups=gn.num_groups, affine=gn.affine, activation=activation)
    new = GroupNormFlex(gn.num_channels, config, bias=has_bias, **_factory(gn))
    new.eps = float(gn.eps)  # any eps torch takes, even one GNConfig refuses; new.config follows
    with torch.no_grad():
        if gn.affine:
            new.weight.copy_(gn.weight)
            if has_bias:
                new.bias.copy_(gn.bias)
    return new


def _from_batchnorm(bn: nn.BatchNorm2d, config: GNConfig) -> GroupNormFlex:
    new = GroupNormFlex(bn.num_features, config, affine=bn.affine, **_factory(bn))
    new.eps = float(bn.eps)  # as in _from_groupnorm
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
    return new


def _fusable_next(parent: nn.Module, names: List[str], i: int) -> Optional[str]:
    """The name of the module after ``names[i]`` when ``parent`` runs as an
    nn.Sequential and that module is an activation gnflex can fuse."""
    if _forward_owner(parent) is not nn.Sequential or replaced_forward(parent) or i + 1 >= len(names):
        return None
    nxt = parent._modules[names[i + 1]]
    if nxt is None or _activation_name(nxt) in (None, "none"):  # None also for hooks
        return None
    return names[i + 1]


def convert(
    model: nn.Module,
    *,
    fuse_activations: bool = True,
    batchnorm: bool = False,
    batchnorm_config: Optional[GNConfig] = None,
) -> Tuple[nn.Module, ConversionReport]:
    """Replace normalisation layers of ``model`` (in place) by GroupNormFlex.

    Outputs and gradients are unchanged (up to rounding): a layer is replaced
    only when a GroupNormFlex computes its whole forward.

    - ``nn.GroupNorm``, and subclasses that keep its forward, become a
      GroupNormFlex with the same groups, eps (any value, even one GNConfig
      rejects), affine, bias, weights, dtype and device;
    - timm's ``GroupNorm``/``GroupNorm1`` likewise, and timm's
      ``GroupNormAct``/``GroupNorm1Act`` with ``drop`` an ``nn.Identity`` and
      ``act`` an ``nn.Identity``, ``nn.ReLU``, ``nn.SiLU``, exact ``nn.GELU()``
      or timm's equivalent (GELU, Swish) become a GroupNormFlex with that
      activation fused. timm is recognised by name, not imported;
    - any other GroupNorm (subclass with its own forward, a forward replaced
      on the instance as accelerate's ``add_hook_to_module`` does, other
      activation, tanh GELU, drop block, timm fast_norm, hooks, ...) is left
      alone and listed in ``report.skipped`` with the reason; convert does
      not raise. Activations with hooks or a replaced forward are not fused,
      and torch.fx does not rewrite a block holding such a module (other
      than as a called leaf);
    - ``fuse_activations``: a GroupNorm without activation directly followed
      by ``nn.ReLU``, ``nn.SiLU`` or ``nn.GELU()`` (exact) inside an
      ``nn.Sequential`` becomes one GroupNormFlex with that activation fused,
      and the activation becomes ``nn.Identity`` (indices and state_dict keys
      stay the same). Where forward code calls them in sequence instead
      (``h = self.norm1(x); h = self.act(h)``, ``F.silu(self.norm(x))``,
      ``F.group_norm(...)`` then an activation), the forward of each module
      holding the norm is traced one level deep by torch.fx (see
      ``gnflex._fx_fusion``): between modules, the norm computes the
      activation and the activation module becomes an ActivationAfterNorm
      (classes, code and state_dict keys stay). Where the code must change
      (an activation function, ``F.group_norm``, or a per-sample modulation
      ``norm(h) * factor + shift`` before the activation, as in diffusers'
      scale_shift ``ResnetBlock2D``), that module keeps its class and gets
      its rewritten code as an instance-level ``forward``
      (:class:`gnflex._fx_fusion.FusedForward`; TorchScript cannot compile
      it: pass ``fuse_activations=False`` to script). A norm output used by
      anything besides the activation, or a norm called twice, is not fused;
      ``report.traced`` lists what was traced;
    - diffusers' ``AdaGroupNorm`` becomes gnflex's :class:`AdaGroupNorm`
      (the modulation folded into the kernel), keeping its ``act`` and
      ``linear`` modules;
    - ``batchnorm``: ``nn.BatchNorm2d`` (and subclasses that keep its forward)
      becomes GroupNormFlex with ``batchnorm_config`` (default: GN with
      automatic groups), keeping eps and the affine weights. This changes what
      the layer computes (no running statistics): the model needs fine-tuning
      or training.

    Returns ``(model, report)``: ``model`` is the model passed, changed in place.
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
            fused = None  # name of the following activation fused into the norm
            if isinstance(child, GroupNormFlex):
                continue  # already gnflex's
            if isinstance(child, nn.GroupNorm):
                activation, reason = _groupnorm_activation(child)
                if activation == "none" and fuse_activations:
                    fused = _fusable_next(parent, names, i)
                    activation = _activation_name(parent._modules[fused]) if fused else activation
                build = functools.partial(_from_groupnorm, child, activation)
            elif _is_diffusers_ada_groupnorm(child):
                reason = _hooks_skip_reason(child)
                build = functools.partial(_from_ada_groupnorm, child)
            elif batchnorm and isinstance(child, nn.BatchNorm2d):
                reason = _batchnorm_skip_reason(child)
                build = functools.partial(_from_batchnorm, child, bn_config)
            else:
                visit(child, full + ".")
                continue
            if not reason:
                try:
                    new = build()
                except (ValueError, TypeError, RuntimeError) as e:
                    reason = f"no GroupNormFlex for it: {e}"
            if reason:
                report.skipped.append((full, reason))
                visit(child, full + ".")
                continue
            parent._modules[name] = new
            report.replaced.append((full, repr(child), repr(new)))
            if fused:
                parent._modules[fused] = nn.Identity()
                report.fused.append(f"{prefix}{fused}")

    visit(model, "")
    if fuse_activations:
        fuse_in_forward_code(model, _activation_name, report)
    return model, report
