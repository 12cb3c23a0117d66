"""The main job's dense-prediction part: semantic segmentation at small batch.

GroupNorm's claim (Wu & He, 2018) is strongest where batches are small
because the inputs are large: detection and segmentation. This task is
generated (no download): 64x64 grey images with one to three shapes (disc,
square, triangle; the label of each pixel is its shape, or background) over
a smooth background, each image with its own random gain and offset. The
network is GNCNN's P3 / P4 / P5 features with a small FPN decoder (1x1
laterals, top-down sums, a 3x3 conv block) predicting at stride 8, upsampled
to the image; every norm layer, backbone and decoder, follows the variant.
Evaluated in eval mode: mean IoU over the four classes on a held-out set.
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES = ("background", "disc", "square", "triangle")
IMAGE_SIZE = 64
TRAIN_IMAGES, TEST_IMAGES = 384, 128
DECODER_CHANNELS = 32


@dataclass
class SegmentationData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_scenes(count: int, seed: int, size: int = IMAGE_SIZE):
    """(images (count, 1, size, size), labels (count, size, size)), the same
    for the same seed."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    # Background: a random linear ramp plus pixel noise.
    ramp = uniform(-1, 1, count, 1, 1) * xx + uniform(-1, 1, count, 1, 1) * yy
    images = 0.5 * ramp + 0.15 * torch.randn(count, size, size, generator=gen)
    labels = torch.zeros(count, size, size, dtype=torch.long)
    shapes = torch.randint(1, 4, (count,), generator=gen)  # shapes per image
    for slot in range(3):
        present = (shapes > slot).view(count, 1, 1)
        kind = torch.randint(1, len(CLASSES), (count, 1, 1), generator=gen)
        cx, cy = uniform(0.2, 0.8, count, 1, 1), uniform(0.2, 0.8, count, 1, 1)
        r = uniform(0.12, 0.28, count, 1, 1)
        dx, dy = xx - cx, yy - cy
        disc = dx * dx + dy * dy <= r * r
        square = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
        # Upward triangle: below the apex, inside both slanted edges, above the base.
        triangle = (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
        mask = torch.where(kind == 1, disc, torch.where(kind == 2, square, triangle)) & present
        intensity = uniform(0.6, 1.6, count, 1, 1) * torch.where(torch.rand(count, 1, 1, generator=gen) < 0.5, -1, 1)
        images = torch.where(mask, intensity + 0.15 * torch.randn(count, size, size, generator=gen), images)
        labels = torch.where(mask, kind.expand_as(labels), labels)
    gain, offset = uniform(0.3, 3.0, count, 1, 1), uniform(-2, 2, count, 1, 1)
    return (images * gain + offset).unsqueeze(1), labels


def load_segmentation_data(seed: int = 0, limit: int = 0) -> SegmentationData:
    train, test = (TRAIN_IMAGES, TEST_IMAGES) if not limit else (limit, max(limit // 3, 16))
    x_train, y_train = make_scenes(train, seed=1000 + seed)
    x_test, y_test = make_scenes(test, seed=2000 + seed)
    return SegmentationData(x_train, y_train, x_test, y_test)


class SegmentationNet(nn.Module):
    """GNCNN features (P3, P4, P5) + a small FPN decoder; logits (N, classes, H, W)."""

    def __init__(self, backbone: nn.Module, norm_act, num_classes: int = len(CLASSES)):
        super().__init__()
        self.backbone = backbone
        c3, c4, c5 = backbone.feature_channels
        d = DECODER_CHANNELS
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c in (c3, c4, c5))
        self.fuse = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), norm_act(d))
        self.classify = nn.Conv2d(d, num_classes, 1)

    def forward(self, x):
        f = self.backbone.forward_features(x)
        p3, p4, p5 = (lat(f[k]) for lat, k in zip(self.lateral, ("p3", "p4", "p5")))
        p4 = p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest")
        p3 = p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest")
        logits = self.classify(self.fuse(p3))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def mean_iou(model, x, y, num_classes: int = len(CLASSES), chunk: int = 64) -> float:
    """Mean over classes of intersection / union, summed over the whole set."""
    inter = torch.zeros(num_classes)
    union = torch.zeros(num_classes)
    with torch.no_grad():
        for i in range(0, len(y), chunk):
            pred = model(x[i:i + chunk]).argmax(1).cpu()
            truth = y[i:i + chunk]
            for k in range(num_classes):
                p, t = pred == k, truth == k
                inter[k] += (p & t).sum()
                union[k] += (p | t).sum()
    present = union > 0
    return (inter[present] / union[present]).mean().item()


@dataclass
class SegmentationResult:
    variant: str
    batch_size: int
    mean_iou: float
    final_loss: float
    seconds: float
    steps: int


def train_segmentation(model, variant, batch_size, data, *, epochs, lr, seed, device):
    """AdamW + cosine decay over `epochs` of per-pixel cross-entropy; mean IoU in eval mode."""
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(data.y_train)
    steps_per_epoch = n // batch_size
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    last = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(data.x_train[idx].to(device)), data.y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if epoch == epochs - 1:
                last.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    miou = mean_iou(model, data.x_test.to(device), data.y_test)
    return SegmentationResult(variant, batch_size, miou, sum(last) / max(len(last), 1), seconds, total)


SEGMENTATION_NOTE = (
    "What to look for: mean IoU in eval mode, where BatchNorm normalizes with running statistics "
    "gathered from the training batches (at batch size 1, those of single images, each with its own "
    "gain and offset); GroupNorm and the LN-/IN-like modes normalize each sample by itself. Every "
    "run sees the same images for the same number of epochs, so smaller batches take more steps. "
    "On {test_images} test images, differences of about 0.02 are noise."
)


def write_segmentation_tables(results, out_dir, meta, groups_of) -> None:
    """segmentation.csv and segmentation.md in out_dir (the runs so far)."""
    import os

    from .demo import _grid, write_csv

    write_csv(results, os.path.join(out_dir, "segmentation.csv"),
              ["variant", "batch_size", "mean_iou", "final_loss", "seconds", "steps"])
    variants, sizes, by = _grid(results)
    lines = ["# gnflex demo: segmentation (GNCNN P3/P4/P5 + FPN decoder) across batch sizes\n",
             ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n",
             SEGMENTATION_NOTE.format(test_images=meta["test images"]) + "\n",
             "## Mean IoU (eval mode)\n",
             "| norm | groups per backbone layer | " + " | ".join(f"bs {b}" for b in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for v in variants:
        cells = [f"{by[v, b].mean_iou:.3f}" if (v, b) in by else "" for b in sizes]
        lines.append(f"| {v} | {groups_of(v)} | " + " | ".join(cells) + " |")
    best = [f"bs {b}: {max((by[v, b] for v in variants if (v, b) in by), key=lambda r: r.mean_iou).variant}"
            for b in sizes]
    lines += ["", "Best per batch size: " + "; ".join(best) + "."]
    lines += ["", "## All runs\n", "| norm | batch size | mean IoU | final train loss | seconds | steps |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r.variant} | {r.batch_size} | {r.mean_iou:.3f} | {r.final_loss:.3f} | {r.seconds:.1f} | "
              f"{r.steps} |" for r in results]
    with open(os.path.join(out_dir, "segmentation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
