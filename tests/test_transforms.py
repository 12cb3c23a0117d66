"""torch.func transforms and forward-mode AD on gnflex's op, functional API and
modules: results equal to nn.GroupNorm's under the same transform.

Inside a transform (or with forward-mode tangents) the op runs a composite of
ATen ops; plain autograd keeps the fused kernels (checked last).
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

import gnflex

from gnflex.activations import ACTIVATIONS  # noqa: E402
TOL = {"rtol": 1e-9, "atol": 1e-9}  # float64 throughout: only rounding differs


def torch_gn(x, groups, w, b, activation):
    z = F.group_norm(x, groups, w, b, 1e-5)
    return {"none": lambda t: t, "relu": F.relu, "silu": F.silu, "gelu": F.gelu}[activation](z)


def op_gn(x, groups, w, b, activation):
    return torch.ops.gnflex.group_norm(x, w, b, groups, 1e-5, activation)[0]


def functional_gn(x, groups, w, b, activation):
    return gnflex.group_norm(x, groups, w, b, activation=activation)


ENTRY_POINTS = {"op": op_gn, "functional": functional_gn}


def inputs(shape=(3, 8, 5, 4), seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w = 1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    # A fixed cotangent so the scalar loss is not a plain sum (whose gradient
    # through a normalization is ~0).
    ct = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, w, b, ct


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grad_and_vjp_match_torch(entry, activation):
    fn = ENTRY_POINTS[entry]
    x, w, b, ct = inputs()

    def loss(f):
        return lambda x, w, b: (f(x, 4, w, b, activation) * ct).sum()

    ours = grad(loss(fn), argnums=(0, 1, 2))(x, w, b)
    ref = grad(loss(torch_gn), argnums=(0, 1, 2))(x, w, b)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, **TOL)

    y, pullback = vjp(lambda x, w, b: fn(x, 4, w, b, activation), x, w, b)
    y_ref, pullback_ref = vjp(lambda x, w, b: torch_gn(x, 4, w, b, activation), x, w, b)
    torch.testing.assert_close(y, y_ref, **TOL)
    for a, e in zip(pullback(ct), pullback_ref(ct)):
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_jvp_and_forward_ad_match_torch(entry, activation):
    fn = ENTRY_POINTS[entry]
    x, w, b, _ = inputs()
    tx, tw, tb, _ = inputs(seed=1)
    f = lambda x, w, b: fn(x, 4, w, b, activation)  # noqa: E731
    f_ref = lambda x, w, b: torch_gn(x, 4, w, b, activation)  # noqa: E731
    out, tangent = jvp(f, (x, w, b), (tx, tw, tb))
    out_ref, tangent_ref = jvp(f_ref, (x, w, b), (tx, tw, tb))
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(tangent, tangent_ref, **TOL)

    # torch.autograd.forward_ad (dual tensors), here with a tangent on x only.
    with fwAD.dual_level():
        y = f(fwAD.make_dual(x, tx), w, b)
        primal, tangent = fwAD.unpack_dual(y)
    torch.testing.assert_close(primal, out_ref, **TOL)
    _, tangent_x_ref = jvp(lambda x: f_ref(x, w, b), (x,), (tx,))
    torch.testing.assert_close(tangent, tangent_x_ref, **TOL)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_jacrev_matches_torch(entry):
    fn = ENTRY_POINTS[entry]
    x, w, b, _ = inputs(shape=(2, 4, 3))
    jac = jacrev(lambda x, w: fn(x, 2, w, b, "silu"), argnums=(0, 1))(x, w)
    jac_ref = jacrev(lambda x, w: torch_gn(x, 2, w, b, "silu"), argnums=(0, 1))(x, w)
    for a, e in zip(jac, jac_ref):
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_vmap_over_inputs_and_parameters(entry, channels_last):
    fn = ENTRY_POINTS[entry]
    xs, _, _, _ = inputs(shape=(5, 2, 8, 3, 3), channels_last=False)
    x0, w, b, _ = inputs(shape=(2, 8, 3, 3), channels_last=channels_last)
    # Over inputs: each (2, 8, 3, 3) slice normalized on its own.
    ours = vmap(lambda x: fn(x, 4, w, b, "gelu"))(xs)
    ref = torch.stack([torch_gn(x, 4, w, b, "gelu") for x in xs])
    torch.testing.assert_close(ours, ref, **TOL)
    # Over parameters: an ensemble of 5 affine transforms of one input.
    ws = torch.stack([w * (1 + 0.1 * k) for k in range(5)])
    bs = torch.stack([b + 0.1 * k for k in range(5)])
    ours = vmap(lambda w, b: fn(x0, 4, w, b, "relu"))(ws, bs)
    ref = torch.stack([torch_gn(x0, 4, w_, b_, "relu") for w_, b_ in zip(ws, bs)])
    torch.testing.assert_close(ours, ref, **TOL)


def gn_model(norm):
    """A small conv net with GroupNorm(4, 8) + SiLU built by `norm`."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(), nn.Conv2d(8, 8, 3, padding=1), norm(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double()


