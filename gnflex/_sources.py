"""The C++/CUDA sources of the op library, shared by setup.py and gnflex.jit.

Plain module with no imports from gnflex, so setup.py can run it by path
before the package is built.
"""
import glob
import hashlib
import os
import sys

CPP_DIRS = ("", "cpu", "autograd", "autocast")
# CUDA archs built when TORCH_CUDA_ARCH_LIST is unset: A100, H100/H200, PTX for newer GPUs.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
CUDA_DIRS = ("cuda",)
# Host compiler flags besides optimization. OpenMP: at::parallel_for expands to
# `#pragma omp parallel` in our code. No FMA contraction: the kernels inline the
# same math into differently shaped loops (fused and two-pass schedules, SIMD
# bodies and tails), and contraction chosen per context would make results
# depend on the schedule, i.e. on the thread count. Explicit fused
# multiply-adds in the code are unaffected.
CXX_FLAGS = ("-fopenmp", "-ffp-contract=off")
# nvcc flags besides optimization and archs (setup.py, gnflex.jit, bench/cuda_sass.py).
NVCC_FLAGS = ("-lineinfo", "--expt-relaxed-constexpr")


def sources(csrc_dir):
    """(cpp_sources, cuda_sources) under csrc_dir, sorted."""
    cpp = sorted(p for d in CPP_DIRS for p in glob.glob(os.path.join(csrc_dir, d, "*.cpp")))
    cuda = sorted(p for d in CUDA_DIRS for p in glob.glob(os.path.join(csrc_dir, d, "*.cu")))
    return cpp, cuda


# Build settings read from the environment; part of the fingerprint.
BUILD_ENV = ("GNFLEX_CUDA", "GNFLEX_DEBUG", "GNFLEX_SANITIZE", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CC", "CXX")


def fingerprint(root):
    """Hash of everything a build of the checkout at `root` depends on: the
    package's files (sources, Python, build scripts) and BUILD_ENV. setup.py
    records it in gnflex/_build_info.py; .ci/setup.sh skips the rebuild when
    the installed package has the checkout's fingerprint."""
    files = [os.path.join(root, name) for name in ("setup.py", "pyproject.toml")]
    for top in ("csrc", "gnflex"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            files += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f != "_build_info.py" and not f.endswith(".pyc")]
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    for name in BUILD_ENV:
        digest.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return digest.hexdigest()[:20]


if __name__ == "__main__":  # python gnflex/_sources.py ROOT: print the fingerprint
    print(fingerprint(sys.argv[1]))
