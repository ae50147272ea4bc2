"""GGUF (llama.cpp's format) in and out for RWKV-7, through the `gguf` package (pip install gguf).

    tensors, vocab = read_gguf("model.gguf")     # official key -> float32 array; tokenizer info
    write_gguf("out.gguf", tensors, out_type="q8_0", tokenizer=model.tokenizer)

The mapping is llama.cpp's RWKV7 architecture (rwkv7.md §9): the six time-mix lerps fused into
one (6, 1, 1, C) tensor, the LoRA matrices transposed, r_k flattened, vectors squeezed, and in
layer 0 copies of a0/a1/a2 where llama.cpp wants v0/v1/v2 (layer 0 never uses them). Reading
undoes each of these; quantised tensors are dequantised with `gguf.quants`.
"""

from __future__ import annotations

import numpy as np

from .checkpoint import CheckpointError

ARCH = "rwkv7"
LORAS = ("w", "a", "v", "g")
VECTORS = ("w0", "a0", "v0", "k_k", "k_a")


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError("GGUF files need the `gguf` package: pip install gguf "
                              "(or pip install -e '.[gguf]')") from e
    return gguf


def to_gguf_tensors(w, n_layer, n_head):
    """Official key -> array (stored shapes) as {GGUF name: numpy array in the written shape}."""
    sq = lambda a: np.asarray(a, np.float32).reshape(-1)
    out = {"token_embd.weight": w["emb.weight"],
           "token_embd_norm.weight": sq(w["blocks.0.ln0.weight"]),
           "token_embd_norm.bias": sq(w["blocks.0.ln0.bias"]),
           "output_norm.weight": sq(w["ln_out.weight"]), "output_norm.bias": sq(w["ln_out.bias"]),
           "output.weight": w["head.weight"]}
    for i in range(n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        p = lambda k: w[b + k]
        out.update({
            g + "attn_norm.weight": sq(p("ln1.weight")), g + "attn_norm.bias": sq(p("ln1.bias")),
            g + "attn_norm_2.weight": sq(p("ln2.weight")), g + "attn_norm_2.bias": sq(p("ln2.bias")),
            g + "time_mix_lerp_fused.weight": np.stack(
                [np.asarray(p(f"att.x_{c}"), np.float32).reshape(1, 1, -1) for c in "rwkvag"]),
            g + "time_mix_r_k.weight": sq(p("att.r_k")),
            g + "time_mix_receptance.weight": p("att.receptance.weight"),
            g + "time_mix_key.weight": p("att.key.weight"),
            g + "time_mix_value.weight": p("att.value.weight"),
            g + "time_mix_output.weight": p("att.output.weight"),
            g + "time_mix_ln.weight": sq(p("att.ln_x.weight")),
            g + "time_mix_ln.bias": sq(p("att.ln_x.bias")),
            g + "channel_mix_lerp_k.weight": sq(p("ffn.x_k")),
            g + "channel_mix_key.weight": p("ffn.key.weight"),
            g + "channel_mix_value.weight": p("ffn.value.weight"),
        })
        for name in ("k_k", "k_a"):
            out[g + f"time_mix_{name}.weight"] = sq(p(f"att.{name}"))
        for x in LORAS:
            src = "a" if (x == "v" and i == 0) else x      # llama.cpp wants layer-0 v*: copies of a*
            if x != "g":
                out[g + f"time_mix_{x}0.weight"] = sq(p(f"att.{src}0"))
            out[g + f"time_mix_{x}1.weight"] = np.ascontiguousarray(np.asarray(p(f"att.{src}1")).T)
            out[g + f"time_mix_{x}2.weight"] = np.ascontiguousarray(np.asarray(p(f"att.{src}2")).T)
    return out


def from_gguf_tensors(t, n_layer, head_size):
    """The inverse of to_gguf_tensors: {GGUF name: array} -> official key -> array (stored shapes)."""
    vec = lambda a: np.asarray(a, np.float32).reshape(1, 1, -1)
    flat = lambda a: np.asarray(a, np.float32).reshape(-1)
    w = {"emb.weight": t["token_embd.weight"], "blocks.0.ln0.weight": flat(t["token_embd_norm.weight"]),
         "blocks.0.ln0.bias": flat(t["token_embd_norm.bias"]),
         "ln_out.weight": flat(t["output_norm.weight"]), "ln_out.bias": flat(t["output_norm.bias"]),
         "head.weight": t["output.weight"]}
    for i in range(n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        q = lambda k: t[g + k]
        fused = np.asarray(q("time_mix_lerp_fused.weight"), np.float32).reshape(6, -1)
        C = fused.shape[1]
        w.update({b + f"att.x_{c}": vec(fused[n]) for n, c in enumerate("rwkvag")})
        w.update({
            b + "ln1.weight": flat(q("attn_norm.weight")), b + "ln1.bias": flat(q("attn_norm.bias")),
            b + "ln2.weight": flat(q("attn_norm_2.weight")), b + "ln2.bias": flat(q("attn_norm_2.bias")),
            b + "att.r_k": flat(q("time_mix_r_k.weight")).reshape(C // head_size, head_size),
            b + "att.receptance.weight": q("time_mix_receptance.weight"),
            b + "att.key.weight": q("time_mix_key.weight"),
            b + "att.value.weight": q("time_mix_value.weight"),
            b + "att.output.weight": q("time_mix_output.weight"),
            b + "att.ln_x.weight": flat(q("time_mix_ln.weight")),
            b + "att.ln_x.bias": flat(q("time_mix_ln.bias")),
            b + "ffn.x_k": vec(q("channel_mix_lerp_k.weight")),
            b + "ffn.key.weight": q("channel_mix_key.weight"),
            b + "ffn.value.weight": q("channel_mix_value.weight"),
            b + "att.k_k": vec(q("time_mix_k_k.weight")), b + "att.k_a": vec(q("time_mix_k_a.weight")),
        })
        for x in LORAS:
            # layer 0's v0/v1/v2 are copies of a0/a1/a2 here; the model never uses them
            if x != "g":
                w[b + f"att.{x}0"] = vec(q(f"time_mix_{x}0.weight"))
            w[b + f"att.{x}1"] = np.ascontiguousarray(np.asarray(q(f"time_mix_{x}1.weight")).T)
            w[b + f"att.{x}2"] = np.ascontiguousarray(np.asarray(q(f"time_mix_{x}2.weight")).T)
    return w


def _always_f32(name, array):
    return array.ndim == 1 or any(s in name for s in ("time_mix_w1", "time_mix_w2", "lerp_fused"))


def write_gguf(path, weights, out_type="f32", tokenizer=None, name="tinyrwkv"):
    """Write official-keyed weights as a llama.cpp RWKV7 GGUF. out_type: "f32", "f16", "bf16",
    "q8_0", "q4_0", "q4_1" or "q5_0" (gguf's quantisers) for the matrices (1-D tensors, w1/w2 and the fused lerps stay F32, as llama.cpp's converter
    does). tokenizer: a WorldTokenizer or HFTokenizer to embed (vocabulary metadata)."""
    gguf = _gguf()
    from .model import Config
    if any(k.endswith("ffn.s1") for k in weights):
        raise CheckpointError("DeepEmbed models have no GGUF mapping in llama.cpp's RWKV7 architecture")
    cfg = Config.from_weights(weights)
    Q = gguf.GGMLQuantizationType
    types = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
             "q4_1": Q.Q4_1, "q5_0": Q.Q5_0}
    if out_type not in types:
        raise ValueError(f"out_type must be one of {', '.join(types)}, not {out_type!r}")
    w32 = {k: np.asarray(v, np.float32) if v.dtype != np.uint16 else _bf16(v) for k, v in weights.items()}
    wr = gguf.GGUFWriter(str(path), ARCH)
    wr.add_name(name)
    wr.add_context_length(1048576)
    wr.add_embedding_length(cfg.n_embd)
    wr.add_block_count(cfg.n_layer)
    wr.add_layer_norm_eps(1e-5)
    wr.add_wkv_head_size(cfg.head_size)
    wr.add_decay_lora_rank(cfg.d_decay)
    wr.add_iclr_lora_rank(cfg.d_aaa)
    wr.add_value_residual_mix_lora_rank(cfg.d_mv or cfg.d_aaa)
    wr.add_gate_lora_rank(cfg.d_gate)
    wr.add_feed_forward_length(cfg.dim_ffn)
    wr.add_head_count(0)
    wr.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8,
                      "bf16": 32}[out_type])
    if tokenizer is not None:
        _add_tokenizer(wr, tokenizer, cfg.vocab_size, gguf)
    for gname, arr in to_gguf_tensors(w32, cfg.n_layer, cfg.n_head).items():
        arr = np.ascontiguousarray(arr, np.float32)
        if _always_f32(gname, arr) or out_type == "f32":
            wr.add_tensor(gname, arr)
        elif out_type == "f16":
            wr.add_tensor(gname, arr.astype(np.float16))
        else:
            block = gguf.GGML_QUANT_SIZES[types[out_type]][0]
            if arr.shape[-1] % block:
                wr.add_tensor(gname, arr.astype(np.float16))   # blocks need whole rows
            else:
                q = gguf.quants.quantize(arr, types[out_type])
                wr.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=types[out_type])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def _bf16(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _add_tokenizer(wr, tok, V, gguf):
    from .tokenizer import HFTokenizer, WorldTokenizer
    if isinstance(tok, WorldTokenizer):
        tokens, types = ["<s>"], [gguf.TokenType.CONTROL]
        for i in range(1, V):
            if i <= tok.max_id:
                tokens.append(repr(tok.token_bytes(i))[2:-1])   # the bytes-repr text (§9)
                types.append(gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        wr.add_tokenizer_model("rwkv")
        wr.add_token_list(tokens)
        wr.add_token_types(types)
        wr.add_eot_token_id(261)
        wr.add_chat_template("rwkv-world")
    elif isinstance(tok, HFTokenizer):
        import json
        spec = json.loads(tok._tok.to_str())
        vocab = spec["model"]["vocab"]
        tokens = [None] * len(vocab)
        for text, i in vocab.items():
            tokens[i] = text
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        wr.add_tokenizer_model("gpt2")
        wr.add_tokenizer_pre("default")
        wr.add_token_list(tokens)
        wr.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL
                            for t in tokens])
        wr.add_token_merges(merges)
        wr.add_eos_token_id(0)
    else:
        raise ValueError(f"cannot write a {type(tok).__name__} into GGUF")


