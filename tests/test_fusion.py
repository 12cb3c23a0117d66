"""Norm -> activation fusion on real library models (diffusers, MONAI, timm),
eager (convert) and under torch.compile (gnflex's Inductor pass): outputs and
gradients unchanged, classes and state_dict keys kept, and the activation
calls that followed a norm gone."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gnflex
from _helpers import randomize_groupnorms
from gnflex import GroupNormFlex
from gnflex._fx_fusion import ActivationAfterNorm, FusedForward

_NORMS = {"native_group_norm", "group_norm"}  # torch's (as aten runs it) and gnflex's
_ACTIVATIONS = {"relu", "relu_", "silu", "silu_", "gelu", "gelu_"}


class _CountActivationsAfterNorms(TorchDispatchMode):
    """Activation ops whose input is a norm's output, and fused norms
    (gnflex's op with an activation), over what runs under it."""

    def __init__(self):
        super().__init__()
        self.after_norm = self.fused = 0
        self.norm_outputs = []  # kept alive: ids stay unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._opname
        if func.namespace in ("aten", "gnflex") and name in _NORMS:
            self.norm_outputs.append(out[0])
            if func.namespace == "gnflex":
                activation = args[5] if len(args) > 5 else (kwargs or {}).get("activation", "none")
                self.fused += activation != "none"
        elif func.namespace == "aten" and name in _ACTIVATIONS:
            self.after_norm += any(args[0] is t for t in self.norm_outputs)
        elif func._schema.is_mutable:  # x += shortcut: no longer the norm's output
            self.norm_outputs = [t for t in self.norm_outputs if not any(a is t for a in args)]
        return out


def _count(model, *inputs):
    counter = _CountActivationsAfterNorms()
    with torch.no_grad(), counter:
        model(*inputs)
    return counter


def _randomized(model):
    """float64 (gradients of deep models cancel), in eval mode, GroupNorm affine away from 1 / 0."""
    return randomize_groupnorms(model.double().eval())


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if hasattr(out, "sample"):  # diffusers' output classes
        return out.sample
    return _first_tensor(out.to_tuple())


def _output_and_grads(model, inputs):
    inputs = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = _first_tensor(model(*inputs))
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)))
    grads = {name.removeprefix("_orig_mod."): p.grad.clone()  # a compiled module's names
             for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), [t.grad for t in inputs if t.is_floating_point()], grads


def _assert_close_scaled(ours, ref, tol=1e-9):
    """Per tensor, relative to its largest value."""
    if isinstance(ref, dict):
        assert ours.keys() == ref.keys()
        ours, ref = list(ours.values()), list(ref.values())
    if isinstance(ref, (list, tuple)):
        for a, b in zip(ours, ref, strict=True):
            _assert_close_scaled(a, b, tol)
        return
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * max(ref.abs().max().item(), 1e-3))


def _diffusers_unet2d(**config):
    diffusers = pytest.importorskip("diffusers")
    config = {"down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
              "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 8, **config}
    model = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(16, 32), norm_num_groups=8, **config)
    return model, (torch.randn(2, 3, 8, 8), torch.tensor([3, 500]))


def _diffusers_unet2d_scale_shift():
    return _diffusers_unet2d(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                             resnet_time_scale_shift="scale_shift")


def _diffusers_unet2d_condition():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8)
    return model, (torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.randn(2, 5, 16))


def _diffusers_autoencoder_kl():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return model, (torch.randn(2, 3, 16, 16),)


def _monai_segresnet():
    nets = pytest.importorskip("monai.networks.nets")
    model = nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 2),
                           blocks_up=(1,), norm=("GROUP", {"num_groups": 4}))
    return model, (torch.randn(2, 1, 8, 8, 8),)


def _timm_resnet_gn():
    timm = pytest.importorskip("timm")
    from timm.layers import GroupNorm

    # A timm ResNet whose blocks call norm then act in code (norm_layer without an activation).
    model = timm.create_model("resnet18", pretrained=False, num_classes=4, norm_layer=GroupNorm)
    return model, (torch.randn(2, 3, 32, 32),)


MODELS = {
    "diffusers-UNet2DModel": _diffusers_unet2d,
    "diffusers-UNet2DModel-scale_shift": _diffusers_unet2d_scale_shift,
    "diffusers-UNet2DConditionModel": _diffusers_unet2d_condition,
    "diffusers-AutoencoderKL": _diffusers_autoencoder_kl,
    "monai-SegResNet": _monai_segresnet,
    "timm-resnet18-GroupNorm": _timm_resnet_gn,
}


def _classes(model, names=None):
    """Module classes by name, norms and activations (which convert replaces) left out."""
    replaced = (nn.GroupNorm, nn.SiLU, nn.ReLU, nn.GELU, nn.LeakyReLU, nn.PReLU)
    return {name: type(m) for name, m in model.named_modules()
            if (name in names if names is not None else not isinstance(m, replaced))}


