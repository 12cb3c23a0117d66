"""Where the time of one gnflex CUDA call goes: GPU time per kernel (from
torch.profiler) for gnflex's forward and backward and torch's, and the host
time per call (no GPU wait), for a few shapes. Needs a GPU.

    python bench/cuda_kernel_times.py [--md out.md]

The shapes are the bench cases where gnflex was furthest from the copy speed
or from torch on an H200 (bench/results/cuda_nvidia_h200_*.md), plus a small
one where launch and host overheads dominate.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import gnflex
from gnflex.bench.common import make_inputs, native_group_norm, print_and_save

CASES = [  # (shape, groups, dtype, layout)
    ((1024, 256, 7, 7), 32, torch.float32, "nchw"),
    ((1024, 256, 7, 7), 32, torch.float32, "channels_last"),
    ((1, 512, 16, 180, 320), 32, torch.bfloat16, "nchw"),
    ((1, 512, 16, 180, 320), 32, torch.bfloat16, "channels_last"),
    ((8, 960, 64, 64), 32, torch.float16, "channels_last"),
    ((13, 18, 32, 32), 6, torch.float16, "nchw"),
]


def kernel_times(fn, iters=10):
    """{kernel name: GPU microseconds per call} over `iters` calls."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:  # full names as keys: kernels that share a prefix stay apart
            out[e.key] = out.get(e.key, 0.0) + us / iters
    return out


def short(name, width=110):
    return name if len(name) <= width else name[: width - 3] + "..."


def host_us(fn, iters=200):
    """Host microseconds per call when the GPU keeps up (tiny work)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - start) / iters * 1e6
    torch.cuda.synchronize()
    return host


def ncu_run():
    """One forward and one forward+backward of the first, third and fifth case
    (for ncu, which profiles every kernel launched)."""
    for shape, groups, dtype, layout in CASES[0:5:2]:
        x, w, b, dy = make_inputs(shape, dtype, layout, device="cuda", requires_grad=True)
        y = gnflex.group_norm(x, groups, w, b)
        torch.autograd.grad(y, (x, w, b), dy)
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--md")
    p.add_argument("--ncu", action="store_true", help="only run three shapes once (under ncu)")
    args = p.parse_args()
    if args.ncu:
        ncu_run()
        return
    lines = [f"# Kernel times on {torch.cuda.get_device_name()} (torch {torch.__version__})", ""]
    for shape, groups, dtype, layout in CASES:
        x, w, b, dy = make_inputs(shape, dtype, layout, device="cuda", requires_grad=True)
        native = native_group_norm(groups, "none")
        impls = {"gnflex": lambda x=x, w=w, b=b: gnflex.group_norm(x, groups, w, b),
                 "torch": lambda x=x, w=w, b=b: native(x, w, b)}
        lines.append(f"## {'x'.join(map(str, shape))} G={groups} {str(dtype)[6:]} {layout}")
        for name, f in impls.items():
            with torch.no_grad():
                fwd = kernel_times(f)
                fwd_host = host_us(f)
            bwd = kernel_times(lambda f=f, x=x, w=w, b=b, dy=dy: torch.autograd.grad(f(), (x, w, b), dy))
            lines.append(f"- {name} forward: {sum(fwd.values()):.1f} us GPU, {fwd_host:.1f} us host per call")
            lines += [f"  - {us:8.1f} us  {short(k)}" for k, us in sorted(fwd.items(), key=lambda kv: -kv[1])]
            lines.append(f"- {name} forward+backward: {sum(bwd.values()):.1f} us GPU")
            lines += [f"  - {us:8.1f} us  {short(k)}" for k, us in sorted(bwd.items(), key=lambda kv: -kv[1])]
        lines.append("")
        del x, w, b, dy
        torch.cuda.empty_cache()
    print_and_save(lines, args.md)


if __name__ == "__main__":
    main()