def per_sample_grads(model, x, target):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, ti):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, ti.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)


def test_per_sample_gradients_equal_nn_groupnorm():
    ours = gn_model(lambda: gnflex.GroupNormFlex(8, groups=4, activation="silu"))
    ref = gn_model(lambda: nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU()))
    with torch.no_grad():  # same parameter values in both
        for p_ours, p_ref in zip(ours.parameters(), ref.parameters()):
            p_ours.copy_(p_ref)
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    target = torch.randint(0, 4, (6,))
    g_ours = per_sample_grads(ours, x, target)
    g_ref = per_sample_grads(ref, x, target)
    assert len(g_ours) == len(g_ref)
    for (name, a), e in zip(g_ours.items(), g_ref.values()):
        assert a.shape[0] == 6, name
        torch.testing.assert_close(a, e, **TOL)
    # The per-sample gradients add up to the batch gradient of the mean loss.
    loss = F.cross_entropy(ours(x), target, reduction="sum")
    batch = torch.autograd.grad(loss, list(ours.parameters()))
    for a, e in zip(g_ours.values(), batch):
        torch.testing.assert_close(a.sum(0), e, **TOL)


def test_plain_autograd_keeps_the_fused_kernels():
    x, w, b, _ = inputs()
    y = gnflex.group_norm(x.requires_grad_(), 4, w, b, activation="silu")
    assert y.grad_fn.name() == "GroupNormBackward"
    # Under a transform the composite runs: its graph ends in ATen ops.
    with fwAD.dual_level():
        y = gnflex.group_norm(fwAD.make_dual(x.detach(), torch.ones_like(x)), 4, w, b)
        assert fwAD.unpack_dual(y).tangent is not None


def test_transforms_keep_the_op_errors():
    x, w, b, _ = inputs()
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        grad(lambda x: op_gn(x, 3, w, b, "none").sum())(x)
    with pytest.raises(RuntimeError, match="unknown activation"):
        vmap(lambda x: op_gn(x, 4, w, b, "tanh"))(x.unsqueeze(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_composite_matches_the_kernels_in_every_dtype_and_layout(dtype, channels_last):
    # The composite (inside transforms) computes in the accumulate dtype as
    # the kernels do, returns y in the input's layout and the stats as the op.
    x, w, b, _ = inputs(shape=(2, 8, 5, 3), channels_last=channels_last)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = w.float(), b.float()  # float32 parameters with any input dtype
    kernel = torch.ops.gnflex.group_norm(x, w, b, 4, 1e-5, "silu")
    with fwAD.dual_level():
        composite = torch.ops.gnflex.group_norm(fwAD.make_dual(x, torch.ones_like(x)), w, b, 4, 1e-5, "silu")
        composite = [fwAD.unpack_dual(t).primal for t in composite]
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for k, c in zip(kernel, composite):
        assert k.dtype == c.dtype and k.shape == c.shape
        torch.testing.assert_close(c, k, rtol=tol, atol=tol)
    assert composite[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert composite[0].stride() == kernel[0].stride()


def test_composite_keeps_the_kernels_layout_for_transposed_rank3_input():
    # (N, L, C) stored channel-innermost: the kernels read it channels-last and
    # their y keeps that layout; the composite gives the same strides.
    x = torch.randn(2, 7, 8, dtype=torch.float64).transpose(1, 2)
    kernel = torch.ops.gnflex.group_norm(x, None, None, 4, 1e-5, "gelu")[0]
    with fwAD.dual_level():
        y = torch.ops.gnflex.group_norm(fwAD.make_dual(x, torch.ones_like(x)), None, None, 4, 1e-5, "gelu")[0]
        y = fwAD.unpack_dual(y).primal
    assert y.stride() == kernel.stride() == x.stride()
    torch.testing.assert_close(y, kernel, **TOL)
