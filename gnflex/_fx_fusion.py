"""Fusion of norm -> activation where forward code calls them in sequence.

``convert`` first replaces norm layers, then calls :func:`fuse_in_forward_code`.
The forward of every module that holds a GroupNormFlex without activation
(or calls ``F.group_norm``) is traced by torch.fx one level deep: its
submodules stay single calls, ``*args`` / ``**kwargs`` are empty, and
arguments without a default or with a None default are traced as tensors
(then, if that fails, those with a default keep it). Where a norm's output
feeds only an activation (ReLU / SiLU / exact GELU):

- both are modules (``h = self.norm(x); h = self.act(h)``): the norm computes
  the activation in its kernel and the activation module becomes an
  :class:`ActivationAfterNorm`, which returns that norm's latest output
  unchanged and applies itself to anything else (a shared ``nonlinearity``
  also runs on other tensors). Classes, code and state_dict keys stay;
- the activation is a function, or the norm is ``F.group_norm``: the code
  must change, so that module becomes its traced GraphModule (its submodules
  stay as they are).

Under torch.compile / torch.export and TorchScript the norm computes no taken
activation and the activation module runs: the compiled graph is fused by
:mod:`gnflex._compile_fusion` instead.
"""
import inspect
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .activations import called_activation
from .functional import group_norm as gnflex_group_norm
from .modules import GroupNormFlex

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


class ActivationAfterNorm:
    """An activation module whose call after a norm moved into that norm's
    kernel: it returns the output of those norms' latest call unchanged (the
    activation is in it) and applies the activation to any other input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            for norm in self.after_norms:
                output = norm._taken_output
                if output is not None and output() is input:
                    return input
        return self.activate(input)


class ReLUAfterNorm(ActivationAfterNorm, nn.ReLU):
    kind = "relu"

    def activate(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu(input, inplace=self.inplace)


class SiLUAfterNorm(ActivationAfterNorm, nn.SiLU):
    kind = "silu"

    def activate(self, input: torch.Tensor) -> torch.Tensor:
        return F.silu(input, inplace=self.inplace)


class GELUAfterNorm(ActivationAfterNorm, nn.GELU):
    kind = "gelu"

    def activate(self, input: torch.Tensor) -> torch.Tensor:
        return F.gelu(input)  # the exact form (only that one is fused)


_AFTER_NORM = {cls.kind: cls for cls in (ReLUAfterNorm, SiLUAfterNorm, GELUAfterNorm)}


class _OneLevelTracer(torch.fx.Tracer):
    """Traces a module's own forward: every submodule call is one node, and
    the root's parameters are those of its signature (see the module doc)."""

    def __init__(self, keep_defaults: bool):
        super().__init__()
        self.keep_defaults = keep_defaults
        self.same_signature = True  # the graph takes the arguments forward takes

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        params = list(inspect.signature(inspect.unwrap(root_fn)).parameters.values())[1:]
        positional, keyword = [], {}
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                self.same_signature = False
                continue
            has_default = p.default is not p.empty
            if has_default and (self.keep_defaults or p.default is not None):
                value = p.default
                self.same_signature = False
            else:
                value = self.create_proxy("placeholder", p.name, (p.default,) if has_default else (), {})
            if p.kind is p.KEYWORD_ONLY:
                keyword[p.name] = value
            else:
                positional.append(value)

        def root(self_module):
            return root_fn(self_module, *positional, **keyword)

        return root, [self.root]


def _trace_one_level(module: nn.Module) -> Tuple[Optional[torch.fx.Graph], bool, str]:
    """(graph, whether it takes forward's arguments, why not traced)."""
    why = ""
    for keep_defaults in (False, True):
        tracer = _OneLevelTracer(keep_defaults)
        try:
            return tracer.trace(module), tracer.same_signature, ""
        except Exception as e:  # noqa: BLE001 - fx raises many kinds of errors
            why = f"does not trace ({type(e).__name__})"
    return None, False, why


def _activation_of(node: torch.fx.Node, modules, activation_name) -> Optional[str]:
    """gnflex's name for the activation ``node`` computes from its first
    argument, or None."""
    if node.op == "call_module":
        name = activation_name(modules[node.target])
        return name if name not in (None, "none") else None
    return called_activation(node)


