"""CUDA-specific cases. The numerics/gradient suites in test_forward.py and
test_backward.py also run on CUDA through their `device` parameter; all of
these skip with a reason on machines without a GPU (the last one checks the
GPU check's sanitizer script against the CPU)."""
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

import gnflex
from _helpers import (CUDA_SKIP, DEVICES, TOLERANCES, act_ref, assert_close_to_ref, make_input, make_params,
                      reference)

needs_cuda = pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
pytestmark = pytest.mark.cuda


def test_cuda_kernels_are_registered_for_every_op():
    # Runs without a GPU: the library built here must carry CUDA kernels.
    if not gnflex.built_with_cuda():
        pytest.skip("gnflex was built without CUDA (no nvcc or a CPU-only torch at build time)")
    for op in ("gnflex::group_norm", "gnflex::group_norm_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


def forward_backward(fn, x, w, b, dy):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    return (y,) + torch.autograd.grad(y, (x, w, b), dy)


def check_against_reference(x, groups, activation="silu", dtype=torch.float32):
    """Forward and all gradients against autograd of the float64 reference,
    within the dtype tolerance or a small multiple of torch's own error on the
    same input, whichever is larger: in groups of one or two values rstd is
    about eps^-1/2 = 316 and torch's own fp32 dx is 3e-5 to 9e-5 off."""
    w, b = make_params(x.shape[1], x.dtype, x.device)
    dy = torch.randn_like(x)
    ours = forward_backward(lambda x, w, b: gnflex.group_norm(x, groups, w, b, activation=activation),
                            x, w, b, dy)
    theirs = forward_backward(lambda x, w, b: act_ref(F.group_norm(x, groups, w, b), activation), x, w, b, dy)
    ref = forward_backward(lambda x, w, b: reference(x, groups, w, b, activation=activation),
                           x.double(), w.double(), b.double(), dy.double())
    rtol, atol = TOLERANCES[dtype]
    for a, t, r in zip(ours, theirs, ref):
        torch_error = (t.double() - r).abs().max().item()
        bound = max(atol * max(1.0, r.abs().max().item()), 4 * torch_error)
        torch.testing.assert_close(a.double(), r, rtol=rtol, atol=bound)


@needs_cuda
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_split_group_path(layout):
    # N * G far below the SM count: each group is spread over many blocks.
    x = make_input((1, 256, 128, 128), torch.float32, "cuda", layout)
    check_against_reference(x, 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,groups", [((64, 8, 1, 1), 8), ((3, 64, 2, 1), 64), ((5, 6), 3)])
def test_tiny_groups(device, shape, groups):
    check_against_reference(make_input(shape, torch.float32, device), groups)


@needs_cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("shape", [(2, 6, 7, 5), (3, 9, 13), (1, 3, 33, 31)])
def test_sizes_not_multiple_of_vector_width(dtype, shape):
    x = make_input(shape, dtype, "cuda")
    check_against_reference(x, 3, dtype=dtype)


@needs_cuda
@pytest.mark.parametrize("offset", (1, 3, 5))
def test_misaligned_storage_offset(offset):
    base = torch.randn(2 * 16 * 9 * 9 + offset, device="cuda")
    x = base[offset:].view(2, 16, 9, 9)
    assert x.storage_offset() == offset
    check_against_reference(x, 4)


@needs_cuda
def test_channels_last_3d():
    x = make_input((2, 16, 5, 6, 7), torch.float32, "cuda", "channels_last")
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
    y = gnflex.group_norm(x, 4)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    check_against_reference(x, 4)


@needs_cuda
def test_cuda_graph_capture_and_replay():
    x = make_input((4, 32, 16, 16), torch.float32, "cuda", "channels_last")
    w, b = make_params(32, torch.float32, "cuda")
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gnflex.group_norm(static_x, 8, w, b, activation="silu")  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = gnflex.group_norm(static_x, 8, w, b, activation="silu")
    new_x = make_input((4, 32, 16, 16), torch.float32, "cuda", "channels_last", seed=7)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_ref(static_y, reference(new_x, 8, w, b, activation="silu"), torch.float32)


@needs_cuda
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_cuda_graph_capture_of_forward_and_backward(layout):
    # Forward and backward in one graph, half precision with half parameters,
    # replayed on new data: bitwise equal to eager calls (the same kernels and
    # schedule; a capture gets sequence words and scratch of its own).
    shape = (4, 32, 16, 16)
    w, b = (t.requires_grad_() for t in make_params(32, torch.float16, "cuda"))
    static_x = make_input(shape, torch.float16, "cuda", layout).requires_grad_()
    static_dy = torch.randn_like(static_x)

    def step(x, dy):
        y = gnflex.group_norm(x, 8, w, b, activation="silu")
        return (y,) + torch.autograd.grad(y, (x, w, b), dy)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(static_x, static_dy)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(static_x, static_dy)
    for seed in (7, 8):
        new_x = make_input(shape, torch.float16, "cuda", layout, seed=seed)
        new_dy = torch.randn_like(new_x)
        with torch.no_grad():
            static_x.copy_(new_x)
            static_dy.copy_(new_dy)
        graph.replay()
        eager = step(new_x.requires_grad_(), new_dy)
        torch.cuda.synchronize()
        for got, want in zip(outs, eager):
            assert torch.equal(got, want)


def cuda_kernels_of(fn):
    """Names of the GPU kernels (memsets and copies included) fn runs."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@needs_cuda
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_one_launch_per_pass(layout, dtype):
    # Forward and backward are one kernel each, parameters in their own dtype
    # included (no cast kernels) and dweight / dbias written by the same kernel.
    x = make_input((2, 64, 40, 40), dtype, "cuda", layout)
    w, b = make_params(64, dtype, "cuda")
    y, mean, rstd = torch.ops.gnflex.group_norm(x, w, b, 8, 1e-5, "silu")  # allocates the stream's buffers
    dy = torch.randn_like(y)
    torch.ops.gnflex.group_norm_backward(dy, x, mean, rstd, w, b, 8, "silu", [True, True, True])
    forward = cuda_kernels_of(lambda: torch.ops.gnflex.group_norm(x, w, b, 8, 1e-5, "silu"))
    backward = cuda_kernels_of(
        lambda: torch.ops.gnflex.group_norm_backward(dy, x, mean, rstd, w, b, 8, "silu", [True, True, True]))
    assert len(forward) == 1 and "forward" in forward[0], forward
    assert len(backward) == 1 and "backward" in backward[0], backward


@needs_cuda
def test_shapes_in_turn_share_the_stream_state():
    # Calls of other shapes in between (fewer and more domains, the sequence
    # words growing) leave every result as a first call gives it.
    shapes = [((2, 64, 20, 20), 8), ((16, 32, 8, 8), 32), ((1, 16, 64, 64), 4), ((64, 64, 4, 4), 32)]
    first = {}
    for rounds in range(2):
        for shape, groups in shapes:
            for layout in ("contiguous", "channels_last"):
                x = make_input(shape, torch.float32, "cuda", layout)
                y = gnflex.group_norm(x, groups, activation="gelu")
                key = (shape, layout)
                if rounds == 0:
                    first[key] = y
                    assert_close_to_ref(y, reference(x, groups, activation="gelu"), torch.float32)
                else:
                    assert torch.equal(y, first[key])


@needs_cuda
@pytest.mark.parametrize("eps", (0.0, 1e-3, 0.5))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_eps_values(eps, layout):
    x = make_input((2, 32, 12, 12), torch.float32, "cuda", layout)
    w, b = make_params(32, torch.float32, "cuda")
    y = gnflex.group_norm(x, 8, w, b, eps=eps, activation="silu")
    assert_close_to_ref(y, reference(x, 8, w, b, eps=eps, activation="silu"), torch.float32)


@needs_cuda
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_many_rounds(layout):
    # 16 MB in samples of 1 MB: the statistics and output stages interleave
    # over several rounds in both layouts.
    x = make_input((16, 64, 64, 64), torch.float32, "cuda", layout)
    check_against_reference(x, 16)


@needs_cuda
def test_non_default_stream():
    x = make_input((2, 32, 24, 24), torch.float32, "cuda")
    w, b = make_params(32, torch.float32, "cuda")
    expected = gnflex.group_norm(x, 8, w, b, activation="gelu")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = gnflex.group_norm(x, 8, w, b, activation="gelu")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(y, expected)


@needs_cuda
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_bitwise_reproducible(layout):
    x = make_input((2, 64, 48, 48), torch.float32, "cuda", layout)
    w, b = make_params(64, torch.float32, "cuda")
    dy = torch.randn_like(x)

    def run():
        return forward_backward(lambda x, w, b: gnflex.group_norm(x, 32, w, b, activation="silu"),
                                x, w, b, dy)

    first = run()
    for _ in range(3):
        for a, r in zip(run(), first):
            assert torch.equal(a, r)


@pytest.mark.skipif(CUDA_SKIP is not None or torch.cuda.device_count() < 2,
                    reason=str(CUDA_SKIP or "needs a second GPU"))
def test_second_device():
    x = make_input((2, 16, 8, 8), torch.float32, "cuda:1")
    y = gnflex.group_norm(x, 4)
    assert y.device == x.device
    check_against_reference(x, 4)


@needs_cuda
def test_cpu_and_cuda_agree():
    x = make_input((2, 32, 20, 20), torch.float32, "cpu", "channels_last")
    w, b = make_params(32, torch.float32)
    y_cpu = gnflex.group_norm(x, 8, w, b, activation="silu")
    y_cuda = gnflex.group_norm(x.cuda(), 8, w.cuda(), b.cuda(), activation="silu")
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-5, atol=1e-5)


def test_sanitizer_cases_script_runs():
    # The GPU check runs tests/cuda_sanitize_cases.py under compute-sanitizer;
    # run its logic here against the CPU itself so a broken script shows up
    # without a GPU (it returns 0 only when every comparison passed).
    spec = importlib.util.spec_from_file_location("cuda_sanitize_cases",
                                                  pathlib.Path(__file__).with_name("cuda_sanitize_cases.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(device="cpu") == 0
