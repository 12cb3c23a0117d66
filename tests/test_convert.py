"""gnflex.convert: which layers it replaces (torch, torchvision, timm), what it
keeps (groups, eps, affine, weights, dtype, device), what it leaves alone and
why, and the activations it fuses in nn.Sequential and in forward code."""
import collections
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnflex
from _helpers import randomize_groupnorms, torch_group_norm_without_bias
from gnflex import GroupNormFlex
from gnflex._fx_fusion import FusedForward


def _only_gnflex_norms(model):
    """Every GroupNorm left in ``model`` is a GroupNormFlex (itself an nn.GroupNorm)."""
    return all(isinstance(m, GroupNormFlex) for m in model.modules() if isinstance(m, nn.GroupNorm))


def test_convert_torchvision_resnet18_groupnorm():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is a test dependency")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(32, c)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    n_gn = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    converted, report = gnflex.convert(model)
    assert len(report.replaced) == n_gn == 20
    assert _only_gnflex_norms(converted)
    torch.testing.assert_close(converted(x), before, rtol=1e-4, atol=1e-4)


class MyGroupNorm(nn.GroupNorm):
    pass


def test_convert_fuses_activation_and_keeps_attributes():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8, eps=1e-3), nn.SiLU(),
        nn.Conv2d(8, 8, 1), MyGroupNorm(2, 8, affine=False), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 1), torch_group_norm_without_bias(8, 8), nn.GELU(approximate="tanh"),
    ).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
        model[7].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = model(x)
    keys = set(model.state_dict())
    converted, report = gnflex.convert(model)
    assert [name for name, _, _ in report.replaced] == ["1", "4", "7"]
    assert report.fused == ["2", "5"]  # tanh-GELU is not ours: left alone
    assert isinstance(converted[2], nn.Identity) and isinstance(converted[8], nn.GELU)
    assert (converted[1].activation, converted[1].eps, converted[1].num_groups) == ("silu", 1e-3, 4)
    assert converted[4].weight is None and converted[4].activation == "relu"
    assert converted[7].bias is None and converted[7].weight.dtype == torch.float64
    assert set(converted.state_dict()) == keys
    torch.testing.assert_close(converted(x), before)
    assert "3 module(s) replaced, 2 activation(s) fused" in str(report)


def test_convert_without_fusion_and_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.GroupNorm(4, 16), nn.ReLU())
    converted, report = gnflex.convert(model, fuse_activations=False, batchnorm=True)
    assert isinstance(converted[1], GroupNormFlex) and converted[1].num_groups == 16  # auto groups
    assert isinstance(converted[2], nn.ReLU) and converted[3].activation == "none"
    assert report.fused == [] and len(report.replaced) == 2
    untouched, report = gnflex.convert(nn.Sequential(nn.BatchNorm2d(4)))
    assert isinstance(untouched[0], nn.BatchNorm2d) and report.replaced == []


def test_convert_leaves_groupnormflex_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.SiLU(), GroupNormFlex(8, activation="relu"))
    converted, _ = gnflex.convert(model)
    layers = list(converted)
    again, report = gnflex.convert(converted)
    assert list(again) == layers  # the same module objects
    assert report.replaced == [] and report.skipped == [] and report.fused == []


class OffsetGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x) + 1.0


class ScaledBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_convert_leaves_alone_subclasses_with_their_own_forward():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), OffsetGroupNorm(2, 8), nn.SiLU(), ScaledBatchNorm(8), nn.GroupNorm(4, 8)
    ).eval()
    hooked = nn.GroupNorm(2, 8)
    hooked.register_forward_hook(lambda module, args, out: out * 3)
    model.append(hooked)
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    converted, report = gnflex.convert(model, batchnorm=True)
    assert [name for name, _, _ in report.replaced] == ["4"]
    assert [name for name, _ in report.skipped] == ["1", "3", "5"]
    assert "OffsetGroupNorm" in report.skipped[0][1] and report.skipped[2][1] == "has hooks"
    assert report.fused == [] and isinstance(converted[2], nn.SiLU)
    assert "1: left alone: own forward" in str(report) and "3 left alone" in str(report)
    torch.testing.assert_close(converted(x), before)


@pytest.mark.parametrize("eps", [0.0, -0.5, float("nan")])
def test_convert_keeps_any_eps(eps):
    # GNConfig only accepts finite eps >= 0; convert copies the model's eps anyway.
    model = nn.Sequential(nn.GroupNorm(2, 4, eps=eps), nn.ReLU())
    x = torch.randn(2, 4, 3, 3)
    before = model(x)
    converted, report = gnflex.convert(model)
    assert isinstance(converted[0], GroupNormFlex) and report.skipped == []
    assert converted[0].eps == eps or math.isnan(eps) and math.isnan(converted[0].eps)
    config_eps = converted[0].config.eps  # the layer's config says the same
    assert config_eps == eps or math.isnan(eps) and math.isnan(config_eps)
    torch.testing.assert_close(converted(x), before, equal_nan=True)


def _output_and_grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)))
    return [out, x.grad] + [p.grad for p in model.parameters()]


