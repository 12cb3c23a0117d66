"""Fusion of norm -> activation where forward code calls them in sequence.

``convert`` first replaces norm layers, then calls :func:`fuse_in_forward_code`.
The forward of every module that holds a GroupNormFlex without activation
(or calls ``F.group_norm``) is traced by torch.fx one level deep: its
submodules stay single calls, ``*args`` / ``**kwargs`` are empty, and
arguments without a default or with a None default are traced as tensors
(then, if that fails, those with a default keep it). Where a norm's output
feeds only an activation (ReLU / SiLU / exact GELU) or a modulation:

- both are modules (``h = self.norm(x); h = self.act(h)``): the norm computes
  the activation in its kernel and the activation module becomes an
  :class:`ActivationAfterNorm`, which returns that norm's latest output
  unchanged and applies itself to anything else (a shared ``nonlinearity``
  also runs on other tensors). Classes, code and state_dict keys stay;
- the activation is a function, the norm is ``F.group_norm``, or the norm's
  output is only multiplied by a factor, maybe then shifted and activated
  (diffusers' ``norm2(h) * (1 + scale) + shift``): the code must change. The
  module keeps its class and state_dict keys and gets the rewritten code as
  an instance-level ``forward`` (:class:`FusedForward`); it calls
  :func:`fused_norm_call`, which folds a per-sample (N, C, 1, ...) factor
  and shift into the kernel and computes anything else as written.

Under torch.compile / torch.export and TorchScript the norm computes no taken
activation and the activation module runs: the compiled graph is fused by
:mod:`gnflex._compile_fusion` instead.
"""
import inspect
import operator
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .activations import called_activation, torch_function
from .functional import group_norm as gnflex_group_norm
from ._modulation import modulation_params
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


# ---- graph helpers, shared with the torch.compile pass ----------------------------
_BINARY = {"mul": (operator.mul, torch.mul), "add": (operator.add, torch.add)}


def only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def other_operand(node: Optional[torch.fx.Node], name: str, operand: torch.fx.Node):
    """The other operand of a ``mul`` / ``add`` call (function or method,
    no keywords) on ``operand``, else None."""
    if node is None or node.kwargs or len(node.args) != 2 or node.args.count(operand) != 1:
        return None
    if not ((node.op == "call_function" and node.target in _BINARY[name])
            or (node.op == "call_method" and node.target == name)):
        return None
    return node.args[1] if node.args[0] is operand else node.args[0]


class Modulation(NamedTuple):
    """A norm output's chain ``* factor [+ shift] [-> activation]``: its
    nodes (None where absent) and the last of them."""
    mul: torch.fx.Node
    factor: object
    add: Optional[torch.fx.Node]
    shift: object
    act: Optional[torch.fx.Node]
    activation: Optional[str]
    last: torch.fx.Node


def modulation_chain(y: torch.fx.Node, activation_of: Callable, folds: Callable = lambda operand: True):
    """The :class:`Modulation` where ``y`` feeds only ``* factor``, maybe then
    only ``+ shift``, maybe then only an activation (``activation_of(node)``:
    its name or None); None where it is not only multiplied. ``folds(operand)``
    says whether a factor or shift can go into the op."""
    mul = only_user(y)
    factor = other_operand(mul, "mul", y)
    if factor is None or not folds(factor):
        return None
    add = only_user(mul)
    shift = other_operand(add, "add", mul)
    if shift is None or not folds(shift):
        add, shift = None, None
    last = add or mul
    act = only_user(last)
    activation = activation_of(act) if act is not None else None
    if activation is None or act.args[:1] != (last,) or last in act.args[1:] or last in act.kwargs.values():
        act, activation = None, None
    return Modulation(mul, factor, add, shift, act, activation, act or last)


