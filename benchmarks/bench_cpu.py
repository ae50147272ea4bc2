#!/usr/bin/env python
"""CPU benchmark of tinyrwkv's backends beside the official `rwkv` package, from a checkout.

    python benchmarks/bench_cpu.py --quick                      # smoke run, under a minute
    python benchmarks/bench_cpu.py --shapes 0.1B --runs 3       # one shape, a few minutes
    python benchmarks/bench_cpu.py --both-openblas --out results.json
        # everything (0.1B, 0.4B, 1.5B; numpy, numba, numba-bf16, official) twice: with the
        # machine's OpenBLAS settings as they are, then with OPENBLAS_CORETYPE and
        # OPENBLAS_L2_SIZE both unset in the measured processes

`tinyrwkv bench ...` runs this script. The harness is in cpu_harness/ beside it (Unix only; its
__init__.py says what each number means and how it is measured). Optional: `pip install
threadpoolctl` to see which OpenBLAS kernel each process chose, and the official package
(`pip install rwkv torch`) for the side-by-side rows and ratios.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's tinyrwkv

from cpu_harness import BACKENDS, Options, backend_setup  # noqa: E402
from cpu_harness.shapes import parse_shape  # noqa: E402

QUICK = {"shapes": "tiny", "runs": 1, "decode_tokens": 8, "warmup": 4, "prefill": "64,256"}


def add_arguments(parser):
    """The options of the benchmark (also `tinyrwkv bench` in a checkout)."""
    parser.add_argument("--shapes", default="0.1B,0.4B,1.5B",
                        help="comma-separated: 0.1B, 0.4B, 1.5B, tiny (L2 C256), or custom like "
                             "L4-C512-V1024")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated: numpy, numba, numba-bf16, numpy-bf16, official")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs (fresh processes) per backend and shape; medians are reported")
    parser.add_argument("--decode-tokens", type=int, default=32,
                        help="timed single-token forwards per run")
    parser.add_argument("--warmup", type=int, default=8,
                        help="untimed single-token forwards before decode timing")
    parser.add_argument("--prefill", default="512,2048",
                        help="comma-separated prompt lengths T ('' for none)")
    parser.add_argument("--prefill-budget", type=float, default=60.0, metavar="SECONDS",
                        help="a prefill length whose first run took longer is not repeated")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every backend and library (default: each library's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and ids")
    parser.add_argument("--cache-dir", default=None,
                        help="keep the synthetic checkpoints here and reuse them "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--out", default=None, help="write every raw number to this JSON file")
    parser.add_argument("--both-openblas", action="store_true",
                        help="run everything twice: OpenBLAS environment as it is, then with "
                             "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to use "
                             "less than a quarter of a core (a shared machine)")
    parser.add_argument("--retry-busy", type=int, default=0, metavar="N",
                        help="repeat a run (up to N times) when other processes used more than a "
                             "quarter of a core during it; repeated runs stay in the JSON")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="time one child process may take")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in under a minute: options left at their defaults become "
                             "--shapes tiny --runs 1 --decode-tokens 8 --warmup 4 --prefill 64,256")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def options_from_args(args):
    """Options from parsed arguments (with --quick applied); ValueError for a bad value."""
    given = vars(args).copy()
    if args.quick:
        defaults = add_arguments(argparse.ArgumentParser()).parse_args([])
        for key, value in QUICK.items():
            if given[key] == getattr(defaults, key):
                given[key] = value
    shapes = [parse_shape(s.strip()) for s in given["shapes"].split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        backend_setup(b)
    opts = Options(shapes=shapes, backends=backends, runs=given["runs"],
                   decode_tokens=given["decode_tokens"], warmup=max(1, given["warmup"]),
                   prefill=tuple(int(t) for t in given["prefill"].split(",") if t.strip()),
                   prefill_budget=args.prefill_budget, threads=args.threads, seed=args.seed,
                   quick=args.quick, timeout=args.timeout, verbose=not args.quiet,
                   wait_quiet=args.wait_quiet, retry_busy=max(0, args.retry_busy),
                   cache_dir=args.cache_dir)
    if not shapes or not backends:
        raise ValueError("give at least one shape and one backend")
    if opts.runs < 1 or opts.decode_tokens < 1 or any(T < 1 for T in opts.prefill):
        raise ValueError("--runs, --decode-tokens and every --prefill length must be at least 1")
    return opts


def run(args):
    """Run, print the tables on stdout, and write --out JSON."""
    opts = options_from_args(args)
    # Imported here, not at the top, so that --help works anywhere: the runner is Unix only.
    from cpu_harness.report import format_report
    from cpu_harness.runner import benchmark
    report = benchmark(opts, both_openblas=args.both_openblas)
    print(format_report(report, opts))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"\n(raw numbers written to {args.out})")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_cpu.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="CPU speed of tinyrwkv's backends beside the official rwkv package, on "
                    "synthetic models, with the machine's measured limits.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:               # a bad option value: say which, like argparse does
        parser.error(str(e))
    except ImportError as e:              # not a Unix (runner.py), or no tinyrwkv
        parser.exit(1, f"{parser.prog}: {e}\n")


if __name__ == "__main__":
    main()
