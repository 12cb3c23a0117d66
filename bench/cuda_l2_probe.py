"""How much of a re-read hits L2: a read-only pass (x.sum()) over buffers of
8-40 MB, timed cold (after a flush larger than L2) and again right after a
first pass, on the GPU at hand. The output pass of gnflex's two-pass kernels
re-reads x a lag of ~kLagRounds x kRoundBytes after its statistics pass read
it (csrc/cuda/group_norm_launch.cuh); this says how far that distance can go.

    python bench/cuda_l2_probe.py [--md out.md]
"""
import argparse
import statistics

import torch

from gnflex.bench.common import print_and_save
from gnflex.bench.cuda import event_ms


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--md")
    args = p.parse_args()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    flush = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")
    lines = [f"# L2 re-read probe on {torch.cuda.get_device_name()} (L2 {l2 / 2 ** 20:.0f} MB)", "",
             "| MB | cold read GB/s | re-read GB/s | re-read / cold |", "|---|---|---|---|"]
    for mb in (8, 16, 24, 32, 40, 48):
        x = torch.ones(mb << 18, dtype=torch.float32, device="cuda")  # mb MB
        cold, warm = [], []
        for _ in range(9):
            flush.zero_()
            cold.append(event_ms(x.sum))
            warm.append(event_ms(x.sum))
        c, w = statistics.median(cold), statistics.median(warm)
        gbps = lambda ms: (mb << 20) / ms / 1e6  # noqa: E731
        lines.append(f"| {mb} | {gbps(c):.0f} | {gbps(w):.0f} | {c / w:.2f} |")
        del x
    print_and_save(lines, args.md)


if __name__ == "__main__":
    main()
