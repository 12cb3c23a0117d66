"""Bad input gives a clear Python exception naming the problem, never a crash.

The forward's bad-input matrix: every case raises an exception of the
expected type with a message naming the problem, and agrees with
torch.nn.functional.group_norm on whether the input is accepted. Every eps
torch accepts is accepted too (tests/test_numerics.py checks the values);
only GNConfig, our own API, rejects a NaN, infinite or negative eps. Then the
backward's checks, the module's, and a build loaded under another torch.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gnflex

op = torch.ops.gnflex.group_norm
op_bwd = torch.ops.gnflex.group_norm_backward


def x(*shape, dtype=torch.float32, device="cpu"):
    if dtype in (torch.int64, torch.bool):
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=device)


# torch rejects no channels or no spatial values from 2.14 on; 2.11-2.13
# return an empty output. gnflex rejects them under every torch.
TORCH_REJECTS_EMPTY = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14)

# (id, input, groups, weight, bias, eps, exception type, message fragment,
#  torch also rejects it)
CASES = [
    ("ndim<2", x(8), 2, None, None, 1e-5, RuntimeError, "at least 2 dims", True),
    ("ndim0", torch.tensor(1.0), 1, None, None, 1e-5, RuntimeError, "at least 2 dims", True),
    ("C==0", x(2, 0, 4), 1, None, None, 1e-5, RuntimeError, "num_channels > 0", TORCH_REJECTS_EMPTY),
    ("C%G!=0", x(2, 10, 4), 3, None, None, 1e-5, RuntimeError, "must be divisible by num_groups (3)", True),
    ("G==0", x(2, 8, 4), 0, None, None, 1e-5, RuntimeError, "num_groups must be positive, got 0", True),
    ("G<0", x(2, 8, 4), -2, None, None, 1e-5, RuntimeError, "num_groups must be positive, got -2", True),
    ("G>C", x(2, 4, 4), 8, None, None, 1e-5, RuntimeError, "num_channels (4) must be divisible", True),
    ("zero spatial", x(2, 4, 0, 3), 2, None, None, 1e-5, RuntimeError, "non-empty spatial dims", TORCH_REJECTS_EMPTY),
    ("zero spatial 1d", x(2, 4, 0), 2, None, None, 1e-5, RuntimeError, "non-empty spatial dims", TORCH_REJECTS_EMPTY),
    ("weight shape", x(2, 4, 3), 2, torch.ones(3), None, 1e-5, RuntimeError,
     "expected weight of shape [4] (num_channels) or [2, 4] (per sample), got [3]", True),
    ("weight 2d", x(2, 4, 3), 2, torch.ones(4, 1), None, 1e-5, RuntimeError, "expected weight of shape [4]", True),
    ("bias shape", x(2, 4, 3), 2, None, torch.ones(5), 1e-5, RuntimeError, "expected bias of shape [4]", True),
    ("weight dtype", x(2, 4, 3), 2, torch.ones(4, dtype=torch.float64), None, 1e-5, RuntimeError,
     "weight dtype Double does not match input dtype Float", True),
    ("bias int", x(2, 4, 3), 2, None, torch.ones(4, dtype=torch.int64), 1e-5, RuntimeError,
     "bias dtype Long does not match", True),
    ("weight half for float", x(2, 4, 3), 2, torch.ones(4, dtype=torch.float16), None, 1e-5, RuntimeError,
     "weight dtype Half does not match input dtype Float", True),
    ("int input", x(2, 4, 3, dtype=torch.int64), 2, None, None, 1e-5, NotImplementedError,
     "float32, float64, float16 or bfloat16 input, got Long", True),
    ("bool input", x(2, 4, 3, dtype=torch.bool), 2, None, None, 1e-5, NotImplementedError, "got Bool", True),
    ("complex input", x(2, 4, 3, dtype=torch.complex64), 2, None, None, 1e-5, NotImplementedError,
     "got ComplexFloat", True),
    ("weight on meta", x(2, 4, 3), 2, torch.ones(4, device="meta"), None, 1e-5, RuntimeError, "meta", True),
    ("meta input, bad groups", x(2, 6, 3, device="meta"), 4, None, None, 1e-5, RuntimeError,
     "must be divisible by num_groups (4)", True),
    ("meta input, int", x(2, 4, 3, dtype=torch.int64, device="meta"), 2, None, None, 1e-5, NotImplementedError,
     "expected a float32, float64, float16 or bfloat16 input", None),  # torch's meta kernel does not check dtypes
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    _, inp, groups, weight, bias, eps, exc, fragment, torch_rejects = case
    with pytest.raises(exc) as info:
        op(inp, weight, bias, groups, eps, "none")
    assert fragment in str(info.value), str(info.value)
    # The module-level API raises the same.
    with pytest.raises(exc):
        gnflex.group_norm(inp, groups, weight, bias, eps)
    if torch_rejects is None:
        return
    try:
        F.group_norm(inp, groups, weight, bias, eps)
        torch_raised = False
    except (RuntimeError, ValueError, ZeroDivisionError, NotImplementedError):
        torch_raised = True
    assert torch_raised == torch_rejects


def test_single_value_groups_rejected_like_torch():
    # torch.nn.functional.group_norm refuses N * C * HxW / G == 1; so do the
    # Python API and the module (the op itself accepts it).
    for shape, groups in (((1, 1), 1), ((1, 4), 4), ((1, 3, 1, 1), 3)):
        inp = x(*shape)
        with pytest.raises(ValueError, match="more than 1 value"):
            F.group_norm(inp, groups)
        with pytest.raises(ValueError, match="more than 1 value per group"):
            gnflex.group_norm(inp, groups)
        with pytest.raises(ValueError, match="more than 1 value per group"):
            gnflex.GroupNormFlex(shape[1], groups=groups)(inp)
        y, _, _ = op(inp, None, None, groups, 1e-5, "none")
        assert torch.equal(y, torch.zeros_like(y))
    gnflex.group_norm(x(2, 4), 4)  # two samples: fine, as in torch
    F.group_norm(x(2, 4), 4)


def test_unknown_activation():
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        op(x(2, 4, 3), None, None, 2, 1e-5, "tanh")
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        op(x(2, 4, 3, device="meta"), None, None, 2, 1e-5, "tanh")


def test_config_rejects_non_finite_eps():
    for eps in (math.nan, math.inf, -1e-5):
        with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
            gnflex.GNConfig(eps=eps)


def test_empty_batch_matches_torch():
    inp = x(0, 8, 5, 5).requires_grad_()
    w = torch.rand(8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y, mean, rstd = op(inp, w, b, 4, 1e-5, "silu")
    assert y.shape == (0, 8, 5, 5) and mean.shape == rstd.shape == (0, 4)
    ref = F.group_norm(inp, 4, w, b)
    assert ref.shape == y.shape
    dx, dw, db = torch.autograd.grad(gnflex.group_norm(inp, 4, w, b).sum(), (inp, w, b))
    rdx, rdw, rdb = torch.autograd.grad(ref.sum(), (inp, w, b))
    assert dx.shape == rdx.shape
    assert torch.equal(dw, rdw) and torch.equal(db, rdb)  # zeros


def test_meta_input_gives_shapes():
    inp = x(2, 8, 5, 5, device="meta").to(memory_format=torch.channels_last)
    y, mean, rstd = op(inp, torch.ones(8, device="meta"), None, 4, 1e-5, "gelu")
    assert y.device.type == "meta" and y.shape == inp.shape and y.stride() == inp.stride()
    assert mean.shape == (2, 4) and mean.dtype == torch.float32
    dx, dw, db = op_bwd(y, inp, mean, rstd, torch.ones(8, device="meta"), None, 4, "gelu", [True, True, False])
    assert dx.shape == inp.shape and dw.shape == (8,) and db is None


def test_fake_tensors_reject_like_the_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        good = torch.empty(2, 8, 4)
        y, _, _ = op(good, None, None, 4, 1e-5, "none")
        assert y.shape == good.shape
        with pytest.raises(RuntimeError, match="must be divisible by num_groups"):
            op(torch.empty(2, 6, 4), None, None, 4, 1e-5, "none")
        with pytest.raises(RuntimeError, match="non-empty spatial dims"):
            op(torch.empty(2, 8, 0), None, None, 4, 1e-5, "none")


def test_backward_errors():
    x = torch.randn(2, 8, 4)
    y, mean, rstd = op(x, None, None, 2, 1e-5, "none")
    mask = [True, False, False]
    with pytest.raises(RuntimeError, match=r"grad_out shape \[2, 8, 3\] does not match input shape"):
        op_bwd(torch.randn(2, 8, 3), x, mean, rstd, None, None, 2, "none", mask)
    with pytest.raises(RuntimeError, match=r"expected mean with N \* num_groups = 4 elements"):
        op_bwd(y, x, mean[:1], rstd, None, None, 2, "none", mask)
    with pytest.raises(RuntimeError, match=r"expected rstd of dtype Float, got Double"):
        op_bwd(y, x, mean, rstd.double(), None, None, 2, "none", mask)
    with pytest.raises(RuntimeError, match=r"grad_out dtype Double does not match input dtype Float"):
        op_bwd(y.double(), x, mean, rstd, None, None, 2, "none", mask)


def test_module_rejects_wrong_input():
    m = gnflex.GroupNormFlex(8, groups=4)
    expected = r"expected weight of shape \[12\] \(num_channels\) or \[2, 12\] \(per sample\), got \[8\]"
    with pytest.raises(RuntimeError, match=expected):
        m(torch.randn(2, 12, 3, 3))
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        m(torch.randn(8))


def test_build_info_matches_running_torch():
    from gnflex import _build_info

    assert _build_info.torch_version.split("+")[0] == torch.__version__.split("+")[0]
    assert os.path.isfile(gnflex.library_path())


def test_installed_package_requires_the_torch_release_it_was_built_against():
    """pip keeps the torch the library loads under: the package's requirement
    is the build's release (the import guard refuses any other)."""
    from importlib.metadata import requires

    from gnflex import _build_info

    release = _build_info.torch_version.split("+")[0]
    torch_reqs = [r.replace(" ", "") for r in requires("gnflex") or [] if r.startswith("torch") and "extra" not in r]
    assert torch_reqs == [f"torch=={release}"], torch_reqs


def test_import_under_other_torch_version_fails_clearly(tmp_path):
    code = "import torch; torch.__version__ = '1.0.0'; import gnflex"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "gnflex was built against torch" in proc.stderr and "1.0.0" in proc.stderr
