"""Every CPU kernel variant (portable, AVX2, AVX-512, AVX-512 with AVX512-BF16
conversions) gives the reference results.

ATen's CPU capability picks the variant; ATEN_CPU_CAPABILITY (default, avx2,
avx512) forces one and GNFLEX_CPU_VARIANT caps gnflex's alone, which needs a
fresh process. A variant wider than this
process's capability cannot run on this CPU and is skipped: ATen takes a forced
avx512 on trust, and its own kernels (the float64 reference) would fault.
"""
import os
import re
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


# The variant an AVX512 process runs unless capped: with AVX512-BF16's
# conversions where the CPU has them.
WIDEST = "AVX512_BF16" if "avx512_bf16" in cpu_flags() else "AVX512"
# (ATEN_CPU_CAPABILITY, GNFLEX_CPU_VARIANT, the variant that must run): every variant
# gnflex has, chosen by ATen's capability and by gnflex's own cap.
VARIANTS = [("default", None, "DEFAULT"), ("avx2", None, "AVX2"), ("avx512", "avx512", "AVX512"),
            ("avx512", None, WIDEST), ("avx512", "avx2", "AVX2")]


def skip_unless_runs(capability):
    host_rank = CAPABILITIES.index(HOST) if HOST in CAPABILITIES else 0
    if CAPABILITIES.index(capability.upper()) > host_rank:
        pytest.skip(f"ATen runs this CPU as {HOST}: the {capability} kernels cannot run here")


@pytest.mark.parametrize("capability,variant_limit,want", VARIANTS,
                         ids=["DEFAULT", "AVX2", "AVX512", "uncapped-AVX512", "AVX2-under-AVX512"])
def test_kernel_variant_matches_reference(capability, variant_limit, want, tmp_path):
    skip_unless_runs(capability)
    cap, variant, worst = run_with_capability(capability, tmp_path, variant_limit)
    if cap != capability.upper():
        pytest.skip(f"ATEN_CPU_CAPABILITY={capability}: ATen runs {cap}")
    assert variant == want
    assert worst <= 1.0


def test_variant_limit_is_checked(tmp_path):
    code = "from gnflex import _C; _C.cpu_tuning()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(os.environ, GNFLEX_CPU_VARIANT="avx1024"))
    assert proc.returncode != 0 and "GNFLEX_CPU_VARIANT must be default, avx2, avx512 or avx512_bf16" in proc.stderr


# bfloat16 outputs of every kind of store (whole vectors, tails of short planes
# and rows, streamed), with outputs that are denormal floats (a tiny weight),
# NaN and inf, forward and backward: printed as bits, one line per tensor.
BF16_BITS = textwrap.dedent(
    """
    import hashlib, torch, gnflex
    from gnflex import _C
    torch.manual_seed(0)
    torch.set_num_threads(2)
    lines, denormals = [], 0
    cases = [((2, 64, 9, 7), 8), ((2, 72, 5, 6), 6), ((3, 40, 3, 3), 10), ((2, 64, 16, 16), 8)]
    for (shape, groups), fmt, special in [(c, f, s) for c in cases
                                          for f in (torch.contiguous_format, torch.channels_last)
                                          for s in ("tiny", "nan", "inf")]:
        x = (torch.randn(shape) * 3 + 1).to(torch.bfloat16, memory_format=fmt)
        w, b = torch.randn(shape[1]).bfloat16(), torch.randn(shape[1]).bfloat16()
        w[::2], b[::2] = 1e-38, 0
        flat = x.as_strided((x.numel(),), (1,))
        if special != "tiny":
            flat[len(flat) // 3] = float(special)
        for act in ("none", "silu"):
            xg = x.clone().requires_grad_()
            y = gnflex.group_norm(xg, groups, w, b, activation=act)
            dy = torch.randn_like(y) * 1e-37
            dx, = torch.autograd.grad(y, xg, dy)
            denormals += int(((y.float().abs() < 1.17e-38) & (y != 0)).sum())
            for t in (y, dx):
                lines.append(t.detach().contiguous().view(torch.int16).flatten().tolist())
    print(_C.cpu_tuning()["kernel_variant"], denormals, hashlib.sha256(str(lines).encode()).hexdigest())
    """
)


@pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("stream", ["1G", "1"], ids=["cached", "streamed"])
def test_bf16_conversions_match_the_avx512_variant(stream, tmp_path):
    """The hardware conversion reads float denormals as 0 and writes its own
    NaN: those vectors must still round as ATen's (and AVX512's) do."""
    skip_unless_runs("avx512")
    results = {}
    for variant in ("avx512", "avx512_bf16"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY="avx512", GNFLEX_CPU_VARIANT=variant, GNFLEX_CPU_STREAM_BYTES=stream)
        proc = subprocess.run([sys.executable, "-c", BF16_BITS], capture_output=True, text=True, env=env,
                              timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        name, denormals, digest = proc.stdout.split()
        results[name] = (int(denormals), digest)
    assert set(results) == {"AVX512", "AVX512_BF16"}
    assert results["AVX512"][0] > 1000  # the case reaches denormal outputs
    assert results["AVX512"] == results["AVX512_BF16"]


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
    variants = ("::AVX2::", "::AVX512::", "::AVX512BF16::")
    outside = sorted(f for f in wide if not any(v in f for v in variants))
    assert not outside, f"{len(outside)} functions outside the SIMD variants use AVX: {outside[:5]}"


@pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="needs a CPU with AVX512-BF16")
def test_bf16_conversion_rounds_every_float_as_aten(tmp_path):
    """tests/cpu/bf16_narrow_check.cpp: the AVX512-BF16 kernels' conversion
    against ATen's over all 2^32 floats, compiled as that variant is."""
    import shutil

    from torch.utils import cpp_extension

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++")
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "..", "csrc")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    binary = tmp_path / "bf16_narrow_check"
    # The variant's own target and defines, read from its source: -m flags
    # for the target pragma, -D for each #define.
    with open(os.path.join(csrc, "cpu", "group_norm_kernels_avx512bf16.cpp")) as f:
        variant = f.read()
    target = re.search(r'#pragma GCC target\("([^"]+)"\)', variant).group(1).split(",")
    defines = re.findall(r"^#define (\w+)(?: (\w+))?$", variant, re.MULTILINE)
    assert target and defines
    flags = ["-O2", "-std=c++17"] + [f"-m{t}" for t in target] + [f"-D{n}={v}" if v else f"-D{n}" for n, v in defines]
    includes = [f"-I{csrc}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    subprocess.run([compiler, *flags, *includes, os.path.join(here, "cpu", "bf16_narrow_check.cpp"), "-o",
                    str(binary), f"-L{torch_lib}", "-lc10", f"-Wl,-rpath,{torch_lib}"], check=True)
    proc = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout
    assert "blocks differing from ATen: 0;" in proc.stdout
    assert int(proc.stdout.rsplit(":", 1)[1]) > 0  # the check sees what the instruction alone does
