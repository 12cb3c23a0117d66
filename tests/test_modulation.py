"""GroupNorm modulated per sample (AdaGN / FiLM): the op's per-sample (N, C)
weight and bias, ``gnflex.modulated_group_norm`` and ``gnflex.AdaGroupNorm``,
against torch's composition in float64, forward and backward, on every
schedule, dtype, layout and activation."""
import pytest
import torch
import torch.nn.functional as F

import gnflex
from _helpers import ACTIVATIONS, DEVICES, DTYPES, TOLERANCES, act_ref, make_input, make_params

# (shape, groups): 2-D, 3-D and 4-D spatial, one group, InstanceNorm-like.
SHAPES = [((3, 8, 5, 7), 4), ((2, 12, 33), 3), ((2, 6, 3, 4, 5), 1), ((4, 16, 6, 6), 16)]


def modulation(shape, dtype, device="cpu", seed=2):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[0], shape[1]
    scale = (0.5 * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype=dtype, device=device)
    shift = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return scale, shift


def composed(x, groups, scale, shift, weight, bias, eps, activation, scale_offset):
    """The eager composition diffusers and FiLM write, in float64."""
    per_value = [x.shape[0], x.shape[1]] + [1] * (x.dim() - 2)
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    y = F.group_norm(x.double().contiguous(), groups, w, b, eps)
    if scale is not None:
        y = y * (scale_offset + scale.double().reshape(per_value))
    if shift is not None:
        y = y + shift.double().reshape(per_value)
    return act_ref(y, activation)


