"""The command line: `gnflex demo` (the main job), `gnflex bench`, `gnflex info`."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import gnflex
from gnflex import cli, demo


def run_cli(args, tmp_path, timeout=600, env=None):
    # cwd outside the checkout: `-m gnflex` would otherwise import the source tree.
    return subprocess.run([sys.executable, "-m", "gnflex", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path, env=env)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_quick_writes_table_csv_and_plot(quick_demo):
    with open(quick_demo / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["variant"], int(r["batch_size"])) for r in rows} == {
        (v, b) for v in ("gn_auto", "batchnorm", "ln_like") for b in (1, 32)}
    for r in rows:
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
        assert float(r["final_loss"]) > 0 and float(r["seconds"]) > 0 and int(r["steps"]) > 0
    acc = {(r["variant"], int(r["batch_size"])): float(r["test_accuracy"]) for r in rows}
    # 10 classes: chance is 0.1.
    assert acc["gn_auto", 32] > 0.5, acc
    md = (quick_demo / "results.md").read_text()
    assert "| gn_auto |" in md and "bs 32" in md
    png = (quick_demo / "accuracy_vs_batch.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_demo_quick_segmentation_sweep(quick_demo):
    with open(quick_demo / "segmentation.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["variant"], int(r["batch_size"])) for r in rows} == {
        (v, b) for v in ("gn_auto", "batchnorm", "ln_like") for b in (1, 8)}
    for r in rows:
        assert 0.0 <= float(r["mean_iou"]) <= 1.0 and int(r["steps"]) > 0
    md = (quick_demo / "segmentation.md").read_text()
    assert "## Mean IoU (eval mode)" in md and "| gn_auto |" in md and "On 32 test images" in md
    assert (quick_demo / "miou_vs_batch.png").read_bytes().startswith(b"\x89PNG")


def test_segmentation_scenes_and_model():
    from gnflex import demo_segmentation as seg

    x, y = seg.make_scenes(64, seed=3)
    again, y_again = seg.make_scenes(64, seed=3)
    assert torch.equal(x, again) and torch.equal(y, y_again)  # generated, the same for a seed
    assert x.shape == (64, 1, seg.IMAGE_SIZE, seg.IMAGE_SIZE) and y.shape == (64, seg.IMAGE_SIZE, seg.IMAGE_SIZE)
    assert set(y.unique().tolist()) == set(range(len(seg.CLASSES)))
    assert ((y > 0).flatten(1).any(1)).all()  # every image holds a shape
    # Each image has its own gain and offset: per-image means and stds spread.
    assert x.mean((1, 2, 3)).std() > 0.5 and x.std((1, 2, 3)).max() > 2 * x.std((1, 2, 3)).min()
    for variant in ("gn_auto", "batchnorm", "in_like"):
        model = demo.build_segmentation_model(variant)
        assert model(x[:2]).shape == (2, len(seg.CLASSES), seg.IMAGE_SIZE, seg.IMAGE_SIZE)
        norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
        assert len(norms) == 8 and all(isinstance(m, torch.nn.BatchNorm2d) == (variant == "batchnorm") for m in norms)

    class Oracle(torch.nn.Module):  # logits that pick the true label: IoU 1
        def forward(self, images):
            return torch.nn.functional.one_hot(y[: len(images)], len(seg.CLASSES)).permute(0, 3, 1, 2).float()

    assert seg.mean_iou(Oracle(), x, y) == 1.0
    assert seg.mean_iou(lambda images: torch.zeros(len(images), 4, 64, 64), x, y) < 0.25  # all background


def test_demo_variants_build_the_intended_norms():
    x = torch.randn(2, 1, 64, 64)
    for variant in demo.VARIANTS:
        model = demo.build_model(variant)
        assert model(x).shape == (2, 10)
        kinds = {type(m).__name__ for m in model.modules()}
        assert ("BatchNorm2d" in kinds) == (variant == "batchnorm")
        assert ("GroupNormFlex" in kinds) == (variant not in ("batchnorm", "none"))
    groups = {v: [demo.norm_groups(v, c) for c in demo.WIDTHS] for v in demo.VARIANTS}
    assert groups["gn_auto"] == ["16", "32", "32", "32"]  # the literal rule: C=16 -> 16 groups
    assert groups["gn_min2"] == ["8", "16", "32", "32"]  # min_channels_per_group=2: C=16 -> 8
    assert groups["ln_like"] == ["1"] * 4
    assert groups["in_like"] == [str(c) for c in demo.WIDTHS]
    assert groups["batchnorm"] == ["-"] * 4


def test_demo_data_is_split_and_upsampled():
    data = demo.load_digits_data(seed=0)
    assert data.x_train.shape[1:] == (1, demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    assert len(data.y_train) + len(data.y_test) == 1797
    assert set(data.y_test.tolist()) == set(range(10))
    assert abs(data.x_train.mean().item()) < 1e-4


@pytest.mark.parametrize("args,fragment", [
    (["--batch-sizes", "0"], "positive integers"),
    (["--batch-sizes", "two"], "comma-separated integers"),
    (["--variants", "gn,layernorm"], "unknown variant"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--segmentation-epochs", "0"], "--segmentation-epochs must be >= 1"),
    (["--task", "segmentation", "--segmentation-batch-sizes", "100000"], "exceed"),
    (["--task", "segmentation", "--ddp"], "digits sweep only"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--quick", "--batch-sizes", "100000"], "exceed"),
    (["--ddp"], "torchrun"),
])
def test_demo_rejects_bad_arguments(args, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--out", str(tmp_path), "--no-progress", *args])
    message = str(e.value.code) + capsys.readouterr().err
    assert e.value.code != 0 and fragment in message, message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_demo_cuda_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device"):
        cli.main(["demo", "--device", "cuda", "--out", str(tmp_path)])


def test_console_demo_command(tmp_path):
    proc = run_cli(["demo", "--quick", "--variants", "gn_auto", "--batch-sizes", "16", "--out", "o"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| gn_auto |" in proc.stdout
    assert (tmp_path / "o" / "accuracy_vs_batch.png").exists()


def test_info_lists_versions_and_kernels(tmp_path):
    proc = run_cli(["info"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"gnflex {gnflex.__version__}" in out and f"torch {torch.__version__}" in out
    assert "gnflex::group_norm: CPU" in out and "Meta" in out and "Autograd" in out
    assert "CPU caches: L1d " in out and "fused budgets: group " in out and "schedule: auto" in out
    from gnflex import _C  # same environment as the command, so the same variant
    assert f"CPU kernel variant: {_C.cpu_tuning()['kernel_variant']}" in out
    keys = out.split("gnflex::group_norm:")[1].splitlines()[0].strip().split(", ")
    assert ("CUDA" in keys) == gnflex.built_with_cuda()


def test_bench_cpu_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    code = cli.main(["bench", "cpu", "--quick", "--rounds", "1", "--min-run-time", "0.01", "--threads", "1",
                     "--json", str(out), "--md", str(md)])
    assert code == 0
    result = json.loads(out.read_text())
    # shapes x layouts x activations (none, SiLU, AdaGN + SiLU) x passes (fp32)
    assert len(result["rows"]) == 2 * 2 * 3 * 2
    assert {r["act"] for r in result["rows"]} == {"none", "silu", "adagn+silu"}
    assert all(r["gnflex_ms"] > 0 and r["torch_ms"] > 0 for r in result["rows"])
    bwd = [r for r in result["rows"] if r["pass"] == "fwd+bwd"]
    assert all("gnflex_saved_mb" in r for r in bwd)
    # Every row is measured against the copy, forward and backward alike.
    assert all(r["clone_ms"] > 0 and r["over_clone"] == pytest.approx(r["gnflex_ms"] / r["clone_ms"])
               for r in result["rows"])
    # Forward rows also against one elementwise pass of the same per-value work.
    fwd = [r for r in result["rows"] if r["pass"] == "fwd"]
    assert all(r["elementwise_ms"] > 0 and r["over_elementwise"] == pytest.approx(r["gnflex_ms"] / r["elementwise_ms"])
               for r in fwd)
    assert not any("elementwise_ms" in r for r in bwd)
    assert {"cpu", "cpu_capability", "gnflex_variant", "caches"} <= set(result["machine"])
    targets = {t["target"]: t for t in result["Targets"]}
    assert "forward+backward time / clone" in targets and "every row vs torch" in targets
    assert "Targets" in md.read_text() and "issue" not in md.read_text()


def test_bench_cpu_save_names_the_results_by_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    code = cli.main(["bench", "cpu", "--shapes", "8x64x56x56", "--dtypes", "float32", "--acts", "none", "--rounds",
                     "1", "--min-run-time", "0.01", "--threads", "1", "--save"])
    assert code == 0
    saved = sorted(p.name for p in (tmp_path / "bench" / "results").iterdir())
    assert len(saved) == 2 and saved[0].startswith("cpu_") and saved[0].endswith(".json")
    assert torch.backends.cpu.get_cpu_capability().lower() in saved[0]


def test_bench_cpu_row_targets_name_the_worst_row():
    from gnflex.bench.cpu import check_targets

    def row(shape, over, vs):
        return {"dtype": "float32", "layout": "nchw", "act": "none", "pass": "fwd", "shape": shape, "x_mb": 1.0,
                "over_clone": over, "vs_torch": vs}

    got = {t["target"]: t for t in check_targets([row("a", 1.2, 1.1), row("b", 1.7, 0.9)], l3_bytes=32 << 20)}
    within = got["forward time / clone, tensors within half the L3"]
    assert within["met"] == "NO (1 of 2)" and within["value"] == 1.7 and within["worst"].endswith(" b")
    assert got["every row vs torch"]["met"] == "NO (1 of 2)" and got["every row vs torch"]["value"] == 0.9
    # Rows that miss a goal say how far they are from one elementwise pass.
    rows = [{**row("a", 1.2, 1.1), "over_elementwise": 1.0}, {**row("b", 1.7, 0.9), "over_elementwise": 1.1},
            {**row("c", 1.9, 1.0), "over_elementwise": 1.3}]
    got = {t["target"]: t for t in check_targets(rows, l3_bytes=32 << 20)}
    assert got["forward time / clone, tensors within half the L3"]["missed_over_elementwise"] == 1.3
    # A 1 MiB tensor is beyond half of a 1 MiB L3.
    got = {t["target"]: t for t in check_targets([row("a", 1.2, 1.1)], l3_bytes=1 << 20)}
    assert got["forward time / clone, larger tensors"]["met"] == "yes"
    assert "forward time / clone, tensors within half the L3" not in got


def test_bench_cpu_rejects_unknown_dtypes_and_shapes(capsys):
    for bad in (["--dtypes", "fp32"], ["--shapes", "1x2x3"], ["--acts", "relu"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", "cpu", *bad])
        assert e.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_bench_help_and_bad_target(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "cpu", "--help"])
    assert e.value.code == 0 and "--threads" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "gpu"])
    assert e.value.code == 2


def test_fused_silu_keeps_only_x_and_statistics_for_backward():
    # What autograd saves for gnflex's fused GN+SiLU: x, weight, bias, mean,
    # rstd (no normalized or activated copy of x); torch's GN + F.silu keeps more.
    from gnflex.bench.common import saved_tensor_bytes

    x = torch.randn(4, 64, 32, 32, requires_grad=True)
    w = torch.rand(64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    ours = saved_tensor_bytes(lambda: gnflex.group_norm(x, 32, w, b, activation="silu"))
    expected = x.numel() * 4 + 2 * 64 * 4 + 2 * 4 * 32 * 4
    assert ours == expected
    theirs = saved_tensor_bytes(
        lambda: torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, w, b)))
    assert theirs >= ours + 0.95 * x.numel() * 4  # at least one more activation-sized tensor


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.slow
def test_demo_ddp_two_processes(tmp_path):
    # torchrun ships with torch, next to this interpreter.
    torchrun = TORCHRUN if os.path.exists(TORCHRUN) else shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the interpreter or on PATH"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "gnflex", "demo", "--ddp", "--quick",
                           "--variants", "gn_auto,batchnorm", "--batch-sizes", "8", "--out", "o", "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "o" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert "workers 2" in proc.stdout


def test_demo_checks_dependencies_first_and_keeps_tables_without_matplotlib(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def without(*names):
        return lambda name, *a, **k: None if name in names else real_find_spec(name, *a, **k)

    trained = []
    monkeypatch.setattr(demo, "train_one",
                        lambda *a, **k: trained.append(a) or demo.RunResult(a[0], a[1], 0.5, 1.0, 0.1, 3))
    monkeypatch.setattr(importlib.util, "find_spec", without("sklearn"))
    with pytest.raises(SystemExit, match="scikit-learn.*pip install"):
        demo.main(["--quick", "--out", str(tmp_path / "a"), "--no-progress"])
    assert trained == []  # refused before any training

    # No plot library: the tables are written as runs finish, the plot is skipped.
    monkeypatch.setattr(importlib.util, "find_spec", without("matplotlib"))
    monkeypatch.setattr(demo, "write_plot", lambda *a, **k: False)
    out = tmp_path / "b"
    assert demo.main(["--quick", "--variants", "gn_auto,batchnorm", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "matplotlib not installed" in captured.err and "no plot" in captured.out
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(demo.QUICK_BATCH_SIZES)
    assert not (out / "accuracy_vs_batch.png").exists()
    assert demo.QUICK_BATCH_SIZES[0] == demo.BATCH_SIZES[0] == 1


def test_cuda_bench_cases_are_valid_inputs():
    # The CUDA bench and the simulator's traffic model share one case list;
    # check it here, where no GPU is needed: every case is a valid GroupNorm
    # input, and the traffic model keeps C, G, dtype and layout.
    from gnflex.bench.cases import CUDA_CASES, traffic_cases
    from gnflex.bench.cuda import case_rows

    rows = case_rows(CUDA_CASES)
    # (none, SiLU) x (fwd, fwd+bwd), and AdaGN + SiLU fwd+bwd
    assert len(rows) == 5 * sum(len(layouts) for *_, layouts in CUDA_CASES)
    for name, shape, groups, dtype, layout, activation, backward in rows:
        assert shape[1] % groups == 0 and len(shape) >= 3, (name, shape, groups)
        assert dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert layout == "nchw" or len(shape) in (4, 5), (name, shape, layout)
    traffic = traffic_cases()
    assert {(c, g, d, lay) for _, _, c, _, g, d, lay in traffic} >= {
        (shape[1], groups, dtype, layout) for _, shape, groups, dtype, layouts in CUDA_CASES for layout in layouts}
    # At most 8M values a case (the simulator runs ~4e5 values a second).
    assert all(n * c * hxw <= 1 << 23 and c % g == 0 for _, n, c, hxw, g, _, _ in traffic)


def test_cuda_bench_rows_carry_every_measure():
    # The bench's rows from measurements, without a GPU: every field the JSON
    # promises, ratios of graph times, the backward's copy fraction scaled to
    # its three tensors, and the planner's path where the library has CUDA.
    from gnflex.bench import cuda as bench

    assert bench.percentiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (1.0, 3.0, 5.0)
    fake = {k: {"graph": (0.9 * v, v, 1.1 * v), "cold": (2 * v, 2 * v, 2 * v), "host_us": 10 * v, "eager_ms": 3 * v}
            for k, v in {"gnflex": 1.0, "torch": 2.0, "compile": 1.5, "copy": 0.8}.items()}
    rows = [bench.row_for("vae", (1, 128, 64, 64), 32, torch.float16, layout, "silu", backward, fake)
            for layout in ("nchw", "channels_last") for backward in (False, True)]
    for row in rows:
        for key in ("gnflex_graph_ms", "torch_graph_ms", "copy_graph_ms", "compile_graph_ms", "gnflex_cold_ms",
                    "torch_cold_ms", "copy_cold_ms", "gnflex_host_us", "torch_host_us", "gnflex_eager_ms",
                    "torch_eager_ms", "mb", "path", "case", "dtype", "layout", "act", "pass", "shape", "groups"):
            assert key in row, key
        assert row["vs_torch"] == 2.0 and row["vs_compile"] == 1.5 and row["mb"] == 1.0
        assert row["copy_fraction"] == pytest.approx(0.8 * (1.5 if row["pass"] == "fwd+bwd" else 1.0))
        if gnflex.built_with_cuda():
            assert row["path"] == "l2", row  # 1 MB: re-read from L2
    summary = bench.summarize(rows)
    assert summary["vs torch (graph), all rows"] == pytest.approx(2.0)
    if gnflex.built_with_cuda():
        from gnflex import _C

        big = _C.cuda_plan(1, 512, 16 * 180 * 320, 32, 2, True)  # 943 MB batch-1 video, one domain
        assert big["path"] == "dram" and big["rounds"] == 1, big
        many = _C.cuda_plan(64, 256, 64 * 64, 32, 2, False)  # 128 MB in groups of 64 KB: many rounds
        assert many["path"] == "l2" and many["rounds"] > 1 and many["forward_tickets"] < 2 ** 31, many
        heads = _C.cuda_plan(1024, 256, 7 * 7, 32, 2, False)  # groups of 392 values: a warp each, one pass
        assert heads["path"] == "block" and heads["forward_tickets"] == 1024 * 32 // 8, heads
        assert _C.cuda_plan(1024, 256, 7 * 7, 32, 2, True)["path"] == "l2"  # channels-last: a sample per domain
        assert _C.cuda_plan(8, 64, 64 * 64, 32, 2, False)["path"] != "block"  # groups of 8192 values: two passes
        with pytest.raises(ValueError, match="element_size"):
            _C.cuda_plan(1, 8, 4, 2, 3, False)


def test_build_fingerprint_tracks_sources_and_settings(tmp_path, monkeypatch):
    # .ci/setup.sh skips the build when the installed package's fingerprint
    # (recorded by setup.py) equals the checkout's: it must change with any
    # source file and with the build settings, and with nothing else.
    from gnflex import _sources

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(root, name), tmp_path / name)
    for top in ("csrc", "gnflex"):
        shutil.copytree(os.path.join(root, top), tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in _sources.BUILD_ENV:
        monkeypatch.delenv(name, raising=False)
    base = _sources.fingerprint(str(tmp_path))
    assert _sources.fingerprint(str(tmp_path)) == base
    (tmp_path / "gnflex" / "_build_info.py").write_text("# generated: not a source\n")
    (tmp_path / "README.md").write_text("not part of the package\n")
    assert _sources.fingerprint(str(tmp_path)) == base
    header = tmp_path / "csrc" / "group_norm_math.h"
    header.write_text(header.read_text() + "\n")
    changed = _sources.fingerprint(str(tmp_path))
    assert changed != base
    monkeypatch.setenv("GNFLEX_CUDA", "1")
    assert _sources.fingerprint(str(tmp_path)) not in (base, changed)


def test_build_flags_are_described_once():
    # csrc/build_flags.txt is the one description of the build: every build
    # reads it, and none of its flags (OpenMP aside: a link flag too) or source
    # folders is written down again elsewhere.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "gnflex"))
    try:
        import _sources  # the checkout's, as setup.py runs it
    finally:
        sys.path.pop(0)
    table = _sources.build_table(os.path.join(root, "csrc"))
    assert {"cpp_dirs", "cuda_dirs", "cxx", "nvcc", "cuda_archs"} <= set(table)
    cpp, cuda = _sources.sources(os.path.join(root, "csrc"))
    assert any(p.endswith("group_norm_kernels_avx512.cpp") for p in cpp) and len(cuda) >= 5
    builds = {"setup.py": "build_table", "gnflex/jit.py": "build_table", "bench/cuda_sass.py": "build_table",
              "CMakeLists.txt": "build_flags.txt", ".ci/cuda-sim": "build_flags.txt"}
    for path, reads in builds.items():
        with open(os.path.join(root, path)) as f:
            text = f.read()
        assert reads in text, path
        for flag in table["cxx"] + table["nvcc"]:
            assert flag == "-fopenmp" or flag not in text, (path, flag)
        assert "autograd" not in text and "autocast" not in text, path  # source folders