def per_sample_like(value, y) -> bool:
    """``value`` is an (N, C, 1, ...) tensor of y's dtype that broadcasts
    against ``y`` (a norm's input or output) without changing its shape or dtype."""
    if not isinstance(value, torch.Tensor) or value.dim() != y.dim() or value.dtype != y.dtype:
        return False
    same = [statically_known_true(value.shape[d] == y.shape[d]) for d in (0, 1)]
    return all(same) and all(statically_known_true(size == 1) for size in value.shape[2:])


def fused_norm_call(norm: GroupNormFlex, input: torch.Tensor, factor, shift, activation: str) -> torch.Tensor:
    """``activation(norm(input) * factor + shift)`` as forward code wrote it
    (``factor`` / ``shift`` None: not there) in one fused call, where factor
    and shift are per sample (N, C, 1, ...) in the input's dtype; else as
    written."""
    per_sample = all(v is None or per_sample_like(v, input) for v in (factor, shift))
    if per_sample and not has_hooks(norm) and norm.activation == "none" and norm._takes_activation is None:
        weight, bias = norm.weight, norm.bias
        if factor is not None or shift is not None:
            weight, bias = modulation_params(input, factor, shift, weight, bias, 0.0)
        return gnflex_group_norm(input, norm.num_groups, weight, bias, norm.eps, activation)
    output = norm(input)
    if factor is not None:
        output = output * factor
    if shift is not None:
        output = output + shift
    return torch_function(activation)(output)


class FusedForward:
    """The forward of a module whose forward code convert rewrote (fused
    calls): the traced graph's code, run with the module as ``self``, so its
    submodules are looked up at each call. Set on the instance: class,
    submodules and state_dict keys stay. A call with arguments other than
    the traced ones (tensors for every named parameter, nothing for
    ``*args`` / ``**kwargs``) runs the class's forward instead. TorchScript
    cannot compile it: convert with ``fuse_activations=False`` to script."""

    def __init__(self, module: nn.Module, graph: torch.fx.Graph, parameters: List[str]):
        python_code = graph.python_code(root_module="self")
        importer = torch.package.sys_importer
        imports = torch.fx.graph_module._format_import_block(python_code.globals, importer)
        self.__setstate__({"module": module, "source": imports + python_code.src, "parameters": parameters})

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self.code = torch.fx.graph_module._forward_from_src(self.source, {})

    def __getstate__(self):
        return {"module": self.module, "source": self.source, "parameters": self.parameters}

    def __call__(self, *args, **kwargs):
        names = self.parameters
        traced = (len(args) + len(kwargs) == len(names) and all(k in names[len(args):] for k in kwargs)
                  and all(isinstance(a, torch.Tensor) for a in args)
                  and all(isinstance(v, torch.Tensor) for v in kwargs.values()))
        if not traced:
            return type(self.module).forward(self.module, *args, **kwargs)
        return self.code(self.module, *args, **kwargs)

    def __repr__(self) -> str:
        return f"FusedForward(<{type(self.module).__name__}>)"


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
        self.same_signature = True  # every named parameter of forward is a graph input
        self.parameters: List[str] = []  # the graph's inputs, in order

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        params = list(inspect.signature(inspect.unwrap(root_fn)).parameters.values())[1:]
        positional, keyword = [], {}
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue  # empty: FusedForward runs the class's forward for any other call
            has_default = p.default is not p.empty
            if has_default and (self.keep_defaults or p.default is not None):
                value = p.default
                self.same_signature = False
            else:
                value = self.create_proxy("placeholder", p.name, (p.default,) if has_default else (), {})
                self.parameters.append(p.name)
            if p.kind is p.KEYWORD_ONLY:
                keyword[p.name] = value
            else:
                positional.append(value)

        def root(self_module):
            return root_fn(self_module, *positional, **keyword)

        return root, [self.root]


