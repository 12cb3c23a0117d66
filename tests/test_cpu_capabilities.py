"""Both CPU kernel copies (portable and AVX2) give the reference results.

ATen's CPU capability picks the copy; ATEN_CPU_CAPABILITY=default forces the
portable one, which needs a fresh process.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import torch, torch.nn.functional as F, gnflex
    torch.manual_seed(0)
    worst = 0.0
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for act, f in (("none", lambda t: t), ("silu", F.silu), ("gelu", F.gelu), ("relu", F.relu)):
                x = torch.randn(2, 24, 9, 7, dtype=dtype).to(memory_format=fmt).requires_grad_()
                w = (torch.rand(24, dtype=dtype) + 0.5).requires_grad_()
                b = torch.randn(24, dtype=dtype).requires_grad_()
                y = gnflex.group_norm(x, 6, w, b, activation=act)
                dy = torch.randn_like(y)
                grads = torch.autograd.grad(y, (x, w, b), dy)
                xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
                yr = f(F.group_norm(xr.contiguous(), 6, wr, br))
                rgrads = torch.autograd.grad(yr, (xr, wr, br), dy.double())
                for a, r in zip((y,) + grads, (yr,) + rgrads):
                    err = ((a.double() - r).abs().max() / r.abs().max().clamp_min(1)).item()
                    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
                    worst = max(worst, err / tol)
    print(torch.backends.cpu.get_cpu_capability(), worst)
    """
)


def run_with_capability(capability, cwd):
    env = dict(os.environ)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    # cwd outside the checkout so the installed gnflex is imported.
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    cap, worst = proc.stdout.split()
    return cap, float(worst)


def test_portable_kernels_match_reference(tmp_path):
    cap, worst = run_with_capability("default", tmp_path)
    assert cap == "DEFAULT"
    assert worst <= 1.0


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="this CPU has no AVX2: only the portable kernels can run")
def test_avx2_kernels_match_reference(tmp_path):
    cap, worst = run_with_capability("avx2", tmp_path)
    assert cap == "AVX2"
    assert worst <= 1.0