def _assert_same_function(model, converted, x, tol):
    # Per tensor, tolerances relative to its largest value: gradients of deep
    # models range over orders of magnitude.
    for ours, ref in zip(_output_and_grads(converted, x), _output_and_grads(model, x)):
        scale = ref.abs().max().item()
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize(
    "name, activations",
    [
        ("efficientnet_b0_gn", {"silu": 33, "none": 16}),  # GroupNormAct(SiLU) and GroupNormAct(Identity)
        ("poolformerv2_s12", {"none": 24}),  # GroupNorm1NoBias, a subclass of timm's GroupNorm1
    ],
)
def test_convert_timm_models_match_outputs_and_gradients(name, activations):
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    torch.manual_seed(0)
    # float64: in float32 the rounding of 16+ blocks, amplified by gradient
    # sums that cancel, would need a loose tolerance.
    model = randomize_groupnorms(timm.create_model(name, pretrained=False).eval().double())
    converted, report = gnflex.convert(copy.deepcopy(model))
    assert report.skipped == [] and _only_gnflex_norms(converted)
    found = collections.Counter(m.activation for m in converted.modules() if isinstance(m, GroupNormFlex))
    assert found == activations
    _assert_same_function(model, converted, torch.randn(2, 3, 32, 32, dtype=torch.float64), tol=1e-8)


def test_convert_timm_norm_layers():
    pytest.importorskip("timm", reason="timm is a test dependency")
    from timm.layers import GroupNorm, GroupNorm1, GroupNorm1Act, GroupNormAct
    from timm.layers.activations import GELU, Swish

    torch.manual_seed(0)
    model = randomize_groupnorms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        GroupNorm1(8),
        GroupNorm(8, num_groups=4, eps=1e-3),
        GroupNormAct(8, 4, act_layer="relu"),
        GroupNormAct(8, 2, act_layer="silu", affine=False),
        GroupNormAct(8, 4, act_layer="gelu"),  # timm's GELU
        GroupNormAct(8, 4, act_layer=nn.GELU),
        GroupNormAct(8, 4, act_layer=Swish),
        GroupNorm1Act(8, act_layer=GELU),
        GroupNormAct(8, 4, apply_act=False), nn.ReLU(),  # fused: the norm has no activation
        GroupNormAct(8, 4, act_layer="silu"), nn.ReLU(),  # not fused: the norm has one
    ))
    converted, report = gnflex.convert(copy.deepcopy(model))
    assert report.skipped == [] and report.fused == ["10"]
    assert [converted[i].activation for i in range(1, 12) if i != 10] == [
        "none", "none", "relu", "silu", "gelu", "gelu", "silu", "gelu", "relu", "silu"
    ]
    assert isinstance(converted[12], nn.ReLU) and converted[2].eps == 1e-3 and converted[1].num_groups == 1
    _assert_same_function(model, converted, torch.randn(2, 3, 6, 6), tol=1e-5)


def test_convert_leaves_alone_timm_layers_it_cannot_compute():
    pytest.importorskip("timm", reason="timm is a test dependency")
    from timm.layers import GroupNorm1, GroupNormAct

    fast = GroupNorm1(8)
    fast._fast_norm = True  # group_norm in the autocast dtype
    model = nn.Sequential(
        GroupNormAct(8, 4, act_layer=nn.Tanh),
        GroupNormAct(8, 4, act_layer="gelu_tanh"),
        GroupNormAct(8, 4, act_layer=nn.GELU, act_kwargs={"approximate": "tanh"}),
        GroupNormAct(8, 4, act_layer="relu", drop_layer=nn.Dropout),
        fast,
    ).eval()
    x = torch.randn(2, 8, 4, 4)
    before = model(x)
    converted, report = gnflex.convert(model)
    assert report.replaced == [] and [name for name, _ in report.skipped] == ["0", "1", "2", "3", "4"]
    assert "Tanh" in report.skipped[0][1] and "Dropout" in report.skipped[3][1]
    assert "fast_norm" in report.skipped[4][1]
    torch.testing.assert_close(converted(x), before)


