"""The activations gnflex fuses: the one Python table of their names.

Canonical names and the aliases the op also accepts. The C++ side has one
enum (csrc/group_norm_types.h) and one name table (csrc/group_norm_utils.cpp);
tests/test_activations.py checks that both sides accept exactly these names.
"""
import torch
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


# What forward code calls to apply each activation (functions, and methods by
# name), for the passes that move it into the norm before it.
CALLED_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", F.gelu: "gelu"}
CALLED_METHODS = {"relu": "relu", "relu_": "relu"}


def called_activation(node) -> "str | None":
    """The activation a torch.fx ``call_function`` / ``call_method`` node
    applies to its first argument, or None (also for the tanh GELU: ours is
    the exact one)."""
    if node.op == "call_function" and node.target in CALLED_FUNCTIONS:
        if node.target is F.gelu and node.kwargs.get("approximate", "none") != "none":
            return None
        if node.target is F.gelu and len(node.args) > 1 and node.args[1] != "none":
            return None
        return CALLED_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in CALLED_METHODS:
        return CALLED_METHODS[node.target]
    return None
