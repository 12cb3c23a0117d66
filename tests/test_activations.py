"""One list of activation names: gnflex/activations.py (Python) and the C++
name table agree, and every layer of gnflex accepts exactly those names:
the op, its fake kernel, GNConfig and the modules, ONNX export and convert."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import gnflex
from gnflex import _C
from gnflex.activations import ACTIVATIONS, ALIASES, ALL_NAMES, canonical, torch_function

op = torch.ops.gnflex.group_norm


def test_python_and_cpp_accept_the_same_names():
    assert sorted(_C.activation_names()) == sorted(ALL_NAMES)
    assert set(ALIASES.values()) <= set(ACTIVATIONS)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_layer_accepts_every_name(name):
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    expected = torch_function(name)(torch.nn.functional.group_norm(x, 4))
    # The op, the functional API and the modules (the config keeps the canonical name).
    torch.testing.assert_close(op(x, None, None, 4, 1e-5, name)[0], expected)
    torch.testing.assert_close(gnflex.group_norm(x, 4, activation=name), expected)
    layer = gnflex.GroupNormFlex(8, groups=4, activation=name, affine=False)
    assert layer.activation == canonical(name) and layer.config.activation == canonical(name)
    torch.testing.assert_close(layer(x), expected)
    # The fake kernel (torch.compile / torch.export).
    with FakeTensorMode():
        assert op(torch.empty(2, 8, 3, 3), None, None, 4, 1e-5, name)[0].shape == (2, 8, 3, 3)
    # The ONNX translation's Python side (the exporter runs it as Python).
    assert canonical(name) in ACTIVATIONS


@pytest.mark.parametrize("name", ["tanh", "SiLU", "gelu_tanh", ""])
def test_every_layer_rejects_other_names(name):
    x = torch.randn(2, 8, 3)
    with pytest.raises(RuntimeError, match="unknown activation") as info:
        op(x, None, None, 4, 1e-5, name)
    # The op's message lists the names from the C++ table, as Python's does.
    assert all(f"'{a}'" in str(info.value) for a in ACTIVATIONS)
    assert all(f"{alias}={canon}" in str(info.value) for alias, canon in ALIASES.items())
    with FakeTensorMode(), pytest.raises(RuntimeError, match="unknown activation"):
        op(torch.empty(2, 8, 3), None, None, 4, 1e-5, name)
    with pytest.raises(ValueError, match="unknown activation"):
        gnflex.GNConfig(activation=name)
    with pytest.raises(ValueError, match="unknown activation"):
        canonical(name)


def test_convert_fuses_every_activation_from_its_torch_module():
    modules = {"none": nn.Identity(), "relu": nn.ReLU(), "silu": nn.SiLU(), "gelu": nn.GELU()}
    assert set(modules) == set(ACTIVATIONS)
    for name, act in modules.items():
        model = nn.Sequential(nn.GroupNorm(2, 4), act)
        converted, _ = gnflex.convert(model)
        assert converted[0].activation == name


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_onnx_export_of_aliases(tmp_path, alias):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is a test dependency")
    import numpy as np

    class Model(nn.Module):
        def forward(self, x):
            return gnflex.group_norm(x, 2, activation=alias)

    x = torch.randn(2, 4, 5)
    for route in ("torch.onnx", "gnflex.onnx"):
        path = str(tmp_path / f"{route}.onnx")
        if route == "torch.onnx":
            torch.onnx.export(Model(), (x,), path, dynamo=False)
        else:
            gnflex.onnx.export(Model(), (x,), path)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert np.abs(out - Model()(x).numpy()).max() <= 1e-4, route
