"""The `tinyrwkv` command: generate, chat, info."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

def default_model():
    """The model shipped in weights/, if there is one."""
    from .errors import CheckpointError
    from .loader import shipped_model_path
    try:
        return shipped_model_path()
    except CheckpointError as e:
        fail(str(e))


def fail(message):
    print(f"tinyrwkv: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def load_model(args):
    import tinyrwkv
    if "--weights" in sys.argv:
        print("tinyrwkv: note: --weights is now --storage; the old name goes in the next release",
              file=sys.stderr)
    path = args.model or default_model()
    t0 = time.perf_counter()
    try:
        model = tinyrwkv.load(path, dtype=args.dtype, tokenizer=args.tokenizer,
                              backend=args.backend, storage=args.storage, threads=args.threads,
                              strategy=args.strategy, device=args.device)
    except ValueError as e:                     # a bad option combination, no GPU, ...
        fail(str(e))
    if model.tokenizer is None:
        fail(str(model.tokenizer_error))
    c = model.config
    print(f"tinyrwkv: {model.path.name}: RWKV-7 {c.variant}, L{c.n_layer} C{c.n_embd} "
          f"H{c.n_head}x{c.head_size} V{c.vocab_size}, {model.n_params / 1e6:.1f}M params, "
          f"{model.dtype.name}, backend {model.backend}"
          f"{f' ({model.threads} threads)' if getattr(model, 'threads', None) else ''}"
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
                          penalty_decay=args.penalty_decay,
                          **({"penalty_exempt": ""} if args.command == "chat" else {}),
                          **({"ban_tokens": (0,)} if args.command == "chat" else {}))


def rate(n, seconds):
    return f"{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tok/s)" if seconds > 0 else f"{n} tokens"


def load_state(path, config):
    """--state: a tinyrwkv state (.npz, --save-state) or a state-tuning checkpoint (.pth or
    .safetensors with blocks.{i}.att.time_state, RWKV-PEFT), read through tinyrwkv.formats."""
    from .formats import open_model
    from .formats.lora import initial_state
    from .model import State
    if str(path).endswith(".npz"):
        return State.load(path, config)
    return initial_state(open_model(path).read_all("float32", progress=False), config)


def cmd_merge_lora(args):
    """Base (any format load reads) + adapter (RWKV-PEFT .pth/.safetensors, PEFT folder or
    llama.cpp LoRA GGUF) -> OUT, merged tensor by tensor while it is written."""
    from .formats.lora import LoraMerged, read_adapter
    base = _model_source(args.base)
    lora, _ = read_adapter(args.lora)           # --alpha is required: the file's alpha, if any,
    try:                                        # is not trusted over the user's
        merged = LoraMerged(base, lora, args.alpha)
        write_weights(Path(args.output), merged, args.type, _tokenizer_of(base))
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
    the one `load` would choose from the vocabulary size, else None (then none is written)."""
    from .tokenizer import TokenizerError, get_tokenizer
    if source.tokenizer is not None:
        return source.tokenizer
    try:
        return get_tokenizer(source.tensors()["emb.weight"].shape[0], None, model_path=source.path)
    except TokenizerError:
        return None


