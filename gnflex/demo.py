"""The main job: GroupNorm vs BatchNorm / LN-like / IN-like across batch sizes.

    gnflex demo [--out DIR] [--quick] [--task both|digits|segmentation] [--device cpu|cuda] [--epochs E]
                [--batch-sizes 1,2,4,8,16,32] [--segmentation-epochs E] [--segmentation-batch-sizes 1,2,4,8]
    torchrun --nproc_per_node=2 -m gnflex demo --ddp      (the same sweep, data parallel, gloo on CPU)

Wu & He (2018) report that BatchNorm's error grows as the batch per worker
shrinks while GroupNorm's stays flat. This sweep checks that claim on real
data that ships with scikit-learn (the 8x8 handwritten digits, no download):
the same GNCNN, seeds and schedule for every normalisation and batch size,
evaluated in eval mode (BatchNorm then uses its running statistics, which is
where small batches hurt it; at batch size 1 they are single images').

Then the same for dense prediction, where GroupNorm is used (gnflex.demo_segmentation):
generated shape scenes, GNCNN's P3/P4/P5 features with an FPN decoder, mean IoU
at batch sizes 1-8.

Writes to --out: results.md and results.csv (digits: test accuracy, final
training loss, seconds per run; rewritten as each run finishes),
segmentation.md and segmentation.csv (mean IoU) and, after each sweep,
accuracy_vs_batch.png and miou_vs_batch.png (one line per norm; need matplotlib).
"""
import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GNConfig, choose_gn_groups
from .modules import GNCNN, GroupNormFlex

# Norm variants: GroupNorm-family configs for GNCNN, or a replacement layer.
VARIANTS = ("gn_auto", "gn_min2", "ln_like", "in_like", "batchnorm", "none")
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
QUICK_BATCH_SIZES = (1, 32)
TASKS = ("both", "digits", "segmentation")
SEGMENTATION_BATCH_SIZES = (1, 2, 4, 8)
SEGMENTATION_EPOCHS = 8
# The demo's own dependencies: pyproject's "demo" extra.
INSTALL_HINT = 'pip install scikit-learn tqdm matplotlib   (or, from a checkout: pip install ".[demo]")'


def check_dependencies() -> None:
    """Before any training: exit if scikit-learn (the data) is missing; warn
    if tqdm (progress bars) or matplotlib (the plot) is, since the tables are
    written without them."""
    import importlib.util

    missing = [m for m in ("sklearn", "tqdm", "matplotlib") if importlib.util.find_spec(m) is None]
    if "sklearn" in missing:
        raise SystemExit(f"gnflex demo needs scikit-learn for its data set: {INSTALL_HINT}")
    if missing:
        print(f"note: {', '.join(missing)} not installed: "
              f"{'no plot' if 'matplotlib' in missing else 'no progress bars'} "
              f"(the tables are written anyway). To install: {INSTALL_HINT}", file=sys.stderr)
WIDTHS = (16, 32, 64, 128)
IMAGE_SIZE = 64  # digits are 8x8; GNCNN's P5 (stride 32) is then 2x2


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(seed: int = 0, image_size: int = IMAGE_SIZE, limit: int = 0) -> Data:
    """scikit-learn's bundled digits, split 80/20 (stratified, fixed seed),
    scaled to [0, 1], normalised with the training mean/std and upsampled."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - the demo's own dependency
        raise SystemExit(f"gnflex demo needs scikit-learn for its data set: {INSTALL_HINT}") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=seed, stratify=digits.target)
    if limit:
        train_idx, test_idx = train_idx[:limit], test_idx[: max(limit // 4, 10)]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x_train, x_test = x[train_idx], x[test_idx]
    mean, std = x_train.mean(), x_train.std()
    return Data((x_train - mean) / std, y[train_idx], (x_test - mean) / std, y[test_idx])


def norm_groups(variant: str, channels: int) -> str:
    """Human-readable groups of a variant's norm at `channels` channels."""
    if variant in ("batchnorm", "none"):
        return "-"
    return str(_gn_config(variant, channels).num_groups(channels))


def _gn_config(variant: str, channels: int) -> GNConfig:
    if variant == "gn_auto":
        return GNConfig(groups="auto")  # the literal rule: C=16 -> 16 groups
    if variant == "gn_min2":
        return GNConfig(groups="auto", min_channels_per_group=2)  # C=16 -> 8 groups
    return GNConfig(mode=variant)