def _skip_identities(graph: torch.fx.Graph, modules) -> None:
    """nn.Identity placeholders (timm's drop_block when off) between a norm
    and its activation: their output is their input."""
    for node in list(graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if type(module) is nn.Identity and not has_hooks(module):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


class _Fusion:
    """State of one convert call: which module holds each module, and the
    activation modules already made ActivationAfterNorm."""

    def __init__(self, model: nn.Module, activation_name, report):
        self.activation_name, self.report = activation_name, report
        # id of a replaced activation module -> (it, its ActivationAfterNorm)
        self.replacements: Dict[int, Tuple[nn.Module, ActivationAfterNorm]] = {}
        self.find_parents(model)

    def find_parents(self, model: nn.Module) -> None:
        self.parents: Dict[int, List[Tuple[nn.Module, str]]] = {}
        for parent in model.modules():
            for name, child in parent._modules.items():
                if child is not None:
                    self.parents.setdefault(id(child), []).append((parent, name))

    def after_norm(self, act: nn.Module, activation: str) -> ActivationAfterNorm:
        """``act`` as an ActivationAfterNorm, in every module that holds it."""
        if isinstance(act, ActivationAfterNorm):
            return act
        if id(act) in self.replacements:
            return self.replacements[id(act)][1]
        new = _AFTER_NORM[activation]()
        if hasattr(act, "inplace"):
            new.inplace = act.inplace
        new.after_norms = []
        new.train(act.training)
        for parent, name in self.parents.pop(id(act), []):
            parent._modules[name] = new
        self.replacements[id(act)] = (act, new)
        return new

    def fuse_module(self, module: nn.Module, name: str) -> Optional[nn.Module]:
        """Fuses in ``module``'s forward code; returns its GraphModule where
        that code had to change, else None."""
        graph, same_signature, why = _trace_one_level(module)
        label = name or "<model>"
        if graph is None:
            self.report.traced.append((label, why))
            return None
        modules = dict(module.named_modules())
        _skip_identities(graph, modules)
        calls: Dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        prefix = f"{name}." if name else ""
        in_place, in_code = [], []
        for node in list(graph.nodes):
            is_flex = node.op == "call_module" and isinstance(modules.get(node.target), GroupNormFlex)
            is_functional = node.op == "call_function" and node.target is F.group_norm
            if not (is_flex or is_functional):
                continue
            norm = modules[node.target] if is_flex else None
            if is_flex and (norm.activation != "none" or norm._takes_activation is not None
                            or has_hooks(norm) or replaced_forward(norm)):
                continue  # has one, or what its hooks see would change
            where = f"{prefix}{node.target}" if is_flex else f"{prefix}F.group_norm ({node.name})"
            users = list(node.users)
            activations = [_activation_of(u, modules, self.activation_name) for u in users]
            if len(users) != 1:
                if any(activations):
                    self.report.skipped.append((where, f"activation not fused: its output has {len(users)} users"))
                continue
            act_node, activation = users[0], activations[0]
            if activation is None or act_node.args[:1] != (node,):
                continue  # not followed by an activation: nothing to fuse
            if is_flex and (calls[node.target] != 1 or len(self.parents.get(id(norm), ())) != 1):
                self.report.skipped.append((where, "activation not fused: the norm is called or held elsewhere too"))
                continue
            if is_flex and act_node.op == "call_module":
                act = self.after_norm(modules[act_node.target], activation)
                act.after_norms.append(norm)
                norm._takes_activation = activation
                in_place.append(f"{where} + {activation}")
            elif same_signature and not has_hooks(module) and not replaced_forward(module):
                in_code.append((node, act_node, activation, where))
            else:
                self.report.skipped.append((where, "activation not fused: an activation function after it, "
                                                   "in code traced with other arguments or with hooks"))
        self.report.fused += in_place
        if not in_code:
            if in_place:
                self.report.traced.append((label, f"{len(in_place)} fused, module kept"))
            return None
        for node, act_node, activation, where in in_code:
            if node.op == "call_module":
                modules[node.target].activation = activation
                modules[node.target].config = modules[node.target].config.replace(activation=activation)
            else:
                # gnflex.group_norm takes F.group_norm's arguments (same names) + activation.
                bound = _GROUP_NORM_SIGNATURE.bind(*node.args, **node.kwargs)
                bound.apply_defaults()
                with graph.inserting_after(node):
                    new = graph.call_function(gnflex_group_norm, kwargs={**bound.arguments, "activation": activation})
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                node = new
            act_node.replace_all_uses_with(node)
            graph.erase_node(act_node)
            self.report.fused.append(where + f" + {activation}")
        graph.lint()
        gm = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
        self.report.traced.append((label, f"{len(in_place) + len(in_code)} fused, rewritten by torch.fx "
                                          f"({len(in_code)} in code)"))
        return gm


def fuse_in_forward_code(model: nn.Module, activation_name: Callable, report) -> nn.Module:
    """Fuse where forward code calls a norm then an activation; returns the
    model (its GraphModule where its own code had to change). Adds to
    ``report.fused``, ``report.skipped`` and ``report.traced``."""
    fusion = _Fusion(model, activation_name, report)

    def wants_tracing(module: nn.Module) -> bool:
        if isinstance(module, GroupNormFlex) or replaced_forward(module):
            return False
        has_candidate = any(isinstance(m, GroupNormFlex) and m.activation == "none" and m._takes_activation is None
                            for m in module.children())
        code = getattr(type(module).forward, "__code__", None)
        return has_candidate or (code is not None and "group_norm" in code.co_names)

    # Inner modules first: a GraphModule holds the submodules it was built with.
    for name, module in reversed(list(model.named_modules())):
        new = fusion.fuse_module(module, name) if wants_tracing(module) else None
        if new is None:
            continue
        if not name:
            return new
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name)._modules[child] = new
        fusion.find_parents(model)
    return model
