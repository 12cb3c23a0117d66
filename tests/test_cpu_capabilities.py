"""Every CPU kernel variant (portable, AVX2, AVX-512) gives the reference results.

ATen's CPU capability picks the variant; ATEN_CPU_CAPABILITY (default, avx2,
avx512) forces one and GNFLEX_CPU_VARIANT caps gnflex's alone, which needs a
fresh process. A variant wider than this
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
    # Planes of 3 values: under one vector in every variant and dtype (the lane permutations
    # of each ISA), 20 to a group: more than one round of planes.
    cases = [((2, 24, 9, 7), 6), ((2, 72, 5, 6), 6), ((2, 80, 1, 3), 4)]
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
    print(torch.backends.cpu.get_cpu_capability(), _C.cpu_tuning()["kernel_variant"], worst)
    """
)


# ATen's x86 capabilities, narrowest first; other CPUs run the portable variant.
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


def run_with_capability(capability, cwd, variant=None):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env.pop("GNFLEX_CPU_VARIANT", None)
    if variant is not None:
        env["GNFLEX_CPU_VARIANT"] = variant
    # cwd outside the checkout so the installed gnflex is imported.
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    cap, variant, worst = proc.stdout.split()
    return cap, variant, float(worst)


# (ATEN_CPU_CAPABILITY, GNFLEX_CPU_VARIANT, the variant that must run): every variant
# gnflex has, chosen by ATen's capability and by gnflex's own cap.
VARIANTS = [("default", None, "DEFAULT"), ("avx2", None, "AVX2"), ("avx512", None, "AVX512"),
          ("avx512", "avx2", "AVX2")]


@pytest.mark.parametrize("capability,variant_limit,want", VARIANTS,
                         ids=["DEFAULT", "AVX2", "AVX512", "AVX2-under-AVX512"])
def test_kernel_variant_matches_reference(capability, variant_limit, want, tmp_path):
    host_rank = CAPABILITIES.index(HOST) if HOST in CAPABILITIES else 0
    if CAPABILITIES.index(capability.upper()) > host_rank:
        pytest.skip(f"ATen runs this CPU as {HOST}: the {want} kernels cannot run here")
    cap, variant, worst = run_with_capability(capability, tmp_path, variant_limit)
    if cap != capability.upper():
        pytest.skip(f"ATEN_CPU_CAPABILITY={capability}: ATen runs {cap}")
    assert variant == want
    assert worst <= 1.0


def test_variant_limit_is_checked(tmp_path):
    code = "from gnflex import _C; _C.cpu_tuning()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(os.environ, GNFLEX_CPU_VARIANT="avx1024"))
    assert proc.returncode != 0 and "GNFLEX_CPU_VARIANT must be default, avx2 or avx512" in proc.stderr


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags() or "avx512f" in cpu_flags(),
                    reason="needs a CPU with AVX2 and without AVX-512")
def test_forced_avx512_on_a_cpu_without_it_runs_avx2(tmp_path):
    # ATen takes ATEN_CPU_CAPABILITY=avx512 on trust; gnflex must still pick a variant this CPU runs.
    code = "from gnflex import _C; print(_C.cpu_tuning()['kernel_variant'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(os.environ, ATEN_CPU_CAPABILITY="avx512"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["AVX2"]


# The variants the activations' vector exp runs in: AVX2 and AVX-512 have their
# own, the portable variant ATen's.
@pytest.mark.parametrize("variant", ["default", "avx2", "avx512"])
def test_activations_over_the_range_of_exp_in_every_variant(variant, tmp_path):
    if CAPABILITIES.index(variant.upper()) > (CAPABILITIES.index(HOST) if HOST in CAPABILITIES else 0):
        pytest.skip(f"ATen runs this CPU as {HOST}: the {variant} kernels cannot run here")
    test = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_numerics.py")
    env = dict(os.environ, GNFLEX_CPU_VARIANT=variant)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test, "-k",
                           "test_float32_activation_value_by_value"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]


def wide_vector_functions(library):
    """Functions of `library` (demangled) that use AVX or wider instructions."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True).stdout
    found, name = set(), None
    for line in listing.splitlines():
        if line.endswith(">:"):  # "0000000000001234 <function>:"
            name = line[line.index("<") + 1:-2]
        elif name is not None and "\t" in line:
            mnemonic = line.split("\t", 1)[1].split(" ", 1)[0]
            if (mnemonic.startswith("v") and mnemonic not in ("verr", "verw")) or mnemonic.startswith("k"):
                found.add(name)
    return found


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 Linux build only")
def test_only_the_simd_variants_use_wide_vectors():
    """Everything outside the AVX2 / AVX-512 variants runs on any x86-64. Each
    variant's target pragma covers only the code after it, so a template or
    inline function the variant shares with other files (std::vector, c10) is
    compiled for the baseline there too, and the linker cannot keep a wider
    build of it for the whole library (capability_prelude.h). Compiling the
    variants with per-file -mavx512f flags would break this: every such
    function instantiated in the variant would be built for AVX-512."""
    import shutil

    from gnflex import _C

    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils)")
    wide = wide_vector_functions(_C.__file__)
    assert any("::AVX512::" in f for f in wide)  # the variants themselves are found
    outside = sorted(f for f in wide if "::AVX2::" not in f and "::AVX512::" not in f)
    assert not outside, f"{len(outside)} functions outside the SIMD variants use AVX: {outside[:5]}"
