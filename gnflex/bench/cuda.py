"""CUDA benchmark: gnflex vs torch on one GPU, same process, same run.

    gnflex bench cuda [--quick] [--budget-s 300] [--md out.md] [--json out.json]

Cases (gnflex/bench/cases.py): the shapes people run GroupNorm on: diffusion UNets
(channels-last, N = 1, 2, 8), VAEs at batch 1, video (5-D), detection heads,
3-D medical volumes, G = 1 and G = C, (N, C, L) sequences and a small case;
each with and without SiLU, forward and forward+backward. Contenders, measured
in turn on each row: gnflex, torch's native GroupNorm (+ F.silu), torch.compile
of it (SiLU rows) and a copy of x (x.clone(): the bandwidth floor).

What is measured, per contender (p10 / median / p90 over the repetitions):
- graph: GPU time warm. A CUDA graph of K back-to-back calls (the backward
  captured with them), replayed, events around the replay, / K. Inputs stay in
  L2 where they fit: the time a model sees when the tensor was just written.
- cold: GPU time with L2 flushed. A buffer of twice the L2 is zeroed before
  each call, events around the call only (the memset keeps the GPU busy while
  the host enqueues the call, so the events time the GPU).
- host: host time per call, many calls with no synchronization.
- eager: one call between events, then a synchronization: latency as a
  Python loop sees it (host enqueue time for small tensors, not the GPU's).
Ratios use graph times: vs_torch = torch / gnflex, vs_compile = compile /
gnflex, copy_fraction = copy / gnflex (forward; fwd+bwd: 1.5 x copy / gnflex,
the backward moving three tensors to the copy's two). path: the planner's
choice for the forward (gnflex._C.cuda_plan): "block" when each group is
normalized in one pass by one warp or block, "l2" when the output pass
re-reads x from L2, "dram" when from memory.

--budget-s stops starting new rows after that many seconds and still writes
what was measured (the one-command GPU check, .ci/gpu, runs it).
"""
import argparse
import math
import statistics
import sys
import time

import torch

import gnflex
from .cases import CUDA_CASES, QUICK_CUDA_CASES
from .common import MODULATED, geomean, make_inputs, make_modulation, native_group_norm, write_results

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REPEATS = 15  # repetitions per measure (p10 / median / p90)
GRAPH_TARGET_MS = 2.0  # a captured graph holds about this much GPU time


def case_rows(cases):
    """(name, shape, groups, dtype, layout, activation, backward) in run order:
    every case without an activation first, then with SiLU and AdaGN + SiLU
    (forward+backward, then forward, whose torch.compile baseline costs a
    compile per shape; AdaGN forward+backward only), so a run cut short by
    --budget-s still covers every shape."""
    rows = [(name, shape, groups, DTYPES[dtype], layout, activation, backward)
            for name, shape, groups, dtype, layouts in cases
            for layout in layouts
            for activation in ("none", "silu", MODULATED)
            for backward in (False, True)
            if activation != MODULATED or backward]  # AdaGN: its target is forward+backward
    return sorted(rows, key=lambda r: (r[5] != "none", r[5] != "none" and not r[6]))


def percentiles(times):
    """(p10, median, p90) of a list of times."""
    ordered = sorted(times)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return at(0.1), statistics.median(ordered), at(0.9)


