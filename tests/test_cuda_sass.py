"""bash .ci/cuda-sass reads the kernels' cost from their compiled code
(bench/cuda_sass.py). Its parsing, checked here on a small kernel whose loop
is known: needs nvcc and the cuobjdump / nvdisasm wheels (the test extra),
not a GPU."""
import importlib.util
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cuda_sass", ROOT / "bench" / "cuda_sass.py")
cuda_sass = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_sass)

NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
pytestmark = pytest.mark.skipif(
    not os.path.exists(NVCC) or cuda_sass.tool("cuobjdump") is None or cuda_sass.tool("nvdisasm") is None,
    reason="needs nvcc and cuobjdump / nvdisasm (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")

KERNEL = r"""
struct alignas(16) F4 { float v[4]; };
__global__ void scale_loop(const F4* __restrict__ x, F4* __restrict__ y, long n) {
  for (long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    F4 a = x[i];
    for (int k = 0; k < 4; ++k) a.v[k] = a.v[k] * 2.0f + 1.0f;
    y[i] = a;
  }
}
"""


def test_loop_resources_and_loads_of_a_known_kernel(tmp_path, monkeypatch):
    source, cubin = tmp_path / "k.cu", tmp_path / "k.cubin"
    source.write_text(KERNEL)
    done = subprocess.run([NVCC, "-cubin", "-arch=sm_90", "-O3", "-lineinfo", "-Xptxas", "-v", "-o", str(cubin),
                           str(source)], capture_output=True, text=True, check=True)
    spills = cuda_sass.ptxas_spills(done.stdout + done.stderr)
    (name,) = spills
    assert name.startswith("_Z10scale_loop") and spills[name] == 0
    res = subprocess.run([cuda_sass.tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    usage = cuda_sass.resource_usage(res)[name]
    assert 8 <= usage["REG"] <= 64 and usage["LOCAL"] == 0
    sass = subprocess.run([cuda_sass.tool("nvdisasm"), "-g", "-gi", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    # A file of its own has no phases; call the whole kernel one.
    monkeypatch.setattr(cuda_sass, "phase_of", lambda chain: "loop")
    functions, labels = cuda_sass.parse_sass(sass)
    loops = cuda_sass.main_loops(functions[name], labels[name])
    count, load_bytes, widest = loops["loop"]
    assert widest == 16  # the 16-byte load of x, not a scalar one
    values = load_bytes / 4
    assert values >= 4 and 1.0 <= count / values <= 12, (count, load_bytes)


def test_load_widths_and_budgets():
    assert cuda_sass.load_bytes("LDG.E.128.CONSTANT R4, desc[UR4][R8.64]") == 16
    assert cuda_sass.load_bytes("LDG.E.U16 R3, desc[UR4][R2.64]") == 2
    assert cuda_sass.load_bytes("LDG.E R3, desc[UR4][R2.64]") == 4
    assert cuda_sass.load_bytes("LDG.E.STRONG.GPU R3, desc[UR4][R2.64]") == 0  # sequencing, not data
    assert cuda_sass.load_bytes("STG.E.128 desc[UR4][R2.64], R4") == 0
    row = {"kernel": "k<none,8,half,fp32>/chunk_stats_cl", "regs": 70, "spills": 4, "value_bytes": 2,
           "loop_instr_per_value": 9.0, "load_bytes": 8}
    misses = cuda_sass.over_budget(row)
    assert len(misses) == 4, misses
    assert cuda_sass.over_budget(dict(row, regs=64, spills=0, loop_instr_per_value=8.0, load_bytes=16)) == []
    assert cuda_sass.short_name("void gnflex::cuda::forward_cl_kernel<(gnflex::Activation)2, 8, c10::Half, float>"
                                "(c10::Half const*)") == "forward_cl_kernel<silu,8,half,fp32>"