@pytest.mark.parametrize("name", MODELS)
def test_eager_fusion_on_library_models(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model = _randomized(model)
    inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    before = _count(model, *inputs)
    assert before.after_norm >= 3 and before.fused == 0
    reference = _output_and_grads(model, inputs)
    keys, classes = list(model.state_dict()), _classes(model)

    converted, report = gnflex.convert(copy.deepcopy(model))
    after = _count(converted, *inputs)
    # At least 90 % of the activation calls after a norm are gone, into the norm's kernel.
    assert after.after_norm <= 0.1 * before.after_norm, str(report)
    assert after.fused >= 0.9 * before.after_norm
    assert not any(isinstance(m, nn.GroupNorm) and not isinstance(m, GroupNormFlex) for m in converted.modules())
    # Same classes (activation modules aside), same state_dict keys, same function.
    assert _classes(converted, classes) == classes and list(converted.state_dict()) == keys
    assert not any(isinstance(m, torch.fx.GraphModule) for m in converted.modules())
    _assert_close_scaled(_output_and_grads(converted, inputs), reference)


def test_diffusers_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model, inputs = _diffusers_unet2d()
    converted, report = gnflex.convert(_randomized(model))
    assert type(converted) is type(model) and report.fused
    converted.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, torch_dtype=torch.float64).eval()  # torch's GroupNorm again
    assert not any(isinstance(m, GroupNormFlex) for m in loaded.modules())
    with torch.no_grad():
        inputs = [inputs[0].double(), inputs[1]]
        _assert_close_scaled(loaded(*inputs).sample, converted(*inputs).sample)
    reconverted, again = gnflex.convert(loaded)
    assert list(reconverted.state_dict()) == list(converted.state_dict()) and again.fused == report.fused


class _TimeBlock(nn.Module):
    """As diffusers' ResnetBlock2D: *args / **kwargs, and one nonlinearity
    module for the norm's output and the time embedding."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 8)
        self.act = nn.SiLU()
        self.proj = nn.Linear(4, 8)

    def forward(self, x, temb, *args, **kwargs):
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            raise ValueError("no longer taken")
        h = self.act(self.norm(x))
        return h + self.proj(self.act(temb))[:, :, None, None]


def test_shared_activation_still_applies_to_other_inputs():
    """Only the norm's outputs pass through the shared activation."""
    torch.manual_seed(0)
    block = _randomized(_TimeBlock())
    x, temb = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    ref = block(x, temb)
    converted, report = gnflex.convert(copy.deepcopy(block))
    assert report.fused == ["norm + silu"] and type(converted) is _TimeBlock, str(report)
    assert isinstance(converted.act, ActivationAfterNorm) and isinstance(converted.act, nn.SiLU)
    torch.testing.assert_close(converted(x, temb), ref)
    # Run the activation on the norm's output from elsewhere (a stale output is not passed through).
    h = converted.norm(x)
    assert converted.act(h) is h
    torch.testing.assert_close(converted.act(h.clone()), F.silu(h))
    # Pickles and deep-copies after a call (the weak reference is dropped).
    for restored in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert restored.act.after_norms == [restored.norm]
        torch.testing.assert_close(restored(x, temb), ref)
        h = restored.norm(x)
        assert restored.act(h) is h


