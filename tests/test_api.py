"""Python API: GNConfig, choose_gn_groups, GroupNormFlex, ConvGNAct, GNCNN."""
import inspect

import pytest
import torch
from torch import nn

import gnflex
from gnflex import GNCNN, ConvGNAct, GNConfig, GroupNormFlex, choose_gn_groups
from _helpers import act_ref, make_input, torch_group_norm_without_bias


def test_choose_gn_groups_follows_the_rule_for_every_channel_count():
    priority = (32, 16, 8, 4, 2, 1)
    for min_cpg in (1, 2, 4):
        for c in range(1, 1025):
            expected = next((g for g in priority if c % g == 0 and c // g >= min_cpg), None)
            if expected is None:
                with pytest.raises(ValueError):
                    choose_gn_groups(c, min_channels_per_group=min_cpg)
            else:
                assert choose_gn_groups(c, min_channels_per_group=min_cpg) == expected, (c, min_cpg)


def test_choose_gn_groups_documented_examples():
    assert choose_gn_groups(16) == 16 and choose_gn_groups(8) == 8
    assert choose_gn_groups(16, min_channels_per_group=2) == 8
    assert choose_gn_groups(8, min_channels_per_group=2) == 4
    assert choose_gn_groups(64) == 32 and choose_gn_groups(24) == 8 and choose_gn_groups(7) == 1
    assert choose_gn_groups(12, priority=(6, 3)) == 6


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "8"])
def test_choose_gn_groups_rejects_bad_channels(bad):
    with pytest.raises(ValueError):
        choose_gn_groups(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown mode"):
        GNConfig(mode="bn")
    with pytest.raises(ValueError, match="unknown activation"):
        GNConfig(activation="tanh")
    for groups in (0, -1, 1.5, "four"):
        with pytest.raises(ValueError):
            GNConfig(groups=groups)
    with pytest.raises(ValueError, match="conflicts"):
        GNConfig(mode="ln_like", groups=4)
    with pytest.raises(ValueError):
        GNConfig(min_channels_per_group=0)
    # eps: tests/test_bad_inputs.py


def test_config_modes_pick_groups():
    assert GNConfig().num_groups(64) == 32
    assert GNConfig(min_channels_per_group=2).num_groups(16) == 8
    assert GNConfig(groups=4).num_groups(64) == 4
    assert GNConfig(mode="ln_like").num_groups(48) == 1
    assert GNConfig(mode="in_like").num_groups(48) == 48
    with pytest.raises(ValueError, match=r"num_channels \(10\) must be divisible by num_groups \(3\)"):
        GNConfig(groups=3).num_groups(10)


def test_groupnormflex_construction_errors():
    with pytest.raises(ValueError, match=r"num_channels \(10\) must be divisible by num_groups \(3\)"):
        GroupNormFlex(10, groups=3)
    with pytest.raises(ValueError, match="unknown mode"):
        GroupNormFlex(8, mode="batch")
    with pytest.raises(ValueError, match="unknown activation"):
        GroupNormFlex(8, activation="softplus")
    with pytest.raises(ValueError):
        GroupNormFlex(8, groups=0)
    with pytest.raises(TypeError):
        GroupNormFlex(8, config={"mode": "gn"})


@pytest.mark.parametrize("mode,groups", [("ln_like", lambda c: 1), ("in_like", lambda c: c)])
def test_modes_equal_torch_groupnorm(mode, groups):
    x = make_input((3, 12, 5, 5), torch.float32)
    ours = GroupNormFlex(12, mode=mode)
    ref = nn.GroupNorm(groups(12), 12)
    with torch.no_grad():
        for p in (ours.weight, ours.bias):
            p.normal_()
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["none", "relu", "silu", "gelu"])
def test_groupnormflex_matches_groupnorm_plus_activation(activation):
    x = make_input((2, 32, 6, 6), torch.float32, layout="channels_last")
    ours = GroupNormFlex(32, groups=8, activation=activation)
    ref = nn.GroupNorm(8, 32)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), act_ref(ref(x.contiguous()), activation), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_with_nn_groupnorm():
    ref = nn.GroupNorm(4, 16)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = GroupNormFlex(16, groups=4)
    ours.load_state_dict(ref.state_dict())
    back = nn.GroupNorm(4, 16)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, ref.weight) and torch.equal(back.bias, ref.bias)
    x = make_input((2, 16, 4, 4), torch.float32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_groupnormflex_is_an_nn_groupnorm():
    m = GroupNormFlex(64, activation="silu")
    assert isinstance(m, nn.GroupNorm)
    assert (m.num_groups, m.num_channels, m.eps, m.affine) == (32, 64, 1e-5, True)
    # Code that collects norm parameters by type (e.g. no weight decay on
    # norms) finds ours as it finds nn.GroupNorm's.
    model = nn.Sequential(nn.Conv2d(3, 64, 3), m, nn.Conv2d(64, 8, 1), nn.GroupNorm(4, 8))
    norm_params = [p for mod in model.modules() if isinstance(mod, nn.GroupNorm) for p in mod.parameters()]
    assert len(norm_params) == 4 and norm_params[0] is m.weight
    # Still gnflex's forward (fused activation), not nn.GroupNorm's.
    x = make_input((2, 64, 3, 3), torch.float32)
    torch.testing.assert_close(m(x), act_ref(nn.GroupNorm.forward(m, x), "silu"), rtol=1e-5, atol=1e-5)
    assert GroupNormFlex(8, affine=False).weight is None


def test_affine_false_and_bias_false_like_nn_groupnorm():
    no_affine = GroupNormFlex(8, affine=False)
    assert no_affine.weight is None and no_affine.bias is None
    assert set(no_affine.state_dict()) == set(nn.GroupNorm(4, 8, affine=False).state_dict()) == set()
    no_bias = GroupNormFlex(8, groups=4, bias=False)
    assert no_bias.bias is None and no_bias.weight is not None
    ref = torch_group_norm_without_bias(4, 8)
    no_bias.load_state_dict(ref.state_dict())
    x = make_input((2, 8, 3, 3), torch.float32)
    torch.testing.assert_close(no_bias(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_affine(x), nn.GroupNorm(8, 8, affine=False)(x), rtol=1e-5, atol=1e-5)


def test_factory_kwargs_and_repr():
    m = GroupNormFlex(16, GNConfig(activation="silu"), dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.weight.device.type == "cpu"
    text = repr(m)
    assert "groups=16" in text and "mode=gn" in text and "activation=silu" in text
    m16 = GroupNormFlex(16, dtype=torch.bfloat16)
    assert m16(torch.randn(2, 16, 3, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_keywords_replace_config_fields():
    base = GNConfig(mode="gn", groups=4, activation="relu")
    m = GroupNormFlex(16, base, activation="gelu", eps=1e-3)
    assert (m.num_groups, m.activation, m.eps) == (4, "gelu", 1e-3)
    assert base.activation == "relu"  # the config itself is unchanged
    assert GroupNormFlex(16, min_channels_per_group=4).num_groups == 4
    assert GroupNormFlex(16, mode="in_like", affine=False).config == GNConfig(mode="in_like", affine=False)
    # The config's fields are named parameters (help(), IDEs), not **kwargs.
    params = inspect.signature(GroupNormFlex).parameters
    for name in ("mode", "groups", "eps", "affine", "activation", "min_channels_per_group", "bias"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    with pytest.raises(TypeError, match="unexpected keyword argument 'act'"):
        GroupNormFlex(16, act="silu")


def test_config_is_derived_from_the_layer():
    m = GroupNormFlex(16, groups="auto", min_channels_per_group=2, activation="silu")
    assert m.config == GNConfig(groups=8, activation="silu")  # the layer's count, not "auto"
    m.eps, m.activation = 1e-3, "relu"
    assert (m.config.eps, m.config.activation) == (1e-3, "relu")
    with pytest.raises(AttributeError):
        m.config = GNConfig()
    # An eps GNConfig refuses but torch takes (convert copies it): the config shows it too.
    m.eps = -0.5
    assert m.config.eps == -0.5 and m.config.num_groups(16) == 8


def test_conv_gn_act_block():
    block = ConvGNAct(3, 16, kernel_size=3, stride=2, activation="silu")
    assert block.conv.bias is None and block.norm.activation == "silu"
    x = torch.randn(2, 3, 17, 17)
    y = block(x)
    assert y.shape == (2, 16, 9, 9)
    ref = nn.functional.silu(nn.functional.group_norm(block.conv(x), block.norm.num_groups,
                                                      block.norm.weight, block.norm.bias))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert ConvGNAct(4, 8, kernel_size=5)(torch.randn(1, 4, 10, 10)).shape == (1, 8, 10, 10)


def test_gncnn_shapes_and_features():
    model = GNCNN(in_channels=3, num_classes=7, widths=(8, 16, 32, 64))
    x = torch.randn(2, 3, 64, 96)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits2, feats = model(x, return_features=True)
    torch.testing.assert_close(logits, logits2)
    assert list(feats) == ["p3", "p4", "p5"]
    assert feats["p3"].shape == (2, 16, 8, 12)
    assert feats["p4"].shape == (2, 32, 4, 6)
    assert feats["p5"].shape == (2, 64, 2, 3)
    flagged = GNCNN(widths=(8, 16, 32, 64), return_features=True)
    assert isinstance(flagged(torch.randn(1, 3, 32, 32)), tuple)
    with pytest.raises(ValueError):
        GNCNN(widths=(8, 16))


def test_gncnn_trains():
    # Learnable task: the class is the brightest quadrant of the image.
    torch.manual_seed(0)
    labels = torch.arange(32) % 4
    x = torch.randn(32, 3, 32, 32) * 0.5
    for i, q in enumerate(labels.tolist()):
        r, c = divmod(q, 2)
        x[i, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += 1.0
    model = GNCNN(num_classes=4, widths=(8, 16, 32, 32), config=GNConfig(min_channels_per_group=2),
                  activation="silu")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # The final loss of this run is chaotic: scaling x by 1 +- 1e-7 moves it
    # between 0.08 and 0.44 (torch's own GroupNorm: 0.09-0.16), while an
    # untrained or broken model stays near log(4) = 1.39.
    assert losses[-1] < 0.5 * losses[0], losses


def test_torchscript_matches_eager():
    torch.manual_seed(0)
    norm = GroupNormFlex(16, groups=4, activation="gelu")
    x = make_input((2, 16, 5, 5), torch.float32, layout="channels_last")
    scripted = torch.jit.script(norm)
    torch.testing.assert_close(scripted(x), norm(x))

    model = GNCNN(widths=(8, 16, 32, 32)).eval()
    img = torch.randn(2, 3, 32, 32, requires_grad=True)
    scripted_model = torch.jit.script(model)
    out, ref = scripted_model(img), model(img)
    torch.testing.assert_close(out, ref)
    feats = scripted_model(img, True)[1]
    torch.testing.assert_close(feats["p4"], model(img, True)[1]["p4"])
    (g_script,) = torch.autograd.grad(out.sum(), img)
    (g_eager,) = torch.autograd.grad(ref.sum(), img)
    torch.testing.assert_close(g_script, g_eager)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = GNCNN(widths=(8, 16, 32, 32), activation="silu")
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref.sum().backward()
    for g, r in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_functional_mirrors_torch():
    x = make_input((2, 8, 4, 4), torch.float32)
    w = torch.rand(8) + 0.5
    b = torch.randn(8)
    torch.testing.assert_close(gnflex.functional.group_norm(x, 4, w, b, 1e-3),
                               nn.functional.group_norm(x, 4, w, b, 1e-3), rtol=1e-5, atol=1e-5)
    y, mean, rstd = gnflex.functional.group_norm_with_stats(x, 4)
    assert mean.shape == rstd.shape == (2, 4)


def test_module_sees_parameters_however_they_are_held():
    """The module reads registered parameters without nn.Module.__getattr__;
    parametrizations, the old weight_norm's plain attribute and
    torch.func.functional_call's substitutes must still be what it uses."""
    import torch.nn.functional as F
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    x = make_input((2, 8, 4, 4), torch.float32)
    m = GroupNormFlex(8, GNConfig(groups=4))
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    w, b = m.weight.detach().clone(), m.bias.detach().clone()
    torch.testing.assert_close(m(x), F.group_norm(x, 4, w, b))

    new_w, new_b = torch.rand(8) + 0.5, torch.randn(8)
    out = torch.func.functional_call(m, {"weight": new_w, "bias": new_b}, (x,))
    torch.testing.assert_close(out, F.group_norm(x, 4, new_w, new_b))

    parametrize.register_parametrization(m, "weight", Doubled())
    torch.testing.assert_close(m(x), F.group_norm(x, 4, 2 * w, b))
    parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old weight_norm is deprecated, still used
        old = nn.utils.weight_norm(GroupNormFlex(8, GNConfig(groups=4)), dim=None)
    with torch.no_grad():
        old.weight_g.fill_(3.0)
    effective = 3.0 * old.weight_v / old.weight_v.norm()
    torch.testing.assert_close(old(x), F.group_norm(x, 4, effective.detach(), old.bias.detach()))


def test_torch_order_group_norm_is_a_drop_in():
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = make_input((2, 64, 5, 5), torch.float32)
    ref = nn.GroupNorm(32, 64, 1e-3, True)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    norm = gnflex.GroupNorm(32, 64, 1e-3, True)
    norm.load_state_dict(ref.state_dict())
    assert isinstance(norm, nn.GroupNorm) and isinstance(norm, GroupNormFlex)
    assert (norm.num_groups, norm.num_channels, norm.eps, norm.affine) == (32, 64, 1e-3, True)
    torch.testing.assert_close(norm(x), ref(x))
    assert repr(norm) == repr(ref)
    ref.load_state_dict(norm.state_dict())

    fused = gnflex.GroupNorm(8, 64, activation="silu", dtype=torch.float64)
    assert fused.weight.dtype == torch.float64 and "activation=silu" in repr(fused)
    torch.testing.assert_close(fused(x.double()), F.silu(F.group_norm(x.double(), 8, fused.weight, fused.bias)))
    plain = gnflex.GroupNorm(4, 64, affine=False)
    assert plain.weight is None and plain.bias is None
    assert gnflex.GroupNorm(4, 64, bias=False).bias is None
    with pytest.raises(ValueError, match="divisible by num_groups"):
        gnflex.GroupNorm(5, 64)
    scripted = torch.jit.script(gnflex.GroupNorm(32, 64))
    torch.testing.assert_close(scripted(x), gnflex.GroupNorm(32, 64)(x))


def test_modules_trace_with_torch_fx():
    """torch.fx's default tracer goes through GroupNormFlex.forward (not a
    torch.nn leaf): the single-value check must not branch on a Proxy."""
    torch.manual_seed(0)
    x = make_input((2, 3, 8, 8), torch.float32)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), GroupNormFlex(8, groups=4, activation="silu"),
                          gnflex.GroupNorm(2, 8))
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    assert any(node.op == "call_function" and "gnflex" in str(node.target) for node in traced.graph.nodes)
    with pytest.raises(ValueError, match="more than 1 value per group"):
        GroupNormFlex(4, groups=4)(torch.randn(1, 4))  # eager still checks
