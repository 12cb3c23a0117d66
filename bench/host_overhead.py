"""What gnflex's Python layer adds per call over the raw op, on a tiny CPU
input (the kernel's own time is the same in every contender): the op
(torch.ops.gnflex.group_norm), the functional API, the GroupNormFlex module,
and torch's F.group_norm / nn.GroupNorm for scale; under no_grad, then
recorded (forward and backward through torch.autograd.grad, what a training
step pays per layer). Rounds interleave the contenders; each round's median
per contender, then the minimum over rounds.

    python bench/host_overhead.py [--rounds 7] [--md out.md]
"""
import argparse
import statistics
import timeit

import torch
import torch.nn.functional as F

import gnflex
from gnflex.bench.common import print_and_save
from gnflex.bench.cpu import cpu_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--md")
    args = p.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(1, 8, 4, 4)
    module = gnflex.GroupNormFlex(8, groups=4)
    w, b = module.weight, module.bias
    ref = torch.nn.GroupNorm(4, 8)
    contenders = {
        "op": lambda: torch.ops.gnflex.group_norm(x, w, b, 4, 1e-5, "none"),
        "functional": lambda: gnflex.group_norm(x, 4, w, b),
        "module": lambda: module(x),
        "F.group_norm": lambda: F.group_norm(x, 4, w, b),
        "nn.GroupNorm": lambda: ref(x),
    }
    with torch.no_grad():
        best = time_rounds(contenders, args.rounds, 2000)
    lines = [f"# Host time per call, CPU: {cpu_model()}; tiny input 1x8x4x4, no_grad, 1 thread",
             f"torch {torch.__version__}, gnflex {gnflex.__version__}; min over {args.rounds} interleaved rounds "
             "of the median of 5 x 2000 calls (recorded: 5 x 500)", "",
             "| call | us | over the op |", "|---|---|---|"]
    for name, us in best.items():
        lines.append(f"| {name} | {us:.2f} | {us - best['op']:+.2f} |")

    xg = x.clone().requires_grad_()
    dy = torch.randn_like(x)

    def recorded(forward, params):
        return lambda: torch.autograd.grad(forward(), (xg, *params), dy)

    recorded_contenders = {
        "op": recorded(lambda: torch.ops.gnflex.group_norm(xg, w, b, 4, 1e-5, "none")[0], (w, b)),
        "functional": recorded(lambda: gnflex.group_norm(xg, 4, w, b), (w, b)),
        "module": recorded(lambda: module(xg), (w, b)),
        "F.group_norm": recorded(lambda: F.group_norm(xg, 4, w, b), (w, b)),
        "nn.GroupNorm": recorded(lambda: ref(xg), (ref.weight, ref.bias)),
    }
    best = time_rounds(recorded_contenders, args.rounds, 500)
    lines += ["", "Recorded: forward + backward through torch.autograd.grad (input, weight and bias)", "",
              "| call | us | over F.group_norm |", "|---|---|---|"]
    for name, us in best.items():
        lines.append(f"| {name} | {us:.2f} | {us - best['F.group_norm']:+.2f} |")
    print_and_save(lines, args.md)


def time_rounds(contenders, rounds, number):
    best = {k: float("inf") for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times = timeit.repeat(fn, number=number, repeat=5)
            best[name] = min(best[name], statistics.median(times) / number * 1e6)
    return best


if __name__ == "__main__":
    main()
