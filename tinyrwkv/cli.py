"""The `tinyrwkv` command: generate, chat, info."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from .checks import NON_NEGATIVE, POSITIVE, UNIT, Range, decode_text, option, read_text
from .cli_support import (HelpFormatter, Parser, add_model_options, add_sampling_options,
                          default_model, describe_os_error, emit, fail, load_model, load_state,
                          no_check_finite, one_line_errors, rate, sampling_from)
from .formats.numerics import check_finite
from .formats.source import FiniteOnly

def cmd_merge_lora(args):
    """Base (any format load reads) + adapter (RWKV-PEFT .pth/.safetensors, PEFT folder or
    llama.cpp LoRA GGUF) -> OUT, merged tensor by tensor while it is written."""
    from .files import OutputError
    from .formats.lora import LoraMerged, read_adapter
    limit_threads(args)
    base = _model_source(args.base)
    lora, _ = read_adapter(args.lora)           # --alpha is required: the file's alpha, if any,
    if args.check_finite:                       # is not trusted over the user's
        check_finite(lora, args.lora, fix=f"the adapter is damaged or its training diverged; "
                     f"nothing was written (--no-check-finite merges it anyway)")
    try:
        merged = LoraMerged(base, lora, args.alpha)
        if args.check_finite:                   # NaN in the base, or a merge that overflows
            merged = FiniteOnly(merged, f"merging {args.lora} into {args.base}",
                                "the base model is damaged, or the merge overflowed; nothing was "
                                "written (--no-check-finite writes it anyway)")
        write_weights(Path(args.output), merged, args.type, _tokenizer_of(base),
                      inputs=(base.path, args.lora))
    except OutputError:                         # the output is an input: its own message
        raise
    except ValueError as e:                     # the adapter does not fit the base
        fail(f"{args.lora} cannot be merged into {args.base}: {e}; give the adapter trained on "
             "this base model")
    print(f"tinyrwkv: merged {args.lora} into {args.base} -> {args.output}", file=sys.stderr)


def _model_source(path):
    """The model file at `path` (any format), checked to be an RWKV-7 x070 model before anything
    is written from it: as tinyrwkv.load checks it."""
    from .formats import open_model
    from .schema import check_x070_keys, detect_version
    source = open_model(path)
    infos = source.tensors()
    detect_version(infos.keys(), source=source.path)
    check_x070_keys(infos, source=source.path)
    return source


def _tokenizer_of(source):
    """The tokenizer to write beside (or into) a converted model: the one the file carries, else
    the one `load` would choose from the vocabulary size, else None (then none is written). One
    that does not fit the embedding is not written either (get_tokenizer checks it), with a note."""
    from .tokenizer import TokenizerError, get_tokenizer
    try:
        return get_tokenizer(source.tensors()["emb.weight"].shape[0], None, model_path=source.path,
                             carried=source.tokenizer)
    except TokenizerError as e:
        if source.tokenizer is not None:
            print(f"tinyrwkv: note: the output gets no tokenizer: {e}", file=sys.stderr)
        return None


def write_weights(out, weights, out_type, tok=None, name="tinyrwkv", inputs=()):
    """Write official-keyed weights (a dict, or a TensorSource: then streamed, one tensor at a
    time) as out's suffix says (.gguf, .safetensors, .pth, or a folder for HF/fla).

    Every file is written atomically (tinyrwkv/files.py): a kill or an error leaves the old output
    or none, never a partial one. `inputs`: the files read from; an output that is one of them (or
    holds one, or sits in one) is refused before anything is written: the inputs are read while
    the output is written, so writing over one would destroy it."""
    import numpy as np
    from .files import atomic_path, refuse_overwriting
    from .formats import as_source, write_gguf, write_hf, write_safetensors
    source = as_source(weights)
    suffix = out.suffix.lower()
    if suffix != ".gguf" and out_type not in ("f32", "f16", "bf16"):
        fail(f"{out_type} is a GGUF type; .safetensors, .pth and folders take f32, f16 or bf16")
    side_tokenizer = out.with_name(out.stem + ".tokenizer.json")
    for output in (out, side_tokenizer) if suffix in (".safetensors", ".pth") else (out,):
        refuse_overwriting(output, inputs)
    dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(out_type)
    if suffix == "":                             # a folder: Hugging Face / fla format
        write_hf(out, source, tok, dtype=dtype)
    elif suffix == ".gguf":
        write_gguf(out, source, out_type, tokenizer=tok, name=name)
    elif suffix in (".safetensors", ".pth"):
        if suffix == ".pth":
            from .formats.pth import write_pth
            write_pth(out, source, out_type)          # torch's format, written without torch
        else:
            code = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[out_type]
            entries = {k: (code, info.shape) for k, info in source.tensors().items()}
            write_safetensors(out, entries, lambda key: source.read(key, dtype))
        from .tokenizer import HFTokenizer
        if isinstance(tok, HFTokenizer):         # beside it, where tinyrwkv.load looks
            with atomic_path(side_tokenizer) as tmp:
                tok._tok.save(str(tmp))
    else:
        fail(f"{out}: give the output a .gguf, .safetensors or .pth suffix, or no suffix for a "
             "Hugging Face / fla model folder")


def cmd_generate(args):
    from .formats.state_file import save_state, state_file_path
    from .generate import Session
    prompts = prompts_of(args)
    if len(prompts) > 1:
        return generate_several(args, prompts)
    if args.save_state:
        state_file_path(args.save_state)         # a folder is refused before the generation
    prompt = prompts[0] if prompts else None
    if prompt is None:
        if sys.stdin.isatty():
            fail("give a prompt: tinyrwkv generate \"Once upon a time\" (or pipe it on stdin)")
        prompt = decode_text(sys.stdin.buffer.read(), "stdin", "prompt")
    model = load_model(args)
    session = Session(model, model.tokenizer, seed=None if args.seed < 0 else args.seed)
    if args.state:
        session.state = load_state(args.state, model.config)
    session.feed(prompt)
    if args.echo:
        emit(prompt)
    for piece in session.stream(args.max_tokens, sampling_from(args), stop=args.stop):
        emit(piece)
    emit("\n")
    s = session.stats
    print(f"tinyrwkv: prompt {rate(s['prompt_tokens'], s['prompt_seconds'])}; "
          f"generated {rate(s['tokens'], s['seconds'])}", file=sys.stderr)
    if args.save_state:
        written = save_state(session.state, args.save_state)
        added = "" if written.name == Path(args.save_state).name else " (.npz added to the name)"
        print(f"tinyrwkv: state saved to {written}{added}", file=sys.stderr)


def prompts_of(args):
    """The prompts given: the positional one, then each --prompt, then the lines of
    --prompts-file (blank lines skipped). None of them: [] (then stdin is the prompt)."""
    prompts = ([] if args.prompt is None else [args.prompt]) + args.prompts
    if args.prompts_file:
        lines = read_text(args.prompts_file, "prompts file").splitlines()
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            fail(f"{args.prompts_file}: the prompts file has no prompts; write one per line")
        prompts += from_file
    return prompts


def generate_several(args, prompts):
    """Several prompts: prefilled one by one, decoded together as one batch (generate.py's
    stream_batch); each completion printed after the batch ends, in the prompts' order, under a
    `==> prompt i <==` line (as `head` labels several files)."""
    from .generate import Session, stream_batch
    if args.save_state:
        fail("--save-state saves one state: give one prompt")
    model = load_model(args)
    seed = None if args.seed < 0 else args.seed
    start = load_state(args.state, model.config) if args.state else None
    sessions = [Session(model, model.tokenizer, state=start, seed=seed) for _ in prompts]
    for session, prompt in zip(sessions, prompts):
        session.feed(prompt)
    texts = [[] for _ in prompts]
    t0 = time.perf_counter()
    for i, piece in stream_batch(sessions, args.max_tokens, sampling_from(args), stop=args.stop):
        texts[i].append(piece)
    seconds = time.perf_counter() - t0
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        separator = "\n" if i > 0 else ""            # a blank line between completions
        emit(f"{separator}==> prompt {i + 1} <==\n")
        emit((prompt if args.echo else "") + "".join(text) + "\n")
    prompt_tokens = sum(s.stats["prompt_tokens"] for s in sessions)
    prompt_seconds = sum(s.stats["prompt_seconds"] for s in sessions)
    print(f"tinyrwkv: {len(prompts)} prompts {rate(prompt_tokens, prompt_seconds)}; generated "
          f"{rate(sum(s.stats['tokens'] for s in sessions), seconds)} as a batch of "
          f"{len(prompts)}", file=sys.stderr)


def cmd_info(args):
    from .model import Config
    from .schema import detect_version
    from .tokenizer import TokenizerError, get_tokenizer
    source = _model_source(args.path)                     # shapes and dtypes, no data read
    path, tensors = source.path, source.tensors()
    variant = detect_version(tensors.keys())
    config = Config.from_weights({k: SimpleNamespace(shape=t.shape) for k, t in tensors.items()})
    unused = {f"blocks.0.att.{n}" for n in ("v0", "v1", "v2")}
    n_params = sum(int(_prod(t.shape)) for k, t in tensors.items() if k not in unused)
    try:
        tok = get_tokenizer(config.vocab_size, args.tokenizer, model_path=path,
                            carried=source.tokenizer).name
    except TokenizerError as e:
        tok = f"unknown ({e})"
    files = getattr(source, "files", None) or [path]          # a folder: the shards it reads
    size = sum(Path(f).stat().st_size for f in files)
    rows = [
        ("file", f"{path} ({size / 1e6:.1f} MB)"),
        ("format", source.description),
        ("architecture", f"RWKV-7 ({variant})"),
        ("layers", config.n_layer), ("width (n_embd)", config.n_embd),
        ("heads x head size", f"{config.n_head} x {config.head_size}"),
        ("channel-mix width", config.dim_ffn),
        ("LoRA ranks w/a/v/g", f"{config.d_decay}/{config.d_aaa}/{config.d_mv}/{config.d_gate}"),
        ("vocabulary rows", config.vocab_size), ("tokenizer", tok),
        ("parameters", f"{n_params:,} ({n_params / 1e6:.1f}M; layer-0 v0/v1/v2 not counted)"),
        ("tensors", len(tensors)),
        ("state size", f"{config.n_layer * config.n_embd * (config.head_size + 2):,} numbers"),
    ]
    if config.d_deepembed:
        rows.insert(8, ("DeepEmbed rank", config.d_deepembed))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def cmd_trace(args):
    import tinyrwkv
    from . import oracle
    try:
        model = tinyrwkv.load(args.model, backend="numpy",
                              dtype=args.dtype if args.impl == "tinyrwkv" else "float32",
                              tokenizer=args.tokenizer, progress=False,
                              check_finite=args.check_finite, threads=args.threads)
    except ValueError as e:                     # threads without threadpoolctl
        fail(str(e))
    if args.ids:
        try:
            ids = [int(t) for t in read_text(args.ids, "token id file").split()]
        except ValueError as e:
            fail(f"{args.ids}: token ids must be whitespace-separated integers ({e})")
    else:
        if model.tokenizer is None:
            fail(str(model.tokenizer_error))
        ids = model.tokenizer.encode(args.prompt)
    from .files import refuse_overwriting
    refuse_overwriting(oracle.trace_file_path(args.out), [model.path, args.ids])
    try:
        select = oracle.Selection(
            names=None if args.names is None else [p for n in args.names for p in n.split(",") if p],
            layers=None if args.layers is None else oracle.parse_ranges(args.layers, "--layers"),
            tokens=None if args.tokens is None else oracle.parse_ranges(args.tokens, "--tokens"),
            state_every=args.state_every)
        select.token_rows(len(ids))
        if select.layers and select.layers[-1] >= model.config.n_layer:
            raise ValueError(f"--layers: the model has layers 0..{model.config.n_layer - 1}")
    except ValueError as e:
        fail(str(e))
    state = None
    if args.initial_state:
        from .formats.state_file import load_state
        state = load_state(args.initial_state, model.config)
    if args.final_state:
        from .formats.state_file import state_file_path
        refuse_overwriting(state_file_path(args.final_state), [model.path, args.ids, args.out])
    from .formats.progress import ProgressBar, stderr_is_tty
    show = args.progress if args.progress is not None else stderr_is_tty()
    meta = {"model": str(model.path), "dtype": args.dtype, "ids": [int(i) for i in ids],
            "initial_state": args.initial_state and str(args.initial_state)}
    with ProgressBar(label="tracing", force=bool(args.progress)) as bar:
        if args.impl == "tinyrwkv":
            written, final = oracle.write_trace(args.out, model, ids, state=state, select=select,
                                                progress=bar if show else None, meta=meta)
        else:
            written, final = _trace_other(args, model, ids, state, select,
                                          bar if show else None, meta)
    size = written.stat().st_size
    print(f"tinyrwkv: {len(ids)} tokens, {size / 1e6:,.1f} MB -> {written}", file=sys.stderr)
    if args.final_state:
        from .formats.state_file import save_state
        print(f"tinyrwkv: final state -> {save_state(final, args.final_state)}", file=sys.stderr)


# --impl: what each bridge (tinyrwkv/bridges) takes from the trace command's options
IMPL_DEFAULTS = {"official": dict(mode="decode", precision="fp32", device="cpu"),
                 "llama.cpp": dict(precision="f32"),
                 "fla": dict(mode="chunk", precision="fp32", device="cuda")}
IMPL_CHOICES = {"official": dict(mode=("decode", "prefill"), precision=("fp32", "fp16", "bf16"),
                                 device=("cpu", "cuda")),
                "llama.cpp": dict(precision=("f32", "f16", "q8_0")),
                "fla": dict(mode=("chunk", "fused_recurrent", "decode"),
                            precision=("fp32", "fp16", "bf16"), device=("cuda",))}


def _trace_other(args, model, ids, state, select, progress, meta):
    """`tinyrwkv trace --impl NAME`: another implementation run by its bridge, saved as a trace."""
    from . import oracle
    from .bridges import bridge
    chosen = dict(IMPL_DEFAULTS[args.impl])
    for key in ("mode", "precision", "device"):
        value = getattr(args, key)
        if value is None:
            continue
        if key not in IMPL_CHOICES[args.impl] or value not in IMPL_CHOICES[args.impl][key]:
            allowed = IMPL_CHOICES[args.impl].get(key)
            fail(f"--{key} {value}: " + (f"--impl {args.impl} takes {', '.join(allowed)}"
                                         if allowed else f"--impl {args.impl} has no --{key}"))
        chosen[key] = value
    if args.detail and args.impl != "official":
        fail("--detail is for --impl official only")
    if args.impl == "official":
        options = dict(mode=chosen["mode"], strategy=f"{chosen['device']} {chosen['precision']}",
                       detail=args.detail or "coarse")
    elif args.impl == "llama.cpp":
        if args.mode:
            fail("--impl llama.cpp has no --mode: give --chunk K for K tokens per call")
        options = dict(out_type=chosen["precision"], chunk=args.chunk, n_threads=args.threads)
    else:
        torch_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
        options = dict(device=chosen["device"], dtype=torch_dtype[chosen["precision"]],
                       mode=chosen["mode"], **({"piece": args.chunk} if args.chunk else {}))
    if args.chunk and args.impl == "official":
        fail("--chunk is for --impl llama.cpp (tokens per call) and fla (tokens per call in "
             "fused_recurrent mode)")
    try:
        tr, final = bridge(args.impl).record(model.path, ids, state=state, select=select,
                                             progress=progress, **options)
    except ImportError as e:
        fail(str(e))
    meta.update(dtype=f"{args.impl} {chosen['precision']}", impl=args.impl,
                options={k: v for k, v in options.items() if v is not None})
    return oracle.save_trace(args.out, tr, meta=meta), final


def cmd_compare(args):
    """Check the other trace (check_trace), compare, print the report; write --json and
    --heatmap when asked. A trace that cannot be compared as it is (names that are not trace
    names, no logits, wrong shapes, the token axis elsewhere) is an error naming every problem,
    exit 1, unless --warn: then each is a warning on stderr and the rest is compared."""
    from . import oracle
    from .files import refuse_overwriting
    if args.heatmap:
        try:
            import matplotlib  # noqa: F401  (checked before the traces are read)
        except ImportError:
            fail("--heatmap needs matplotlib, an optional dependency: pip install matplotlib "
                 "(or leave out --heatmap)")
    for out in (args.json, args.heatmap):
        if out:
            refuse_overwriting(out, [args.reference, args.other])
    reference, other = oracle.load_trace(args.reference), oracle.load_trace(args.other)
    calibration = _calibration(args, reference)
    report = oracle.compare(reference, other, args.dtype, args.tol, problems="warn",
                            local=not args.no_local, **calibration)
    if report["problems"] and not args.warn:
        if args.json:
            oracle.save_report_json(args.json, report, args.reference, args.other)
        fail(oracle.describe_problems(report["problems"], rest="--warn"))
    for problem in report["problems"]:
        print(f"tinyrwkv: warning: {problem['message']}", file=sys.stderr)
    print(oracle.format_report(report, warnings=False))
    if args.json:
        oracle.save_report_json(args.json, report, args.reference, args.other)
    if args.heatmap and report["rows"]:
        oracle.save_heatmap(args.heatmap, report)
    if not report["rows"]:
        fail("the traces have no tensor name in common")
    raise SystemExit(0 if report["ok"] else 1)


def _calibration(args, reference):
    """compare's model, ids and initial state for tolerances that follow the numbers: --model, or
    the model the reference trace names in its meta when that file is there; {} for one fixed
    tolerance (--fixed, --tol, or no model to be had), said on stderr."""
    meta = reference.meta or {}
    if args.fixed or args.tol is not None:
        return {}
    path = args.model or meta.get("model")
    if path is None or not Path(path).exists():
        why = (f"the model the reference names ({path}) is not here" if path else
               "the reference trace does not name its model")
        print(f"tinyrwkv: note: {why}, so one tolerance per dtype serves every tensor (this can "
              "flag ill-conditioned tensors such as gn on correct code); give --model for "
              "tolerances that follow the numbers and the local op check", file=sys.stderr)
        return {}
    if meta.get("ids") is None:
        fail(f"{args.reference} does not list its token ids (__meta__ 'ids'), which calibrated "
             "tolerances need: write it with `tinyrwkv trace`, or give --fixed")
    if meta.get("dtype") not in (None, "float64"):
        fail(f"{args.reference} is a {meta['dtype']} trace: calibrated tolerances are measured "
             "against the float64 oracle; trace the reference with --dtype float64")
    import tinyrwkv
    model = tinyrwkv.load(path, dtype="float64", backend="numpy", progress=False)
    state = None
    state_path = args.initial_state or meta.get("initial_state")
    if state_path:
        from .formats.state_file import load_state
        state = load_state(state_path, model.config)
    print(f"tinyrwkv: tolerances calibrated on {path}"
          + (f" from the state {state_path}" if state_path else "") + " (what rounding to "
          f"{args.dtype} does to each tensor; --fixed for one tolerance)", file=sys.stderr)
    return dict(model=model, ids=meta["ids"], state=state)


def limit_threads(args):
    """--threads for commands that compute with NumPy only (BLAS threads, via threadpoolctl)."""
    if args.threads is not None:
        from .loader import _blas_threads
        try:
            _blas_threads(args.threads)
        except ValueError as e:
            fail(str(e))


def cmd_golden(args):
    from .golden import write_golden
    limit_threads(args)
    manifest = write_golden(args.out)
    print(f"tinyrwkv: {len(manifest['cases'])} golden cases -> {args.out}/manifest.json",
          file=sys.stderr)


def cmd_convert(args):
    """Any format load reads -> OUT, streamed: each tensor is read, converted and written before
    the next is read (formats/source.py), so memory holds one tensor, not the model."""
    source, out = _model_source(args.input), Path(args.output)
    src = source.path
    tensors = source if not args.check_finite else FiniteOnly(
        source, src, "the file is damaged or comes from a diverged training run: re-download it; "
        "nothing was written (--no-check-finite converts it anyway)")
    write_weights(out, tensors, args.type, _tokenizer_of(source), name=src.stem, inputs=[src])
    print(f"tinyrwkv: {src.name} ({source.description}) -> {out} "
          f"({args.type if out.suffix else 'HF/fla ' + args.type})", file=sys.stderr)


def cmd_bench(args):
    """`tinyrwkv bench ARGS` = `python benchmarks/bench_cpu.py ARGS` of this checkout. The
    benchmark is a Unix-only measurement harness beside the package, not in it (a wheel does not
    carry it), so it runs as its own process."""
    import subprocess
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"
    if not script.is_file():
        fail("the benchmark is not part of the installed package: in a checkout of tinyrwkv "
             "(git clone ...), run python benchmarks/bench_cpu.py (the same options; --help "
             "lists them)")
    raise SystemExit(subprocess.call([sys.executable, str(script), *args.bench_args]))


def build_parser():
    parser = Parser(
        prog="tinyrwkv",
        description="RWKV-7 (x070) in NumPy: generate text, chat, and inspect checkpoints.",
        epilog="Run 'tinyrwkv COMMAND --help' for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)   # Parsers too
    fmt = HelpFormatter

    def blas_threads_arg(p):
        p.add_argument("--threads", type=option(int, POSITIVE),
                       help="BLAS threads (default: all cores; needs threadpoolctl)")

    model_args, sampling_args = add_model_options, add_sampling_options

    g = sub.add_parser("generate", help="continue a prompt, streaming the text", formatter_class=fmt,
                       description="Continue a prompt with an RWKV-7 model. Text streams to stdout; "
                                   "speed is reported on stderr.")
    g.add_argument("prompt", nargs="?", help="the text to continue (default: read stdin)")
    g.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeatable): several prompts are generated together, as one "
                        "batch, and each completion is printed under a '==> prompt N <==' line")
    g.add_argument("--prompts-file", metavar="FILE",
                   help="prompts to generate together as one batch, one per line (blank lines "
                        "are skipped)")
    model_args(g)
    sampling_args(g, temperature=1.0, top_p=0.85, presence=0.2, frequency=0.2, max_tokens=200)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable)")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    g.add_argument("--state", metavar="FILE",
                   help="start from a state: one saved with --save-state (.npz), or a state-tuning "
                        "checkpoint with blocks.N.att.time_state (.pth/.safetensors)")
    g.add_argument("--save-state", metavar="FILE",
                   help="save the final state to FILE (.npz is appended to a name without it)")
    g.set_defaults(func=cmd_generate)

    from .chat import add_parser as add_chat_parser
    add_chat_parser(sub, fmt)
    from .server import add_parser as add_serve_parser
    add_serve_parser(sub, fmt)
    from .evaluate import add_parser as add_eval_parser
    add_eval_parser(sub, fmt)

    # Every word after `bench` is the benchmark's own, --help included: no prefix character of
    # this parser can start one of them, so they all land in bench_args.
    b = sub.add_parser("bench", help="measure speed beside the official package (in a checkout: "
                                     "python benchmarks/bench_cpu.py)",
                       add_help=False, prefix_chars="\0")
    b.add_argument("bench_args", nargs="*")
    b.set_defaults(func=cmd_bench)

    tr = sub.add_parser("trace", help="record every intermediate of the forward pass (.npz)",
                        formatter_class=fmt,
                        description="Run the recurrent form token by token and save every "
                                    "intermediate under a stable name, for `tinyrwkv compare`, "
                                    "layer by layer to disk (bounded memory). Names, shapes, "
                                    "the token axis and the selections: docs/formats.md §8.3, "
                                    "§8.4.")
    tr.add_argument("--model", "-m", metavar="PATH", help="checkpoint; default: the shipped model")
    src = tr.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text, encoded with the model's tokenizer")
    src.add_argument("--ids", metavar="FILE", help="a text file of whitespace-separated token ids")
    tr.add_argument("--out", required=True, metavar="FILE", help="the trace (.npz)")
    tr.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                    help="float64: the oracle; float32: what a float32 implementation should match")
    tr.add_argument("--tokenizer", metavar="PATH", help="tokenizer for --prompt (default: the model's)")
    tr.add_argument("--names", action="append", metavar="GLOBS",
                    help="keep only these names: comma-separated glob patterns on the full name "
                         "(L3.y, L*.state, logits) or a layer's op (y, ffn_*); repeatable. "
                         "final.* is always written (docs/formats.md §8.4)")
    tr.add_argument("--layers", metavar="RANGES",
                    help="keep L{i}.* only for these layers: 0,2-4 or 2:5 (half-open)")
    tr.add_argument("--tokens", metavar="RANGES",
                    help="keep only these token rows (0 = the first token of --ids): 0:64,500-511; "
                         "the file lists them in __tokens__")
    tr.add_argument("--state-every", type=option(int, POSITIVE), default=1, metavar="K",
                    help="keep L{i}.state only after every K-th token and the last (chunk ends); "
                         "the file lists them in __state_tokens__")
    tr.add_argument("--initial-state", metavar="FILE",
                    help="start from this state file (tinyrwkv state .npz) instead of zeros")
    tr.add_argument("--final-state", metavar="FILE",
                    help="also save the state after the last token as a state file")
    tr.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")
    impl = tr.add_argument_group(
        "another implementation (docs/formats.md §8.6)",
        "--impl runs another implementation with its intermediates recorded under these "
        "names, so `tinyrwkv compare` can point inside it. official: the rwkv package (torch); "
        "llama.cpp: llama-cpp-python on a GGUF (other files are converted); fla: "
        "flash-linear-attention on a CUDA GPU.")
    impl.add_argument("--impl", choices=["tinyrwkv", "official", "llama.cpp", "fla"],
                      default="tinyrwkv", help="whose forward pass to trace")
    impl.add_argument("--mode", help="official: decode (one token per call, a state every "
                                     "token; default) or prefill; fla: chunk (default), "
                                     "fused_recurrent or decode")
    impl.add_argument("--precision", help="official, fla: fp32 (default), fp16, bf16; "
                                          "llama.cpp: the GGUF type a non-GGUF model is "
                                          "converted to, f32 (default), f16, q8_0")
    impl.add_argument("--device", help="official: cpu (default) or cuda; fla: cuda")
    impl.add_argument("--detail", choices=["coarse", "fine"],
                      help="official: coarse (its compiled functions' inputs and outputs; "
                           "default) or fine (their Python source, with most per-layer names)")
    impl.add_argument("--chunk", type=option(int, POSITIVE), metavar="K",
                      help="llama.cpp: K tokens per call (a state after each call; default all "
                           "at once); fla fused_recurrent: tokens per call (<= 63)")
    blas_threads_arg(tr)
    no_check_finite(tr)
    tr.set_defaults(func=cmd_trace)

    cp = sub.add_parser("compare", help="compare two traces; exit 1 where they disagree",
                        formatter_class=fmt,
                        description="One row per tensor in both traces (max|d|, max|d|/std, "
                                    "relative RMS, its tolerance and the error over it) and the "
                                    "first divergence (layer, op, token, its error's ratio to "
                                    "the tolerance). With the model (--model, or the one the "
                                    "reference trace names) each tensor's tolerance is a "
                                    "multiple of what rounding to --dtype does to it, and each "
                                    "op is also recomputed from the other trace's own inputs "
                                    "(the local op check), which names the op a bug is in "
                                    "(docs/formats.md §8.5). The other trace is checked first: a name "
                                    "that is not a trace name, no logits, a shape that is not "
                                    "the reference's or the token axis elsewhere than first is an "
                                    "error naming each problem (exit 1; --warn compares the rest "
                                    "instead). Exit status 0 when all tensors agree, 1 when any "
                                    "is beyond the tolerance of --dtype or the trace has a "
                                    "problem, 2 for a usage error.")
    cp.add_argument("reference", help="the reference trace (float64, from tinyrwkv trace)")
    cp.add_argument("other", help="the trace to check: any subset of the trace names, with logits")
    cp.add_argument("--dtype", choices=["fp32", "tf32", "fp16", "bf16"], default="fp32",
                    help="the other implementation's precision (its activations; bf16 and fp16 "
                         "with a float32 state): the rounding the tolerances allow for")
    cp.add_argument("--tol", type=option(float, POSITIVE),
                    help="one max|d|/std tolerance for every tensor (implies --fixed)")
    cp.add_argument("--model", "-m", metavar="PATH",
                    help="the model the reference trace is of, for tolerances that follow the "
                         "numbers and the local op check (docs/formats.md §8.5); default: the "
                         "model named in the reference trace, when that file is here")
    cp.add_argument("--initial-state", metavar="FILE",
                    help="the state the reference trace started from (default: the one it names)")
    cp.add_argument("--fixed", action="store_true",
                    help="one tolerance per dtype for every tensor, as before calibration")
    cp.add_argument("--no-local", action="store_true",
                    help="skip the local op check (each op recomputed from the other trace's own "
                         "inputs); the global check still runs")
    cp.add_argument("--warn", action="store_true",
                    help="report unknown names, a missing logits and wrong shapes as warnings and "
                         "compare the rest (a tensor of the wrong shape still fails)")
    cp.add_argument("--json", metavar="FILE",
                    help="also write the report as JSON: per tensor the error, tolerance and "
                         "ratio, the first divergence, what was not compared, any problems")
    cp.add_argument("--heatmap", metavar="FILE.png",
                    help="also draw error/tolerance per layer and op as a PNG (needs matplotlib)")
    cp.set_defaults(func=cmd_compare)

    gd = sub.add_parser("golden", help="write golden test vectors for other implementations",
                        formatter_class=fmt,
                        description="Deterministic synthetic checkpoints (.safetensors, and .pth "
                                    "when torch is installed) with token ids, float64 expected "
                                    "logits and states (continued calls, initial states, 256 "
                                    "tokens, bf16, the 65536 vocabulary), traces, tokenizer and "
                                    "sampling cases, manifest.json and manifest.txt (key=value "
                                    "lines for C: docs/formats.md §8.2).")
    gd.add_argument("--out", required=True, metavar="DIR")
    blas_threads_arg(gd)
    gd.set_defaults(func=cmd_golden)

    cv = sub.add_parser("convert", help="convert between .pth, .safetensors and GGUF",
                        formatter_class=fmt,
                        description="Read any checkpoint tinyrwkv loads (.pth, .safetensors, "
                                    "llama.cpp RWKV7 .gguf, Hugging Face / fla folders) and write "
                                    "it as OUT says: .gguf (llama.cpp's RWKV7 layout, with the "
                                    "vocabulary), .safetensors (official key names), .pth (needs "
                                    "torch), or a folder (config.json + safetensors, fla names).")
    cv.add_argument("input", help="the checkpoint to read")
    cv.add_argument("output", help="OUT.gguf, OUT.safetensors, OUT.pth, or a folder (no suffix): "
                                   "Hugging Face / fla format")
    cv.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0", "q5_0", "q4_1", "q4_0"],
                    default="f16", help="matrix storage: GGUF any of these; safetensors and .pth "
                                        "f32/f16/bf16")
    no_check_finite(cv, "convert even if a tensor holds NaN or Inf (checked as each tensor is "
                        "read; by default nothing is written then)")
    cv.set_defaults(func=cmd_convert)

    ml = sub.add_parser("merge-lora", help="merge an RWKV-PEFT LoRA into a base model",
                        formatter_class=fmt,
                        description="W + (B @ A) * alpha / r for every X.lora_A / X.lora_B pair, "
                                    "after copying the LoRA file's other trained tensors, as "
                                    "RWKV-PEFT's merge_lora.py does.")
    ml.add_argument("base", help="the base checkpoint")
    ml.add_argument("lora", help="the LoRA adapter: RWKV-PEFT .pth/.safetensors, a PEFT "
                                   "folder or a llama.cpp adapter .gguf")
    ml.add_argument("output", help="OUT.safetensors, OUT.pth or OUT.gguf")
    ml.add_argument("--alpha", type=option(float), required=True,
                    help="the lora_alpha used in training")
    ml.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0"], default="bf16")
    blas_threads_arg(ml)
    no_check_finite(ml, "write the merged model even if a tensor holds NaN or Inf")
    ml.set_defaults(func=cmd_merge_lora)

    t = sub.add_parser("train", help="train or fine-tune an RWKV-7 on a text file (hand-written "
                                     "gradients)",
                       formatter_class=fmt,
                       description="Train an RWKV-7 on a UTF-8 text file, from scratch (a BPE "
                                   "tokenizer, RWKV-LM's initialisation) or from a checkpoint "
                                   "(--init-from: every weight, a LoRA adapter with --lora, or the "
                                   "initial state with --state-tune): AdamW with warm-up and "
                                   "cosine decay, validation, the best step kept, samples, "
                                   "checkpoints (--resume), a loss curve and a model card.",
                       epilog="examples:\n"
                              "  tinyrwkv train --data stories.txt --out runs/new\n"
                              "  tinyrwkv train --init-from weights/model.safetensors --lora 8 "
                              "--data shakespeare.txt --valid valid.txt --steps 300 --out runs/lora\n"
                              "  tinyrwkv train --init-from weights/model.safetensors --state-tune "
                              "--data shakespeare.txt --valid valid.txt --steps 300 --out runs/state")
    from . import trainer
    trainer.add_arguments(t)
    t.set_defaults(func=trainer.run)
    t.check = trainer.check_config            # --width a multiple of --head-size: a usage error

    i = sub.add_parser("info", help="describe a checkpoint without loading it", formatter_class=fmt)
    i.add_argument("path", help="RWKV-7 model: .pth, .safetensors, .gguf or a Hugging Face "
                                   "folder")
    i.add_argument("--tokenizer", metavar="PATH", help="tokenizer to check against the vocabulary")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    """`tinyrwkv ...`: parse (a usage error exits 2), run the command, and end every error as
    one_line_errors says."""
    args = build_parser().parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]   # for train's card
    with one_line_errors():
        args.func(args)


if __name__ == "__main__":
    main()
