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


def sources(csrc_dir):
    """(cpp_sources, cuda_sources) under csrc_dir, sorted."""
    cpp = sorted(p for d in CPP_DIRS for p in glob.glob(os.path.join(csrc_dir, d, "*.cpp")))
    cuda = sorted(p for d in CUDA_DIRS for p in glob.glob(os.path.join(csrc_dir, d, "*.cu")))
    return cpp, cuda
