#!/usr/bin/env python
"""CPU benchmark of tinyrwkv's backends beside the official `rwkv` package and llama.cpp.

    python benchmarks/bench_cpu.py --quick                      # smoke run, about a minute
    python benchmarks/bench_cpu.py --shapes 0.1B --runs 3       # one shape, a few minutes
    python benchmarks/bench_cpu.py --shapes shipped --runs 3    # the model in weights/
    python benchmarks/bench_cpu.py --both-openblas --out results.json
        # every shape and backend twice: with the machine's OpenBLAS settings as they are, then
        # with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE both unset in the measured processes
    python benchmarks/bench_cpu.py --device-cpu --out cpu16.json --markdown-out cpu16.md
        # a many-core machine: 0.1B, threads 1,2,4,8,16, numba/bf16/int8, official, llama.cpp
    python benchmarks/bench_cpu.py --shapes 0.1B --load both    # quiet, then a busy core
    python benchmarks/bench_cpu.py --shapes 0.1B --batch 1,2,4,8 --backends numba,numba-bf16

`tinyrwkv bench ...` runs this script. The harness is in cpu_harness/ beside it (Unix only; its
__init__.py says what each number means and how it is measured). Optional: `pip install
threadpoolctl` to see which OpenBLAS kernel each process chose, the official package (`pip
install rwkv torch`) for the side-by-side rows and ratios, and `pip install llama-cpp-python
gguf` for the llama.cpp rows.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's tinyrwkv

from cpu_harness import BACKENDS, Options, backend_setup  # noqa: E402
from cpu_harness.shapes import parse_shape  # noqa: E402

QUICK = {"shapes": "tiny", "runs": 1, "decode_tokens": 8, "warmup": 4, "prefill": "64,256"}
# --device-cpu: the many-core (16-core Xeon) machine's run; options left at their defaults
# become these.
DEVICE_CPU = {"shapes": "0.1B", "threads": "1,2,4,8,16",
              "backends": "numba,numba-bf16,numba-int8,official,llama-f32,llama-f16,llama-q8_0"}


def add_arguments(parser):
    """The options of the benchmark (also `tinyrwkv bench` in a checkout)."""
    parser.add_argument("--shapes", default="0.1B,0.4B,1.5B",
                        help="comma-separated: 0.1B, 0.4B, 1.5B, tiny (L2 C256), shipped (the model "
                             "in weights/, read by tinyrwkv.load() with no path; converted by "
                             "tinyrwkv convert for the official package and llama.cpp), or custom "
                             "like L4-C512-V1024")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated rows: numpy, numba (float32 weights), numba-bf16, "
                             "numba-f16, numba-int8 (tinyrwkv's storage types; one this tinyrwkv "
                             "refuses shows 'not available'), numpy-bf16, official (the rwkv "
                             "package, cpu fp32), llama-f32, llama-f16, llama-q8_0 (llama.cpp "
                             "through llama-cpp-python, on GGUFs written by tinyrwkv convert)")
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
    parser.add_argument("--threads", default=None, metavar="N[,N...]",
                        help="threads for every backend and library (default: each library's "
                             "own, all cores); several, e.g. 1,2,4,8,16: a thread sweep, every "
                             "backend at every count; the table shows each backend at its best "
                             "decode count, a second table and the JSON every count")
    parser.add_argument("--batch", default="", metavar="B[,B...]",
                        help="batched decode, e.g. 1,2,4,8: tinyrwkv rows also time "
                             "model.forward_batch over B states and report aggregate tok/s per B "
                             "('not available' where this tinyrwkv has no forward_batch)")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="run N busy background processes (a pure-Python loop each, one "
                             "thread, normal priority) during the whole pass; their rate is "
                             "reported")
    parser.add_argument("--load", choices=("quiet", "busy", "both"), default=None,
                        help="quiet: no background processes; busy: --busy N (at least 1); both: "
                             "every pass twice, quiet then busy, two labelled tables and their "
                             "ratio (default: busy if --busy N > 0, else quiet)")
    parser.add_argument("--llama-extra-bufts", choices=("auto", "on", "off"), default="auto",
                        help="llama.cpp's extra (repacked) CPU weight buffers, the model parameter "
                             "use_extra_bufts: on, off, or auto = llama.cpp's default, and if a "
                             "llama row's process crashes (its Q8_0 repacking segfaulted on an "
                             "AVX-512 Intel host) that row again with them off, noted under the "
                             "table")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and ids")
    parser.add_argument("--cache-dir", default=None,
                        help="keep the synthetic checkpoints here and reuse them "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--out", default=None, help="write every raw number to this JSON file")
    parser.add_argument("--markdown-out", default=None, metavar="FILE",
                        help="also write the report's tables to FILE, with a compact table per "
                             "pass in the layout of README.md's speed section, ready to paste")
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
                        help="a smoke run (1-2 minutes; the first one also converts the GGUFs): "
                             "options left at their defaults become --shapes tiny --runs 1 "
                             "--decode-tokens 8 --warmup 4 --prefill 64,256")
    parser.add_argument("--device-cpu", action="store_true",
                        help="the many-core machine's run: options left at their defaults become "
                             "--shapes 0.1B --threads 1,2,4,8,16 --backends numba,numba-bf16,"
                             "numba-int8,official,llama-f32,llama-f16,llama-q8_0")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def _ints(text, what):
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} takes comma-separated whole numbers, not {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{what}: every value must be at least 1")
    return values


def options_from_args(args):
    """Options from parsed arguments (with --quick and --device-cpu applied); ValueError for a
    bad value."""
    given = vars(args).copy()
    defaults = add_arguments(argparse.ArgumentParser()).parse_args([])
    for preset, on in ((QUICK, args.quick), (DEVICE_CPU, args.device_cpu)):
        if on:
            for key, value in preset.items():
                if given[key] == getattr(defaults, key):
                    given[key] = value
    shapes = [parse_shape(s.strip()) for s in given["shapes"].split(",") if s.strip()]
    backends = [b.strip() for b in given["backends"].split(",") if b.strip()]
    for b in backends:
        backend_setup(b)
    threads = tuple(_ints(given["threads"], "--threads")) if given["threads"] else (None,)
    if len(set(threads)) != len(threads):
        raise ValueError("--threads: a count is given twice")
    if args.busy < 0:
        raise ValueError("--busy must be 0 or more")
    opts = Options(shapes=shapes, backends=backends, runs=given["runs"],
                   decode_tokens=given["decode_tokens"], warmup=max(1, given["warmup"]),
                   prefill=tuple(int(t) for t in given["prefill"].split(",") if t.strip()),
                   prefill_budget=args.prefill_budget, threads=threads, seed=args.seed,
                   quick=args.quick, timeout=args.timeout, verbose=not args.quiet,
                   wait_quiet=args.wait_quiet, retry_busy=max(0, args.retry_busy),
                   cache_dir=args.cache_dir, batch=tuple(_ints(args.batch, "--batch")),
                   busy=args.busy, load=args.load or ("busy" if args.busy > 0 else "quiet"),
                   llama_extra_bufts=args.llama_extra_bufts)
    if not shapes or not backends:
        raise ValueError("give at least one shape and one backend")
    if len({s.name for s in shapes}) != len(shapes) or len(set(backends)) != len(backends):
        raise ValueError("a shape or backend is given twice")
    if opts.runs < 1 or opts.decode_tokens < 1 or any(T < 1 for T in opts.prefill):
        raise ValueError("--runs, --decode-tokens and every --prefill length must be at least 1")
    return opts


def run(args, argv=None):
    """Run, print the tables on stdout, and write --out JSON (and --markdown-out)."""
    opts = options_from_args(args)
    # Imported here, not at the top, so that --help works anywhere: the runner is Unix only.
    from cpu_harness.report import format_markdown, format_report
    from cpu_harness.runner import benchmark
    report = benchmark(opts, both_openblas=args.both_openblas)
    if args.out:              # first: a long run's numbers survive a failure below
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    text = format_report(report, opts)
    print(text)
    if args.out:
        print(f"\n(raw numbers written to {args.out})")
    if args.markdown_out:
        Path(args.markdown_out).write_text(format_markdown(report, opts, text, sys.argv[1:] if argv is None else argv))
        print(f"(tables written to {args.markdown_out})")
    return report


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is none to show (None, '', a flag's
    False): there the help text says what happens."""

    def _get_help_string(self, action):
        if action.default in (None, "") or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_cpu.py", formatter_class=HelpFormatter,
        description="CPU speed of tinyrwkv's backends (and weight storage types) beside the "
                    "official rwkv package and llama.cpp, on synthetic models or the shipped "
                    "one, with the machine's measured limits; optionally a thread sweep, "
                    "batched decode and a busy background.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args, argv)
    except ValueError as e:               # a bad option value: say which, like argparse does
        parser.error(str(e))
    except ImportError as e:              # not a Unix (runner.py), or no tinyrwkv
        parser.exit(1, f"{parser.prog}: {e}\n")


if __name__ == "__main__":
    main()
