"""End-to-end CPU training step (forward + backward + SGD), original model vs
``gnflex.convert`` of a copy, timed in the same run (interleaved rounds, the
best round's median per model):

  resnet50_gn   timm's ResNet-50 with GroupNorm(32) (+ ReLU, fused by convert)
  diffusion     a stack of diffusion ResnetBlocks (GroupNorm(32) -> SiLU -> conv,
                twice, + skip) in channels_last, as forward code calls them

    python bench/train_step_e2e.py [--threads 2] [--rounds 3] [--md out.md] [--json out.json]

An honest number, no target: GroupNorm is one part of these steps (the
convolutions dominate), so the step gets faster by GroupNorm's share at most.
"""
import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import gnflex
from gnflex.bench.cpu import cpu_model


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without the time embedding."""

    def __init__(self, channels):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()

    def forward(self, x):
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        return x + h


def models():
    """{name: (model factory, input shape, channels_last)}"""
    import timm

    return {
        "resnet50_gn": (lambda: timm.create_model("resnet50_gn", pretrained=False, num_classes=100),
                        (4, 3, 128, 128), False),
        "diffusion": (lambda: nn.Sequential(*[ResnetBlock(128) for _ in range(4)]), (2, 128, 32, 32), True),
    }


def train_step(model, opt, x):
    out = model(x)
    if out.dim() > 2:  # the ResnetBlock stack: a regression-style loss
        loss = out.float().square().mean()
    else:
        loss = F.cross_entropy(out, torch.zeros(len(out), dtype=torch.long))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def norm_share(step):
    """Share of one step's CPU time in GroupNorm and activation ops (forward
    and backward), by the profiler: what conversion can speed up at most."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    keys = ("group_norm", "silu", "relu", "gelu", "threshold_backward")
    norm = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys))
    return norm / total if total else float("nan")


def time_steps(step, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--md")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (build, shape, channels_last) in models().items():
        torch.manual_seed(0)
        original = build()
        converted, report = gnflex.convert(copy.deepcopy(original))
        x = torch.randn(shape)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        contenders = {}
        for label, model in (("original", original), ("converted", converted)):
            model = model.to(memory_format=fmt).train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            xs = x.contiguous(memory_format=fmt)
            contenders[label] = lambda m=model, o=opt, xs=xs: train_step(m, o, xs)
            for _ in range(2):  # warm-up: allocator, optimizer state
                contenders[label]()
        shares = {label: norm_share(step) for label, step in contenders.items()}
        best = {label: float("inf") for label in contenders}
        for _ in range(args.rounds):
            for label, step in contenders.items():
                best[label] = min(best[label], time_steps(step, args.steps))
        rows.append({"model": name, "input": "x".join(map(str, shape)),
                     "layout": "channels_last" if channels_last else "nchw",
                     "norms_replaced": len(report.replaced), "activations_fused": len(report.fused),
                     "original_ms": best["original"] * 1e3, "converted_ms": best["converted"] * 1e3,
                     "speedup": best["original"] / best["converted"],
                     "norm_act_share_original": shares["original"], "norm_act_share_converted": shares["converted"]})
        print(rows[-1], flush=True)
    machine = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)
    if args.md:
        cols = list(rows[0])
        with open(args.md, "w") as f:
            f.write("# CPU training step: original vs gnflex.convert\n\nMachine: "
                    + ", ".join(f"{k} {v}" for k, v in machine.items()) + "\n\n"
                    "Forward + backward + SGD step, best of the rounds' medians; speedup = original / converted. "
                    "norm_act_share: the step's CPU time in GroupNorm and activation ops (forward and backward), "
                    "from one profiled step.\n\n")
            f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            for r in rows:
                f.write("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