def read_gguf(path):
    """Read a llama.cpp RWKV7 GGUF: (official key -> float32 array, tokenizer or None)."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    field = lambda key: reader.fields.get(key)

    def value(key):
        f = field(key)
        if f is None:
            return None
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]

    arch = value("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r}; tinyrwkv reads RWKV-7 "
                              f"('{ARCH}') GGUFs only")
    n_layer, head_size = value(f"{ARCH}.block_count"), value(f"{ARCH}.wkv.head_size")
    tensors = {}
    for t in reader.tensors:
        data = t.data
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            arr = np.asarray(data, np.float32)
        else:
            arr = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = arr.reshape(shape)
    try:
        weights = from_gguf_tensors(tensors, n_layer, head_size)
    except KeyError as e:
        raise CheckpointError(f"{path}: RWKV7 GGUF without tensor {e}") from e
    return weights, _read_tokenizer(reader, value, gguf)


def _read_tokenizer(reader, value, gguf):
    model = value("tokenizer.ggml.model")
    if model is None:
        return None
    if model == "rwkv":
        from .tokenizer import WorldTokenizer
        return WorldTokenizer()
    if model == "gpt2":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        f = reader.fields["tokenizer.ggml.tokens"]
        tokens = [bytes(f.parts[i]).decode() for i in f.data]
        m = reader.fields["tokenizer.ggml.merges"]
        merges = [tuple(bytes(m.parts[i]).decode().split(" ", 1)) for i in m.data]
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        import tempfile
        from pathlib import Path
        from .tokenizer import HFTokenizer
        tmp = Path(tempfile.mkdtemp()) / "gguf.tokenizer.json"      # HFTokenizer reads files
        tok.save(str(tmp))
        return HFTokenizer(tmp)
    return None
