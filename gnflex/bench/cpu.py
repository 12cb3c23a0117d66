"""CPU benchmark: gnflex vs torch, in the same process and run.

    gnflex bench cpu [--threads 2] [--quick] [--compile] [--jit] [--md out.md] [--json out.json]
    python bench/bench_cpu.py ...            (the same, from a checkout)

For each shape (from detection / classification / diffusion models), dtype
(fp32, bf16), layout (NCHW, channels_last), activation (none, SiLU) and pass
(forward, forward+backward), times with torch.utils.benchmark:
  gnflex    gnflex.group_norm (SiLU fused)
  torch     F.group_norm (+ F.silu); adagn+silu rows: F.silu(F.group_norm(x) * (1 + scale) + shift)
            against gnflex.modulated_group_norm, with per-sample (N, C) scale and shift
  compile   torch.compile (Inductor) of F.group_norm + F.silu   [--compile, fp32 SiLU rows]
  clone     x.clone(), the memory-traffic floor of the forward      [forward rows]
  jit       the JIT build of this checkout's csrc/ (gnflex.jit)     [--jit]
Each time is the smallest of --rounds medians (the rounds interleave the
contenders, which evens out a noisy machine). Ratios vs_* are baseline time /
gnflex time (> 1: gnflex faster); clone_ratio is gnflex time / clone time.
Forward+backward rows also record the bytes autograd saves for the backward
(saved_mb), which is what a training step keeps per layer.
"""
import argparse
import platform
import sys

import torch
import torch.utils.benchmark as benchmark

import gnflex
from .common import (MODULATED, geomean, make_inputs, make_modulation, native_group_norm, saved_tensor_bytes,
                     summarize, write_results)

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

# The CPU speed targets, on every machine the bench runs on (AVX2 and AVX-512
# alike): (name, row filter, ratio field, goal, higher is better[, or-else
# (field, goal, higher)]), each on the geomean over the shape set.
FP32_FWD = {"dtype": "float32", "act": "none", "pass": "fwd"}
TARGETS = [
    ("fp32 NCHW forward vs torch", {**FP32_FWD, "layout": "nchw"}, "vs_torch", 1.3, True,
     ("clone_ratio", 1.1, False)),
    ("fp32 channels_last forward vs torch", {**FP32_FWD, "layout": "channels_last"}, "vs_torch", 1.3, True),
    ("fp32 channels_last forward time / NCHW forward time", {**FP32_FWD, "layout": "channels_last"},
     "over_nchw", 1.2, False),
    ("fp32 NCHW forward+backward vs torch",
     {"dtype": "float32", "layout": "nchw", "act": "none", "pass": "fwd+bwd"}, "vs_torch", 1.3, True),
    ("fp32 channels_last forward+backward vs torch",
     {"dtype": "float32", "layout": "channels_last", "act": "none", "pass": "fwd+bwd"}, "vs_torch", 2.0, True),
    ("fp32 fused GN+SiLU forward+backward vs GN + F.silu", {"dtype": "float32", "act": "silu", "pass": "fwd+bwd"},
     "vs_torch", 2.0, True),
    ("fp32 fused AdaGN+SiLU forward+backward vs the eager composition",
     {"dtype": "float32", "act": MODULATED, "pass": "fwd+bwd"}, "vs_torch", 2.0, True),
    ("fp32 GN+SiLU vs torch.compile of GN+SiLU", {"dtype": "float32", "act": "silu"}, "vs_compile", 1.0, True),
    ("bf16 forward+backward vs torch", {"dtype": "bfloat16", "act": "none", "pass": "fwd+bwd"},
     "vs_torch", 1.3, True),
]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_case(shape, groups, dtype, layout, activation, backward, jit_ops, with_compile):
    """(timed functions, the ones to run once for saved bytes)."""
    x, w, b, dy = make_inputs(shape, dtype, layout, requires_grad=backward)
    native = native_group_norm(groups, activation)
    leaves = (x, w, b)
    if activation == MODULATED:
        scale, shift = make_modulation(x, requires_grad=backward)
        leaves = (x, w, b, scale, shift)
        forwards = {
            "gnflex": lambda: gnflex.modulated_group_norm(x, groups, scale, shift, w, b, activation="silu"),
            "torch": lambda: native(x, w, b, scale, shift),
        }
        jit_ops = with_compile = None
    else:
        forwards = {
            "gnflex": lambda: gnflex.group_norm(x, groups, w, b, activation=activation),
            "torch": lambda: native(x, w, b),
        }
    if with_compile and activation == "silu" and dtype == torch.float32:
        compiled = torch.compile(native, dynamic=False)
        forwards["compile"] = lambda: compiled(x, w, b)
    if jit_ops is not None:
        forwards["jit"] = lambda: jit_ops.group_norm(x, w, b, groups, 1e-5, activation)[0]
    if not backward:
        return {**forwards, "clone": lambda: x.clone()}, {}
    timed = {k: (lambda f: lambda: torch.autograd.grad(f(), leaves, dy))(f) for k, f in forwards.items()}
    return timed, {k: forwards[k] for k in ("gnflex", "torch")}


def measure(fns, rounds, min_run_time):
    """Smallest median over `rounds` interleaved rounds, in ms."""
    best = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            t = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
            best[name] = min(best.get(name, float("inf")), t)
    return best


