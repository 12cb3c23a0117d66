"""The C++ path: CMake builds the op library against libtorch and
examples/cpp/gncnn_infer, which runs a scripted GNCNN saved from Python."""
import os
import shutil
import subprocess

import pytest
import torch

import gnflex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(REPO, "build-cpp")  # kept between runs: rebuilding takes minutes on 2 cores

pytestmark = pytest.mark.slow


def _skip_without_cuda_toolkit():
    """libtorch's CMake config needs the CUDA toolkit when torch is a CUDA build;
    CMakeLists.txt finds it (and nvrtc) by itself where there is one."""
    if torch.version.cuda is None:
        return
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if not any(r and os.path.exists(os.path.join(r, "include", "cuda_runtime.h")) for r in roots):
        pytest.skip("torch is a CUDA build and libtorch's CMake needs the CUDA toolkit; none found")


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_cmake_build_and_cpp_inference(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler found")
    torch.manual_seed(1)
    model = gnflex.GNCNN(widths=(8, 16, 32, 32), activation="silu",
                         config=gnflex.GNConfig(min_channels_per_group=2)).eval()
    model_path = tmp_path / "gncnn.pt"
    torch.jit.script(model).save(str(model_path))

    env = dict(os.environ, GNFLEX_TEST_MODEL=str(model_path))
    _skip_without_cuda_toolkit()
    # The README's command as written (no CUDA or nvrtc arguments).
    _run(["cmake", "-S", REPO, "-B", BUILD_DIR, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
         env=env, timeout=600)
    _run(["cmake", "--build", BUILD_DIR, "-j", str(os.cpu_count() or 2)], env=env, timeout=1800)
    ctest = _run(["ctest", "--test-dir", BUILD_DIR, "--output-on-failure"], env=env, timeout=600)
    assert "100% tests passed" in ctest

    out = _run([os.path.join(BUILD_DIR, "gncnn_infer"), str(model_path), "3"], timeout=300)
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    logits = torch.tensor([float(v) for v in lines["logits"].split()], dtype=torch.float64)
    grad_norm = float(lines["grad_norm"])
    assert lines["op"] == "gnflex::group_norm registered"

    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    torch.testing.assert_close(logits, expected.detach().flatten().double(), rtol=1e-5, atol=1e-6)
    assert grad_norm > 0
    assert abs(grad_norm - x.grad.norm().item()) <= 1e-5 * max(1.0, grad_norm)
