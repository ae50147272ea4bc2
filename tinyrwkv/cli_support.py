"""What every command of the `tinyrwkv` CLI shares (tinyrwkv/cli.py and the commands in their own
modules: chat.py, server.py, evaluate.py): one-line errors, output that fails plainly, loading a
model and a state from the options, and the argument parser's classes."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from .checks import NON_NEGATIVE, POSITIVE, UNIT, Range, option

def default_model():
    """The model shipped in weights/, if there is one."""
    from .errors import CheckpointError
    from .loader import shipped_model_path
    try:
        return shipped_model_path()
    except CheckpointError as e:
        fail(str(e))


def fail(message):
    """The end of every error a user can cause: one line on stderr, exit status 1."""
    one_line = " ".join(str(message).splitlines())
    print(f"tinyrwkv: error: {one_line}", file=sys.stderr)
    raise SystemExit(1)


def load_model(args):
    from .loader import load
    if "--weights" in sys.argv:
        print("tinyrwkv: note: --weights is now --storage; the old name goes in the next release",
              file=sys.stderr)
    path = args.model or default_model()
    t0 = time.perf_counter()
    try:
        model = load(path, dtype=args.dtype, tokenizer=args.tokenizer,
                              backend=args.backend, storage=args.storage, threads=args.threads,
                              strategy=args.strategy, device=args.device,
                              check_finite=args.check_finite)
    except ValueError as e:                     # a bad option combination, no GPU, ...
        fail(str(e))
    if model.tokenizer is None:
        fail(str(model.tokenizer_error))
    c = model.config
    print(f"tinyrwkv: {model.path.name}: RWKV-7 {c.variant}, L{c.n_layer} C{c.n_embd} "
          f"H{c.n_head}x{c.head_size} V{c.vocab_size}, {model.n_params / 1e6:.1f}M params, "
          f"{model.dtype.name}, backend {model.backend}"
          f"{f' ({model.threads_description})' if hasattr(model, 'threads_description') else ''}"
          f"{f' on {model.device_name}' if getattr(model, 'device_name', None) else ''}, "
          f"tokenizer {model.tokenizer.name} "
          f"(loaded in {time.perf_counter() - t0:.2f} s)", file=sys.stderr)
    if model.backend == "numpy" and not (args.backend or args.strategy) and args.dtype == "float32":
        from .loader import numba_missing
        print(f"tinyrwkv: backend numpy, not the faster numba: {numba_missing()}",
              file=sys.stderr)
    return model


def sampling_from(args):
    from .sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty,
                          penalty_decay=args.penalty_decay)


def rate(n, seconds):
    return f"{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tok/s)" if seconds > 0 else f"{n} tokens"


def load_state(path, config):
    """--state: a tinyrwkv state (.npz, --save-state) or a state-tuning checkpoint (.pth or
    .safetensors with blocks.{i}.att.time_state, RWKV-PEFT), read through tinyrwkv.formats."""
    from .formats.lora import read_start_state
    return read_start_state(path, config)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose commands may check what depends on several options: `check`, a
    function of the parsed options that raises ValueError, runs after parsing, and its message
    is the command's usage error (exit 2), as for a single bad option."""
    check = None

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if self.check is not None:
            try:
                self.check(namespace)
            except ValueError as e:
                self.error(str(e))
        return namespace, extras


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is none to show (None) or it would
    mislead (a flag's True/False: --no-check-finite "default: True"): there the help text says
    what happens."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


# What to do about an OSError, by errno; the message names the path first.
OS_ERROR_FIXES = {
    errno.ENOENT: "no such file or folder; check the path",
    errno.EEXIST: "already exists (and is not a folder); choose another path",
    errno.EACCES: "permission denied; check its permissions, or use another path",
    errno.EPERM: "operation not permitted; check its permissions, or use another path",
    errno.EISDIR: "is a folder, not a file; give the path of a file",
    errno.ENOTDIR: "a part of the path is not a folder; check the path",
    errno.ENOSPC: "no space left on the device; free some disk space, or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENAMETOOLONG: "the name is too long; use a shorter path",
}
if hasattr(errno, "EDQUOT"):                   # not on Windows
    OS_ERROR_FIXES[errno.EDQUOT] = "disk quota exceeded; free some space, or write elsewhere"


def describe_os_error(e):
    """An OSError as `path: what happened; what to do` (no path: a failed write to an already
    open file, e.g. a pipe)."""
    what = OS_ERROR_FIXES.get(e.errno, e.strerror or str(e))
    if e.filename is None:
        return what
    where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return f"{where}: {what}"


def emit(text):
    """Write generated text to stdout now. A failed write (`> file` on a full disk) is an OSError
    naming stdout; BrokenPipeError (the reader went away) stays what it is."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OSError(e.errno, e.strerror, "stdout") from None


def _discard_stdout():
    """Point stdout at the null device (the CLI's, never the library's: it changes file
    descriptor 1 of this process)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):   # stdout replaced by an object without a fd
        pass


