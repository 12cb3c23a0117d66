"""Every CPU kernel copy (portable, AVX2, AVX-512) gives the reference results.

ATen's CPU capability picks the copy; ATEN_CPU_CAPABILITY (default, avx2,
avx512) forces one and GNFLEX_CPU_COPY caps gnflex's alone, which needs a
fresh process. A copy wider than this
process's capability cannot run on this CPU and is skipped: ATen takes a forced
avx512 on trust, and its own kernels (the float64 reference) would fault.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import itertools, torch, torch.nn.functional as F, gnflex
    from gnflex import _C
    torch.manual_seed(0)
    worst = 0.0
    tolerances = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
    # C = 72: channels-last rows of whole 512-bit vectors (16 floats, 32 halves) and a tail.
    cases = [((2, 24, 9, 7), 6), ((2, 72, 5, 6), 6)]
    for (shape, groups), (dtype, tol) in itertools.product(cases, tolerances.items()):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for act, f in (("none", lambda t: t), ("silu", F.silu), ("gelu", F.gelu), ("relu", F.relu)):
                x = torch.randn(shape, dtype=dtype).to(memory_format=fmt).requires_grad_()
                w = (torch.rand(shape[1], dtype=dtype) + 0.5).requires_grad_()
                b = torch.randn(shape[1], dtype=dtype).requires_grad_()
                y = gnflex.group_norm(x, groups, w, b, activation=act)
                dy = torch.randn_like(y)
                grads = torch.autograd.grad(y, (x, w, b), dy)
                xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
                yr = f(F.group_norm(xr.contiguous(), groups, wr, br))
                rgrads = torch.autograd.grad(yr, (xr, wr, br), dy.double())
                for a, r in zip((y,) + grads, (yr,) + rgrads):
                    err = ((a.double() - r).abs().max() / r.abs().max().clamp_min(1)).item()
                    worst = max(worst, err / tol)
    print(torch.backends.cpu.get_cpu_capability(), _C.cpu_tuning()["kernel_copy"], worst)
    """
)


# ATen's x86 capabilities, narrowest first; other CPUs run the portable copy.
CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
# The widest this CPU runs (lower if ATEN_CPU_CAPABILITY is set for the tests).
HOST = torch.backends.cpu.get_cpu_capability()


def cpu_flags():
    """The x86 feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return set()


def run_with_capability(capability, cwd, copy=None):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env.pop("GNFLEX_CPU_COPY", None)
    if copy is not None:
        env["GNFLEX_CPU_COPY"] = copy
    # cwd outside the checkout so the installed gnflex is imported.
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    cap, copy, worst = proc.stdout.split()
    return cap, copy, float(worst)


# (ATEN_CPU_CAPABILITY, GNFLEX_CPU_COPY, the copy that must run): every copy
# gnflex has, chosen by ATen's capability and by gnflex's own cap.
COPIES = [("default", None, "DEFAULT"), ("avx2", None, "AVX2"), ("avx512", None, "AVX512"),
          ("avx512", "avx2", "AVX2")]


@pytest.mark.parametrize("capability,copy_limit,want", COPIES,
                         ids=["DEFAULT", "AVX2", "AVX512", "AVX2-under-AVX512"])
def test_kernel_copy_matches_reference(capability, copy_limit, want, tmp_path):
    host_rank = CAPABILITIES.index(HOST) if HOST in CAPABILITIES else 0
    if CAPABILITIES.index(capability.upper()) > host_rank:
        pytest.skip(f"ATen runs this CPU as {HOST}: the {want} kernels cannot run here")
    cap, copy, worst = run_with_capability(capability, tmp_path, copy_limit)
    if cap != capability.upper():
        pytest.skip(f"ATEN_CPU_CAPABILITY={capability}: ATen runs {cap}")
    assert copy == want
    assert worst <= 1.0


def test_copy_limit_is_checked(tmp_path):
    code = "from gnflex import _C; _C.cpu_tuning()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(os.environ, GNFLEX_CPU_COPY="avx1024"))
    assert proc.returncode != 0 and "GNFLEX_CPU_COPY must be default, avx2 or avx512" in proc.stderr


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags() or "avx512f" in cpu_flags(),
                    reason="needs a CPU with AVX2 and without AVX-512")
def test_forced_avx512_on_a_cpu_without_it_runs_avx2(tmp_path):
    # ATen takes ATEN_CPU_CAPABILITY=avx512 on trust; gnflex must still pick a copy this CPU runs.
    code = "from gnflex import _C; print(_C.cpu_tuning()['kernel_copy'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(os.environ, ATEN_CPU_CAPABILITY="avx512"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["AVX2"]


# The copies the activations' vector exp runs in: AVX2 and AVX-512 have their
# own, the portable copy ATen's.
@pytest.mark.parametrize("copy", ["default", "avx2", "avx512"])
def test_activations_over_the_range_of_exp_in_every_copy(copy, tmp_path):
    if CAPABILITIES.index(copy.upper()) > (CAPABILITIES.index(HOST) if HOST in CAPABILITIES else 0):
        pytest.skip(f"ATen runs this CPU as {HOST}: the {copy} kernels cannot run here")
    test = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_numerics.py")
    env = dict(os.environ, GNFLEX_CPU_COPY=copy)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test, "-k",
                           "test_float32_activation_value_by_value"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
