"""Models out of eager Python: TorchScript (fresh processes), torch.compile,
torch.export and ONNX (run by onnxruntime)."""
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

import gnflex
from gnflex import GNCNN, ConvGNAct, GNConfig, GroupNormFlex


def randomize_norms(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GroupNormFlex) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.normal_()
    return model


MODELS = {
    "groupnormflex": (lambda: GroupNormFlex(16, groups=4, activation="silu"), (2, 16, 6, 6)),
    "convgnact": (lambda: ConvGNAct(3, 16, stride=2, activation="gelu"), (2, 3, 12, 12)),
    "gncnn": (lambda: GNCNN(widths=(8, 16, 32, 32)), (2, 3, 32, 32)),
}

LOADER = textwrap.dedent(
    """
    import sys, torch
    mode, case_file = sys.argv[1:3]
    if mode == "import":
        import gnflex  # noqa: F401
    else:
        torch.ops.load_library(sys.argv[3])  # the op library alone, no gnflex package
    for model_path, data_path in torch.load(case_file):
        model = torch.jit.load(model_path)
        data = torch.load(data_path)
        x = data["x"].clone().requires_grad_()
        out = model(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(out, data["out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, data["grad"], rtol=1e-5, atol=1e-6)
        print("OK", model_path)
    """
)


def test_torchscript_saved_models_run_in_fresh_processes(tmp_path):
    # script and trace of every model, saved; then loaded in a process that
    # imports gnflex and in one that only loads the op library by path.
    cases = []
    for name, (make, shape) in sorted(MODELS.items()):
        model = randomize_norms(make()).eval()
        x = torch.randn(shape, requires_grad=True)
        out = model(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        for how in ("script", "trace"):
            exported = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x.detach())
            torch.testing.assert_close(exported(x), out)
            model_path, data_path = tmp_path / f"{name}_{how}.pt", tmp_path / f"{name}_{how}_data.pt"
            exported.save(str(model_path))
            torch.save({"x": x.detach(), "out": out.detach(), "grad": grad}, data_path)
            cases.append((str(model_path), str(data_path)))
    torch.save(cases, tmp_path / "cases.pt")
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    for mode, extra in (("import", []), ("library", [gnflex.library_path()])):
        proc = subprocess.run([sys.executable, str(script), mode, str(tmp_path / "cases.pt"), *extra],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, (mode, proc.stderr[-3000:])
        assert proc.stdout.count("OK") == len(cases) == 6, proc.stdout


def test_torch_compile_training_step_dynamic_batch():
    torch.manual_seed(0)
    model = GNCNN(widths=(8, 16, 32, 32), activation="silu")
    reference = GNCNN(widths=(8, 16, 32, 32), activation="silu")
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch in (2, 3, 5):
        x = torch.randn(batch, 3, 32, 32)
        target = torch.randint(0, 10, (batch,))
        for m in (model, reference):
            m.zero_grad()
        loss = nn.functional.cross_entropy(compiled(x), target)
        loss.backward()
        ref_loss = nn.functional.cross_entropy(reference(x), target)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for p, r in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6)


def test_torch_export_gncnn(tmp_path):
    model = randomize_norms(GNCNN(widths=(8, 16, 32, 32))).eval()
    x = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    assert any("gnflex.group_norm" in str(node.target) for node in program.graph.nodes)
    for n in (2, 5):
        xs = torch.randn(n, 3, 32, 32)
        torch.testing.assert_close(program.module()(xs), model(xs))
    path = tmp_path / "gncnn.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    torch.testing.assert_close(loaded.module()(x), model(x))


onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is a test dependency (.ci/setup.sh installs it)")


class EveryNorm(nn.Module):
    """Every (mode, activation) pair, affine, weight only and no affine, as
    branches on one conv output (branches, not a chain: stacked instance
    norms amplify rounding), plus the functional API."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.norms = nn.ModuleList(
            GroupNormFlex(12, GNConfig(mode=mode, activation=activation, affine=affine), bias=bias)
            for mode in ("gn", "ln_like", "in_like")
            for activation in ("none", "relu", "silu", "gelu")
            for affine, bias in ((True, True), (True, False), (False, True))
        )

    def forward(self, x):
        h = self.conv(x)
        functional = gnflex.group_norm(h, 3, self.norms[0].weight, None, activation="silu")
        return torch.cat([norm(h) for norm in self.norms] + [functional], dim=1)


@pytest.mark.parametrize("dynamo", (True, False), ids=("dynamo", "torchscript"))
def test_plain_torch_onnx_export(tmp_path, dynamo):
    import numpy as np

    model = randomize_norms(EveryNorm()).eval()
    x = torch.randn(2, 3, 9, 7)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xn = torch.randn(2, 3, 9, 7)  # new values, the exported shape
    (out,) = session.run(None, {session.get_inputs()[0].name: xn.numpy()})
    expected = model(xn).detach().numpy()
    assert out.shape == expected.shape and np.abs(out - expected).max() <= 1e-4
    # Eager calls outside the export still run gnflex's op.
    assert not gnflex._dispatch.in_onnx_export()


def test_keep_op_switch_is_per_thread():
    # gnflex.onnx.export's switch (keep the op in the traced graph) holds in
    # its own thread or task only: another thread's export still gets torch's ops.
    from gnflex._dispatch import _keep_op_in_onnx, keep_op_in_onnx_export

    seen = []
    with keep_op_in_onnx_export():
        other = threading.Thread(target=lambda: seen.append(_keep_op_in_onnx.get()))
        other.start()
        other.join()
        assert _keep_op_in_onnx.get()
    assert seen == [False] and not _keep_op_in_onnx.get()


@pytest.mark.parametrize("opset", (18, 21))
def test_onnx_export_every_mode_and_activation(tmp_path, opset):
    import numpy as np
    import onnx

    # Every (mode, activation) pair as a branch on the same conv output
    # (branches, not a chain: stacked instance norms amplify rounding).
    class AllModes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, padding=1)
            self.norms = nn.ModuleList(
                GroupNormFlex(12, GNConfig(mode=mode, activation=activation))
                for mode in ("gn", "ln_like", "in_like")
                for activation in ("none", "relu", "silu", "gelu")
            )

        def forward(self, x):
            h = self.conv(x)
            return torch.cat([norm(h) for norm in self.norms], dim=1)

    model = randomize_norms(AllModes()).eval()
    x = torch.randn(2, 3, 9, 7)
    path = tmp_path / "model.onnx"
    gnflex.onnx.export(model, (x,), str(path), opset=opset)
    graph_ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    if opset >= 21:
        assert graph_ops.count("GroupNormalization") == 12
    else:
        assert "GroupNormalization" not in graph_ops and "ReduceMean" in graph_ops
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.abs(out - model(x).detach().numpy()).max() <= 1e-4


def test_onnx_export_gncnn_without_affine(tmp_path):
    import numpy as np

    model = GNCNN(widths=(8, 16, 16, 16), config=GNConfig(affine=False)).eval()
    x = torch.randn(1, 3, 64, 64)  # P5 2x2: 32x32 would give one value per group (torch refuses that)
    path = tmp_path / "gncnn.onnx"
    gnflex.onnx.export(model, (x,), str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.abs(out - model(x).detach().numpy()).max() <= 1e-4
