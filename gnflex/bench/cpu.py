"""CPU benchmark: gnflex vs torch and the memory copy, in the same process and run.

    gnflex bench cpu [--threads 2] [--quick] [--dtypes float32,bfloat16] [--compile] [--jit]
                     [--save] [--md out.md] [--json out.json]
    python bench/bench_cpu.py ...            (the same, from a checkout)

For each shape (from detection / classification / diffusion models), dtype
(fp32, bf16, fp16), layout (NCHW, channels_last), activation (none, SiLU,
AdaGN + SiLU) and pass (forward, forward+backward), times with
torch.utils.benchmark:
  gnflex    gnflex.group_norm (SiLU fused)
  torch     F.group_norm (+ F.silu); adagn+silu rows: F.silu(F.group_norm(x) * (1 + scale) + shift)
            against gnflex.modulated_group_norm, with per-sample (N, C) scale and shift
  clone     x.clone(): one read and one write of x, the floor every row is measured against
  elementwise  one torch elementwise pass doing the forward's per-value work
            besides normalizing: x + 1 (bf16/fp16: the conversions), F.silu(x)
            (and its exp and division) for SiLU rows; forward rows only
  compile   torch.compile (Inductor) of F.group_norm + F.silu   [--compile, fp32 SiLU rows]
  jit       the JIT build of this checkout's csrc/ (gnflex.jit)     [--jit]
Each time is the smallest of --rounds medians; the rounds interleave the
contenders, so a noisy machine slows all of them alike. Ratios vs_* are
baseline time / gnflex time (> 1: gnflex faster); over_clone is gnflex time /
clone time (torch_over_clone the same for torch), over_elementwise gnflex
time / elementwise time (near 1: bound by the per-value arithmetic that any
single pass pays, not by memory); spread is gnflex's largest
median / its smallest over the rounds. Forward+backward rows also record the
bytes autograd saves for the backward (saved_mb), which is what a training
step keeps per layer. --save writes cpu_<cpu>_<isa>_torch<v>.md and .json,
named by the machine, into bench/results/ (from a checkout's root) or here.
"""
import argparse
import math
import os
import platform
import re
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
    ((1, 128, 256, 256), 32),
    ((2, 32, 64, 64, 64), 32),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATIONS = ("none", "silu", MODULATED)
QUICK_SHAPES = [((8, 64, 56, 56), 32), ((8, 256, 32, 32), 32)]