@contextmanager
def one_line_errors():
    """Every error a user can cause ends here as one line `tinyrwkv: error: ...`, exit 1:

    * ValueError and its kinds (CheckpointError, TokenizerError, a bad option combination): by
      the project's rule, their message already names the file, the problem and the fix;
    * OSError (missing file, permission denied, disk full, ...): path, problem and fix
      (describe_os_error); UnicodeDecodeError of a text input; a missing optional package;
      MemoryError; a panic of the tokenizers library (its own message, printed by Rust's panic
      hook, stays on stderr above: a library cannot silence it);
    * Ctrl-C exits 130 and a closed pipe (`tinyrwkv generate ... | head`) exits 1, both without
      a traceback; SystemExit (argparse's usage errors: exit 2) passes through.

    Anything else is a bug in tinyrwkv, not something the user did. Its traceback is kept,
    since it is what a fix needs, and a last line says that it is a bug and how to report it;
    exit 1. (A ValueError raised by a bug is shown as a user error: the price of ValueError
    being the project's user-error type.)
    """
    from .tokenizer import is_rust_panic
    try:
        yield
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("\ntinyrwkv: interrupted", file=sys.stderr)
        raise SystemExit(130)
    except BrokenPipeError:                    # the reader went away: nothing to tell it
        _discard_stdout()
        raise SystemExit(1)
    except OSError as e:
        if e.filename == "stdout":             # so that Python's flush at exit stays quiet
            _discard_stdout()
        fail(describe_os_error(e))
    except UnicodeDecodeError as e:            # a ValueError too: caught first, for its message
        fail(f"the input is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")
    except ValueError as e:
        fail(str(e))
    except ImportError as e:                   # an optional package missing, or broken
        package = (e.name or "").split(".")[0]
        fail(f"{e}: this needs the Python package {package}; install it (pip install {package})"
             if package else f"{e}; reinstall the package it names")
    except MemoryError:
        fail("out of memory; close other programs, or use a smaller model (or --storage "
             "bfloat16 to halve the weights' memory, int8 for about a quarter)")
    except Exception as e:
        traceback.print_exc()
        print(f"tinyrwkv: internal error: {type(e).__name__}: this is a bug in tinyrwkv, not a "
              "problem with your input or files; please report it to the tinyrwkv project's "
              "issue tracker with the command you ran and the traceback above", file=sys.stderr)
        raise SystemExit(1)
    except BaseException as e:
        if not is_rust_panic(e):
            raise
        fail(f"the tokenizers library crashed (a Rust panic: {e}); pass the model's own "
             "tokenizer.json")


def no_check_finite(p, what="load the model even if a tensor holds NaN or Inf (its output will "
                             "be NaN); by default such a file is refused, naming the tensors"):
    p.add_argument("--no-check-finite", dest="check_finite", action="store_false", help=what)


def add_model_options(p, model_help=None):
    """The options that choose and load a model (load_model reads them)."""
    p.add_argument("--model", "-m", metavar="PATH",
                   help=model_help or "RWKV-7 model: .pth, .safetensors, .gguf or a Hugging "
                                      "Face folder; default: the model in weights/")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="'world', or a tokenizer.json (needed for Pile models: 20B_tokenizer.json); "
                        "default: chosen from the vocabulary size")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="compute precision (float64 runs on the numpy backend)")
    p.add_argument("--backend", choices=["numpy", "numba", "cupy"],
                   help="numba: compiled CPU kernels (default where numba is installed); "
                        "numpy: the readable reference; cupy: CUDA GPU (needs CuPy)")
    p.add_argument("--storage", "--weights", dest="storage",
                   choices=["float32", "bfloat16", "float16", "int8"],
                   help="how the large matrices are kept: numba float32 (default), "
                        "bfloat16, float16 or int8 (GGUF Q8_0 blocks; a q8_0 .gguf is used "
                        "as it is); cupy float16 (default), bfloat16 or float32 "
                        "(--weights is the old name of this option)")
    p.add_argument("--strategy", metavar="TEXT",
                   help="the official package's strategy instead of --backend/--storage: "
                        "'cpu fp32', 'cpu bf16', 'cpu fp16', 'cuda fp16', 'cuda:1 bf16', "
                        "'cuda fp32'")
    p.add_argument("--device", type=option(int, NON_NEGATIVE),
                   help="CUDA device number for the cupy backend (default 0)")
    p.add_argument("--threads", type=option(int, POSITIVE),
                   help="threads for kernels and BLAS (default: prefill on all cores; decode "
                        "chooses 1 to all while it runs, so a busy machine cannot stall it)")
    no_check_finite(p)

def add_sampling_options(p, temperature, top_p, presence, frequency, max_tokens):
    """The sampling options (sampling_from reads them), with the command's defaults."""
    # The ranges SamplingParams checks, here as usage errors (exit 2) before anything loads.
    p.add_argument("--max-tokens", "-n", type=option(int, POSITIVE), default=max_tokens,
                   help="tokens to generate at most")
    p.add_argument("--temperature", "-t", type=option(float, NON_NEGATIVE), default=temperature,
                   help="0 = greedy")
    p.add_argument("--top-p", type=option(float, UNIT), default=top_p,
                   help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=option(int, NON_NEGATIVE), default=0,
                   help="keep the k most likely tokens (0 = off)")
    p.add_argument("--presence-penalty", type=option(float), default=presence,
                   help="subtracted from a token's logit once it has appeared")
    p.add_argument("--frequency-penalty", type=option(float), default=frequency,
                   help="subtracted per (decayed) occurrence")
    p.add_argument("--penalty-decay", type=option(float, UNIT), default=0.996,
                   help="occurrence counts are multiplied by this every token")
    p.add_argument("--seed", type=option(int, Range(-1)), default=0,
                   help="random seed (-1: a different one each run)")
