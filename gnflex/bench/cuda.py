"""CUDA benchmark: gnflex vs torch on one GPU, same process, same run.

    gnflex bench cuda [--quick] [--md bench/results/cuda_<gpu>.md] [--json ...]
    python bench/bench_cuda.py ...           (the same, from a checkout)

Cases: detection / diffusion shapes, fp16 / bf16 / fp32, NCHW and
channels_last, forward and forward+backward, with and without SiLU.
Baselines measured in the same run: torch's native GroupNorm, native GN +
F.silu, torch.compile of native GN (+ SiLU), and a plain copy (x.clone()),
the bandwidth limit for the forward. Ratios are baseline time / gnflex time
(> 1: gnflex faster), except "copy fraction" = copy time / gnflex time.

Targets (issue 4, geomean, H100): forward >= 1.5x native; channels_last
forward+backward >= 2.5x native; fused GN+SiLU >= 1.1x torch.compile;
forward >= 85% of copy bandwidth on large shapes; (1,256,128,128) G=32 >= 3x.
"""
import argparse
import math
import sys

import torch

import gnflex
from .common import geomean, make_inputs, native_group_norm, write_results

SHAPES = [  # (shape, groups)
    ((8, 256, 64, 64), 32),
    ((2, 512, 64, 64), 32),
    ((1, 320, 128, 128), 32),
    ((16, 128, 32, 32), 32),
    ((1, 256, 128, 128), 32),
    ((2, 128, 16, 32, 32), 32),
]
QUICK_SHAPES = [((8, 256, 64, 64), 32), ((1, 256, 128, 128), 32)]


def cuda_time(fn, iters=50, warmup=10):
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

    def ours():
        return gnflex.group_norm(x, groups, w, b, activation=activation)

    compiled = torch.compile(native)

    def with_backward(fn):
        return lambda: torch.autograd.grad(fn(), (x, w, b), dy)

    fns = {"gnflex": ours, "torch": lambda: native(x, w, b), "compile": lambda: compiled(x, w, b)}
    if backward:
        fns = {k: with_backward(v) for k, v in fns.items()}
    else:
        fns["copy"] = lambda: x.clone(memory_format=torch.preserve_format)
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(prog="gnflex bench cuda", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--md")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    machine = {"gpu": device, "torch": torch.__version__, "cuda": torch.version.cuda,
               "gnflex": gnflex.__version__}
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16, torch.float32]
    rows = []
    for dtype in dtypes:
        for layout in ("nchw", "channels_last"):
            for activation in ("none", "silu"):
                for backward in (False, True):
                    for shape, groups in shapes:
                        fns = make_fns(shape, groups, dtype, layout, activation, backward)
                        t = {k: cuda_time(f) for k, f in fns.items()}
                        row = {"dtype": str(dtype).replace("torch.", ""), "layout": layout,
                               "activation": activation, "pass": "fwd+bwd" if backward else "fwd",
                               "shape": "x".join(map(str, shape)), "groups": groups,
                               **{f"{k}_ms": v for k, v in t.items()},
                               "vs_torch": t["torch"] / t["gnflex"],
                               "vs_compile": t["compile"] / t["gnflex"]}
                        if "copy" in t:
                            row["copy_fraction"] = t["copy"] / t["gnflex"]
                        rows.append(row)
                        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                              flush=True)

    summary = {
        "forward vs native": geomean([r["vs_torch"] for r in rows if r["pass"] == "fwd"]),
        "channels_last fwd+bwd vs native": geomean(
            [r["vs_torch"] for r in rows if r["pass"] == "fwd+bwd" and r["layout"] == "channels_last"]),
        "GN+SiLU vs torch.compile": geomean([r["vs_compile"] for r in rows if r["activation"] == "silu"]),
        "forward copy fraction (large shapes)": geomean(
            [r["copy_fraction"] for r in rows if r["pass"] == "fwd" and
             math.prod(map(int, r["shape"].split("x"))) >= 2 ** 24]),
        "(1,256,128,128) vs native": geomean([r["vs_torch"] for r in rows if r["shape"] == "1x256x128x128"]),
    }
    print("\n".join(f"{k}: {v:.2f}" for k, v in summary.items()))
    print("machine:", machine)
    write_results(args, f"CUDA benchmark on {device}", machine,
                  "vs_torch / vs_compile: baseline time / gnflex time (> 1: gnflex faster); copy_fraction: "
                  "x.clone() time / gnflex time (forward only).",
                  rows, [{"measure": k, "geomean": v} for k, v in summary.items()],
                  ["dtype", "layout", "activation", "pass", "shape", "gnflex_ms", "torch_ms", "compile_ms",
                   "vs_torch", "vs_compile"], ["measure", "geomean"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