def norm_act(variant: str, channels: int) -> nn.Module:
    """The variant's norm layer followed by ReLU (fused into GroupNormFlex)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant in ("batchnorm", "none"):
        layer = nn.BatchNorm2d(channels) if variant == "batchnorm" else nn.Identity()
        return nn.Sequential(layer, nn.ReLU(inplace=True))
    return GroupNormFlex(channels, _gn_config(variant, channels), activation="relu")


def build_model(variant: str, num_classes: int = 10, widths=WIDTHS) -> nn.Module:
    """GNCNN whose norm layers follow `variant`. BatchNorm and no-norm keep
    GNCNN's structure: the ReLU the GN layer had fused follows the new layer."""
    norm_act(variant, widths[0])  # checks the name
    model = GNCNN(in_channels=1, num_classes=num_classes, widths=widths, activation="relu")
    for block in [m for m in model.modules() if hasattr(m, "norm") and isinstance(m.norm, GroupNormFlex)]:
        block.norm = norm_act(variant, block.norm.num_channels)
    return model


def build_segmentation_model(variant: str) -> nn.Module:
    """The segmentation network (GNCNN features + FPN decoder), every norm following `variant`."""
    from .demo_segmentation import SegmentationNet

    return SegmentationNet(build_model(variant), lambda c: norm_act(variant, c))


@dataclass
class RunResult:
    variant: str
    batch_size: int
    test_accuracy: float
    final_loss: float
    seconds: float
    steps: int


def _progress(total, desc, leave, disable):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - listed as a dependency
        return None
    return tqdm(total=total, desc=desc, leave=leave, disable=disable, dynamic_ncols=True)