def _full_size_calls(model, inputs, like):
    """(aten mul / add calls on tensors of ``like``'s shape, gnflex op calls
    with per-sample weight) while ``model`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        elementwise = per_sample = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "aten" and func._opname in ("mul", "add") \
                    and any(isinstance(a, torch.Tensor) and a.shape == like.shape for a in args):
                Count.elementwise += 1
            if func.namespace == "gnflex" and args[1] is not None and args[1].dim() == 2:
                Count.per_sample += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(*inputs)
    return Count.elementwise, Count.per_sample


def test_eager_fusion_of_the_scale_shift_modulation():
    """diffusers' scale_shift ResnetBlock2D: norm2(h) * (1 + scale) + shift
    then SiLU becomes one op call with per-sample weight and bias; the class
    stays, and the rewritten forward survives deepcopy and pickling."""
    resnet = pytest.importorskip("diffusers.models.resnet")
    torch.manual_seed(0)
    block = _randomized(resnet.ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8, groups=4,
                                             time_embedding_norm="scale_shift")).double()
    inputs = [torch.randn(2, 16, 6, 6, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)]
    reference = _output_and_grads(block, inputs)
    converted, report = gnflex.convert(copy.deepcopy(block))
    assert sorted(report.fused) == ["norm1 + silu", "norm2 * scale + shift + silu"], str(report)
    assert type(converted) is resnet.ResnetBlock2D and isinstance(converted.forward, FusedForward)
    assert list(converted.state_dict()) == list(block.state_dict())
    # Before: y * (1 + scale), + shift and the residual add on full tensors; after: the residual add only.
    assert _full_size_calls(block, inputs, inputs[0]) == (3, 0)
    assert _full_size_calls(converted, inputs, inputs[0]) == (1, 1)
    _assert_close_scaled(_output_and_grads(converted, inputs), reference)
    for restored in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert restored.forward.module is restored
        _assert_close_scaled(_output_and_grads(restored, inputs), reference)


class _FiLMBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x, scale, shift=None):
        return F.silu(self.norm(x) * scale + shift)


def test_rewritten_forward_computes_other_calls_as_written():
    """A factor that is not per sample, or a call with other arguments than
    the traced ones, gives what the original code gives."""
    torch.manual_seed(0)
    block = _randomized(_FiLMBlock()).double()
    converted, report = gnflex.convert(copy.deepcopy(block))
    assert report.fused == ["norm * scale + shift + silu"] and isinstance(converted.forward, FusedForward)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    shift = torch.randn(2, 8, 1, 1, dtype=torch.float64)
    for scale in (torch.randn(2, 8, 1, 1, dtype=torch.float64),  # fused
                  torch.randn(1, 8, 1, 1, dtype=torch.float64),  # per channel: as written
                  torch.randn(2, 8, 4, 4, dtype=torch.float64),  # full tensor: as written
                  torch.randn(2, 8, 1, 1, dtype=torch.float32),  # promotes: as written
                  0.5):  # not a tensor: the class's forward
        torch.testing.assert_close(converted(x, scale, shift), block(x, scale, shift))
    torch.testing.assert_close(converted(x, scale=shift, shift=shift), block(x, shift, shift))


def test_norm_output_used_twice_is_not_fused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(2, 8)
            self.act = nn.SiLU()

        def forward(self, x):
            h = self.norm(x)
            return self.act(h) + h

    x = torch.randn(2, 8, 4, 4)
    block = Block()
    converted, report = gnflex.convert(copy.deepcopy(block))
    assert report.fused == [] and ("norm", "activation not fused: its output has 2 users") in report.skipped
    torch.testing.assert_close(converted(x), block(x))


def test_scripting_a_fused_model_runs_unfused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(2, 8)
            self.act = nn.SiLU()

        def forward(self, x):
            return self.act(self.norm(x))

    torch.manual_seed(0)
    block = _randomized(Block()).float()
    x = torch.randn(2, 8, 4, 4)
    converted, report = gnflex.convert(copy.deepcopy(block))
    assert report.fused == ["norm + silu"]
    scripted = torch.jit.script(converted)
    torch.testing.assert_close(scripted(x), block(x))
    torch.testing.assert_close(converted(x), block(x))


# ---- torch.compile ----------------------------------------------------------------
def _compiled_counts(model, inputs):
    """(activations after a gnflex norm, fused gnflex norms) in the forward
    graph Inductor compiles (after gnflex's pre-grad pass)."""
    import operator

    found = {}

    def record(graph):
        after = fused = 0
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is torch.ops.gnflex.group_norm.default:
                fused += (node.args[5] if len(node.args) > 5 else node.kwargs.get("activation", "none")) != "none"
            elif getattr(node.target, "_opname", None) in _ACTIVATIONS:
                src = node.args[0]
                after += (src.op == "call_function" and src.target is operator.getitem
                          and src.args[0].target is torch.ops.gnflex.group_norm.default)
        found["after"], found["fused"] = after, fused

    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=record), torch.no_grad():
        out = torch.compile(model, fullgraph=True)(*inputs)
    return found, out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusers-UNet2DModel", "monai-SegResNet"])
def test_compiled_fusion_on_library_models(name):
    """The Inductor pass fuses in models converted with fuse_activations=False
    (norms without activations, activation calls in code): no graph break,
    same result as eager."""
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model = _randomized(model).float()
    before = _count(model, *inputs)
    converted, _ = gnflex.convert(copy.deepcopy(model), fuse_activations=False)
    found, out = _compiled_counts(converted, inputs)
    assert found["after"] <= 0.1 * before.after_norm and found["fused"] >= 0.9 * before.after_norm, found
    with torch.no_grad():
        torch.testing.assert_close(_first_tensor(out), _first_tensor(model(*inputs)), rtol=1e-4, atol=1e-4)


def test_compiled_fusion_with_convert_fused_model_and_gradients():
    """A model convert fused in eager compiles to the same fused graph (the
    norm's taken activation is off under compile, the pass fuses it back),
    with gradients equal to eager."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.norm1 = nn.GroupNorm(2, 8)
            self.norm2 = nn.GroupNorm(4, 8)
            self.act = nn.SiLU()

        def forward(self, x):
            h = self.act(self.norm1(x))
            return self.act(self.norm2(self.conv(h))) + F.relu(self.norm1.weight[None, :, None, None])

    torch.manual_seed(0)
    block = _randomized(Block()).float()
    converted, report = gnflex.convert(copy.deepcopy(block))
    assert sorted(report.fused) == ["norm1 + silu", "norm2 + silu"], str(report)
    x = torch.randn(2, 8, 6, 6)
    found, _ = _compiled_counts(converted, (x,))
    assert found == {"after": 0, "fused": 2}
    torch._dynamo.reset()
    compiled = torch.compile(converted, fullgraph=True)
    _assert_close_scaled(_output_and_grads(compiled, [x]), _output_and_grads(block, [x]), tol=1e-5)
