"""Command line: ``python -m gnflex demo`` (or the ``gnflex`` script)."""
import argparse
import sys
import time


def demo(args) -> int:
    """A short GNCNN example: group choice, agreement with torch, a few training steps."""
    import torch
    import torch.nn.functional as F

    import gnflex

    torch.manual_seed(args.seed)
    print(f"gnflex {gnflex.__version__} | torch {torch.__version__} | CUDA kernels: {gnflex.built_with_cuda()}")

    print("\nGroups chosen by choose_gn_groups (literal rule / min_channels_per_group=2):")
    for c in (8, 16, 24, 64, 96, 320):
        print(f"  C={c:4d}: {gnflex.choose_gn_groups(c):3d} / {gnflex.choose_gn_groups(c, min_channels_per_group=2):3d}")

    x = torch.randn(4, 64, 32, 32).to(memory_format=torch.channels_last)
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    ours = gnflex.group_norm(x, 32, w, b, activation="silu")
    ref = F.silu(F.group_norm(x.contiguous(), 32, w, b))
    print(f"\nGN+SiLU on channels_last (4, 64, 32, 32): max |gnflex - torch| = {(ours - ref).abs().max():.2e}, "
          f"output stays channels_last: {ours.is_contiguous(memory_format=torch.channels_last)}")

    # Synthetic task: which quadrant of the image is brightest.
    def batch(n):
        imgs = torch.randn(n, 3, 32, 32) * 0.5
        labels = torch.randint(0, 4, (n,))
        for i, q in enumerate(labels.tolist()):
            r, c = divmod(q, 2)
            imgs[i, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += 1.0
        return imgs, labels

    model = gnflex.GNCNN(num_classes=4, widths=(16, 32, 64, 64), activation="silu",
                         config=gnflex.GNConfig(min_channels_per_group=2))
    print(f"\nGNCNN: {sum(p.numel() for p in model.parameters())} parameters")
    logits, feats = model(torch.randn(2, 3, 64, 64), return_features=True)
    print(f"  input (2, 3, 64, 64) -> logits {tuple(logits.shape)}, "
          + ", ".join(f"{k} {tuple(v.shape)}" for k, v in feats.items()))

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        imgs, labels = batch(args.batch_size)
        loss = F.cross_entropy(model(imgs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == 1:
            print(f"  step {step:3d}: loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        imgs, labels = batch(256)
        acc = (model(imgs).argmax(1) == labels).float().mean().item()
    print(f"  {args.steps} steps in {time.perf_counter() - start:.1f}s; held-out accuracy {acc:.1%} (chance 25%)")
    return 0


def bench(args) -> int:
    """Run the CPU or CUDA benchmark harness with the remaining arguments."""
    if args.target == "cpu":
        from .bench.cpu import main as run
    else:
        from .bench.cuda import main as run
    return run(args.bench_args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gnflex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run a short GNCNN example")
    p_demo.add_argument("--steps", type=int, default=60)
    p_demo.add_argument("--batch-size", type=int, default=32)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=demo)
    p_bench = sub.add_parser(
        "bench", help="time gnflex against torch (see `gnflex bench cpu --help`)",
        description="Benchmark harness: `gnflex bench cpu [options]` or `gnflex bench cuda [options]`; "
                    "options after the target go to that harness (`--help` lists them).")
    p_bench.add_argument("target", choices=("cpu", "cuda"))
    p_bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of the harness")
    p_bench.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
