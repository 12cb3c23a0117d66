"""Checkout entry point of the cuda benchmark; the harness is gnflex.bench.cuda.

    python bench/bench_cuda.py --help      (same as: gnflex bench cuda --help)
"""
import sys

from gnflex.bench.cuda import main

if __name__ == "__main__":
    sys.exit(main())
