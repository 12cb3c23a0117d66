"""Loads the native op library and checks it matches the running torch."""
import os

import torch

try:
    from . import _build_info
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "gnflex's native library is not built. Install gnflex with "
        "`pip install --no-build-isolation .` (after installing torch)."
    ) from exc


def _release(version):
    return str(version).split("+")[0]


if _release(_build_info.torch_version) != _release(torch.__version__):
    raise ImportError(
        f"gnflex was built against torch {_build_info.torch_version} but torch {torch.__version__} "
        "is imported; the C++ ABI differs between releases. Rebuild gnflex against this torch: "
        "`pip install --no-build-isolation --no-deps --force-reinstall .`"
    )

try:
    from . import _C  # noqa: E402  (registers torch.ops.gnflex.*)
except ImportError as exc:
    raise ImportError(
        f"gnflex's op library did not load from {os.path.dirname(__file__)}: {exc}. If that is a "
        "source checkout, build it in place (`pip install --no-build-isolation -e .`) or import "
        "gnflex from outside the checkout so the installed package is used."
    ) from exc

ops = torch.ops.gnflex
# The op itself, for the Python layer's calls: a global (not three attribute
# lookups per call), and its one overload rather than the packet, which
# resolves the overload on every call.
group_norm_op = ops.group_norm.default


def library_path():
    """Path of the compiled op library, for ``torch.ops.load_library``."""
    return os.path.abspath(_C.__file__)


def built_with_cuda():
    """True when the library was compiled with CUDA kernels."""
    return bool(_build_info.with_cuda)


def set_autocast_half_output(enabled: bool) -> bool:
    """Opt-in CUDA autocast mode for gnflex's op (process-wide; returns the
    previous setting). Off (the default), the op follows torch's rule for
    group_norm under CUDA autocast: input cast to float32, float32 output.
    On, it takes the input in the autocast dtype (float16 / bfloat16) and
    returns that dtype, computing in float32 inside (as timm's fast_norm), so
    a half-precision network moves half the bytes through its norms. float32
    parameters are used as they are. Read when the op is called, or when
    torch.compile traces it. CPU autocast is unaffected (torch does not cast
    group_norm there)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_autocast_half_output: enabled must be a bool, got {type(enabled).__name__}")
    return _C.autocast_half_output(enabled)


def autocast_half_output() -> bool:
    """Whether :func:`set_autocast_half_output` is on."""
    return _C.autocast_half_output()
