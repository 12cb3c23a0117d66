"""CUDA benchmark: gnflex vs torch on one GPU, same process, same run.

    gnflex bench cuda [--quick] [--budget-s 300] [--md out.md] [--json out.json]
    python bench/bench_cuda.py ...           (the same, from a checkout)

Cases (gnflex/bench/cases.py): the shapes people run GroupNorm on: diffusion UNets
(channels-last, N = 1, 2, 8), VAEs at batch 1, video (5-D), detection heads,
3-D medical volumes, G = 1 and G = C, (N, C, L) sequences and a small case;
each with and without SiLU, forward and forward+backward. Baselines in the
same run: torch's native GroupNorm (+ F.silu), torch.compile of it (SiLU
forward rows), and a device-to-device copy of x (forward rows: the
bandwidth limit). Ratios are baseline time / gnflex time (> 1: gnflex
faster); copy_fraction = copy time / gnflex time; gbps = bytes that must
move (x read, y written; backward: x, dy read, dx written) per second.

--budget-s stops starting new cases after that many seconds and still writes
what was measured (the one-command GPU check, .ci/gpu, runs it last).
"""
import argparse
import math
import sys
import time

import torch

import gnflex
from .cases import CUDA_CASES, QUICK_CUDA_CASES
from .common import geomean, make_inputs, native_group_norm, write_results

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def case_rows(cases):
    """(name, shape, groups, dtype, layout, activation, backward) in run order:
    every case without an activation first, then with SiLU (forward+backward,
    then forward, whose torch.compile baseline costs a compile per shape), so a
    run cut short by --budget-s still covers every shape."""
    rows = [(name, shape, groups, DTYPES[dtype], layout, activation, backward)
            for name, shape, groups, dtype, layouts in cases
            for layout in layouts
            for activation in ("none", "silu")
            for backward in (False, True)]
    return sorted(rows, key=lambda r: (r[5] != "none", r[5] != "none" and not r[6]))


def cuda_time(fn, iters=30, warmup=5):
    """Median of per-iteration CUDA-event times, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def make_fns(shape, groups, dtype, layout, activation, backward):
    x, w, b, dy = make_inputs(shape, dtype, layout, device="cuda", requires_grad=backward)
    native = native_group_norm(groups, activation)
    fns = {"gnflex": lambda: gnflex.group_norm(x, groups, w, b, activation=activation),
           "torch": lambda: native(x, w, b)}
    if activation == "silu" and not backward:
        compiled = torch.compile(native)
        fns["compile"] = lambda: compiled(x, w, b)
    if backward:
        return {k: (lambda f: lambda: torch.autograd.grad(f(), (x, w, b), dy))(f) for k, f in fns.items()}
    fns["copy"] = lambda: x.clone(memory_format=torch.preserve_format)
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(prog="gnflex bench cuda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="three cases")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no new case after this many seconds")
    p.add_argument("--md")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gnflex bench cuda: no CUDA device", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    machine = {"gpu": device, "torch": torch.__version__, "cuda": torch.version.cuda,
               "gnflex": gnflex.__version__}
    started = time.monotonic()
    rows, skipped = [], 0
    todo = case_rows(QUICK_CUDA_CASES if args.quick else CUDA_CASES)
    for name, shape, groups, dtype, layout, activation, backward in todo:
        if time.monotonic() - started > args.budget_s:
            skipped += 1
            continue
        try:
            t = {k: cuda_time(f) for k, f in make_fns(shape, groups, dtype, layout, activation, backward).items()}
        except torch.cuda.OutOfMemoryError:
            print(f"out of memory: {name} {shape}", flush=True)
            torch.cuda.empty_cache()
            continue
        moved = math.prod(shape) * torch.tensor([], dtype=dtype).element_size() * (3 if backward else 2)
        row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "layout": layout,
               "act": activation, "pass": "fwd+bwd" if backward else "fwd",
               "shape": "x".join(map(str, shape)), "groups": groups,
               **{f"{k}_ms": v for k, v in t.items()},
               "gbps": moved / t["gnflex"] / 1e6, "vs_torch": t["torch"] / t["gnflex"]}
        if "compile" in t:
            row["vs_compile"] = t["compile"] / t["gnflex"]
        if "copy" in t:
            row["copy_fraction"] = t["copy"] / t["gnflex"]
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del t
        torch.cuda.empty_cache()

    def mb(r):
        return math.prod(map(int, r["shape"].split("x"))) * (4 if r["dtype"] == "float32" else 2) / 2 ** 20

    summary = {
        "NCHW vs torch": geomean([r["vs_torch"] for r in rows if r["layout"] == "nchw"]),
        "channels_last fwd+bwd vs torch": geomean(
            [r["vs_torch"] for r in rows if r["layout"] == "channels_last" and r["pass"] == "fwd+bwd"]),
        "VAE and video vs torch": geomean([r["vs_torch"] for r in rows if r["case"] in ("vae", "video")]),
        "GN+SiLU vs torch.compile": geomean([r["vs_compile"] for r in rows if "vs_compile" in r]),
        "forward copy fraction (>= 32 MB)": geomean(
            [r["copy_fraction"] for r in rows if "copy_fraction" in r and mb(r) >= 32]),
    }
    summary_rows = [{"measure": k, "geomean": v} for k, v in summary.items()]
    print("\n".join(f"{k}: {v:.2f}" for k, v in summary.items()))
    if skipped:
        print(f"budget of {args.budget_s:.0f} s reached: {skipped} of {len(todo)} rows not run")
    machine["rows_not_run"] = skipped
    print("machine:", machine)
    write_results(args, f"CUDA benchmark on {device}", machine,
                  "vs_torch / vs_compile: baseline time / gnflex time (> 1: gnflex faster); copy_fraction: "
                  "x.clone() time / gnflex time (forward rows); gbps: bytes that must move / gnflex time.",
                  rows, summary_rows,
                  ["case", "dtype", "layout", "act", "pass", "shape", "groups", "gnflex_ms", "torch_ms",
                   "compile_ms", "copy_ms", "gbps", "vs_torch", "vs_compile", "copy_fraction"],
                  ["measure", "geomean"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
