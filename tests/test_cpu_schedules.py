"""The CPU kernels' two schedules (fused and two-pass) compute the same
numbers: forced with GNFLEX_CPU_SCHEDULE, they agree bitwise with each other
and with the automatic choice, for every dtype, activation and layout."""
import pytest
import torch

import gnflex
from _helpers import ACTIVATIONS, DTYPES, assert_close_to_ref, grads_of, make_input, make_params, reference

# (shape, groups): channels-first groups and channels-last samples that fit
# the fused budgets, a 3-d input with ragged chunks, several samples of odd
# sizes, runs (7x7 planes, rows of 48 channels) that end in a half step and a
# scalar tail of fp16 / bf16, channels-last row blocks (two per sample)
# that two threads split inside a sample, and tails taken as one overlapping
# vector: 10x10 planes, rows of 40 channels and 6x6 planes, and a run whose
# tail vector stays inside its last chunk (4116 = 4096 + 20; 12293 above ends
# in a chunk of 5, so scalar). Short planes (5x7, 7x7, 6x6, 10x10) are walked
# in blocks whose vectors straddle planes; 200 of them in one group make two
# blocks, which two threads split; planes under a vector (3x3, 2x2, 5) go in
# rounds of a vector's worth of planes, 1200 of them in two blocks. Planes of one
# value ((N, C), (N, C, 1, 1)) run through the channels-last kernels. Small
# groups are set up in batches: 5120 groups of 8 values, in whole batches
# that two threads split, and 18 groups of 40 (3x48x5: a batch and a part).
# Short planes in batches of small groups are walked as one run across
# groups (ACROSS_SHAPES, below).
# A channels-last sample of 16900 rows of 8 channels takes its statistics in
# three runs (the last partial), which two threads split, and its backward
# gradient sums in runs of row blocks joined across threads.
SHAPES = [
    ((2, 64, 20, 20), 8),
    ((1, 4, 12293), 2),
    ((3, 6, 5, 7), 3),
    ((2, 48, 7, 7), 6),
    ((3, 256, 10, 10), 32),
    ((2, 40, 6, 6), 8),
    ((1, 4, 4116), 2),
    ((1, 200, 5, 7), 1),
    ((2, 64, 3, 3), 8),
    ((1, 1200, 2, 2), 1),
    ((3, 48, 5), 6),
    ((48, 96), 8),
    ((5, 40, 1, 1), 4),
    ((160, 64, 2, 2), 32),
    ((1, 8, 130, 130), 2),
]
# Short planes walked as one run across groups (a batch of small groups, a
# two-pass block): 3x3 in groups of 3 (tiny under 16 lanes; two batches and a
# part a thread), 4x4 in groups of 4 (whole vectors, so the backward's sums
# cross groups too; twenty batches a thread), 6x6 in groups of 2 (72 values:
# whole vectors of 8 lanes but not of 16, so fp32 sums walk each group).
ACROSS_SHAPES = [((9, 60, 3, 3), 20), ((40, 64, 4, 4), 16), ((3, 24, 6, 6), 12)]
SHAPES += ACROSS_SHAPES


def run(monkeypatch, schedule, x, w, b, groups, activation, dy):
    monkeypatch.setenv("GNFLEX_CPU_SCHEDULE", schedule)
    out = torch.ops.gnflex.group_norm(x, w, b, groups, 1e-5, activation)
    grads = grads_of(lambda x, w, b: gnflex.group_norm(x, groups, w, b, activation=activation), x, w, b, dy)
    return (*out, *grads[1:])


