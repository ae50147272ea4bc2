#!/usr/bin/env python
"""CPU benchmark of tinyrwkv's backends beside the official `rwkv` package.

The same benchmark as `tinyrwkv bench` (all the work is in tinyrwkv/bench.py, whose docstring
says what each number means and how it is measured), runnable from a checkout:

    python benchmarks/bench_cpu.py --quick                      # smoke run, under a minute
    python benchmarks/bench_cpu.py --shapes 0.1B --runs 3       # one shape, a few minutes
    python benchmarks/bench_cpu.py --both-openblas --out results.json
        # everything (0.1B, 0.4B, 1.5B; numpy, numba, numba-bf16, official) twice: with the
        # machine's OpenBLAS settings as they are, then with OPENBLAS_CORETYPE and
        # OPENBLAS_L2_SIZE both unset in the measured processes

Optional: `pip install threadpoolctl` to see which OpenBLAS kernel each process chose, and the
official package (`pip install rwkv torch`) for the side-by-side rows and ratios.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's tinyrwkv

from tinyrwkv import bench  # noqa: E402


if __name__ == "__main__":
    bench.main(prog="benchmarks/bench_cpu.py")
