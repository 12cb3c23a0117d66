"""gnflex: GroupNorm for PyTorch on its own CPU/CUDA kernels.

Importing gnflex loads the op library (``torch.ops.gnflex.group_norm`` and
``torch.ops.gnflex.group_norm_backward``) and registers their fake kernels.
"""
from ._ops import autocast_half_output, built_with_cuda, library_path, ops, set_autocast_half_output
from . import _meta  # noqa: F401  (fake kernels for torch.compile / export)
from . import activations, functional
from . import onnx  # noqa: F401  (gnflex.onnx.export; imports onnxscript lazily)
from .activations import ACTIVATIONS
from .config import GN_GROUP_PRIORITY, MODES, GNConfig, choose_gn_groups
from .functional import group_norm, modulated_group_norm
from .convert import ConversionReport, convert
from .modules import GNCNN, AdaGroupNorm, ConvGNAct, GroupNorm, GroupNormFlex

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "AdaGroupNorm",
    "GN_GROUP_PRIORITY",
    "MODES",
    "ConversionReport",
    "ConvGNAct",
    "GNCNN",
    "GNConfig",
    "GroupNorm",
    "GroupNormFlex",
    "activations",
    "autocast_half_output",
    "built_with_cuda",
    "choose_gn_groups",
    "convert",
    "functional",
    "group_norm",
    "library_path",
    "modulated_group_norm",
    "ops",
    "set_autocast_half_output",
]
