"""Command line: ``gnflex demo | bench | info`` (also ``python -m gnflex ...``)."""
import argparse
import sys


def demo(args) -> int:
    """GN vs BN / LN-like / IN-like across batch sizes (see gnflex.demo)."""
    from . import demo as demo_module

    return demo_module.run(args)


def bench(args) -> int:
    """Run the CPU or CUDA benchmark harness, or the table of saved CPU results,
    with the remaining arguments."""
    if args.target == "cpu":
        from .bench.cpu import main as run
    elif args.target == "table":
        from .bench.table import main as run
    else:
        from .bench.cuda import main as run
    return run(args.bench_args)


def _size(n):
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def cpu_tuning_line():
    """The caches the CPU kernels read and the budgets they derive from them."""
    from . import _C

    t = _C.cpu_tuning()
    return (f"CPU caches: L1d {_size(t['l1d'])}, L2 {_size(t['l2'])}, L3 {_size(t['l3'])} "
            f"({t['cache_source']}) | fused budgets: group {_size(t['fused_group_bytes'])}, sample "
            f"{_size(t['fused_sample_bytes'])} (channels-last backward samples past L2: calls up to "
            f"{_size(t['l3_reread_bytes'])}) | streaming stores from {_size(t['stream_output_bytes'])} | "
            f"walking back from {_size(t['walk_back_bytes'])} to {_size(t['walk_back_max_bytes'])} | "
            f"schedule: {t['schedule']} (GNFLEX_CPU_SCHEDULE)")


def info_lines():
    """What this installation is: versions, build, kernels per device."""
    import platform

    import torch

    import gnflex
    from . import _C, _build_info

    lines = [
        f"gnflex {gnflex.__version__} ({gnflex.library_path()})",
        f"python {platform.python_version()} | torch {torch.__version__} | built against torch "
        f"{_build_info.torch_version}",
        f"CUDA kernels compiled: {bool(_build_info.with_cuda)}"
        + (f" (CUDA {_build_info.cuda_version}, archs {getattr(_build_info, 'cuda_archs', None)})"
           if _build_info.with_cuda else ""),
        f"CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()} | CPU kernel variant: "
        f"{_C.cpu_tuning()['kernel_variant']} (ATEN_CPU_CAPABILITY; GNFLEX_CPU_VARIANT caps it) | "
        f"intra-op threads: {torch.get_num_threads()}",
    ]
    lines.append(cpu_tuning_line())
    openmp = [ln.strip() for ln in torch.__config__.parallel_info().splitlines()
              if ln.startswith(("ATen parallel backend", "OMP_NUM_THREADS"))]
    lines += openmp
    lines.append("registered kernels (op: dispatch keys):")
    keys = ("CPU", "CUDA", "Meta", "Autograd", "AutocastCUDA")
    for op in ("gnflex::group_norm", "gnflex::group_norm_backward"):
        have = [k for k in keys if torch._C._dispatch_has_kernel_for_dispatch_key(op, k)]
        lines.append(f"  {op}: {', '.join(have)}")
    return lines


def info(args) -> int:
    print("\n".join(info_lines()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gnflex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from .demo import __doc__ as demo_doc, add_arguments

    p_demo = sub.add_parser("demo", help="GN vs BN / LN-like / IN-like across batch sizes on sklearn digits",
                            description=demo_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p_demo)
    p_demo.set_defaults(func=demo)

    p_bench = sub.add_parser(
        "bench", help="time gnflex against torch (see `gnflex bench cpu --help`)",
        description="Benchmark harness: `gnflex bench cpu [options]` or `gnflex bench cuda [options]`; "
                    "`gnflex bench table [--write README.md]`: the README's table from the saved CPU results; "
                    "options after the target go to that harness (`--help` lists them).")
    p_bench.add_argument("target", choices=("cpu", "cuda", "table"))
    p_bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of the harness")
    p_bench.set_defaults(func=bench)

    p_info = sub.add_parser("info", help="versions, build and registered kernels",
                            description="Versions, what the op library was built against, compiled CUDA "
                                        "archs, threads and which kernels are registered for which device.")
    p_info.set_defaults(func=info)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