def check_targets(rows):
    """Geomean of each target's rows and whether it (or its or-else goal) is met."""
    def goal(field, target, higher, where):
        ratios = [r[field] for r in rows if field in r and all(r[k] == v for k, v in where.items())]
        if not ratios:
            return None
        value = geomean(ratios)
        return value, f"{'>=' if higher else '<='} {target}" + ("" if field == "vs_torch" else f" ({field})"), \
            (value >= target if higher else value <= target)

    out = []
    for name, where, field, target, higher, *or_else in TARGETS:
        first = goal(field, target, higher, where)
        if first is None:
            continue
        value, text, met = first
        if or_else:
            second = goal(*or_else[0], where)
            if second is not None:
                value = f"{value:.3f} ({second[0]:.3f})"
                text, met = f"{text} or {second[1]}", met or second[2]
        out.append({"target": name, "value": value, "goal": text, "met": "yes" if met else "NO"})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="gnflex bench cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.1, help="seconds per timing round")
    p.add_argument("--quick", action="store_true", help="two shapes, fp32 only")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of GN + SiLU")
    p.add_argument("--jit", action="store_true", help="also time the JIT build of this checkout")
    p.add_argument("--md", help="write a markdown table here")
    p.add_argument("--json", help="write raw results here")
    args = p.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.min_run_time <= 0:
        p.error("--threads and --rounds must be >= 1, --min-run-time > 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    jit_ops = None
    if args.jit:
        from gnflex import jit as gnflex_jit

        jit_ops = gnflex_jit.load()

    machine = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
               "gnflex": gnflex.__version__, "python": platform.python_version(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    rows = []
    nchw_times = {}  # gnflex's NCHW time per case, for the channels_last rows' over_nchw
    for dtype in dtypes:
        for layout in ("nchw", "channels_last"):
            for activation in ("none", "silu", MODULATED):
                for backward in (False, True):
                    for shape, groups in shapes:
                        if layout == "channels_last" and len(shape) == 3:
                            continue  # an (N, C, L) input has no channels_last format
                        fns, saved_fns = make_case(shape, groups, dtype, layout, activation, backward,
                                                   jit_ops, args.compile)
                        t = measure(fns, args.rounds, args.min_run_time)
                        row = {"dtype": str(dtype).replace("torch.", ""), "layout": layout,
                               "act": activation, "pass": "fwd+bwd" if backward else "fwd",
                               "shape": "x".join(map(str, shape)),
                               **{f"{k}_ms": v for k, v in t.items()},
                               "vs_torch": t["torch"] / t["gnflex"]}
                        for name, fn in saved_fns.items():
                            row[f"{name}_saved_mb"] = saved_tensor_bytes(fn) / 2 ** 20
                        if "compile" in t:
                            row["vs_compile"] = t["compile"] / t["gnflex"]
                        if "jit" in t:
                            row["vs_jit"] = t["jit"] / t["gnflex"]
                        if "clone" in t:
                            row["clone_ratio"] = t["gnflex"] / t["clone"]
                        same_nchw = nchw_times.get((row["dtype"], activation, row["pass"], row["shape"]))
                        if layout == "nchw":
                            nchw_times[(row["dtype"], activation, row["pass"], row["shape"])] = t["gnflex"]
                        elif same_nchw is not None:
                            row["over_nchw"] = t["gnflex"] / same_nchw
                        rows.append(row)
                        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items()), flush=True)

    ratio_fields = ["vs_torch", "vs_compile", "vs_jit", "clone_ratio", "over_nchw"]
    summary = summarize(rows, ["dtype", "layout", "act", "pass"], ratio_fields)
    targets = check_targets(rows)
    print("\nGeomeans (vs_*: baseline time / gnflex time, > 1: gnflex faster; clone_ratio: gnflex / clone)")
    for s in summary:
        print("  " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in s.items() if not (isinstance(v, float) and v != v)))
    print("\nTargets (geomean over the shape set)")
    for tr in targets:
        value = f"{tr['value']:.2f}" if isinstance(tr["value"], float) else tr["value"]
        print(f"  {tr['target']}: {value} (goal {tr['goal']}) met: {tr['met']}")
    print("machine:", machine)
    present = [c for c in ratio_fields if any(c in r for r in rows)]
    columns = ["dtype", "layout", "act", "pass", "shape", "gnflex_ms", "torch_ms"] + \
        [c for c in ("compile_ms", "jit_ms", "clone_ms", "gnflex_saved_mb", "torch_saved_mb")
         if any(c in r for r in rows)] + present
    write_results(args, "CPU benchmark: gnflex vs torch", machine,
                  "Ratios vs_*: baseline time / gnflex time (> 1: gnflex faster). clone_ratio: gnflex time / "
                  "x.clone() time (forward only). SiLU rows: gnflex fuses it; torch runs F.group_norm then "
                  "F.silu. *_saved_mb: bytes autograd keeps for the backward (forward+backward rows). over_nchw: "
                  "gnflex's channels_last time / its NCHW time for the same case.",
                  rows, summary, columns, ["dtype", "layout", "act", "pass"] + present,
                  extra_tables=[("Targets", targets, ["target", "value", "goal", "met"])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