def write_weights(out, weights, out_type, tok=None, name="tinyrwkv"):
    """Write official-keyed weights (a dict, or a TensorSource: then streamed, one tensor at a
    time) as out's suffix says (.gguf, .safetensors, .pth, or a folder for HF/fla)."""
    import numpy as np
    from .formats import as_source, write_gguf, write_hf, write_safetensors
    source = as_source(weights)
    suffix = out.suffix.lower()
    if suffix != ".gguf" and out_type not in ("f32", "f16", "bf16"):
        fail(f"{out_type} is a GGUF type; .safetensors, .pth and folders take f32, f16 or bf16")
    dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(out_type)
    if suffix == "":                             # a folder: Hugging Face / fla format
        write_hf(out, source, tok, dtype=dtype)
    elif suffix == ".gguf":
        write_gguf(out, source, out_type, tokenizer=tok, name=name)
    elif suffix in (".safetensors", ".pth"):
        if suffix == ".pth":
            try:
                import torch
            except ImportError:
                fail("writing .pth needs torch (pip install torch); .safetensors does not")
            # torch.save takes the whole dict: .pth output is not streamed
            dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[out_type]
            torch.save({k: torch.tensor(np.asarray(source.read(k, "float32"))).to(dt)
                        for k in source.keys()}, out)
        else:
            code = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[out_type]
            entries = {k: (code, info.shape) for k, info in source.tensors().items()}
            write_safetensors(out, entries, lambda key: source.read(key, dtype))
        from .tokenizer import HFTokenizer
        if isinstance(tok, HFTokenizer):         # beside it, where tinyrwkv.load looks
            tok._tok.save(str(out.with_name(out.stem + ".tokenizer.json")))
    else:
        fail(f"{out}: give the output a .gguf, .safetensors or .pth suffix, or no suffix for a "
             "Hugging Face / fla model folder")


