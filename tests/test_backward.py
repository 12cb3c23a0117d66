"""Gradients: against autograd of the float64 reference, gradcheck,
gradgradcheck and torch.library.opcheck on both ops."""
import pytest
import torch

import gnflex
from _helpers import (ACTIVATIONS, DEVICES, DTYPES, LAYOUT_CASES, assert_close_to_ref, grads_of, make_input,
                      make_params, reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout,shape,groups", LAYOUT_CASES, ids=str)
def test_gradients_match_reference(device, dtype, layout, activation, shape, groups):
    x = make_input(shape, dtype, device, layout)
    w, b = make_params(shape[1], dtype, device)
    dy = make_input(shape, dtype, device, seed=5)
    _, dx, dw, db = grads_of(lambda x, w, b: gnflex.group_norm(x, groups, w, b, activation=activation),
                            x, w, b, dy)
    _, rdx, rdw, rdb = grads_of(lambda x, w, b: reference(x, groups, w, b, activation=activation),
                               x, w, b, dy)
    assert dx.dtype == dtype and dw.dtype == dtype
    # dx is O(rstd); dweight/dbias sum over N * HxW values: scale atol to them.
    assert_close_to_ref(dx, rdx, dtype, scale=max(1.0, rdx.abs().max().item()))
    assert_close_to_ref(dw, rdw, dtype, scale=max(1.0, rdw.abs().max().item()))
    assert_close_to_ref(db, rdb, dtype, scale=max(1.0, rdb.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_gradcheck_float64(device, activation, layout):
    x = make_input((2, 6, 3, 4), torch.float64, device, layout).requires_grad_()
    w, b = (t.requires_grad_() for t in make_params(6, torch.float64, device))
    fn = lambda x, w, b: gnflex.group_norm(x, 3, w, b, activation=activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_without_affine(device):
    x = make_input((3, 4, 5), torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gnflex.group_norm(x, 2, activation="silu"), (x,))
    assert torch.autograd.gradgradcheck(lambda x: gnflex.group_norm(x, 2, activation="silu"), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("present", ("weight", "bias"))
def test_gradcheck_with_only_one_affine_parameter(device, present):
    """Only a weight or only a bias (F.group_norm takes either alone): the
    gradient reaches the one passed, first and second order."""
    x = make_input((3, 4, 5), torch.float64, device).requires_grad_()
    w, b = make_params(4, torch.float64, device)
    param = (w if present == "weight" else b).requires_grad_()

    def fn(x, param):
        kwargs = {present: param}
        return gnflex.group_norm(x, 2, activation="gelu", **kwargs)

    assert torch.autograd.gradcheck(fn, (x, param))
    assert torch.autograd.gradgradcheck(fn, (x, param))


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients_are_computed(device):
    x = make_input((2, 8, 4, 4), torch.float32, device)
    w, b = make_params(8, torch.float32, device)
    y, mean, rstd = torch.ops.gnflex.group_norm(x, w, b, 4, 1e-5, "relu")
    dy = torch.randn_like(y)
    full = torch.ops.gnflex.group_norm_backward(dy, x, mean, rstd, w, b, 4, "relu", [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        part = torch.ops.gnflex.group_norm_backward(dy, x, mean, rstd, w, b, 4, "relu", mask)
        for wanted, got, ref in zip(mask, part, full):
            if wanted:
                assert torch.equal(got, ref)
            else:
                assert got is None


@pytest.mark.parametrize("device", DEVICES)
def test_grad_out_in_another_layout(device):
    # dy contiguous while x is channels_last (and the reverse): same gradients.
    x_cl = make_input((2, 16, 5, 6), torch.float32, device, "channels_last")
    x_cf = x_cl.contiguous()
    dy = make_input((2, 16, 5, 6), torch.float32, device, seed=3)
    w, b = make_params(16, torch.float32, device)
    out = []
    for x, g in ((x_cl, dy), (x_cf, dy.to(memory_format=torch.channels_last))):
        _, dx, dw, db = grads_of(lambda x, w, b: gnflex.group_norm(x, 4, w, b, activation="gelu"), x, w, b, g)
        assert dx.stride() == x.stride()
        out.append((dx, dw, db))
    for a, r in zip(*out):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


# (shape, groups): both threads counts use the per-group fused schedule; N * G
# (or N, channels-last) = 1 makes 1 thread fuse and 2 threads take the two-pass
# schedule; a 3-d input with ragged chunks.
SCHEDULE_CASES = [((2, 64, 40, 40), 8), ((1, 64, 40, 40), 1), ((1, 4, 12293), 2)]


@pytest.mark.parametrize("activation", ("none", "silu", "gelu"))
@pytest.mark.parametrize("shape,groups", SCHEDULE_CASES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_backward_bitwise_deterministic_across_threads(layout, shape, groups, activation):
    x = make_input(shape, torch.float32, "cpu", layout)
    dy = make_input(shape, torch.float32, "cpu", layout, seed=9)
    w, b = make_params(shape[1], torch.float32)

    def run():
        return grads_of(lambda x, w, b: gnflex.group_norm(x, groups, w, b, activation=activation), x, w, b, dy)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        again = run()
    finally:
        torch.set_num_threads(threads)
    for a, r in zip(one, again):
        assert torch.equal(a, r)


OPCHECK_CASES = [
    ((2, 8, 5, 5), "contiguous", 4, "silu", True),
    ((2, 8, 5, 5), "channels_last", 2, "relu", True),
    ((3, 6, 7), "contiguous", 3, "gelu", False),
    ((2, 4, 3, 3, 3), "channels_last", 2, "none", True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout,groups,activation,affine", OPCHECK_CASES, ids=str)
def test_opcheck(device, shape, layout, groups, activation, affine):
    x = make_input(shape, torch.float32, device, layout).requires_grad_()
    w, b = make_params(shape[1], torch.float32, device) if affine else (None, None)
    if affine:
        w.requires_grad_()
        b.requires_grad_()
    torch.library.opcheck(torch.ops.gnflex.group_norm.default, (x, w, b, groups, 1e-5, activation))
    y, mean, rstd = torch.ops.gnflex.group_norm(x.detach(), w, b, groups, 1e-5, activation)
    dy = torch.randn_like(y)
    for mask in ([True, affine, affine], [True, False, False], [False, affine, affine]):
        torch.library.opcheck(
            torch.ops.gnflex.group_norm_backward.default,
            (dy, x.detach(), mean, rstd, w if w is None else w.detach(), b if b is None else b.detach(),
             groups, activation, mask),
        )


# ---- the graph node a recorded call leaves (GroupNormBackward) -------------------
def recorded(affine=True, activation="silu"):
    """x (a non-leaf, so that only the graph holds it), leaves, y."""
    leaf = make_input((2, 8, 5, 5), torch.float32, "cpu").requires_grad_()
    w, b = (t.requires_grad_() for t in make_params(8, torch.float32))
    x = leaf * 1.5
    y = gnflex.group_norm(x, 4, w if affine else None, b if affine else None, activation=activation)
    return leaf, w, b, x, y


def test_second_backward_without_retain_graph_raises():
    leaf, w, b, _, y = recorded()
    y.sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()


def test_retained_graph_gives_the_same_gradients_twice():
    leaf, w, b, _, y = recorded()
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, (leaf, w, b), dy, retain_graph=True)
    second = torch.autograd.grad(y, (leaf, w, b), dy)
    for a, r in zip(first, second):
        assert torch.equal(a, r)


def test_input_modified_in_place_after_the_forward_raises():
    leaf, w, b, x, y = recorded()
    with torch.no_grad():
        x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("affine", (True, False))
def test_saved_tensor_hooks_see_what_the_node_saves(affine):
    """torch.autograd.graph.saved_tensors_hooks (activation offloading,
    checkpointing) packs every tensor the node keeps and unpacks it for the
    backward; gradients are those of the unhooked graph."""
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    def unpack(t):
        unpacked.append(t.shape)
        return t

    torch.manual_seed(0)
    leaf, w, b, x, _ = recorded(affine)
    dy = torch.randn(2, 8, 5, 5)
    params = (w, b) if affine else ()
    plain = torch.autograd.grad(gnflex.group_norm(x, 4, *params, activation="silu"), (leaf, *params), dy,
                                retain_graph=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = gnflex.group_norm(x, 4, *params, activation="silu")
    # x, mean and rstd, and the weight and bias where given.
    assert sorted(packed) == sorted([x.shape, (2, 4), (2, 4)] + [w.shape, b.shape] * affine)
    hooked = torch.autograd.grad(y, (leaf, *params), dy)
    assert sorted(unpacked) == sorted(packed)
    for a, r in zip(hooked, plain):
        assert torch.equal(a, r)


def test_gradient_of_one_input_only():
    leaf, w, b, _, y = recorded()
    dy = torch.randn_like(y)
    full = torch.autograd.grad(y, (leaf, w, b), dy, retain_graph=True)
    for i, wanted in enumerate((leaf, w, b)):
        (only,) = torch.autograd.grad(y, (wanted,), dy, retain_graph=True)
        assert torch.equal(only, full[i])


def test_graph_frees_what_it_saved():
    """No reference cycle keeps the saved input alive once the output is gone."""
    import gc
    import weakref

    _, _, _, x, y = recorded()
    saved = weakref.ref(x)
    del x
    gc.collect()
    assert saved() is not None  # held by the graph
    del y
    gc.collect()
    assert saved() is None


def test_anomaly_mode_runs_the_node():
    with torch.autograd.detect_anomaly():
        leaf, w, b, _, y = recorded()
        y.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("affine", (True, False))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_compiled_autograd(affine, layout):
    """torch._dynamo's compiled autograd traces the backward into one graph
    (fullgraph) with gnflex's backward op in it; the gradients are the eager
    ones."""
    from torch._dynamo import compiled_autograd

    # Compiled graphs are cached per process: start from none, so this case
    # compiles its own.
    torch._dynamo.reset()
    compiled_autograd.reset()
    torch.manual_seed(0)
    x = make_input((2, 8, 5, 5), torch.float32, "cpu", layout).requires_grad_()
    w, b = (t.requires_grad_() for t in make_params(8, torch.float32))
    params = (w, b) if affine else ()

    def loss():
        return gnflex.group_norm(x * 1.5, 4, *params, activation="silu").square().sum()

    eager = torch.autograd.grad(loss(), (x, *params))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    y = loss()
    with compiled_autograd._enable(torch.compile(backend=backend, fullgraph=True)):
        y.backward()
    assert len(graphs) == 1 and "GroupNormBackward" in graphs[0]
    for a, r in zip((x.grad, *(p.grad for p in params)), eager):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