def case_tensors(shape, dtype, layout):
    """x, grad_out, weight and bias of one case."""
    x = make_input(shape, dtype, "cpu", layout)
    dy = make_input(shape, dtype, "cpu", layout, seed=9)
    return (x, dy, *make_params(shape[1], dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,groups", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_schedules_agree_bitwise(monkeypatch, layout, shape, groups, activation, dtype):
    x, dy, w, b = case_tensors(shape, dtype, layout)
    fused = run(monkeypatch, "fused", x, w, b, groups, activation, dy)
    two_pass = run(monkeypatch, "two_pass", x, w, b, groups, activation, dy)
    auto = run(monkeypatch, "auto", x, w, b, groups, activation, dy)
    for f, t, a in zip(fused, two_pass, auto):
        assert torch.equal(f, t) and torch.equal(f, a)


# fp32 / fp64 with an activation keep g = dy * act'(z) in dx between the
# backward's passes (unless dx is streamed); a run with a ragged end redoes one
# vector over values already written (simd_for), whose g must be read first.
# Runs of 20 channels, planes of 261 values, rows of 40 channels: ragged ends
# of 4-8 values for fp32 and fp64. Every schedule against the float64
# reference (the schedules' bitwise agreement would not see an error both make).
KEPT_IN_DX_SHAPES = [((2, 20, 3, 7), 5), ((2, 8, 9, 29), 4), ((2, 40, 6, 6), 8)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("activation", ("silu", "gelu"))
@pytest.mark.parametrize("shape,groups", KEPT_IN_DX_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("schedule", ("fused", "two_pass"))
def test_gradients_kept_in_dx_match_the_reference(monkeypatch, schedule, layout, shape, groups, activation, dtype):
    x, dy, w, b = case_tensors(shape, dtype, layout)
    got = run(monkeypatch, schedule, x, w, b, groups, activation, dy)[3:]
    want = grads_of(lambda x, w, b: reference(x, groups, w, b, activation=activation), x, w, b, dy)[1:]
    for g, r in zip(got, want):
        assert_close_to_ref(g, r, dtype, scale=max(1.0, r.abs().max().item()))


# The walks across groups against the float64 reference: the schedules'
# agreement would not see an error both make.
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("activation", ("none", "silu"))
@pytest.mark.parametrize("shape,groups", ACROSS_SHAPES, ids=str)
@pytest.mark.parametrize("schedule", ("fused", "two_pass"))
def test_walks_across_groups_match_the_reference(monkeypatch, schedule, shape, groups, activation, dtype):
    x, dy, w, b = case_tensors(shape, dtype, "contiguous")
    got = run(monkeypatch, schedule, x, w, b, groups, activation, dy)
    want_y = reference(x, groups, w, b, activation=activation)
    want_grads = grads_of(lambda x, w, b: reference(x, groups, w, b, activation=activation), x, w, b, dy)[1:]
    assert_close_to_ref(got[0], want_y, dtype)
    for g, r in zip(got[3:], want_grads):
        assert_close_to_ref(g, r, dtype, scale=max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("present", ("none", "weight", "bias", "per_sample_bias"))
@pytest.mark.parametrize("shape,groups", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("schedule", ("fused", "two_pass"))
def test_absent_parameters_read_as_ones_and_zeros(monkeypatch, schedule, layout, shape, groups, present, dtype):
    # The kernels take an absent weight / bias as null and read 1 / 0: the
    # same bits as passing ones / zeros, in every schedule and layout.
    x, dy, w, b = case_tensors(shape, dtype, layout)
    if present == "per_sample_bias":
        b = torch.randn(shape[0], shape[1]).to(dtype)
    w = w if present == "weight" else None
    b = b if present in ("bias", "per_sample_bias") else None
    ones = torch.ones(shape[1], dtype=dtype)
    zeros = torch.zeros(shape[:2] if present == "per_sample_bias" else shape[1:2], dtype=dtype)
    absent = run(monkeypatch, schedule, x, w, b, groups, "silu", dy)
    filled = run(monkeypatch, schedule, x, ones if w is None else w, zeros if b is None else b, groups, "silu", dy)
    for got, want, name in zip(absent, filled, ("y", "mean", "rstd", "dx", "dweight", "dbias")):
        if got is not None:
            assert torch.equal(got, want), name
    assert (absent[4] is None) == (w is None) and (absent[5] is None) == (b is None)


def test_unknown_schedule_is_an_error(monkeypatch):
    monkeypatch.setenv("GNFLEX_CPU_SCHEDULE", "fastest")
    with pytest.raises(RuntimeError, match="GNFLEX_CPU_SCHEDULE must be auto, fused or two_pass"):
        gnflex.group_norm(torch.randn(2, 4, 3), 2)


def test_cpu_tuning_reads_the_caches():
    from gnflex import _C

    t = _C.cpu_tuning()
    assert t["cache_source"] in ("sysfs", "sysconf", "default")
    assert 0 < t["l1d"] <= t["l2"] <= t["l3"]
    # Budgets derived from the caches: a group within L2, a sample within 4 x L2.
    assert t["fused_group_bytes"] == t["l2"] and t["fused_sample_bytes"] == 4 * t["l2"]
    # Streaming stores only for outputs that, with their input, would not stay in L3.
    assert t["stream_output_bytes"] == min(max(t["l3"] // 2, 2 << 20), 16 << 20)
    # Channels-last backward samples that spill L2 run fused only while a call's tensors stay in L3.
    assert t["l3_reread_bytes"] == min(t["l3"] // 2, 16 << 20)
    # Elementwise passes walk backward after a thread read more than its L2.
    assert t["walk_back_bytes"] == t["l2"] and t["walk_back_max_bytes"] == 4 * t["l2"]


@pytest.mark.parametrize("variable,key", [("GNFLEX_CPU_STREAM_BYTES", "stream_output_bytes"),
                                          ("GNFLEX_CPU_WALK_BACK_BYTES", "walk_back_bytes")])
def test_size_overrides(monkeypatch, variable, key):
    from gnflex import _C

    monkeypatch.setenv(variable, "64K")
    assert _C.cpu_tuning()[key] == 64 << 10
    monkeypatch.setenv(variable, "lots")
    with pytest.raises(RuntimeError, match=f"{variable} must be a size"):
        _C.cpu_tuning()


# Run-time settings that change only how the kernels write, never what: each
# forced on for every size against off, with the shapes that reach its paths.
# Streaming stores (from a few MiB on): runs of whole cache lines, where they
# engage, and one that is not. Walking back (after a thread read more than
# its L2): SHAPES, on two threads, whose split of channels-last row blocks
# falls inside a sample.
STREAM_SHAPES = [((2, 64, 16, 16), 8), ((3, 32, 8, 8), 4), ((2, 48, 5, 7), 6)]
FORCED_SETTINGS = [("GNFLEX_CPU_STREAM_BYTES", shape, groups) for shape, groups in STREAM_SHAPES] + [
    ("GNFLEX_CPU_WALK_BACK_BYTES", shape, groups) for shape, groups in SHAPES
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ("none", "silu"))
@pytest.mark.parametrize("setting,shape,groups", FORCED_SETTINGS, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("schedule", ("fused", "two_pass"))
def test_forced_settings_write_the_same_values(monkeypatch, schedule, layout, setting, shape, groups, activation,
                                               dtype):
    x, dy, w, b = case_tensors(shape, dtype, layout)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv(setting, "1")
        forced = run(monkeypatch, schedule, x, w, b, groups, activation, dy)
        monkeypatch.setenv(setting, "1G")
        unforced = run(monkeypatch, schedule, x, w, b, groups, activation, dy)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(forced, unforced):
        assert torch.equal(got, want)
