"""CPU benchmark: gnflex vs torch, in the same process and run.

    python bench/bench_cpu.py [--threads 2] [--quick] [--jit] [--md out.md] [--json out.json]

For each shape (from detection / classification / diffusion models), dtype
(fp32, bf16), layout (NCHW, channels_last), activation (none, SiLU) and pass
(forward, forward+backward), times with torch.utils.benchmark:
  gnflex    gnflex.group_norm (SiLU fused)
  torch     F.group_norm (+ F.silu)
  compile   torch.compile (Inductor) of F.group_norm (+ F.silu)   [--compile]
  clone     x.clone(), the memory-traffic floor of the forward      [forward rows]
  jit       the JIT build of this checkout's csrc/ (gnflex.jit)     [--jit]
Ratios are baseline time / gnflex time (> 1: gnflex faster); "clone_ratio"
is gnflex time / clone time (the issue's target is <= 1.3).
"""
import argparse
import platform
import sys

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

import gnflex
from _common import summarize, write_results

SHAPES = [  # (shape, groups)
    ((8, 64, 56, 56), 32),
    ((32, 32, 112, 112), 32),
    ((8, 256, 32, 32), 32),
    ((64, 1024, 7, 7), 32),
    ((2, 512, 64, 64), 32),
    ((1, 320, 64, 64), 32),
    ((4, 128, 16, 16, 16), 32),
    ((16, 128, 1024), 32),
    ((1, 256, 56, 56), 32),
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


def make_fns(shape, groups, dtype, layout, activation, backward, jit_ops, with_compile):
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last" and len(shape) in (4, 5):
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    w = torch.rand(shape[1], dtype=dtype) + 0.5
    b = torch.randn(shape[1], dtype=dtype)
    if backward:
        for t in (x, w, b):
            t.requires_grad_()
    dy = torch.randn_like(x)

    def native(x, w, b):
        y = F.group_norm(x, groups, w, b)
        return F.silu(y) if activation == "silu" else y

    fns = {
        "gnflex": lambda: gnflex.group_norm(x, groups, w, b, activation=activation),
        "torch": lambda: native(x, w, b),
    }
    if with_compile:
        compiled = torch.compile(native)
        fns["compile"] = lambda: compiled(x, w, b)
    if jit_ops is not None:
        fns["jit"] = lambda: jit_ops.group_norm(x, w, b, groups, 1e-5, activation)[0]
    if backward:
        fns = {k: (lambda f: lambda: torch.autograd.grad(f(), (x, w, b), dy))(f) for k, f in fns.items()}
    else:
        fns["clone"] = lambda: x.clone()
    return fns


def measure(fn, min_run_time):
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--quick", action="store_true", help="two shapes, fp32 only")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of GN (+SiLU)")
    p.add_argument("--jit", action="store_true", help="also time the JIT build of this checkout")
    p.add_argument("--md", help="write a markdown table here")
    p.add_argument("--json", help="write raw results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    jit_ops = None
    if args.jit:
        from gnflex import jit as gnflex_jit  # a plain `import gnflex.jit` would make gnflex local here

        jit_ops = gnflex_jit.load()

    machine = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
               "gnflex": gnflex.__version__, "python": platform.python_version(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    rows = []
    for dtype in dtypes:
        for layout in ("nchw", "channels_last"):
            for activation in ("none", "silu"):
                for backward in (False, True):
                    for shape, groups in shapes:
                        if layout == "channels_last" and len(shape) == 3:
                            continue  # an (N, C, L) input has no channels_last format
                        fns = make_fns(shape, groups, dtype, layout, activation, backward, jit_ops, args.compile)
                        t = {k: measure(f, args.min_run_time) * 1e3 for k, f in fns.items()}
                        row = {"dtype": str(dtype).replace("torch.", ""), "layout": layout,
                               "act": activation, "pass": "fwd+bwd" if backward else "fwd",
                               "shape": "x".join(map(str, shape)),
                               **{f"{k}_ms": v for k, v in t.items()},
                               "vs_torch": t["torch"] / t["gnflex"]}
                        if "compile" in t:
                            row["vs_compile"] = t["compile"] / t["gnflex"]
                        if "jit" in t:
                            row["vs_jit"] = t["jit"] / t["gnflex"]
                        if "clone" in t:
                            row["clone_ratio"] = t["gnflex"] / t["clone"]
                        rows.append(row)
                        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items()), flush=True)

    ratio_fields = ["vs_torch", "vs_compile", "vs_jit", "clone_ratio"]
    summary = summarize(rows, ["dtype", "layout", "act", "pass"], ratio_fields)
    print("\nGeomeans (vs_*: baseline time / gnflex time, > 1: gnflex faster; clone_ratio: gnflex / clone)")
    for s in summary:
        print("  " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    print("machine:", machine)
    columns = ["dtype", "layout", "act", "pass", "shape", "gnflex_ms", "torch_ms"] + \
        [c for c in ("compile_ms", "jit_ms", "clone_ms") if any(c in r for r in rows)] + \
        [c for c in ratio_fields if any(c in r for r in rows)]
    write_results(args, "CPU benchmark: gnflex vs torch", machine,
                  "Ratios vs_*: baseline time / gnflex time (> 1: gnflex faster). clone_ratio: gnflex time / "
                  "x.clone() time (forward only). SiLU rows: gnflex fuses it; torch runs F.group_norm then F.silu.",
                  rows, summary, columns,
                  ["dtype", "layout", "act", "pass"] + [c for c in ratio_fields if any(c in r for r in rows)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
