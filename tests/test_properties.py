"""Property-based tests (hypothesis): random shapes, groups, layouts, dtypes,
activations and affine on/off against the float64 reference, forward and
backward. A fixed example budget and derandomize=True keep CI fast and
reproducible; run with HYPOTHESIS_PROFILE=long for a bigger search."""
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")  # listed in .ci/setup.sh and the test extra
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gnflex  # noqa: E402
from _helpers import ACTIVATIONS, DTYPES, assert_close_to_ref, make_input, make_params, reference  # noqa: E402

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@st.composite
def cases(draw):
    groups = draw(st.integers(1, 6))
    channels = groups * draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 9), min_size=0, max_size=3))
    shape = (draw(st.integers(1, 3)), channels, *spatial)
    # torch (the reference) refuses groups of single values with N = 1.
    hypothesis.assume(shape[0] * channels // groups * int(torch.tensor(spatial).prod()) > 1)
    layouts = ["contiguous", "strided"] + (["channels_last"] if spatial else [])
    return {
        "shape": shape,
        "groups": groups,
        "layout": draw(st.sampled_from(layouts)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "activation": draw(st.sampled_from(ACTIVATIONS)),
        "affine": draw(st.booleans()),
        "scale": draw(st.sampled_from([1.0, 1e-3, 1e3])),
        "offset": draw(st.sampled_from([0.0, 5.0, -300.0])),
    }


@given(cases())
def test_forward_and_backward_match_reference(case):
    shape, groups, dtype, activation = case["shape"], case["groups"], case["dtype"], case["activation"]
    x = make_input(shape, dtype, "cpu", case["layout"])
    with torch.no_grad():
        x.copy_(x.double() * case["scale"] + case["offset"])
    w, b = make_params(shape[1], dtype) if case["affine"] else (None, None)
    dy = make_input(shape, dtype, "cpu", seed=7)
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]

    def grads(fn):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        args = xs + [None] * (3 - len(xs))
        y = fn(*args)
        return (y, *torch.autograd.grad(y, xs, dy.to(y.dtype)))

    ours = grads(lambda x, w, b: gnflex.group_norm(x, groups, w, b, activation=activation))
    ref = grads(lambda x, w, b: reference(x, groups, w, b, activation=activation))
    assert ours[0].shape == x.shape and ours[0].dtype == dtype
    for a, r in zip(ours, ref):
        assert_close_to_ref(a, r, dtype, scale=max(1.0, r.abs().max().item()))
