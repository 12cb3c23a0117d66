"""The C++/CUDA sources of the op library, shared by setup.py and gnflex.jit.

Plain module with no imports from gnflex, so setup.py can run it by path
before the package is built.
"""
import glob
import os

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


def sources(csrc_dir):
    """(cpp_sources, cuda_sources) under csrc_dir, sorted."""
    cpp = sorted(p for d in CPP_DIRS for p in glob.glob(os.path.join(csrc_dir, d, "*.cpp")))
    cuda = sorted(p for d in CUDA_DIRS for p in glob.glob(os.path.join(csrc_dir, d, "*.cu")))
    return cpp, cuda