def train_one(variant, batch_size, data, *, epochs, lr, seed, device, dist=None, show=True) -> RunResult:
    """Train from scratch with AdamW + cosine decay over `epochs`; evaluate
    in eval mode on the test split."""
    torch.manual_seed(seed)
    model = build_model(variant).to(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    if dist:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(data.y_train)
    per_rank = n // world
    steps_per_epoch = per_rank // batch_size  # drop the last partial batch (BN needs >1 value)
    total_steps = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    gen = torch.Generator().manual_seed(seed)
    bar = _progress(total_steps, f"{variant} bs={batch_size}", leave=False, disable=not show or rank != 0)
    start = time.perf_counter()
    model.train()
    last_losses = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)[rank * per_rank:(rank + 1) * per_rank]
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            xb, yb = data.x_train[idx].to(device), data.y_train[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if epoch == epochs - 1:
                last_losses.append(loss.item())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    net = model.module if dist else model
    net.eval()
    with torch.no_grad():
        correct = 0
        for i in range(0, len(data.y_test), 256):
            xb = data.x_test[i:i + 256].to(device)
            correct += (net(xb).argmax(1).cpu() == data.y_test[i:i + 256]).sum().item()
    final_loss = sum(last_losses) / len(last_losses) if last_losses else float("nan")
    return RunResult(variant, batch_size, correct / len(data.y_test), final_loss, seconds, total_steps)


def _grid(results):
    """(variants in run order, sorted batch sizes, {(variant, batch size): result})."""
    variants = list(dict.fromkeys(r.variant for r in results))
    sizes = sorted({r.batch_size for r in results})
    return variants, sizes, {(r.variant, r.batch_size): r for r in results}


WHAT_TO_LOOK_FOR = (
    "What to look for: accuracy is measured in eval mode, where BatchNorm normalizes with running "
    "statistics gathered from the training batches; the smaller the batch, the noisier they are, and "
    "at batch size 1 they are the statistics of single images. GroupNorm (and the LN-/IN-like modes) "
    "normalize each sample by itself, the same way in training and evaluation, so the batch size "
    "does not enter. On a 360-image test set one image is 0.28 points: differences of 1-3 points are noise."
)


def summary_lines(results):
    """What this run's table says, computed from it: the best norm per batch
    size and BatchNorm's accuracy minus gn_auto's."""
    variants, sizes, by = _grid(results)
    best = []
    for b in sizes:
        runs = [by[v, b] for v in variants if (v, b) in by]
        top = max(runs, key=lambda r: r.test_accuracy)
        best.append(f"bs {b}: {top.variant} {top.test_accuracy:.3f}")
    lines = ["Best per batch size: " + "; ".join(best) + "."]
    both = [b for b in sizes if ("batchnorm", b) in by and ("gn_auto", b) in by]
    if both:
        diffs = [f"bs {b}: {by['batchnorm', b].test_accuracy - by['gn_auto', b].test_accuracy:+.3f}" for b in both]
        lines.append("batchnorm minus gn_auto: " + "; ".join(diffs) + ".")
    return lines


def write_csv(results, path, fields) -> None:
    """One row per run: the given result fields (creates the directory)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            w.writerow({k: getattr(r, k) for k in fields})


def write_tables(results, out_dir, meta):
    """results.csv and results.md in out_dir (the runs so far)."""
    write_csv(results, os.path.join(out_dir, "results.csv"),
              ["variant", "batch_size", "test_accuracy", "final_loss", "seconds", "steps"])

    variants, sizes, by = _grid(results)
    lines = ["# gnflex demo: GN vs BN / LN-like / IN-like across batch sizes\n",
             ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n",
             WHAT_TO_LOOK_FOR + "\n",
             "## Test accuracy (eval mode)\n",
             "| norm | groups per layer (C=" + "/".join(map(str, WIDTHS)) + ") | "
             + " | ".join(f"bs {b}" for b in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for v in variants:
        groups = "/".join(norm_groups(v, c) for c in WIDTHS)
        cells = [f"{by[v, b].test_accuracy:.3f}" if (v, b) in by else "" for b in sizes]
        lines.append(f"| {v} | {groups} | " + " | ".join(cells) + " |")
    lines += [""] + summary_lines(results)
    lines += ["", "## All runs\n", "| norm | batch size | test accuracy | final train loss | seconds | steps |",
              "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.variant} | {r.batch_size} | {r.test_accuracy:.3f} | {r.final_loss:.3f} | "
                     f"{r.seconds:.1f} | {r.steps} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(results, out_dir, value=lambda r: r.test_accuracy, name="accuracy_vs_batch.png",
               ylabel="test accuracy (eval mode)", title="GNCNN on sklearn digits: accuracy vs batch size") -> bool:
    """A plot of ``value`` (default: test accuracy) against batch size, one
    line per norm, as ``name`` in out_dir; False (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, sizes, by = _grid(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v in variants:
        pts = [(b, value(by[v, b])) for b in sizes if (v, b) in by]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (per worker)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=120)
    plt.close(fig)
    return True


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _variant_list(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in VARIANTS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="gnflex_demo_out", help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds: 3 variants, batch sizes 1 and 32, 1 epoch on a subset")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 2; 1 with --quick)")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="comma-separated (default 1,2,4,8,16,32)")
    p.add_argument("--variants", type=_variant_list, default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--task", choices=TASKS, default="both",
                   help="digits (classification), segmentation (dense prediction) or both (default)")
    p.add_argument("--segmentation-epochs", type=int, default=None,
                   help=f"epochs per segmentation run (default {SEGMENTATION_EPOCHS}; 1 with --quick)")
    p.add_argument("--segmentation-batch-sizes", type=_int_list, default=None,
                   help="comma-separated (default " + ",".join(map(str, SEGMENTATION_BATCH_SIZES)) + ")")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--ddp", action="store_true",
                   help="data parallel; run under torchrun (gloo on CPU, nccl on CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    for name in ("epochs", "segmentation_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        raise SystemExit("--lr must be > 0")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.ddp and args.task == "segmentation":
        raise SystemExit("--ddp runs the digits sweep only; run the segmentation sweep without --ddp")
    dist = None
    if args.ddp:
        import torch.distributed as dist

        if "RANK" not in os.environ:
            raise SystemExit("--ddp: run under torchrun, e.g. torchrun --nproc_per_node=2 -m gnflex demo --ddp")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    rank = dist.get_rank() if dist else 0
    if rank == 0:
        check_dependencies()
    variants = args.variants or (["gn_auto", "batchnorm", "ln_like"] if args.quick else list(VARIANTS))
    if rank == 0:
        from . import __version__

        print(f"gnflex {__version__} | torch {torch.__version__} | device {device} | "
              f"workers {dist.get_world_size() if dist else 1}")
        print("groups per layer (C=" + "/".join(map(str, WIDTHS)) + "): " +
              "; ".join(f"{v} {'/'.join(norm_groups(v, c) for c in WIDTHS)}" for v in variants))
        print(f"choose_gn_groups: C=16 -> {choose_gn_groups(16)} (literal rule), "
              f"{choose_gn_groups(16, min_channels_per_group=2)} with min_channels_per_group=2")
    written = []
    if args.task in ("both", "digits"):
        written += _digits_sweep(args, variants, device, dist, rank)
    if args.task in ("both", "segmentation") and dist is None:
        written += _segmentation_sweep(args, variants, device)
    elif args.task == "both" and rank == 0:
        print("(--ddp: the segmentation sweep runs without --ddp)")
    if rank == 0:
        print(f"wrote {', '.join(os.path.join(args.out, w) for w in written)}")
        if not any(w.endswith(".png") for w in written):
            print(f"(no plots: matplotlib is not installed; {INSTALL_HINT})")
    if dist:
        dist.destroy_process_group()
    return 0


def _sweep_bar(total, rank, show):
    return _progress(total, "sweep", leave=True, disable=not show or rank != 0)


def _digits_sweep(args, variants, device, dist, rank):
    """The batch-size sweep on sklearn digits; the files it wrote (rank 0)."""
    sizes = args.batch_sizes or list(QUICK_BATCH_SIZES if args.quick else BATCH_SIZES)
    epochs = args.epochs or (1 if args.quick else 2)
    data = load_digits_data(args.seed, limit=480 if args.quick else 0)
    world = dist.get_world_size() if dist else 1
    too_big = [b for b in sizes if b > len(data.y_train) // world]
    if too_big:
        raise SystemExit(f"batch sizes {too_big} exceed the {len(data.y_train) // world} training images per worker")
    show = not args.no_progress
    if rank == 0:
        print(f"digits: train {len(data.y_train)} / test {len(data.y_test)} at {IMAGE_SIZE}x{IMAGE_SIZE}")
    meta = {"data": "sklearn digits", "image": f"{IMAGE_SIZE}x{IMAGE_SIZE}", "epochs": epochs,
            "optimizer": f"AdamW lr {args.lr} cosine", "seed": args.seed, "device": str(device),
            "workers": world, "torch": torch.__version__}
    results = []
    sweep = _sweep_bar(len(variants) * len(sizes), rank, show)
    for variant in variants:
        for bs in sizes:
            r = train_one(variant, bs, data, epochs=epochs, lr=args.lr, seed=args.seed, device=device,
                          dist=dist, show=show)
            results.append(r)
            if rank == 0:  # tables as runs finish: an interrupted sweep keeps its rows
                write_tables(results, args.out, meta)
            if sweep is not None:
                sweep.update(1)
                sweep.set_postfix_str(f"{variant} bs={bs} acc={r.test_accuracy:.3f}")
    if sweep is not None:
        sweep.close()
    if rank != 0:
        return []
    with open(os.path.join(args.out, "results.md")) as f:
        print("\n" + f.read())
    return ["results.md", "results.csv"] + (["accuracy_vs_batch.png"] if write_plot(results, args.out) else [])


def _segmentation_sweep(args, variants, device):
    """The batch-size sweep on generated segmentation scenes; the files it wrote."""
    from .demo_segmentation import IMAGE_SIZE as SEG_SIZE, load_segmentation_data, train_segmentation
    from .demo_segmentation import write_segmentation_tables

    sizes = args.segmentation_batch_sizes or list((1, 8) if args.quick else SEGMENTATION_BATCH_SIZES)
    epochs = args.segmentation_epochs or (1 if args.quick else SEGMENTATION_EPOCHS)
    data = load_segmentation_data(args.seed, limit=96 if args.quick else 0)
    too_big = [b for b in sizes if b > len(data.y_train)]
    if too_big:
        raise SystemExit(f"segmentation batch sizes {too_big} exceed the {len(data.y_train)} training images")
    print(f"segmentation: train {len(data.y_train)} / test {len(data.y_test)} generated scenes at "
          f"{SEG_SIZE}x{SEG_SIZE}")
    meta = {"data": "generated shapes (4 classes)", "image": f"{SEG_SIZE}x{SEG_SIZE}",
            "train images": len(data.y_train), "test images": len(data.y_test), "epochs": epochs,
            "optimizer": f"AdamW lr {args.lr} cosine", "seed": args.seed, "device": str(device),
            "torch": torch.__version__}
    show = not args.no_progress
    results = []
    sweep = _sweep_bar(len(variants) * len(sizes), 0, show)
    for variant in variants:
        for bs in sizes:
            torch.manual_seed(args.seed)
            r = train_segmentation(build_segmentation_model(variant), variant, bs, data, epochs=epochs, lr=args.lr,
                                   seed=args.seed, device=device)
            results.append(r)
            write_segmentation_tables(results, args.out, meta,
                                      lambda v: "/".join(norm_groups(v, c) for c in WIDTHS))
            if sweep is not None:
                sweep.update(1)
                sweep.set_postfix_str(f"{variant} bs={bs} mIoU={r.mean_iou:.3f}")
    if sweep is not None:
        sweep.close()
    with open(os.path.join(args.out, "segmentation.md")) as f:
        print("\n" + f.read())
    plotted = write_plot(results, args.out, value=lambda r: r.mean_iou, name="miou_vs_batch.png",
                         ylabel="mean IoU (eval mode)", title="GNCNN + FPN on generated scenes: mean IoU vs batch size")
    return ["segmentation.md", "segmentation.csv"] + (["miou_vs_batch.png"] if plotted else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gnflex demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
