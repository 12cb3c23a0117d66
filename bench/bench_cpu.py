"""Checkout entry point of the cpu benchmark; the harness is gnflex.bench.cpu.

    python bench/bench_cpu.py --help      (same as: gnflex bench cpu --help)
"""
import sys

from gnflex.bench.cpu import main

if __name__ == "__main__":
    sys.exit(main())
