"""The activations gnflex fuses: the one Python table of their names.

Canonical names and the aliases the op also accepts. The C++ side has one
enum (csrc/group_norm_types.h) and one name table (csrc/group_norm_utils.cpp);
tests/test_activations.py checks that both sides accept exactly these names.
"""
import torch.nn.functional as F

# name -> torch's function computing it (GELU: the exact, erf form).
TORCH_FUNCTIONS = {
    "none": lambda t: t,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
}
ACTIVATIONS = tuple(TORCH_FUNCTIONS)
ALIASES = {"identity": "none", "swish": "silu"}
ALL_NAMES = ACTIVATIONS + tuple(ALIASES)


def canonical(name: str) -> str:
    """The canonical name of an activation name or alias; ValueError for
    anything else."""
    if name in TORCH_FUNCTIONS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS} "
                     f"(aliases: {', '.join(f'{a}={c}' for a, c in ALIASES.items())})")


def torch_function(name: str):
    """torch's function for the activation ``name`` (or alias)."""
    return TORCH_FUNCTIONS[canonical(name)]