def event_ms(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def warm_up(fn, calls=3):
    """Runs fn on a side stream (as graph capture requires), then waits for it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()


def graph_times(fn, single_ms):
    """GPU ms per call from replays of a graph of K back-to-back calls."""
    calls = max(1, min(200, int(GRAPH_TARGET_MS / max(single_ms, 1e-3))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = [event_ms(graph.replay) / calls for _ in range(REPEATS)]
    del graph
    return percentiles(times)


def cold_times(fn, flush):
    """GPU ms of one call after zeroing a buffer larger than L2."""
    times = []
    for _ in range(REPEATS):
        flush.zero_()
        times.append(event_ms(fn))
    return percentiles(times)


def host_us(fn, calls=100):
    """Host microseconds per call, calls queued without synchronization."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def eager_ms(fn):
    """One call plus a synchronization, as a Python loop sees it."""
    return statistics.median(event_ms(fn) for _ in range(REPEATS))


def make_fns(shape, groups, dtype, layout, activation, backward):
    x, w, b, dy = make_inputs(shape, dtype, layout, device="cuda", requires_grad=backward)
    native = native_group_norm(groups, activation)
    leaves = (x, w, b)
    if activation == MODULATED:
        scale, shift = make_modulation(x, requires_grad=backward)
        leaves = (x, w, b, scale, shift)
        fns = {"gnflex": lambda: gnflex.modulated_group_norm(x, groups, scale, shift, w, b, activation="silu"),
               "torch": lambda: native(x, w, b, scale, shift)}
    else:
        fns = {"gnflex": lambda: gnflex.group_norm(x, groups, w, b, activation=activation),
               "torch": lambda: native(x, w, b)}
    if activation == "silu":
        compiled = torch.compile(native)
        fns["compile"] = lambda: compiled(x, w, b)
    if backward:
        fns = {k: (lambda f: lambda: torch.autograd.grad(f(), leaves, dy))(f) for k, f in fns.items()}
    fns["copy"] = lambda: x.clone(memory_format=torch.preserve_format)
    return fns


def measure(fns, flush):
    """{contender: {measure: value}}, the contenders in turn within each measure."""
    out = {k: {} for k in fns}
    for fn in fns.values():
        warm_up(fn)
    for k, fn in fns.items():
        out[k]["eager_ms"] = eager_ms(fn)
    for k, fn in fns.items():
        out[k]["graph"] = graph_times(fn, out[k]["eager_ms"])
    for k, fn in fns.items():
        out[k]["cold"] = cold_times(fn, flush)
    for k, fn in fns.items():
        out[k]["host_us"] = host_us(fn)
    return out


def plan_path(shape, groups, dtype, layout):
    try:
        from gnflex import _C

        hxw = math.prod(shape[2:])
        size = torch.tensor([], dtype=dtype).element_size()
        return _C.cuda_plan(shape[0], shape[1], hxw, groups, size, layout == "channels_last")["path"]
    except (ImportError, AttributeError):
        return "?"


def row_for(name, shape, groups, dtype, layout, activation, backward, t):
    mb = math.prod(shape) * torch.tensor([], dtype=dtype).element_size() / 2 ** 20
    row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "layout": layout, "act": activation,
           "pass": "fwd+bwd" if backward else "fwd", "shape": "x".join(map(str, shape)), "groups": groups,
           "mb": mb, "path": plan_path(shape, groups, dtype, layout)}
    for k, m in t.items():
        p10, median, p90 = m["graph"]
        row[f"{k}_graph_ms"], row[f"{k}_graph_p10_ms"], row[f"{k}_graph_p90_ms"] = median, p10, p90
        p10, median, p90 = m["cold"]
        row[f"{k}_cold_ms"], row[f"{k}_cold_p10_ms"], row[f"{k}_cold_p90_ms"] = median, p10, p90
        row[f"{k}_host_us"] = m["host_us"]
        row[f"{k}_eager_ms"] = m["eager_ms"]
    ours = row["gnflex_graph_ms"]
    copy_share = 1.5 if backward else 1.0  # the backward moves 3 tensors, the copy 2
    row["copy_fraction"] = copy_share * row["copy_graph_ms"] / ours
    row["copy_fraction_cold"] = copy_share * row["copy_cold_ms"] / row["gnflex_cold_ms"]
    row["vs_torch"] = row["torch_graph_ms"] / ours
    row["vs_torch_cold"] = row["torch_cold_ms"] / row["gnflex_cold_ms"]
    if "compile_graph_ms" in row:
        row["vs_compile"] = row["compile_graph_ms"] / ours
    row["gbps"] = mb * 2 ** 20 * (3 if backward else 2) / ours / 1e6
    return row


