"""gnflex.jit: the JIT build of csrc/ loads next to the installed library and
computes the same results."""

import pytest
import torch

from _helpers import make_input, make_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def jit_ops():
    import gnflex.jit

    try:
        gnflex.jit.source_dir()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    # CPU kernels only: the JIT mechanics are the same, and CI has no GPU.
    return gnflex.jit.load(with_cuda=False)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_jit_build_matches_installed(jit_ops, layout):
    assert jit_ops is torch.ops.gnflex_jit
    x = make_input((2, 32, 9, 11), torch.float32, layout=layout).requires_grad_()
    w, b = (t.requires_grad_() for t in make_params(32, torch.float32))
    dy = torch.randn_like(x)
    results = []
    for ops in (torch.ops.gnflex, jit_ops):
        y, mean, rstd = ops.group_norm(x, w, b, 8, 1e-5, "silu")
        grads = torch.autograd.grad(y, (x, w, b), dy)
        results.append((y, mean, rstd) + grads)
    for ours, installed in zip(results[1], results[0]):
        torch.testing.assert_close(ours, installed, rtol=1e-6, atol=1e-6)


def test_jit_ops_have_fake_kernels(jit_ops):
    x = make_input((2, 8, 5, 5), torch.float32)
    torch.library.opcheck(jit_ops.group_norm.default, (x, None, None, 4, 1e-5, "relu"))


def test_source_dir_error_names_the_fix(monkeypatch, tmp_path):
    import gnflex.jit

    monkeypatch.setenv("GNFLEX_SOURCE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="GNFLEX_SOURCE_DIR"):
        gnflex.jit.source_dir()
