"""nn.Modules: GroupNormFlex, GroupNorm (torch's argument order), AdaGroupNorm
(time-conditioned), ConvGNAct and the small GNCNN backbone."""
import weakref
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._dispatch import group_norm_dispatch
from ._modulation import modulation_params
from .activations import ACTIVATIONS, ALL_NAMES
from .config import GNConfig, layer_config
from .functional import modulated_group_norm


class GroupNormFlex(nn.GroupNorm):
    """GroupNorm (+ fused activation) over an (N, C, *) input, on gnflex's kernels.

    ``GroupNormFlex(64)`` is GroupNorm with automatically chosen groups;
    ``GroupNormFlex(64, GNConfig(mode="ln_like"))`` or
    ``GroupNormFlex(64, mode="in_like", activation="silu")`` pick other modes
    (the keywords ``mode``, ``groups``, ``eps``, ``affine``, ``activation``
    and ``min_channels_per_group`` replace those fields of ``config``).
    ``layer.config`` is derived from the layer's attributes.

    A subclass of ``nn.GroupNorm`` (as timm's GroupNormAct), so code that finds
    norm layers by type (weight-decay rules, wrap policies, model surgery)
    sees it: ``num_groups``, ``num_channels``, ``eps``, ``affine``, ``weight``
    and ``bias`` mean what they mean there, and state_dicts load both ways.
    ``affine=False`` (in the config) drops both parameters, ``bias=False``
    only the bias.
    """

    # Set by convert where forward code calls an activation module on this
    # norm's output: the kernel computes it, and that module (an
    # ActivationAfterNorm) returns ``_taken_output`` (a weak reference to the
    # latest output) unchanged. Not under torch.compile, where a graph pass fuses.
    _takes_activation: Optional[str] = None
    _taken_output = None

    __jit_unused_properties__ = ["config"]

    def __init__(
        self,
        num_channels: int,
        config: Optional[GNConfig] = None,
        *,
        mode: Optional[str] = None,
        groups: Optional[Union[int, str]] = None,
        eps: Optional[float] = None,
        affine: Optional[bool] = None,
        activation: Optional[str] = None,
        min_channels_per_group: Optional[int] = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        config = GNConfig() if config is None else config
        if not isinstance(config, GNConfig):
            raise TypeError(f"config must be a GNConfig, got {type(config).__name__}")
        changes = {"mode": mode, "groups": groups, "eps": eps, "affine": affine, "activation": activation,
                   "min_channels_per_group": min_channels_per_group}
        changes = {name: value for name, value in changes.items() if value is not None}
        if changes:
            config = config.replace(**changes)
        super().__init__(config.num_groups(num_channels), num_channels, float(config.eps),
                         config.affine, device=device, dtype=dtype)
        if config.affine and not bias:
            self.register_parameter("bias", None)
        self.mode = config.mode
        self.activation = config.activation

    @property
    def config(self) -> GNConfig:
        """What this layer computes, as a GNConfig (read-only: derived from
        ``mode``, ``num_groups``, ``eps``, ``affine`` and ``activation``, so
        it never disagrees with them; ``groups`` is the layer's count)."""
        return layer_config(self.mode, self.num_groups, self.eps, self.affine, self.activation)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return group_norm_dispatch(input, self.num_groups, self.weight, self.bias, self.eps, self.activation)[0]
        # Registered parameters straight from their dict (nn.Module.__getattr__ is
        # a Python call per attribute); a parametrization or a plain attribute
        # (the old weight_norm) is not in it and is read as usual.
        params = self._parameters
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        taken = self._takes_activation
        if taken is None or torch.compiler.is_compiling():
            return group_norm_dispatch(input, self.num_groups, weight, bias, self.eps, self.activation)[0]
        output = group_norm_dispatch(input, self.num_groups, weight, bias, self.eps, taken)[0]
        self._taken_output = weakref.ref(output)
        return output

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_taken_output", None)  # a weak reference does not pickle
        return state

    def extra_repr(self) -> str:
        taken = "" if self._takes_activation is None else f", takes the next {self._takes_activation}"
        return (
            f"{self.num_channels}, groups={self.num_groups}, mode={self.mode}, eps={self.eps}, "
            f"affine={self.affine}, activation={self.activation}{taken}"
        )


class GroupNorm(GroupNormFlex):
    """``nn.GroupNorm`` with its own argument order, on gnflex's kernels:
    ``gnflex.GroupNorm(32, 64)`` where the code said ``nn.GroupNorm(32, 64)``,
    plus a fused ``activation``. The same layer as
    ``GroupNormFlex(num_channels, groups=num_groups, ...)``.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str = "none",
    ):
        config = GNConfig(groups=num_groups, eps=eps, affine=affine, activation=activation)
        super().__init__(num_channels, config, bias=bias, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        text = nn.GroupNorm.extra_repr(self)  # torch's words for torch's arguments
        return text if self.activation == "none" else f"{text}, activation={self.activation}"


# diffusers' names for AdaGroupNorm's embedding activation (get_activation).
EMBEDDING_ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


class AdaGroupNorm(nn.Module):
    """GroupNorm modulated by an embedding, as diffusers' ``AdaGroupNorm``:
    ``scale, shift = linear(act(emb)).chunk(2, dim=1)``, then
    ``group_norm(x) * (1 + scale) + shift`` (no affine of its own), here in one
    kernel with an optional fused output ``activation``. Same arguments,
    attributes (``num_groups``, ``eps``, ``act``, ``linear``) and state_dict
    keys as diffusers' class, so weights load either way and :func:`convert`
    swaps one for the other.
    """

    def __init__(
        self,
        embedding_dim: int,
        out_dim: int,
        num_groups: int,
        act_fn: Optional[str] = None,
        eps: float = 1e-5,
        *,
        activation: str = "none",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if act_fn is not None and act_fn not in EMBEDDING_ACTIVATIONS:
            raise ValueError(f"AdaGroupNorm: act_fn must be None or one of {sorted(EMBEDDING_ACTIVATIONS)}, "
                             f"got {act_fn!r}")
        if activation not in ALL_NAMES:
            raise ValueError(f"AdaGroupNorm: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.num_groups = num_groups
        self.eps = eps
        self.activation = activation
        self.act = None if act_fn is None else EMBEDDING_ACTIVATIONS[act_fn]()
        self.linear = nn.Linear(embedding_dim, out_dim * 2, device=device, dtype=dtype)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        act = self.act
        if act is not None:
            emb = act(emb)
        scale, shift = self.linear(emb).chunk(2, dim=1)
        if not torch.jit.is_scripting():
            return modulated_group_norm(x, self.num_groups, scale, shift, eps=self.eps, activation=self.activation)
        weight, bias = modulation_params(x, scale, shift, None, None, 1.0)
        return group_norm_dispatch(x, self.num_groups, weight, bias, self.eps, self.activation)[0]

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, eps={self.eps}, activation={self.activation}"


class ConvGNAct(nn.Module):
    """Conv2d (no bias) -> GroupNormFlex with the activation fused into the norm.

    ``padding=None`` keeps the spatial size at stride 1 ("same" for odd
    kernels). ``groups`` is the convolution's groups (as in timm's
    ConvNormAct); the norm's groups come from ``config``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: Optional[int] = None,
        dilation: int = 1,
        groups: int = 1,
        activation: str = "relu",
        config: Optional[GNConfig] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=False, **factory,
        )
        self.norm = GroupNormFlex(out_channels, config, activation=activation, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class GNCNN(nn.Module):
    """A small GroupNorm CNN: stem -> stage1 -> stage2 of ConvGNAct blocks,
    global average pool and a linear classifier.

    For an input (N, in_channels, H, W) and ``widths=(w0, w1, w2, w3)``:

    ========  ==========================================  ===================
    part      blocks (kernel 3)                            output
    ========  ==========================================  ===================
    stem      w0 /2, w0 /2, w1 /2                          P3 (N, w1, H/8, W/8)
    stage1    w2 /2, w2                                    P4 (N, w2, H/16, W/16)
    stage2    w3 /2, w3                                    P5 (N, w3, H/32, W/32)
    head      global average pool, Linear(w3, num_classes) logits (N, num_classes)
    ========  ==========================================  ===================

    (sizes rounded up: each stride-2 conv maps H to ceil(H / 2)).
    ``forward(x)`` returns logits; ``forward(x, return_features=True)`` (or
    ``return_features=True`` at construction) returns
    ``(logits, {"p3": P3, "p4": P4, "p5": P5})``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64, 128),
        activation: str = "relu",
        config: Optional[GNConfig] = None,
        return_features: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths must have 4 values (stem, stem out, stage1, stage2), got {widths}")
        w0, w1, w2, w3 = widths
        factory = {"device": device, "dtype": dtype}

        def block(cin, cout, stride):
            return ConvGNAct(cin, cout, 3, stride, activation=activation, config=config, **factory)

        self.stem = nn.Sequential(block(in_channels, w0, 2), block(w0, w0, 2), block(w0, w1, 2))
        self.stage1 = nn.Sequential(block(w1, w2, 2), block(w2, w2, 1))
        self.stage2 = nn.Sequential(block(w2, w3, 2), block(w3, w3, 1))
        self.head = nn.Linear(w3, num_classes, **factory)
        self.return_features = return_features
        self.feature_channels = (w1, w2, w3)

    def forward_features(self, x: Tensor) -> Dict[str, Tensor]:
        p3 = self.stem(x)
        p4 = self.stage1(p3)
        p5 = self.stage2(p4)
        return {"p3": p3, "p4": p4, "p5": p5}

    def forward(
        self, x: Tensor, return_features: Optional[bool] = None
    ) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
        features = self.forward_features(x)
        logits = self.head(features["p5"].mean(dim=(2, 3)))
        want = self.return_features if return_features is None else return_features
        if want:
            return logits, features
        return logits
