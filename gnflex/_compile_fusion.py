"""torch.compile: norm -> activation and norm -> scale-shift -> activation
fused in the graph Inductor compiles.

A pre-grad pass of the default Inductor backend:
- where ``torch.ops.gnflex.group_norm`` without activation feeds only an
  activation (ReLU / SiLU / exact GELU, as Dynamo records the call), the op
  computes it and the call goes;
- where its output is only multiplied by a per-sample (N, C, 1, ...) factor,
  then maybe shifted by a per-sample shift and activated (AdaGN, FiLM:
  diffusers' ``norm(h) * (1 + scale) + shift``), the factor and shift fold into
  per-sample weight and bias (:func:`gnflex._modulation.modulation_params`) and
  one op call computes it all.
Autograd then differentiates the fused op, so the backward is fused too.
Eager models get the activation fusion from :func:`gnflex.convert`.

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

from ._fx_fusion import modulation_chain, per_sample_like
from .activations import called_activation
from ._modulation import modulation_params

_OP = torch.ops.gnflex.group_norm
_ARGUMENTS = [a.name for a in _OP.default._schema.arguments]
_ACTIVATION_INDEX = _ARGUMENTS.index("activation")


def _is_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (_OP, _OP.default)


def _argument(node: torch.fx.Node, name: str):
    """The op call's argument ``name``: positional, keyword or the schema's default."""
    index = _ARGUMENTS.index(name)
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, _OP.default._schema.arguments[index].default_value)


def _value(node):
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _fuse_modulation(graph: torch.fx.Graph, node: torch.fx.Node, y: torch.fx.Node) -> bool:
    """op -> y -> mul(y, factor) [-> add(shift)] [-> activation], each value
    used only by the next: one op call with per-sample weight and bias."""
    y_value = _value(y)
    if y_value is None:
        return False
    m = modulation_chain(y, called_activation, lambda operand: per_sample_like(_value(operand), y_value))
    if m is None:
        return False
    weight, bias = _argument(node, "weight"), _argument(node, "bias")
    if any(p is not None and (_value(p) is None or _value(p).dim() != 1) for p in (weight, bias)):
        return False
    factor, shift, last, activation = m.factor, m.shift, m.last, m.activation or "none"
    with graph.inserting_before(last):
        params = graph.call_function(modulation_params, (_argument(node, "input"), factor, shift, weight, bias, 0.0))
        fused_weight = graph.call_function(operator.getitem, (params, 0))
        fused_bias = graph.call_function(operator.getitem, (params, 1))
        fused = graph.call_function(_OP.default, (_argument(node, "input"), fused_weight, fused_bias,
                                                  _argument(node, "num_groups"), _argument(node, "eps"), activation))
        output = graph.call_function(operator.getitem, (fused, 0))
    output.meta.update(last.meta)
    last.replace_all_uses_with(output)
    for dead in (m.act, m.add, m.mul, y, node):
        if dead is not None:
            graph.erase_node(dead)
    return True


def fuse_norm_activations(graph: torch.fx.Graph) -> int:
    """Fuses in place; returns how many activations and modulations moved
    into a norm."""
    fused = 0
    for node in list(graph.nodes):
        if not _is_op(node) or _argument(node, "activation") != "none":
            continue
        outputs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(outputs) != 1 or len(outputs[0].users) != 1:
            continue
        y = outputs[0]
        if len(node.users) == 1 and _fuse_modulation(graph, node, y):
            fused += 1
            continue
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