# ---- fusion where forward code calls norm then activation ---------------------------
class DiffusionResnetBlock(nn.Module):
    """diffusers-style: one shared nonlinearity module called after each norm
    (once through an identity placeholder)."""

    def __init__(self, c=16):
        super().__init__()
        self.norm1 = nn.GroupNorm(4, c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.drop = nn.Identity()  # as timm's drop_block when off

    def forward(self, x):
        h = self.norm1(x)
        h = self.nonlinearity(h)
        h = self.conv1(h)
        h = self.norm2(h)
        h = self.drop(h)
        h = self.nonlinearity(h)
        return x + self.conv2(h)


class SegmentationResBlock(nn.Module):
    """3-D segmentation style: activation functions, one norm output reused."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv3d(c, c, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, c)
        self.norm2 = nn.GroupNorm(2, c)
        self.w = nn.Parameter(torch.ones(c))

    def forward(self, x):
        x = F.relu(self.norm1(x))
        skip = self.norm2(self.conv(x))  # used twice: not fusable
        y = F.gelu(skip) + skip
        return F.silu(F.group_norm(y, 4, self.w, None, 1e-5))


class DataDependent(nn.Module):
    """Does not trace (branch on a value); its block does."""

    def __init__(self):
        super().__init__()
        self.block = DiffusionResnetBlock()

    def forward(self, x):
        if x.sum() > 0:
            return self.block(x)
        return -self.block(x)


def _count_activation_calls(model, x):
    """Activation ops (aten relu / silu / gelu) that model(x) runs, whoever calls them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = {"relu", "relu_", "silu", "silu_", "gelu", "gelu_"}

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "aten" and func._opname in names:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(x)
    return Count.calls


@pytest.mark.parametrize("build, shape, fused, left_activations", [
    (DiffusionResnetBlock, (2, 16, 6, 6), ["norm1 + silu", "norm2 + silu"], 0),
    (SegmentationResBlock, (2, 8, 3, 4, 4), ["norm1 + relu", "F.group_norm (group_norm) + silu"], 1),
    (DataDependent, (2, 16, 6, 6), ["block.norm1 + silu", "block.norm2 + silu"], 0),
])
def test_convert_fuses_in_forward_code(build, shape, fused, left_activations):
    torch.manual_seed(0)
    model = randomize_groupnorms(build()).double()
    x = torch.randn(shape, dtype=torch.float64)
    def output_and_grads(m):  # by parameter name
        xg = x.clone().requires_grad_()
        out = m(xg)
        out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)))
        grads = {name: p.grad.clone() for name, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
        return out.detach(), xg.grad, grads

    before = output_and_grads(model)
    keys = set(model.state_dict())
    n_activations = _count_activation_calls(model, x)
    converted, report = gnflex.convert(model)
    assert sorted(report.fused) == sorted(fused), str(report)
    assert set(converted.state_dict()) == keys
    after = output_and_grads(converted)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    # The fused activations no longer run separately.
    assert _count_activation_calls(converted, x) == left_activations < n_activations
    if build is SegmentationResBlock:
        assert ("norm2", "activation not fused: its output has 2 users") in report.skipped
    if build is DataDependent:  # its code is not traced (no norm of its own); its block's is, and kept
        assert report.traced == [("block", "2 fused, module kept")]
        assert type(converted) is DataDependent and type(converted.block) is DiffusionResnetBlock
    if build is SegmentationResBlock:  # activation functions: the code changes, the class stays
        assert type(converted) is SegmentationResBlock and isinstance(converted.forward, FusedForward)
        assert not any(isinstance(m, torch.fx.GraphModule) for m in converted.modules())


class _NormActPlusInner(nn.Module):
    """Forward code calling a norm then an activation, beside a submodule."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(4, 8)
        self.act = nn.SiLU()
        self.inner = nn.Sequential(nn.Conv2d(8, 8, 1))

    def forward(self, x):
        return self.act(self.norm(x)) + self.inner(x)


def test_convert_never_changes_results_of_replaced_forwards_or_accelerate_hooks():
    """A forward replaced on the instance (accelerate's add_hook_to_module does
    that) or a hook is what runs: convert leaves such modules as they are, does
    not fuse an activation into or out of them, and traces no block whose code
    would bake them in."""
    accelerate_hooks = pytest.importorskip("accelerate.hooks")

    class Offset(accelerate_hooks.ModelHook):
        def __init__(self, offset):
            self.offset = offset

        def post_forward(self, module, output):
            return output + self.offset

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)

    # A norm whose instance forward doubles its output.
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU())
    plain_forward = model[1].forward
    model[1].forward = lambda h: 2 * plain_forward(h)
    ref = model(x)
    model, report = gnflex.convert(model)
    assert type(model[1]) is nn.GroupNorm and type(model[2]) is nn.SiLU
    assert any("instance" in why for _, why in report.skipped), str(report)
    torch.testing.assert_close(model(x), ref)

    # accelerate hooks on a norm, and on the activation after another norm.
    model = nn.Sequential(nn.GroupNorm(4, 8), nn.ReLU(), nn.GroupNorm(2, 8), nn.SiLU())
    accelerate_hooks.add_hook_to_module(model[0], Offset(1.0))
    accelerate_hooks.add_hook_to_module(model[3], Offset(-0.5))
    ref = model(x)
    model, report = gnflex.convert(model)
    assert type(model[0]) is nn.GroupNorm and isinstance(model[2], GroupNormFlex)
    assert model[2].activation == "none" and type(model[3]) is nn.SiLU, str(report)
    torch.testing.assert_close(model(x), ref)

    # A block whose forward code could be fused, holding a hooked submodule:
    # the hook stays live (a traced block would have baked in its offset).
    block = _NormActPlusInner()
    hook = Offset(1.0)
    accelerate_hooks.add_hook_to_module(block.inner, hook)
    block, report = gnflex.convert(block)
    assert type(block) is _NormActPlusInner and isinstance(block.norm, GroupNormFlex), str(report)
    hook.offset = 3.0
    expected = F.silu(F.group_norm(x, 4, block.norm.weight, block.norm.bias)) + block.inner._old_forward(x) + 3.0
    torch.testing.assert_close(block(x), expected)
