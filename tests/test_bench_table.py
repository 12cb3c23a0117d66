"""The README's CPU table is generated from the saved bench results
(`gnflex bench table --write README.md`), never edited by hand."""
import glob
import json
import os

import pytest

from gnflex.bench import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_table_is_the_saved_results():
    loaded = table.load(glob.glob(os.path.join(ROOT, table.RESULTS)))
    assert loaded, "no saved CPU results with clone timings under bench/results"
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start, end = readme.index(table.BEGIN), readme.index(table.END) + len(table.END)
    assert readme[start:end] == table.render(loaded), "run `gnflex bench table --write README.md`"


def test_files_without_clone_timings_are_left_out(tmp_path):
    old = {"machine": {"cpu": "old"}, "rows": [{"gnflex_ms": 1.0}], "summary": []}
    new = {"machine": {"cpu": "new", "gnflex_variant": "AVX2", "caches": "L2 1 MiB"},
           "rows": [{"gnflex_ms": 1.0, "clone_ms": 0.5}],
           "summary": [{"dtype": "float32", "layout": "nchw", "act": "none", "pass": "fwd",
                        "vs_torch": 1.25, "over_clone": 2.0}],
           "Targets": [{"met": "yes"}, {"met": "NO (1 of 2)"}]}
    for name, results in (("a.json", old), ("b.json", new)):
        (tmp_path / name).write_text(json.dumps(results))
    loaded = table.load([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert [r["machine"]["cpu"] for _, r in loaded] == ["new"]
    block = table.render(loaded)
    assert "| float32 nchw none fwd | 1.25x torch, 2.00x clone |" in block
    assert "| targets met | 1 of 2 |" in block


def test_write_needs_the_markers():
    with pytest.raises(ValueError, match="no table markers"):
        table.replace_block("no markers here", "table")
    text = f"before\n{table.BEGIN}\nold\n{table.END}\nafter"
    assert table.replace_block(text, "new") == "before\nnew\nafter"


def test_cpu_floor_microbenchmark_builds_and_reports(tmp_path):
    """bench/cpu_floor.cpp (the fused forward's floor without gnflex or torch)
    compiles as its header says and prints one row per contender."""
    import shutil
    import subprocess

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++")
    binary = tmp_path / "cpu_floor"
    subprocess.run([compiler, "-O2", "-fopenmp", os.path.join(ROOT, "bench", "cpu_floor.cpp"), "-o", str(binary)],
                   check=True)
    out = subprocess.run([str(binary), "1", "1"], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "contender" not in line]
    assert [r[0].strip() for r in rows][0] == "memcpy" and len(rows) == 7
    memcpy_us = float(rows[0][1])
    assert memcpy_us > 0 and all(float(r[1]) > 0 for r in rows)
    # Each ratio is its row's time over memcpy's (to the printed precision);
    # the times themselves are the VM's, so nothing here bounds them.
    for r in rows:
        assert float(r[2]) == pytest.approx(float(r[1]) / memcpy_us, rel=0.02, abs=0.006)
