"""Times gnflex's bfloat16 forward and forward+backward under each CPU kernel
variant this CPU runs (GNFLEX_CPU_VARIANT caps the variant; one process per variant), to
compare variants on one machine:

    python bench/cpu_variant_compare.py avx2 avx512 avx512_bf16 [--threads 2]
"""
import argparse
import os
import subprocess
import sys

CHILD = r"""
import sys, time, torch, gnflex
from gnflex import _C
torch.set_num_threads(int(sys.argv[1]))
print(_C.cpu_tuning()["kernel_variant"])
for shape in ((8, 64, 56, 56), (8, 256, 32, 32), (2, 512, 64, 64), (64, 1024, 7, 7)):
    for cl in (False, True):
        x = torch.randn(shape).to(torch.bfloat16)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
        dy = torch.randn_like(x)
        fwd = lambda: gnflex.group_norm(x, 32, w, b)
        both = lambda: torch.autograd.grad(gnflex.group_norm(x, 32, w, b), x, dy)
        for name, f in (("fwd", fwd), ("fwd+bwd", both)):
            best = float("inf")
            for _ in range(5):
                f()
            t_end = time.perf_counter() + 0.3
            while time.perf_counter() < t_end:
                t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
            print("x".join(map(str, shape)), "channels_last" if cl else "nchw", name, f"{best * 1e3:.4f}")
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="GNFLEX_CPU_VARIANT values: default, avx2, avx512, avx512_bf16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    results = {}
    for variant in args.variants:
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.threads)], capture_output=True, text=True,
                             check=True, env=dict(os.environ, GNFLEX_CPU_VARIANT=variant)).stdout.split("\n")
        ran = out[0]
        results[ran] = {tuple(line.split()[:3]): float(line.split()[3]) for line in out[1:] if line}
    names = list(results)
    print("| shape | layout | pass | " + " | ".join(f"{n} ms" for n in names) +
          (f" | {names[0]} / {names[-1]} |" if len(names) > 1 else " |"))
    print("|---" * (4 + len(names)) + "|")
    for key in results[names[0]]:
        times = [results[n][key] for n in names]
        ratio = f" | {times[0] / times[-1]:.3f} |" if len(names) > 1 else " |"
        print("| " + " | ".join(key) + " | " + " | ".join(f"{t:.3f}" for t in times) + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
