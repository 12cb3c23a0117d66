"""ONNX export of models that use gnflex ops.

Plain ``torch.onnx.export(model, args, f)`` works, with the default (dynamo)
exporter and with ``dynamo=False``, for models built from gnflex's modules
or ``gnflex.group_norm``: while an export traces them they compute with
torch's own ``F.group_norm`` + activation, which both exporters translate.

This module is the other route: it keeps ``gnflex::group_norm`` in the traced
graph and translates the op itself, also for code that calls
``torch.ops.gnflex.group_norm`` directly. :func:`translation_table` maps the
op to standard ONNX ops and :func:`export` passes that table for you::

    gnflex.onnx.export(model, (x,), "model.onnx")            # opset 18, decomposed
    gnflex.onnx.export(model, (x,), "model.onnx", opset=21)  # y via GroupNormalization-21

Opset 18's GroupNormalization takes per-group scale/bias, which cannot express
per-channel affine parameters, so below opset 21 the op is decomposed
(Reshape, ReduceMean, Sqrt, ...). Opset 21's GroupNormalization takes
per-channel scale and bias and is used for y. mean/rstd outputs (rarely used
by a model) always come from the decomposition; unused ones are pruned.
Requires the ``onnx`` and ``onnxscript`` packages.
"""
import math

import torch

from .activations import ACTIVATIONS, canonical
from ._dispatch import keep_op_in_onnx_export


def translation_table(opset: int = 18):
    """{torch op overload: onnxscript function} for torch.onnx.export."""
    if opset < 18:
        raise ValueError(f"gnflex ONNX export needs opset >= 18, got {opset}")
    import onnxscript  # noqa: F401

    if opset >= 21:
        from onnxscript import opset21 as op
    else:
        from onnxscript import opset18 as op

    def gelu(y):  # the exact, erf form
        half = op.CastLike(op.Constant(value_float=0.5), y)
        one = op.CastLike(op.Constant(value_float=1.0), y)
        inv_sqrt2 = op.CastLike(op.Constant(value_float=1.0 / math.sqrt(2.0)), y)
        return op.Mul(op.Mul(half, y), op.Add(one, op.Erf(op.Mul(y, inv_sqrt2))))

    activations = {"none": lambda y: y, "relu": op.Relu, "silu": lambda y: op.Mul(y, op.Sigmoid(y)), "gelu": gelu}
    assert tuple(activations) == ACTIVATIONS, "an ONNX translation for every activation"

    def group_norm(input, weight=None, bias=None, num_groups=1, eps=1e-5, activation="none"):
        activation = canonical(activation)
        # Work on (N, C, L) so per-channel parameters broadcast as (C, 1).
        x3 = op.Reshape(input, op.Constant(value_ints=[0, 0, -1]))
        grouped = op.Reshape(x3, op.Constant(value_ints=[0, num_groups, -1]))
        axes = op.Constant(value_ints=[2])
        mean = op.ReduceMean(grouped, axes, keepdims=1)
        centered = op.Sub(grouped, mean)
        var = op.ReduceMean(op.Mul(centered, centered), axes, keepdims=1)
        eps_t = op.CastLike(op.Constant(value_float=float(eps)), input)
        rstd = op.Reciprocal(op.Sqrt(op.Add(var, eps_t)))
        channel_shape = op.Constant(value_ints=[-1, 1])
        if opset >= 21 and weight is not None and bias is not None:
            y3 = op.GroupNormalization(x3, weight, bias, epsilon=float(eps), num_groups=num_groups)
        else:
            y3 = op.Reshape(op.Mul(centered, rstd), op.Shape(x3))
            if weight is not None:
                y3 = op.Mul(y3, op.Reshape(weight, channel_shape))
            if bias is not None:
                y3 = op.Add(y3, op.Reshape(bias, channel_shape))
        y = op.Reshape(activations[activation](y3), op.Shape(input))
        stats_shape = op.Constant(value_ints=[0, num_groups])
        return y, op.Reshape(mean, stats_shape), op.Reshape(rstd, stats_shape)

    return {torch.ops.gnflex.group_norm.default: group_norm}


def export(model, args, f=None, *, opset: int = 18, **kwargs):
    """``torch.onnx.export(model, args, f, dynamo=True, opset_version=opset)``
    with gnflex's translation table; returns the ONNXProgram."""
    table = dict(kwargs.pop("custom_translation_table", None) or {})
    table.update(translation_table(opset))
    with keep_op_in_onnx_export():
        return torch.onnx.export(model, args, f, dynamo=True, opset_version=opset,
                                 custom_translation_table=table, **kwargs)
