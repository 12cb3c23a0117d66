"""Fusion of norm -> activation where forward code calls them in sequence.

``convert`` first replaces norm layers, then calls :func:`fuse_in_forward_code`:
each submodule, largest first, is traced with torch.fx; where a GroupNormFlex
(no activation yet) or an ``F.group_norm`` call feeds only an activation
(ReLU / SiLU / exact GELU, as a module or a function), the activation moves
into gnflex's kernel and the traced GraphModule replaces the submodule. A
module that does not trace (data-dependent control flow, ...) is tried again
block by block.
"""
import inspect
from typing import Callable, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .functional import group_norm as gnflex_group_norm
from .modules import GroupNormFlex

# Activation functions and methods gnflex fuses, by what forward code calls.
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", F.gelu: "gelu"}
_METHODS = {"relu": "relu", "relu_": "relu"}
_GROUP_NORM_SIGNATURE = inspect.signature(F.group_norm)


def has_hooks(module: nn.Module) -> bool:
    return any(
        getattr(module, hooks, None)
        for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    )


def replaced_forward(module: nn.Module) -> bool:
    """Whether ``forward`` is replaced on the instance (accelerate's
    add_hook_to_module, monkey-patching): the class does not say what runs."""
    return "forward" in vars(module)


class _Tracer(torch.fx.Tracer):
    """Keeps gnflex's norm layers and every nn.Module that is a known
    activation as single calls."""

    def __init__(self, activation_name: Callable[[nn.Module], Optional[str]]):
        super().__init__()
        self._activation_name = activation_name

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, GroupNormFlex) or self._activation_name(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)


def _activation_of(node: torch.fx.Node, gm_modules, activation_name) -> Optional[str]:
    """gnflex's name for the activation ``node`` computes from its first
    argument, or None."""
    if node.op == "call_module":
        name = activation_name(gm_modules[node.target])
        return name if name not in (None, "none") else None
    if node.op == "call_function" and node.target in _FUNCTIONS:
        if node.target is F.gelu and node.kwargs.get("approximate", "none") != "none":
            return None  # ours is the exact (erf) GELU
        return _FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _METHODS:
        return _METHODS[node.target]
    return None


def _fuse_graph(gm: torch.fx.GraphModule, activation_name) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Fuses in place; returns (what was fused, [(norm left unfused, why)])."""
    modules = dict(gm.named_modules())
    # nn.Identity placeholders (timm's drop_block when off) between a norm and
    # its activation: their output is their input.
    for node in list(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if type(module) is nn.Identity and not module._forward_hooks and not module._forward_pre_hooks:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused, left = [], []
    for node in list(gm.graph.nodes):
        is_flex = node.op == "call_module" and isinstance(modules.get(node.target), GroupNormFlex)
        if is_flex and (has_hooks(modules[node.target]) or replaced_forward(modules[node.target])):
            continue  # what its hooks see would change
        is_functional = node.op == "call_function" and node.target is F.group_norm
        if not (is_flex or is_functional):
            continue
        where = node.target if is_flex else f"F.group_norm ({node.name})"
        users = list(node.users)
        if len(users) != 1:
            if any(_activation_of(u, modules, activation_name) for u in users):
                left.append((where, f"its output has {len(users)} users"))
            continue
        act_node = users[0]
        activation = _activation_of(act_node, modules, activation_name)
        if activation is None or act_node.args[:1] != (node,):
            continue  # not followed by an activation: nothing to fuse
        if is_flex:
            norm = modules[node.target]
            if norm.activation != "none":
                continue
            if calls[node.target] != 1:
                left.append((where, f"called {calls[node.target]} times"))
                continue
            norm.activation = activation
            norm.config = norm.config.replace(activation=activation)
        else:
            # gnflex.group_norm takes F.group_norm's arguments (same names) + activation.
            bound = _GROUP_NORM_SIGNATURE.bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(gnflex_group_norm, kwargs={**bound.arguments, "activation": activation})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            node = new
        act_node.replace_all_uses_with(node)
        gm.graph.erase_node(act_node)
        fused.append(f"{where} + {activation}")
    gm.graph.lint()
    gm.recompile()
    return fused, left


def fuse_in_forward_code(model: nn.Module, activation_name, report) -> nn.Module:
    """Fuse where ``model``'s (or its blocks') forward code calls a norm then an
    activation; returns the model (a GraphModule if the root itself traced
    and had something to fuse). Adds to ``report.fused`` and ``report.skipped``."""

    def has_candidates(module: nn.Module) -> bool:
        return any(isinstance(m, GroupNormFlex) and m.activation == "none" for m in module.modules())

    tracer = _Tracer(activation_name)

    def blocks_tracing(root: nn.Module) -> bool:
        """A GraphModule of root runs the code traced from root and its non-leaf
        modules: their hooks would be baked in or lost, and root's class forward
        would run instead of one replaced on the instance. Such modules are not
        traced; their blocks are tried (leaves keep their hooks: they are called)."""
        return any((m is root or not tracer.is_leaf_module(m, "")) and (has_hooks(m) or replaced_forward(m))
                   for m in root.modules())

    def try_module(module: nn.Module, name: str) -> Optional[nn.Module]:
        if not has_candidates(module) and not _calls_functional_group_norm(module):
            return None
        graph, why = None, "has hooks or an instance-level forward inside"
        if not blocks_tracing(module):
            try:
                graph = tracer.trace(module)
            except Exception as e:  # noqa: BLE001 - fx raises many kinds of errors
                why = f"does not trace ({type(e).__name__})"
        if graph is None:
            report.traced.append((name or "<model>", f"{why}; tried its blocks"))
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                new = try_module(child, full)
                if new is not None:
                    setattr(module, child_name, new)
            return None
        gm = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
        fused, left = _fuse_graph(gm, activation_name)
        prefix = f"{name}." if name else ""
        report.fused += [f"{prefix}{item}" for item in fused]
        report.skipped += [(f"{prefix}{where}", f"activation not fused: {why}") for where, why in left]
        if fused:
            report.traced.append((name or "<model>", f"rewritten by torch.fx ({len(fused)} fused)"))
            return gm
        return None

    new_root = try_module(model, "")
    return model if new_root is None else new_root


def _calls_functional_group_norm(module: nn.Module) -> bool:
    """Whether ``module``'s forward code may call F.group_norm (a cheap check
    before tracing: the name appears in its code)."""
    for m in module.modules():
        code = getattr(type(m).forward, "__code__", None)
        if code is not None and "group_norm" in code.co_names:
            return True
    return False

