"""CPU benchmark: gnflex vs torch's native GroupNorm, same process, same run.

    python bench/bench_cpu.py [--threads 2] [--quick] [--md results.md] [--json results.json]

Times forward and forward+backward with torch.utils.benchmark for a few
shapes, fp32 and bf16, NCHW and channels_last, with and without a SiLU (fused
in gnflex, F.silu after native GN for torch). Ratio = torch time / gnflex
time, so > 1 means gnflex is faster. The geomean per category closes the table.
"""
import argparse
import json
import math
import platform
import sys

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

import gnflex

SHAPES = [  # (shape, groups)
    ((8, 64, 56, 56), 32),
    ((8, 256, 32, 32), 32),
    ((2, 512, 64, 64), 32),
    ((1, 320, 64, 64), 32),
    ((64, 1024, 7, 7), 32),
    ((4, 128, 16, 16, 16), 32),
]
QUICK_SHAPES = [((8, 64, 56, 56), 32), ((8, 256, 32, 32), 32)]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_case(shape, groups, dtype, layout, activation, backward):
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.to(memory_format=fmt)
    w = torch.rand(shape[1], dtype=dtype) + 0.5
    b = torch.randn(shape[1], dtype=dtype)
    if backward:
        for t in (x, w, b):
            t.requires_grad_()
    dy = torch.randn_like(x)

    def ours():
        return gnflex.group_norm(x, groups, w, b, activation=activation)

    def native():
        y = F.group_norm(x, groups, w, b)
        return F.silu(y) if activation == "silu" else y

    if backward:
        def run(fn):
            return lambda: torch.autograd.grad(fn(), (x, w, b), dy)
        return run(ours), run(native)
    return ours, native


def measure(fn, min_run_time):
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--quick", action="store_true", help="two shapes, fp32 only")
    p.add_argument("--md", help="write a markdown table here")
    p.add_argument("--json", help="write raw results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    machine = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "gnflex": gnflex.__version__,
        "python": platform.python_version(),
    }
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    rows = []
    for dtype in dtypes:
        for layout in ("nchw", "channels_last"):
            for activation in ("none", "silu"):
                for backward in (False, True):
                    for shape, groups in shapes:
                        ours, native = make_case(shape, groups, dtype, layout, activation, backward)
                        t_ours = measure(ours, args.min_run_time)
                        t_native = measure(native, args.min_run_time)
                        row = {
                            "dtype": str(dtype).replace("torch.", ""), "layout": layout,
                            "activation": activation, "pass": "fwd+bwd" if backward else "fwd",
                            "shape": "x".join(map(str, shape)), "groups": groups,
                            "gnflex_ms": t_ours * 1e3, "torch_ms": t_native * 1e3,
                            "ratio": t_native / t_ours,
                        }
                        rows.append(row)
                        print(f"{row['dtype']:9s} {layout:13s} {activation:5s} {row['pass']:8s} "
                              f"{row['shape']:16s} gnflex {row['gnflex_ms']:8.3f} ms  torch "
                              f"{row['torch_ms']:8.3f} ms  ratio {row['ratio']:5.2f}", flush=True)

    categories = {}
    for r in rows:
        categories.setdefault((r["dtype"], r["layout"], r["activation"], r["pass"]), []).append(r["ratio"])
    summary = [
        {"dtype": k[0], "layout": k[1], "activation": k[2], "pass": k[3],
         "geomean_ratio": math.exp(sum(math.log(v) for v in vals) / len(vals))}
        for k, vals in categories.items()
    ]
    print("\nGeomean ratio (torch time / gnflex time; > 1: gnflex faster)")
    for s in summary:
        print(f"  {s['dtype']:9s} {s['layout']:13s} {s['activation']:5s} {s['pass']:8s} {s['geomean_ratio']:5.2f}")
    print("machine:", machine)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows, "summary": summary}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write("# CPU benchmark: gnflex vs torch native GroupNorm\n\n")
            f.write("Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + "\n\n")
            f.write("Ratio = torch time / gnflex time (> 1: gnflex faster). SiLU rows: gnflex fuses it, "
                    "torch runs native GN then F.silu.\n\n")
            f.write("## Geomean per category\n\n| dtype | layout | act | pass | geomean ratio |\n|---|---|---|---|---|\n")
            for s in summary:
                f.write(f"| {s['dtype']} | {s['layout']} | {s['activation']} | {s['pass']} | {s['geomean_ratio']:.2f} |\n")
            f.write("\n## All cases\n\n| dtype | layout | act | pass | shape | G | gnflex ms | torch ms | ratio |\n"
                    "|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                f.write(f"| {r['dtype']} | {r['layout']} | {r['activation']} | {r['pass']} | {r['shape']} | "
                        f"{r['groups']} | {r['gnflex_ms']:.3f} | {r['torch_ms']:.3f} | {r['ratio']:.2f} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
