"""Bad input gives a clear Python exception naming the argument, never a crash."""
import os
import subprocess
import sys

import pytest
import torch

import gnflex

op = torch.ops.gnflex.group_norm
op_bwd = torch.ops.gnflex.group_norm_backward


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: op(torch.randn(8), None, None, 2, 1e-5, "none"), r"at least 2 dims, got 1"),
        (lambda: op(torch.randn(2, 10, 4), None, None, 3, 1e-5, "none"),
         r"num_channels \(10\) must be divisible by num_groups \(3\)"),
        (lambda: op(torch.randn(2, 8, 4), None, None, 0, 1e-5, "none"), r"num_groups must be positive, got 0"),
        (lambda: op(torch.randn(2, 8, 4), None, None, -2, 1e-5, "none"), r"num_groups must be positive, got -2"),
        (lambda: op(torch.ones(2, 8, 4, dtype=torch.int64), None, None, 2, 1e-5, "none"),
         r"float32, float64, float16 or bfloat16 input, got Long"),
        (lambda: op(torch.randn(2, 8, 4), torch.ones(4), None, 2, 1e-5, "none"),
         r"expected weight of shape \[8\] \(num_channels\), got \[4\]"),
        (lambda: op(torch.randn(2, 8, 4), None, torch.ones(8, 1), 2, 1e-5, "none"),
         r"expected bias of shape \[8\]"),
        (lambda: op(torch.randn(2, 8, 4), torch.ones(8, dtype=torch.float64), None, 2, 1e-5, "none"),
         r"weight dtype Double does not match input dtype Float"),
        (lambda: op(torch.randn(2, 8, 4), None, None, 2, 1e-5, "tanh"), r"unknown activation 'tanh'"),
    ],
)
def test_forward_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


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
    with pytest.raises(RuntimeError, match=r"expected weight of shape \[12\] \(num_channels\), got \[8\]"):
        m(torch.randn(2, 12, 3, 3))
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        m(torch.randn(8))


def test_build_info_matches_running_torch():
    from gnflex import _build_info

    assert _build_info.torch_version.split("+")[0] == torch.__version__.split("+")[0]
    assert os.path.isfile(gnflex.library_path())


def test_import_under_other_torch_version_fails_clearly(tmp_path):
    code = "import torch; torch.__version__ = '1.0.0'; import gnflex"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "gnflex was built against torch" in proc.stderr and "1.0.0" in proc.stderr
