"""The C++/CUDA sources of the op library, shared by setup.py and gnflex.jit.

Plain module with no imports from gnflex, so setup.py can run it by path
before the package is built.
"""
import glob
import os

CPP_DIRS = ("", "cpu", "autograd", "autocast")
CUDA_DIRS = ("cuda",)


def sources(csrc_dir):
    """(cpp_sources, cuda_sources) under csrc_dir, sorted."""
    cpp = sorted(p for d in CPP_DIRS for p in glob.glob(os.path.join(csrc_dir, d, "*.cpp")))
    cuda = sorted(p for d in CUDA_DIRS for p in glob.glob(os.path.join(csrc_dir, d, "*.cu")))
    return cpp, cuda
