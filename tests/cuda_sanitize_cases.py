"""A few small CUDA forward + backward calls for compute-sanitizer (.ci/gpu):
every kernel of both ops, both layouts, a half and a float type, an
activation, a misaligned input and groups spread over several blocks. Exits
non-zero if a result differs from the CPU kernels. Needs a GPU.

    compute-sanitizer --tool memcheck python3 tests/cuda_sanitize_cases.py
"""
import sys

import torch

import gnflex

CASES = [  # (shape, groups, dtype, channels_last, activation)
    ((2, 8, 5, 7), 4, torch.float32, False, "silu"),
    ((2, 64, 9, 9), 8, torch.float16, True, "none"),
    ((1, 16, 80, 80), 2, torch.float32, False, "gelu"),  # groups over several blocks
    ((3, 300, 4, 4), 10, torch.bfloat16, True, "relu"),
    ((4, 6), 3, torch.float32, False, "none"),
]


def main(device="cuda"):
    """Compares `device` with the CPU kernels; 0 when all agree. (The CI runs
    it with device="cpu", which checks the script itself without a GPU.)"""
    failures = 0
    for shape, groups, dtype, channels_last, activation in CASES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
        dy = torch.randn(shape, generator=g)
        results = []
        for where in ("cpu", device):
            xs = x.detach().to(where, dtype).requires_grad_()
            ws, bs = (t.detach().to(where).requires_grad_() for t in (w, b))
            y = gnflex.group_norm(xs, groups, ws, bs, activation=activation)
            y.backward(dy.to(where, dtype))
            results.append([t.detach().float().cpu() for t in (y, xs.grad, ws.grad, bs.grad)])
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for name, a, r in zip(("y", "dx", "dweight", "dbias"), results[1], results[0]):
            err = ((a - r).abs().max() / r.abs().max().clamp_min(1)).item()
            if not err <= tol:
                print(f"FAIL {shape} G={groups} {dtype} cl={channels_last} {activation}: {name} off by {err:.2e}")
                failures += 1
    misaligned = torch.randn(2 * 16 * 9 * 9 + 3, device=device)[3:].view(2, 16, 9, 9)
    gnflex.group_norm(misaligned, 4)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{len(CASES)} cases, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