def _trace_one_level(module: nn.Module) -> Tuple[Optional[torch.fx.Graph], Optional[List[str]], str]:
    """(graph, its inputs if they are forward's named parameters else None,
    why not traced)."""
    why = ""
    for keep_defaults in (False, True):
        tracer = _OneLevelTracer(keep_defaults)
        try:
            graph = tracer.trace(module)
            return graph, tracer.parameters if tracer.same_signature else None, ""
        except Exception as e:  # noqa: BLE001 - fx raises many kinds of errors
            why = f"does not trace ({type(e).__name__})"
    return None, None, why


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

    def fuse_module(self, module: nn.Module, name: str) -> None:
        """Fuses in ``module``'s forward code: modules in place, and where the
        code has to change, a :class:`FusedForward` on the instance."""
        graph, parameters, why = _trace_one_level(module)
        label = name or "<model>"
        if graph is None:
            self.report.traced.append((label, why))
            return
        modules = dict(module.named_modules())
        _skip_identities(graph, modules)
        calls: Dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        prefix = f"{name}." if name else ""
        code_may_change = parameters is not None and not has_hooks(module) and not replaced_forward(module)
        in_place, in_code, modulated = [], [], []
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
            modulation = modulation_chain(node, lambda n: _activation_of(n, modules, self.activation_name)) \
                if is_flex and code_may_change else None
            if modulation is not None:
                modulated.append((node, modulation, where))
                continue
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
            elif code_may_change:
                in_code.append((node, act_node, activation, where))
            else:
                self.report.skipped.append((where, "activation not fused: an activation function after it, "
                                                   "in code traced with other arguments or with hooks"))
        self.report.fused += in_place
        if not in_code and not modulated:
            if in_place:
                self.report.traced.append((label, f"{len(in_place)} fused, module kept"))
            return
        for node, act_node, activation, where in in_code:
            if node.op == "call_module":  # the norm stays as it is: the class's forward may run too
                with graph.inserting_before(node):
                    new = graph.call_function(fused_norm_call,
                                              (graph.get_attr(node.target), node.args[0], None, None, activation))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                node = new
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
        for node, modulation, where in modulated:
            self.report.fused.append(where + _fuse_modulation(graph, node, modulation))
        graph.lint()
        module.forward = FusedForward(module, graph, parameters)
        self.report.traced.append((label, f"{len(in_place) + len(in_code) + len(modulated)} fused, module kept, "
                                          f"forward code rewritten ({len(in_code) + len(modulated)} in code)"))


def _fuse_modulation(graph: torch.fx.Graph, node: torch.fx.Node, m: Modulation) -> str:
    """Replaces the norm call ``node`` and its chain ``m`` by one
    :func:`fused_norm_call`; returns what was fused, for the report."""
    with graph.inserting_before(m.last):
        norm = graph.get_attr(node.target)
        fused = graph.call_function(fused_norm_call, (norm, node.args[0], m.factor, m.shift, m.activation or "none"))
    m.last.replace_all_uses_with(fused)
    for done in (m.act, m.add, m.mul, node):
        if done is not None:
            graph.erase_node(done)
    return " * scale" + (" + shift" if m.shift is not None else "") + (f" + {m.activation}" if m.activation else "")


def fuse_in_forward_code(model: nn.Module, activation_name: Callable, report) -> None:
    """Fuse where forward code calls a norm then an activation or a
    modulation, in place. Adds to ``report.fused``, ``report.skipped`` and
    ``report.traced``."""
    fusion = _Fusion(model, activation_name, report)

    def wants_tracing(module: nn.Module) -> bool:
        if isinstance(module, GroupNormFlex) or replaced_forward(module):
            return False
        has_candidate = any(isinstance(m, GroupNormFlex) and m.activation == "none" and m._takes_activation is None
                            for m in module.children())
        code = getattr(type(module).forward, "__code__", None)
        return has_candidate or (code is not None and "group_norm" in code.co_names)

    for name, module in reversed(list(model.named_modules())):
        if wants_tracing(module):
            fusion.fuse_module(module, name)