def cmd_generate(args):
    from .generate import Session
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            fail("give a prompt: tinyrwkv generate \"Once upon a time\" (or pipe it on stdin)")
        prompt = sys.stdin.read()
    model = load_model(args)
    session = Session(model, model.tokenizer, seed=None if args.seed < 0 else args.seed)
    if args.state:
        session.state = load_state(args.state, model.config)
    session.feed(prompt)
    if args.echo:
        sys.stdout.write(prompt)
    for piece in session.stream(args.max_tokens, sampling_from(args), stop=args.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = session.stats
    print(f"tinyrwkv: prompt {rate(s['prompt_tokens'], s['prompt_seconds'])}; "
          f"generated {rate(s['tokens'], s['seconds'])}", file=sys.stderr)
    if args.save_state:
        session.state.save(args.save_state)


def cmd_chat(args):
    from .generate import Session, chat_message
    model = load_model(args)
    session = Session(model, model.tokenizer, seed=None if args.seed < 0 else args.seed)
    if args.system:
        session.feed(f"System: {args.system.strip()}\n\n")
    start = session.state.copy() if session.state is not None else None
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset forgets the conversation, /exit (or Ctrl-D) quits.",
              file=sys.stderr)
    while True:
        try:
            message = input("User: ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and message == "":
            break                                  # end of piped input
        message = message.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            session.state = start.copy() if start is not None else None
            print("(conversation reset)", file=sys.stderr)
            continue
        if not interactive:
            print(f"User: {message}")
        session.feed(chat_message(message))
        sys.stdout.write("Assistant:")
        for piece in session.stream(args.max_tokens, sampling_from(args), stop=["\n\n"],
                                    stop_at_eot=False):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n\n")
        sys.stdout.flush()
    s = session.stats
    if s["tokens"]:
        print(f"tinyrwkv: generated {rate(s['tokens'], s['seconds'])}", file=sys.stderr)


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
        tok = source.tokenizer.name if source.tokenizer is not None else \
            get_tokenizer(config.vocab_size, args.tokenizer, model_path=path).name
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
    model = tinyrwkv.load(args.model, dtype=args.dtype, backend="numpy", tokenizer=args.tokenizer,
                          progress=False)
    if args.ids:
        try:
            ids = [int(t) for t in Path(args.ids).read_text().split()]
        except ValueError as e:
            fail(f"{args.ids}: token ids must be whitespace-separated integers ({e})")
    else:
        if model.tokenizer is None:
            fail(str(model.tokenizer_error))
        ids = model.tokenizer.encode(args.prompt)
    tr = oracle.trace(model, ids)
    oracle.save_trace(args.out, tr, meta={"model": str(model.path), "dtype": args.dtype,
                                          "ids": [int(i) for i in ids]})
    print(f"tinyrwkv: {len(tr)} tensors over {len(ids)} tokens -> {args.out}", file=sys.stderr)


def cmd_compare(args):
    from . import oracle
    report = oracle.compare(oracle.load_trace(args.reference), oracle.load_trace(args.other),
                            args.dtype, args.tol)
    print(oracle.format_report(report))
    if not report["rows"]:
        fail("the traces have no tensor name in common")
    raise SystemExit(0 if report["ok"] else 1)


def cmd_golden(args):
    from .golden import write_golden
    manifest = write_golden(args.out)
    print(f"tinyrwkv: {len(manifest['cases'])} golden cases -> {args.out}/manifest.json",
          file=sys.stderr)


def cmd_convert(args):
    """Any format load reads -> OUT, streamed: each tensor is read, converted and written before
    the next is read (formats/source.py), so memory holds one tensor, not the model."""
    source, out = _model_source(args.input), Path(args.output)
    src = source.path
    write_weights(out, source, args.type, _tokenizer_of(source), name=src.stem)
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
    parser = argparse.ArgumentParser(
        prog="tinyrwkv",
        description="RWKV-7 (x070) in NumPy: generate text, chat, and inspect checkpoints.",
        epilog="Run 'tinyrwkv COMMAND --help' for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    def model_args(p):
        p.add_argument("--model", "-m", metavar="PATH",
                       help="RWKV-7 checkpoint (.pth or .safetensors); default: the model in weights/")
        p.add_argument("--tokenizer", metavar="PATH",
                       help="'world', or a tokenizer.json (needed for Pile models: 20B_tokenizer.json); "
                            "default: chosen from the vocabulary size")
        p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                       help="compute precision (float64 runs on the numpy backend)")
        p.add_argument("--backend", choices=["numpy", "numba", "cupy"],
                       help="numba: compiled CPU kernels (default where numba is installed); "
                            "numpy: the readable reference; cupy: CUDA GPU (needs CuPy)")
        p.add_argument("--storage", "--weights", dest="storage",
                       choices=["float32", "bfloat16", "float16"],
                       help="how the large matrices are kept: numba float32 (default) or "
                            "bfloat16; cupy float16 (default), bfloat16 or float32 "
                            "(--weights is the old name of this option)")
        p.add_argument("--strategy", metavar="TEXT",
                       help="the official package's strategy instead of --backend/--storage: "
                            "'cpu fp32', 'cpu bf16', 'cuda fp16', 'cuda:1 bf16', 'cuda fp32'")
        p.add_argument("--device", type=int, help="CUDA device number for the cupy backend (default 0)")
        p.add_argument("--threads", type=int, help="threads for kernels and BLAS (default: all cores)")

    def sampling_args(p, temperature, top_p, presence, frequency, max_tokens):
        p.add_argument("--max-tokens", "-n", type=int, default=max_tokens, help="tokens to generate at most")
        p.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass (1 = off)")
        p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
        p.add_argument("--presence-penalty", type=float, default=presence,
                       help="subtracted from a token's logit once it has appeared")
        p.add_argument("--frequency-penalty", type=float, default=frequency,
                       help="subtracted per (decayed) occurrence")
        p.add_argument("--penalty-decay", type=float, default=0.996,
                       help="occurrence counts are multiplied by this every token")
        p.add_argument("--seed", type=int, default=0, help="random seed (-1: a different one each run)")

    g = sub.add_parser("generate", help="continue a prompt, streaming the text", formatter_class=fmt,
                       description="Continue a prompt with an RWKV-7 model. Text streams to stdout; "
                                   "speed is reported on stderr.")
    g.add_argument("prompt", nargs="?", help="the text to continue (default: read stdin)")
    model_args(g)
    sampling_args(g, temperature=1.0, top_p=0.85, presence=0.2, frequency=0.2, max_tokens=200)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable)")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    g.add_argument("--state", metavar="FILE",
                   help="start from a state: one saved with --save-state (.npz), or a state-tuning "
                        "checkpoint with blocks.N.att.time_state (.pth/.safetensors)")
    g.add_argument("--save-state", metavar="FILE", help="save the final state (.npz)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat in the RWKV 'User:/Assistant:' format", formatter_class=fmt,
                       description="Chat with an RWKV-7 model. The model's state carries the "
                                   "conversation: nothing is re-read between turns.")
    model_args(c)
    sampling_args(c, temperature=1.0, top_p=0.3, presence=0.5, frequency=0.5, max_tokens=500)
    c.add_argument("--system", metavar="TEXT", help="a 'System:' message before the first turn")
    c.set_defaults(func=cmd_chat)

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
                                    "intermediate under a stable name (see tinyrwkv/oracle.py), "
                                    "for `tinyrwkv compare`.")
    tr.add_argument("--model", "-m", metavar="PATH", help="checkpoint; default: the shipped model")
    src = tr.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text, encoded with the model's tokenizer")
    src.add_argument("--ids", metavar="FILE", help="a text file of whitespace-separated token ids")
    tr.add_argument("--out", required=True, metavar="FILE", help="the trace (.npz)")
    tr.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                    help="float64: the oracle; float32: what a float32 implementation should match")
    tr.add_argument("--tokenizer", metavar="PATH", help="tokenizer for --prompt (default: the model's)")
    tr.set_defaults(func=cmd_trace)

    cp = sub.add_parser("compare", help="compare two traces; exit 1 where they disagree",
                        formatter_class=fmt,
                        description="One row per tensor in both traces (max|d|, max|d|/std, "
                                    "relative RMS) and the first divergence (layer, op, token). "
                                    "Exit status 1 when any tensor is beyond the tolerance of "
                                    "--dtype, 0 when all agree.")
    cp.add_argument("reference", help="the reference trace (float64, from tinyrwkv trace)")
    cp.add_argument("other", help="the trace to check (any subset of the names)")
    cp.add_argument("--dtype", choices=["fp32", "tf32", "fp16", "bf16"], default="fp32",
                    help="the other implementation's precision: sets the tolerance")
    cp.add_argument("--tol", type=float, help="max|d|/std tolerance instead of the dtype's")
    cp.set_defaults(func=cmd_compare)

    gd = sub.add_parser("golden", help="write golden test vectors for other implementations",
                        formatter_class=fmt,
                        description="Deterministic synthetic checkpoints (.safetensors, and .pth "
                                    "when torch is installed) with token ids, float64 expected "
                                    "logits and states, traces and a JSON manifest.")
    gd.add_argument("--out", required=True, metavar="DIR")
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
    cv.set_defaults(func=cmd_convert)

    ml = sub.add_parser("merge-lora", help="merge an RWKV-PEFT LoRA into a base model",
                        formatter_class=fmt,
                        description="W + (B @ A) * alpha / r for every X.lora_A / X.lora_B pair, "
                                    "after copying the LoRA file's other trained tensors, as "
                                    "RWKV-PEFT's merge_lora.py does.")
    ml.add_argument("base", help="the base checkpoint")
    ml.add_argument("lora", help="the LoRA checkpoint (.pth or .safetensors)")
    ml.add_argument("output", help="OUT.safetensors, OUT.pth or OUT.gguf")
    ml.add_argument("--alpha", type=float, required=True, help="the lora_alpha used in training")
    ml.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0"], default="bf16")
    ml.set_defaults(func=cmd_merge_lora)

    t = sub.add_parser("train", help="train an RWKV-7 on a text file (NumPy, hand-written gradients)",
                       formatter_class=fmt,
                       description="Train an RWKV-7 from scratch on a UTF-8 text file: a BPE tokenizer, "
                                   "RWKV-LM's initialisation, AdamW with warm-up and cosine decay, "
                                   "validation, samples, checkpoints (--resume), and a model card.")
    from . import trainer
    trainer.add_arguments(t)
    t.set_defaults(func=trainer.run)

    i = sub.add_parser("info", help="describe a checkpoint without loading it", formatter_class=fmt)
    i.add_argument("path", help="RWKV-7 checkpoint (.pth or .safetensors)")
    i.add_argument("--tokenizer", metavar="PATH", help="tokenizer to check against the vocabulary")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .errors import CheckpointError
    from .tokenizer import TokenizerError
    try:
        args.func(args)
    except (CheckpointError, TokenizerError, ValueError, OSError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
