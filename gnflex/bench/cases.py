"""The CUDA benchmark's cases, as plain data: read by gnflex.bench.cuda and,
scaled down, by the CUDA simulator's traffic model (.ci/cuda-sim --traffic
loads this file by path, so it imports nothing)."""

_UNET = ((64, 320), (32, 640), (16, 1280), (8, 1280), (16, 2560), (32, 1920), (64, 960))
BOTH = ("nchw", "channels_last")

# (name, shape, groups, dtype name, layouts): shapes people run GroupNorm on.
CUDA_CASES = (
    [(f"unet n{n}", (n, c, hw, hw), 32, "float16", ("channels_last",)) for n in (1, 2, 8) for hw, c in _UNET]
    + [("vae", (1, c, s, s), 32, "float16", BOTH) for c, s in ((128, 512), (256, 512), (512, 128))]
    + [("video", shape, 32, "bfloat16", BOTH) for shape in ((1, 128, 20, 256, 256), (1, 512, 16, 180, 320))]
    + [("detection", (2, 256, 100, 168), 32, "float32", BOTH),
       ("detection", (1024, 256, 7, 7), 32, "float32", BOTH)]
    + [("medical G=8", (2, 32, 128, 128, 128), 8, "float16", BOTH),
       ("medical G=C", (2, 32, 128, 128, 128), 32, "float16", BOTH)]
    + [("G=1", (8, 256, 64, 64), 1, "float16", BOTH)]
    + [("sequence", (128, c, 512), 32, "float32", ("nchw",)) for c in (32, 2048)]
    + [("small", (13, 18, 32, 32), 6, "float16", BOTH)]
)
QUICK_CUDA_CASES = [CUDA_CASES[1], CUDA_CASES[21], CUDA_CASES[-1]]

# Cases the traffic model runs at full size; the others are scaled down.
FULL_SIZE_TRAFFIC_CASES = [
    ("diffusion", (2, 320, 64, 64), 32, "float16", ("channels_last",)),
    ("unet n2", (2, 960, 64, 64), 32, "float16", ("channels_last",)),
    ("split groups", (1, 256, 128, 128), 32, "float32", ("nchw",)),
]
# Values per scaled-down case: the simulator runs ~1e5 values per second.
TRAFFIC_VALUES = 1 << 18


def _rows(cases):
    """(label, N, C, HxW, G, dtype name, layout) per case and layout, at size."""
    out = []
    for name, shape, groups, dtype, layouts in cases:
        hxw = 1
        for size in shape[2:]:
            hxw *= size
        out += [(name.replace(" ", "_"), shape[0], shape[1], hxw, groups, dtype, layout) for layout in layouts]
    return out


def full_size_cases():
    """Every CUDA case at its real size, in traffic_cases()' format (for the
    simulator's grid report, which computes plans and runs nothing)."""
    return _rows(CUDA_CASES)


def traffic_cases():
    """(label, N, C, HxW, G, dtype name, layout) for the traffic model: every
    CUDA case with the same C, G, dtype and layout and N * HxW cut to about
    TRAFFIC_VALUES / C, then the full-size cases."""
    out = []
    for label, n, c, hxw, groups, dtype, layout in _rows(CUDA_CASES):
        n = max(1, min(n, TRAFFIC_VALUES // (c * hxw)))
        hxw = max(1, min(hxw, TRAFFIC_VALUES // (n * c)))
        out.append((label, n, c, hxw, groups, dtype, layout))
    return out + _rows(FULL_SIZE_TRAFFIC_CASES)


if __name__ == "__main__":
    import sys

    for case in full_size_cases() if "--full" in sys.argv else traffic_cases():
        print(*case)