def check_against_composition(x, groups, scale, shift, weight, bias, activation, scale_offset=1.0, eps=1e-5):
    """Output and the gradients of every tensor argument within the dtype's
    tolerance of the float64 composition."""
    tensors = [t for t in (x, scale, shift, weight, bias) if t is not None]
    ours = [t.detach().requires_grad_() for t in tensors]
    refs = [t.detach().double().requires_grad_() for t in tensors]

    def unpack(leaves):
        it = iter(leaves)
        return [None if t is None else next(it) for t in (x, scale, shift, weight, bias)]

    xo, so, to, wo, bo = unpack(ours)
    y = gnflex.modulated_group_norm(xo, groups, so, to, wo, bo, eps, activation, scale_offset)
    xr, sr, tr, wr, br = unpack(refs)
    expected = composed(xr, groups, sr, tr, wr, br, eps, activation, scale_offset)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == (
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(x.device, x.dtype)
    got = torch.autograd.grad(y, ours, dy)
    want = torch.autograd.grad(expected, refs, dy.double())
    rtol, atol = TOLERANCES[x.dtype]
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol * 4)
    plane = x[0, 0].numel()
    names = [name for name, t in zip(("x", "scale", "shift", "weight", "bias"), (x, scale, shift, weight, bias))
             if t is not None]
    for name, t, a, e in zip(names, tensors, got, want):
        assert a.shape == t.shape and a.dtype == t.dtype, name
        # The gradient of a per-sample value sums a plane; of weight / bias,
        # the batch's planes.
        summed = 1 if name == "x" else plane if name in ("scale", "shift") else plane * x.shape[0]
        torch.testing.assert_close(a.double(), e, rtol=rtol * 4, atol=atol * 4 * summed ** 0.5,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,groups", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_matches_the_composition(device, layout, shape, groups, activation, dtype):
    x = make_input(shape, dtype, device, layout)
    scale, shift = modulation(shape, dtype, device)
    weight, bias = make_params(shape[1], dtype, device)
    check_against_composition(x, groups, scale, shift, weight, bias, activation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_offset", (1.0, 0.0))
@pytest.mark.parametrize("parts", ("scale", "shift", "both", "both+affine", "both+weight"))
def test_forms(device, parts, scale_offset):
    """FiLM (offset 0) and AdaGN (offset 1); scale or shift alone; with
    GroupNorm's own affine, or only its weight; (N, C, 1, 1) as diffusers
    passes them."""
    shape = (3, 8, 6, 5)
    x = make_input(shape, torch.float32, device)
    scale, shift = modulation(shape, torch.float32, device)
    weight, bias = make_params(shape[1], torch.float32, device)
    scale = scale[:, :, None, None] if parts != "shift" else None
    shift = shift[:, :, None, None] if parts != "scale" else None
    weight = weight if "+" in parts else None
    bias = bias if parts == "both+affine" else None
    check_against_composition(x, 2, scale, shift, weight, bias, "silu", scale_offset)


@pytest.mark.parametrize("schedule", ("fused", "two_pass"))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_every_cpu_schedule(monkeypatch, schedule, layout):
    """The fused and two-pass schedules, channels-first and channels-last,
    read per-sample parameters at the right sample."""
    monkeypatch.setenv("GNFLEX_CPU_SCHEDULE", schedule)
    for shape, groups in (((3, 8, 9, 9), 2), ((2, 64, 40, 40), 8)):
        x = make_input(shape, torch.float32, "cpu", layout)
        scale, shift = modulation(shape, torch.float32)
        weight, bias = make_params(shape[1], torch.float32)
        check_against_composition(x, groups, scale, shift, weight, bias, "gelu")


@pytest.mark.parametrize("device", DEVICES)
def test_op_per_sample_parameters(device):
    """The op itself: per-sample weight, bias or both (each independently),
    gradients in each parameter's own shape, and opcheck (schema, fake kernel,
    autograd) on them."""
    x = make_input((2, 6, 4, 5), torch.float32, device)
    w_c, b_c = make_params(6, torch.float32, device)
    w_s, b_s = modulation(x.shape, torch.float32, device)
    per_value = (2, 6, 1, 1)
    for w, b in ((w_s, b_s), (w_c, b_s), (w_s, b_c), (w_s, None), (None, b_s)):
        leaves = [None if t is None else t.clone().requires_grad_() for t in (w, b)]
        y = torch.ops.gnflex.group_norm(x, leaves[0], leaves[1], 3, 1e-5, "relu")[0]
        y_ref = F.group_norm(x, 3)
        if w is not None:
            y_ref = y_ref * w.expand(2, 6).reshape(per_value)
        if b is not None:
            y_ref = y_ref + b.expand(2, 6).reshape(per_value)
        torch.testing.assert_close(y, y_ref.relu(), rtol=1e-5, atol=1e-5)
        y.sum().backward()
        for leaf in leaves:
            if leaf is not None:
                assert leaf.grad.shape == leaf.shape
        args = (x.requires_grad_(), *[None if t is None else t.detach().requires_grad_() for t in (w, b)], 3,
                1e-5, "silu")
        torch.library.opcheck(torch.ops.gnflex.group_norm.default, args)


def test_errors_name_the_argument():
    x = torch.randn(2, 6, 4)
    with pytest.raises(RuntimeError, match=r"expected weight of shape \[6\] \(num_channels\) or \[2, 6\]"):
        torch.ops.gnflex.group_norm(x, torch.ones(3, 6), None, 3, 1e-5, "none")
    with pytest.raises(RuntimeError, match=r"expected bias of shape"):
        torch.ops.gnflex.group_norm(x, None, torch.ones(2, 6, 1), 3, 1e-5, "none")
    with pytest.raises(ValueError, match=r"expected scale of shape \[N, C\] = \[2, 6\]"):
        gnflex.modulated_group_norm(x, 3, torch.ones(2, 3), None)
    with pytest.raises(ValueError, match=r"expected shift of shape"):
        gnflex.modulated_group_norm(x, 3, None, torch.ones(2, 6, 2))


def test_half_input_keeps_float32_modulation():
    """scale and shift of a float16 / bfloat16 model are folded in float32
    (the op takes float32 parameters with 16-bit input), so the result is
    the float32 composition's rounded to the input dtype."""
    x = make_input((2, 8, 16, 16), torch.bfloat16)
    scale, shift = modulation(x.shape, torch.bfloat16)
    y = gnflex.modulated_group_norm(x, 4, scale, shift)
    expected = composed(x, 4, scale, shift, None, None, 1e-5, "none", 1.0)
    torch.testing.assert_close(y.double(), expected, rtol=1.6e-2, atol=1.6e-2)


def test_compiles_without_graph_breaks():
    x = make_input((2, 8, 6, 6), torch.float32)
    scale, shift = modulation(x.shape, torch.float32)

    def fn(x, scale, shift):
        return gnflex.modulated_group_norm(x, 4, scale, shift, activation="silu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, scale, shift), fn(x, scale, shift))


diffusers = pytest.importorskip("diffusers", reason="diffusers is in the interop extra")


def diffusers_ada(act_fn="silu"):
    from diffusers.models.normalization import AdaGroupNorm as DiffusersAdaGroupNorm

    torch.manual_seed(0)
    return DiffusersAdaGroupNorm(16, 8, 4, act_fn=act_fn, eps=1e-6)


@pytest.mark.parametrize("act_fn", (None, "silu", "mish"))
def test_ada_group_norm_matches_diffusers(act_fn):
    """Same state_dict, same output and gradients as diffusers' class."""
    theirs = diffusers_ada(act_fn)
    ours = gnflex.AdaGroupNorm(16, 8, 4, act_fn=act_fn, eps=1e-6)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 8, 5, 5, requires_grad=True)
    emb = torch.randn(3, 16, requires_grad=True)
    for module in (ours, theirs):
        module.zero_grad()
    y_ours, y_theirs = ours(x, emb), theirs(x, emb)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    g_ours = torch.autograd.grad(y_ours.square().sum(), [x, emb, *ours.parameters()])
    g_theirs = torch.autograd.grad(y_theirs.square().sum(), [x, emb, *theirs.parameters()])
    for a, e in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_convert_swaps_diffusers_ada_group_norm():
    theirs = diffusers_ada()
    model = torch.nn.ModuleDict({"norm": theirs})
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    expected = theirs(x, emb)
    keys = model.state_dict().keys()
    model, report = gnflex.convert(model)
    assert isinstance(model["norm"], gnflex.AdaGroupNorm) and model["norm"].linear is theirs.linear
    assert [name for name, _, _ in report.replaced] == ["norm"]
    assert model.state_dict().keys() == keys
    torch.testing.assert_close(model["norm"](x, emb), expected, rtol=1e-5, atol=1e-5)


def test_convert_leaves_a_hooked_ada_group_norm_alone():
    theirs = diffusers_ada()
    theirs.register_forward_hook(lambda module, args, out: out * 2)
    model, report = gnflex.convert(torch.nn.ModuleDict({"norm": theirs}))
    assert model["norm"] is theirs and report.skipped == [("norm", "has hooks")]


def test_ada_group_norm_rejects_unknown_activations():
    with pytest.raises(ValueError, match="act_fn must be None or one of"):
        gnflex.AdaGroupNorm(16, 8, 4, act_fn="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        gnflex.AdaGroupNorm(16, 8, 4, activation="tanh")


def test_ada_group_norm_scripts():
    ours = gnflex.AdaGroupNorm(16, 8, 4, act_fn="silu", activation="relu")
    scripted = torch.jit.script(ours)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    torch.testing.assert_close(scripted(x, emb), ours(x, emb))


def _compiled_norms(model, inputs):
    """gnflex ops in the forward graph Inductor compiles: (activation, whether
    weight is per sample, whether the output feeds a multiplication) each."""
    import operator

    found = []

    def record(graph):
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.gnflex.group_norm.default:
                weight = node.args[1]
                per_sample = weight is not None and weight.meta["val"].dim() == 2
                outputs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
                multiplied = any(v.target is torch.ops.aten.mul.Tensor for u in outputs for v in u.users)
                found.append((node.args[5], per_sample, multiplied))

    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=record), torch.no_grad():
        out = torch.compile(model, fullgraph=True)(*inputs)
    return found, out


@pytest.mark.slow
def test_compile_fuses_diffusers_scale_shift_block():
    """diffusers' ResnetBlock2D with time_embedding_norm="scale_shift"
    (``norm2(h) * (1 + scale) + shift`` then SiLU), converted, compiles to two
    fused norms: norm1 + SiLU, and norm2 + modulation + SiLU; same result."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=32, groups=4,
                          time_embedding_norm="scale_shift").eval()
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 32)
    with torch.no_grad():
        expected = block(x, temb)
    converted, _ = gnflex.convert(block, fuse_activations=False)
    found, out = _compiled_norms(converted, (x, temb))
    assert sorted(found) == [("silu", False, False), ("silu", True, False)], found
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_compiled_modulation_gradients():
    """Training through the fused graph: gradients of x, scale, shift and the
    norm's affine equal eager's."""
    norm = gnflex.GroupNorm(2, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()

    def fn(x, scale, shift):
        return F.silu(norm(x) * (1 + scale) + shift)

    x = make_input((2, 8, 5, 5), torch.float32).requires_grad_()
    scale, shift = [t[:, :, None, None].requires_grad_() for t in modulation(x.shape, torch.float32)]
    leaves = [x, scale, shift, norm.weight, norm.bias]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    y_compiled = compiled(x, scale, shift)
    g_compiled = torch.autograd.grad(y_compiled.square().sum(), leaves)
    y_eager = fn(x, scale, shift)
    g_eager = torch.autograd.grad(y_eager.square().sum(), leaves)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    for a, e in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