def summarize(rows):
    def fwd(r):
        return r["pass"] == "fwd"

    return {
        "vs torch (graph), all rows": geomean([r["vs_torch"] for r in rows]),
        "vs torch (graph), diffusion UNet rows": geomean([r["vs_torch"] for r in rows if r["case"].startswith("unet")]),
        "vs torch.compile (graph), GN+SiLU rows": geomean([r["vs_compile"] for r in rows if "vs_compile" in r]),
        "forward copy fraction (graph), >= 32 MB": geomean(
            [r["copy_fraction"] for r in rows if fwd(r) and r["mb"] >= 32]),
        "backward copy fraction (graph), >= 32 MB": geomean(
            [r["copy_fraction"] for r in rows if not fwd(r) and r["mb"] >= 32]),
        "forward copy fraction (cold), >= 32 MB": geomean(
            [r["copy_fraction_cold"] for r in rows if fwd(r) and r["mb"] >= 32]),
        "host us per call, gnflex / torch": geomean([r["gnflex_host_us"] / r["torch_host_us"] for r in rows]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(prog="gnflex bench cuda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="three cases")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no new row after this many seconds")
    p.add_argument("--md")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gnflex bench cuda: no CUDA device", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    machine = {"gpu": device, "torch": torch.__version__, "cuda": torch.version.cuda, "gnflex": gnflex.__version__,
               "l2_mb": round(l2 / 2 ** 20, 1)}
    flush = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")
    started = time.monotonic()
    rows, skipped = [], 0
    todo = case_rows(QUICK_CUDA_CASES if args.quick else CUDA_CASES)
    for name, shape, groups, dtype, layout, activation, backward in todo:
        if time.monotonic() - started > args.budget_s:
            skipped += 1
            continue
        try:
            t = measure(make_fns(shape, groups, dtype, layout, activation, backward), flush)
        except torch.cuda.OutOfMemoryError:
            print(f"out of memory: {name} {shape}", flush=True)
            torch.cuda.empty_cache()
            continue
        row = row_for(name, shape, groups, dtype, layout, activation, backward, t)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if "p10" not in k
               and "p90" not in k}, flush=True)
        del t
        torch.cuda.empty_cache()
    summary = summarize(rows)
    summary_rows = [{"measure": k, "geomean": v} for k, v in summary.items()]
    print("\n".join(f"{k}: {v:.2f}" for k, v in summary.items()))
    if skipped:
        print(f"budget of {args.budget_s:.0f} s reached: {skipped} of {len(todo)} rows not run")
    machine["rows_not_run"] = skipped
    print("machine:", machine)
    write_results(args, f"CUDA benchmark on {device}", machine,
                  "Times in ms (host in us), medians of the repetitions (p10 / p90 in the JSON). graph: GPU time "
                  "of back-to-back calls replayed from a CUDA graph; cold: GPU time after an L2 flush; host: host "
                  "time per call; eager: one call + synchronize. vs_torch / vs_compile: baseline / gnflex, graph "
                  "times (> 1: gnflex faster); copy_fraction: x.clone() / gnflex (fwd+bwd: 1.5 x clone / gnflex).",
                  rows, summary_rows,
                  ["case", "dtype", "layout", "act", "pass", "shape", "groups", "mb", "path", "gnflex_graph_ms",
                   "torch_graph_ms", "compile_graph_ms", "copy_graph_ms", "gnflex_cold_ms", "torch_cold_ms",
                   "copy_cold_ms", "gnflex_host_us", "torch_host_us", "gnflex_eager_ms", "torch_eager_ms",
                   "vs_torch", "vs_compile", "copy_fraction", "gbps"],
                  ["measure", "geomean"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
