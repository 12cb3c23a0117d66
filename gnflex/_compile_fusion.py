"""torch.compile: norm -> activation fused in the graph Inductor compiles.

A pre-grad pass of the default Inductor backend: where ``torch.ops.gnflex.group_norm``
without activation feeds only an activation (ReLU / SiLU / exact GELU, as
Dynamo records the call), the op computes it and the call goes. Autograd then
differentiates the fused op, so the backward is fused too. Eager models get
the same from :func:`gnflex.convert`.

Importing Inductor takes about a second, so gnflex does not: the op's fake
kernel, which runs while Dynamo traces a graph holding it (before the
backend compiles that graph), installs the pass, beside any pass already set,
once Inductor's config is loaded. A pass set later by the user replaces it.
"""
import inspect
import operator

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .activations import called_activation

_OP = torch.ops.gnflex.group_norm
_ACTIVATION_INDEX = [a.name for a in _OP.default._schema.arguments].index("activation")


def _is_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (_OP, _OP.default)


def _activation_arg(node: torch.fx.Node) -> str:
    if len(node.args) > _ACTIVATION_INDEX:
        return node.args[_ACTIVATION_INDEX]
    return node.kwargs.get("activation", "none")


def fuse_norm_activations(graph: torch.fx.Graph) -> int:
    """Fuses in place; returns how many activations moved into a norm."""
    fused = 0
    for node in list(graph.nodes):
        if not _is_op(node) or _activation_arg(node) != "none":
            continue
        outputs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(outputs) != 1 or len(outputs[0].users) != 1:
            continue
        y = outputs[0]
        act = next(iter(y.users))
        activation = called_activation(act)
        if activation is None or act.args[:1] != (y,) or y in act.args[1:] or y in act.kwargs.values():
            continue
        if len(node.args) > _ACTIVATION_INDEX:
            node.update_arg(_ACTIVATION_INDEX, activation)
        else:
            node.update_kwarg("activation", activation)
        act.replace_all_uses_with(y)
        graph.erase_node(act)
        fused += 1
    return fused


class FusionPass(CustomGraphPass):
    """:func:`fuse_norm_activations` as an Inductor custom pass (its uuid
    keys Inductor's cache on this file)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        fuse_norm_activations(graph)

    def uuid(self):
        return get_hash_for_files((inspect.getfile(fuse_norm_activations),))


FUSION_PASS = FusionPass()


class _AfterOthers(CustomGraphPass):
    """The pass(es) set before gnflex was imported, then FUSION_PASS."""

    def __init__(self, before):
        self.before = tuple(before) if isinstance(before, (list, tuple)) else (before,)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.before:
            p(graph)
        FUSION_PASS(graph)

    def uuid(self):
        ids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.before]
        return None if None in ids else (*ids, FUSION_PASS.uuid())  # None: not cacheable


def install() -> None:
    """Makes FUSION_PASS one of Inductor's pre-grad custom passes."""
    current = inductor_config.pre_grad_custom_pass
    if not isinstance(current, (FusionPass, _AfterOthers)):
        inductor_config.pre_grad_custom_pass = FUSION_PASS if current is None else _AfterOthers(current)
