"""Build the op library from a source checkout at run time, for kernel experiments.

    import gnflex, gnflex.jit
    jit_ops = gnflex.jit.load()          # compiles csrc/ once into a cache dir
    y, mean, rstd = jit_ops.group_norm(x, w, b, 32, 1e-5, "silu")
    y_installed = gnflex.ops.group_norm(x, w, b, 32, 1e-5, "silu")[0]

Edit a kernel under csrc/, call load() again in a new process: only changed
files are recompiled (ninja), nothing is reinstalled. The JIT build registers
its ops under another dispatcher namespace (``torch.ops.gnflex_jit`` by
default), so the installed and the edited build run side by side, which is
what ``gnflex bench cpu --jit`` compares. Autograd and torch.compile work on
the JIT ops as on the installed ones.

Environment: ``GNFLEX_SOURCE_DIR`` (the checkout; default: the one this package
lives in), ``GNFLEX_JIT_CACHE`` (build directory; default
``~/.cache/gnflex/jit``). The CUDA kernels are built when ``with_cuda=True``,
or by default when a GPU is visible (``GNFLEX_CUDA=0/1`` overrides), for
``TORCH_CUDA_ARCH_LIST`` (default: cuda_archs in csrc/build_flags.txt).
"""
import os
import runpy

import torch

from . import _meta

NAMESPACE = "gnflex_jit"
_loaded = {}


def source_dir():
    """The checkout whose csrc/ is compiled."""
    root = os.environ.get("GNFLEX_SOURCE_DIR") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    if not os.path.isdir(csrc):
        raise RuntimeError(
            f"gnflex.jit needs the C++ sources: no csrc/ under {root}. Set GNFLEX_SOURCE_DIR to a "
            "gnflex checkout (the installed package does not ship csrc/)."
        )
    return root


def load(*, namespace=NAMESPACE, build_directory=None, with_cuda=None, verbose=False, extra_cflags=()):
    """Compile csrc/ (if needed) and load it; returns ``torch.ops.<namespace>``."""
    if namespace in _loaded:
        return getattr(torch.ops, namespace)
    if namespace == "gnflex":
        raise ValueError("the JIT build needs a namespace other than the installed 'gnflex'")
    from torch.utils import cpp_extension

    root = source_dir()
    csrc = os.path.join(root, "csrc")
    source_info = runpy.run_path(os.path.join(root, "gnflex", "_sources.py"))
    cpp, cuda = source_info["sources"](csrc)
    if with_cuda is None:
        flag = os.environ.get("GNFLEX_CUDA")
        with_cuda = flag == "1" if flag in ("0", "1") else torch.cuda.is_available()
    if with_cuda:
        # Without it torch derives the archs from the visible GPUs (and fails without one).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", source_info["default_cuda_archs"](csrc))
    build_directory = build_directory or os.environ.get("GNFLEX_JIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gnflex", "jit", namespace)
    os.makedirs(build_directory, exist_ok=True)
    table = source_info["build_table"](csrc)
    # A checkout from before build_flags.txt had compiler-specific lines has no host_flags.
    host_flags = source_info.get("host_flags", lambda table, compiler: table["cxx"])
    host = host_flags(table, cpp_extension.get_cxx_compiler())
    flags = ["-O3", *host, f"-DGNFLEX_OP_NAMESPACE={namespace}", *extra_cflags]
    cpp_extension.load(
        name=f"{namespace}_ops",
        sources=cpp + (cuda if with_cuda else []),
        extra_cflags=flags,
        extra_cuda_cflags=["-O3", *table["nvcc"], f"-DGNFLEX_OP_NAMESPACE={namespace}"],
        extra_ldflags=["-fopenmp"],
        build_directory=build_directory,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    _meta.register_fakes(namespace)
    _loaded[namespace] = build_directory
    return getattr(torch.ops, namespace)