# The CPU speed targets, on every machine the bench runs on (AVX2 and AVX-512
# alike). Per row: (name, row filter, ratio field, goal, higher is better,
# which rows by their x bytes against the L3); each must hold on every row it
# covers. Geomeans: (name, row filter, field, goal, higher is better), over
# the shape set.
FWD = {"pass": "fwd"}
ROW_TARGETS = [
    ("forward time / clone, tensors within half the L3", FWD, "over_clone", 1.5, False, "within"),
    ("forward time / clone, larger tensors", FWD, "over_clone", 1.25, False, "beyond"),
    ("forward+backward time / clone", {"pass": "fwd+bwd"}, "over_clone", 4.0, False, "all"),
    ("every row vs torch", {}, "vs_torch", 0.95, True, "all"),
]
TARGETS = [
    ("fp32 channels_last forward+backward vs torch",
     {"dtype": "float32", "layout": "channels_last", "act": "none", "pass": "fwd+bwd"}, "vs_torch", 2.0, True),
    ("fp32 fused GN+SiLU forward+backward vs GN + F.silu", {"dtype": "float32", "act": "silu", "pass": "fwd+bwd"},
     "vs_torch", 2.0, True),
    ("fp32 fused AdaGN+SiLU forward+backward vs the eager composition",
     {"dtype": "float32", "act": MODULATED, "pass": "fwd+bwd"}, "vs_torch", 2.0, True),
    ("bf16 forward+backward vs torch", {"dtype": "bfloat16", "act": "none", "pass": "fwd+bwd"},
     "vs_torch", 1.5, True),
    ("fp32 GN+SiLU vs torch.compile of GN+SiLU", {"dtype": "float32", "act": "silu"}, "vs_compile", 1.0, True),
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


def retain_freed_memory():
    """Keep freed memory in the process (glibc's malloc) instead of giving
    large blocks back to the OS, so that no contender pays page faults on
    fresh memory for its outputs on every call. With glibc's defaults, a
    forward+backward that frees two large tensors returns them (past the
    dynamic trim threshold) and touches new pages on the next call: that cost
    more than the kernels themselves, and varied with the allocator's state.
    Returns what the results record as the allocator."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return "default (no glibc mallopt)"
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        return "default (mallopt refused)"
    return "glibc, freed memory retained (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"


def isa_flags():
    """The vector extensions this CPU reports that the kernels could use."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_fp16", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return " ".join(w for w in wanted if w in flags) or "none of " + ", ".join(wanted)


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
    clone = {"clone": lambda: x.detach().clone()}
    if not backward:
        elementwise = torch.nn.functional.silu if activation != "none" else (lambda t: t + 1)
        return {**forwards, **clone, "elementwise": lambda: elementwise(x)}, {}
    timed = {k: (lambda f: lambda: torch.autograd.grad(f(), leaves, dy))(f) for k, f in forwards.items()}
    return {**timed, **clone}, {k: forwards[k] for k in ("gnflex", "torch")}


def measure(fns, rounds, min_run_time):
    """Per contender, the medians (ms) of `rounds` interleaved rounds."""
    medians = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            medians[name].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return medians


def row_label(r):
    return f"{r['dtype']} {r['layout']} {r['act']} {r['pass']} {r['shape']}"


def check_targets(rows, l3_bytes):
    """Each target: its worst row (per-row goals) or geomean, and whether it is met."""
    def matches(r, where):
        return all(r[k] == v for k, v in where.items())

    def fits(r, which):
        within = r["x_mb"] * 2 ** 20 <= l3_bytes / 2
        return which == "all" or within == (which == "within")

    out = []
    for name, where, field, goal, higher, which in ROW_TARGETS:
        covered = [r for r in rows if matches(r, where) and fits(r, which) and field in r]
        if not covered:
            continue
        missed_rows = [r for r in covered if not (r[field] >= goal if higher else r[field] <= goal)]
        worst = (min if higher else max)(covered, key=lambda r: r[field])
        # How far the missed rows are from one elementwise pass of the same
        # per-value work: near 1, the arithmetic and not memory is the floor.
        missed = [r["over_elementwise"] for r in missed_rows if "over_elementwise" in r]
        out.append({"target": name, "value": worst[field], "goal": f"{'>=' if higher else '<='} {goal} on every row",
                    "met": f"NO ({len(missed_rows)} of {len(covered)})" if missed_rows else "yes",
                    "worst": row_label(worst), "missed_over_elementwise": max(missed) if missed else ""})
    for name, where, field, goal, higher in TARGETS:
        ratios = [r[field] for r in rows if field in r and matches(r, where)]
        if not ratios:
            continue
        value = geomean(ratios)
        out.append({"target": name, "value": value, "goal": f"{'>=' if higher else '<='} {goal} (geomean)",
                    "met": "yes" if (value >= goal if higher else value <= goal) else "NO", "worst": "",
                    "missed_over_elementwise": ""})
    return out


def machine_slug(machine):
    """bench/results file stem for this machine: cpu_<model>_<isa>_torch<version>."""
    model = re.sub(r"\(r\)|\(tm\)|cpu|processor|\d+-core", " ", machine["cpu"].lower())
    model = "_".join(re.findall(r"[a-z0-9]+", model))[:40]
    return f"cpu_{model}_{machine['cpu_capability'].lower()}_torch{machine['torch'].split('+')[0]}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="gnflex bench cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-run-time", type=float, default=0.1, help="seconds per timing round")
    p.add_argument("--quick", action="store_true", help="two shapes, fp32 only")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of " + ", ".join(DTYPES))
    p.add_argument("--shapes", help="only these shapes, e.g. 8x64x56x56,1x128x256x256")
    p.add_argument("--acts", default=",".join(ACTIVATIONS), help="comma-separated, of " + ", ".join(ACTIVATIONS))
    p.add_argument("--compile", action="store_true", help="also time torch.compile of GN + SiLU")
    p.add_argument("--jit", action="store_true", help="also time the JIT build of this checkout")
    p.add_argument("--malloc", choices=("retain", "default"), default="retain",
                   help="retain (default): keep freed memory in the process, so outputs do not pay page faults on "
                        "every call (glibc); default: the allocator as it is")
    p.add_argument("--save", action="store_true", help="write bench/results/<machine>.md and .json")
    p.add_argument("--md", help="write a markdown table here")
    p.add_argument("--json", help="write raw results here")
    args = p.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.min_run_time <= 0:
        p.error("--threads and --rounds must be >= 1, --min-run-time > 0")
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        p.error(f"--dtypes: unknown {', '.join(unknown)} (of {', '.join(DTYPES)})")
    acts = args.acts.split(",")
    if any(a not in ACTIVATIONS for a in acts):
        p.error(f"--acts: each of {', '.join(ACTIVATIONS)}; got {args.acts}")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = [(sh, g) for sh, g in SHAPES if "x".join(map(str, sh)) in wanted]
        if len(shapes) != len(wanted):
            p.error("--shapes: each of " + ", ".join("x".join(map(str, sh)) for sh, _ in SHAPES))
    dtypes = [torch.float32] if args.quick else [DTYPES[d] for d in args.dtypes.split(",")]
    allocator = retain_freed_memory() if args.malloc == "retain" else "default"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    jit_ops = None
    if args.jit:
        from gnflex import jit as gnflex_jit

        jit_ops = gnflex_jit.load()

    from gnflex import _C

    tuning = _C.cpu_tuning()
    machine = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
               "gnflex": gnflex.__version__, "python": platform.python_version(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "gnflex_variant": tuning["kernel_variant"],
               "caches": f"L1d {tuning['l1d'] >> 10} KiB, L2 {tuning['l2'] >> 10} KiB, L3 {tuning['l3'] >> 20} MiB",
               "isa": isa_flags(), "allocator": allocator}
    rows = []
    nchw_times = {}  # gnflex's NCHW time per case, for the channels_last rows' over_nchw
    for dtype in dtypes:
        for layout in ("nchw", "channels_last"):
            for activation in acts:
                for backward in (False, True):
                    for shape, groups in shapes:
                        if layout == "channels_last" and len(shape) == 3:
                            continue  # an (N, C, L) input has no channels_last format
                        fns, saved_fns = make_case(shape, groups, dtype, layout, activation, backward,
                                                   jit_ops, args.compile)
                        medians = measure(fns, args.rounds, args.min_run_time)
                        t = {k: min(v) for k, v in medians.items()}
                        row = {"dtype": str(dtype).replace("torch.", ""), "layout": layout,
                               "act": activation, "pass": "fwd+bwd" if backward else "fwd",
                               "shape": "x".join(map(str, shape)),
                               "x_mb": math.prod(shape) * dtype.itemsize / 2 ** 20,
                               **{f"{k}_ms": v for k, v in t.items()},
                               "vs_torch": t["torch"] / t["gnflex"],
                               "over_clone": t["gnflex"] / t["clone"],
                               "torch_over_clone": t["torch"] / t["clone"],
                               "spread": max(medians["gnflex"]) / t["gnflex"]}
                        for name, fn in saved_fns.items():
                            row[f"{name}_saved_mb"] = saved_tensor_bytes(fn) / 2 ** 20
                        if "elementwise" in t:
                            row["over_elementwise"] = t["gnflex"] / t["elementwise"]
                        if "compile" in t:
                            row["vs_compile"] = t["compile"] / t["gnflex"]
                        if "jit" in t:
                            row["vs_jit"] = t["jit"] / t["gnflex"]
                        same_nchw = nchw_times.get((row["dtype"], activation, row["pass"], row["shape"]))
                        if layout == "nchw":
                            nchw_times[(row["dtype"], activation, row["pass"], row["shape"])] = t["gnflex"]
                        elif same_nchw is not None:
                            row["over_nchw"] = t["gnflex"] / same_nchw
                        rows.append(row)
                        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items()), flush=True)

    ratio_fields = ["vs_torch", "vs_compile", "vs_jit", "over_clone", "torch_over_clone", "over_elementwise",
                    "over_nchw"]
    summary = summarize(rows, ["dtype", "layout", "act", "pass"], ratio_fields)
    targets = check_targets(rows, tuning["l3"])
    print("\nGeomeans (vs_*: baseline time / gnflex time, > 1: gnflex faster; over_clone: gnflex / clone)")
    for s in summary:
        print("  " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in s.items() if not (isinstance(v, float) and v != v)))
    print("\nTargets")
    for tr in targets:
        print(f"  {tr['target']}: {tr['value']:.2f} (goal {tr['goal']}) met: {tr['met']}"
              + (f", worst: {tr['worst']}" if tr["worst"] else "")
              + (f", missed rows at most {tr['missed_over_elementwise']:.2f}x one elementwise pass"
                 if tr["missed_over_elementwise"] != "" else ""))
    print("machine:", machine)
    if args.save:
        # A checkout's bench/results when run from its root, else here.
        folder = os.path.join("bench", "results") if os.path.isdir(os.path.join("bench", "results")) else "."
        stem = os.path.join(folder, machine_slug(machine))
        args.md, args.json = args.md or stem + ".md", args.json or stem + ".json"
        print("results:", os.path.normpath(args.md), os.path.normpath(args.json))
    present = [c for c in ratio_fields if any(c in r for r in rows)]
    columns = ["dtype", "layout", "act", "pass", "shape", "x_mb", "gnflex_ms", "torch_ms", "clone_ms"] + \
        [c for c in ("elementwise_ms", "compile_ms", "jit_ms", "gnflex_saved_mb", "torch_saved_mb")
         if any(c in r for r in rows)] + \
        present + ["spread"]
    write_results(args, "CPU benchmark: gnflex vs torch and the memory copy", machine,
                  "Ratios vs_*: baseline time / gnflex time (> 1: gnflex faster). over_clone: gnflex time / "
                  "x.clone() time in the same run (torch_over_clone: torch's). over_elementwise (forward rows): "
                  "gnflex time / one torch elementwise pass with the same per-value work besides normalizing "
                  "(x + 1: bf16/fp16 conversions; F.silu(x): exp and division), the compute floor where it exceeds "
                  "the copy. SiLU rows: gnflex fuses it; torch "
                  "runs F.group_norm then F.silu. *_saved_mb: bytes autograd keeps for the backward "
                  "(forward+backward rows). over_nchw: gnflex's channels_last time / its NCHW time for the same "
                  "case. spread: gnflex's largest median / its smallest over the rounds.",
                  rows, summary, columns, ["dtype", "layout", "act", "pass"] + present,
                  extra_tables=[("Targets", targets,
                                     ["target", "value", "goal", "met", "worst", "missed_over_elementwise"])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
