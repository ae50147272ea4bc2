"""flash-linear-attention (pip install flash-linear-attention==0.6.0; it needs torch, triton and a
CUDA GPU) run with torch forward hooks, so that what its RWKV7ForCausalLM computes is recorded
under tinyrwkv's trace names.

    trace, final = record("model-folder", ids, state=None, select=None,
                          device="cuda", dtype="float32", mode="chunk")

How it runs. fla's model is a torch module tree (fla/models/rwkv7/modeling_rwkv7.py and
fla/layers/rwkv7.py, read at 0.6.0). The bridge registers forward hooks on its submodules
(`module.register_forward_hook`, torch's public API, removed in a `finally`); nothing of fla's is
replaced or wrapped. A hook sees a submodule's input and output, so each name below is a tensor
fla computed, copied as it was (in the model's dtype, widened exactly to float64 at the end):

    layers[0].pre_norm          out: ln0
    layers[i].attn_norm         out: L{i}.ln1 (the time-mix input)
    attn.r_proj / k_proj / v_proj   in: xr / xk / xv (the token-shift lerps, fla's fused addcmul)
                                    out: r / k / v (k before the k_a mix, v before the residual)
    attn.w_lora                 in: xw   out: w_pre = w0 + tanh(xw w1) w2
    attn.a_lora                 in: xa   attn.g_lora  in: xg  out: g = sigmoid(xg g1) g2
    attn.g_norm                 in: y (the WKV output, heads side by side)   out: gn
    attn.o_proj                 out: att
    ffn.value                   in: ffn_hidden = relu(xk Wk^T)^2   out: ffn
    layers[i] (the block)       out: block (the residual stream after the layer)
    lm_head                     out: logits

Three more names are fla's own one-line expressions of hooked tensors, evaluated again here with
the same torch call on the same tensor, device and dtype (elementwise, so bit-identical to what
fla's forward held; fla/layers/rwkv7.py):

    w_log = -0.6065306597126334 * w_pre.sigmoid()      fla's log decay (the kernels take log w)
    a     = a_lora(xa).sigmoid()                       (the hooked a_lora output, sigmoid-ed)
    v_res = torch.lerp(v, v_first, v_lora(xv).sigmoid())   layers > 0; layer 0: v_res = v

Left out (never filled in): w (fla never forms the decay itself, only log w inside its kernels),
w_cuda (the official CUDA kernel's input), kk and k_tilde (plain tensors inside the attention's
forward, made by fla's l2_norm / F.normalize and its fused_k_rwkv7 kernel, not the output of any
submodule), bonus (inside fla's fused gate_output_correction kernel with the gate).

The WKV state: fla keeps it in the cache it returns (`past_key_values`, per layer a dict:
recurrent_state [batch][head][key][value] in float32, conv_state = the last ln1, ffn_state = the
last ln2, both in the model's dtype). The bridge reads it after each call, transposed to
tinyrwkv's [value][key]: `final.*` after the last call, and `L{i}.state` after each call, with
`trace.state_tokens` saying after which tokens. A `state` to start from is converted into such a
cache (fla_state_arrays) and handed to fla as past_key_values.

mode picks fla's WKV kernel. fla 0.6.0's attention does not read its `mode` setting: it runs
chunk_rwkv7 when grad mode is on or the call has 64 tokens or more, else
fused_mul_recurrent_rwkv7. So:
    "chunk"            one call, in torch.enable_grad() with every parameter frozen
                       (requires_grad False, so nothing is recorded for backward): the chunked
                       kernel at any length; L{i}.state only after the last token.
    "fused_recurrent"  torch.no_grad(), the ids in calls of `piece` tokens (default 32, at most
                       63), the cache carried between calls: fla's recurrent kernel throughout;
                       L{i}.state after each call.
    "decode"           one token per call (fla's generation path): L{i}.state after every token.

Model files: a folder with config.json (fla / Hugging Face format, as `tinyrwkv convert M OUT`
writes) is given to fla as it is. Anything else tinyrwkv reads is first written to a temporary
float32 folder with tinyrwkv's writer (formats/hf.py; the stored numbers widened exactly). The
weights are loaded with torch's load_state_dict(strict=True) into RWKV7ForCausalLM(config), so a
missing or unexpected tensor is an error, never a random initialisation, then cast to `dtype`.
Known differences of fla's model (docs/formats.md §8.6.3): its GroupNorm eps is head_dim * 1e-5
(the official 64e-5 only for 64-wide heads); no DeepEmbed.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .. import oracle

FLA_VERSION = "0.6.0"            # the version whose source this bridge was written against
LOG_DECAY_SCALE = -0.6065306597126334    # fla's literal, -exp(-0.5)
DTYPES = ("float32", "float16", "bfloat16")
MODES = ("chunk", "fused_recurrent", "decode")
MAX_PIECE = 63                   # fla runs its chunked kernel for calls of 64 tokens or more
PIECE = 32                       # fused_recurrent's default: its states fall on state_every=64's

# name -> (submodule of model.model.layers[i], "in" or "out"); "" is the block itself
HOOKED = {
    "ln1": ("attn_norm", "out"),
    "xr": ("attn.r_proj", "in"), "r": ("attn.r_proj", "out"),
    "xw": ("attn.w_lora", "in"), "w_pre": ("attn.w_lora", "out"),
    "xk": ("attn.k_proj", "in"), "k": ("attn.k_proj", "out"),
    "xv": ("attn.v_proj", "in"), "v": ("attn.v_proj", "out"),
    "xa": ("attn.a_lora", "in"),
    "xg": ("attn.g_lora", "in"), "g": ("attn.g_lora", "out"),
    "y": ("attn.g_norm", "in"), "gn": ("attn.g_norm", "out"),
    "att": ("attn.o_proj", "out"),
    "ffn_hidden": ("ffn.value", "in"), "ffn": ("ffn.value", "out"),
    "block": ("", "out"),
}
# fla's own expressions of hooked tensors (module docstring)
DERIVED = {
    "w_log": "-0.6065306597126334 * w_lora(xw).sigmoid()",
    "a": "a_lora(xa).sigmoid()",
    "v_res": "torch.lerp(v, v_first, v_lora(xv).sigmoid()); layer 0: v",
}
NOT_OBSERVED = {
    "w": "fla never forms the decay, only its log (w_log) inside its kernels",
    "w_cuda": "the official CUDA kernel's input; fla has no such tensor",
    "kk": "a plain tensor inside RWKV7Attention.forward (l2_norm / F.normalize), no submodule's",
    "k_tilde": "the output of fla's fused_k_rwkv7 function, no submodule's",
    "bonus": "inside fla's fused gate_output_correction kernel",
}
# every layer name this bridge can write
RECORDED = tuple(n for n in oracle.LAYER_NAMES if n in HOOKED or n in DERIVED or n == "state")


class FlaError(RuntimeError):
    """fla cannot run here or cannot run this model; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# Pure helpers (NumPy only): config checks, state conversion, rows
# ----------------------------------------------------------------------------------------------

def check_config(config):
    """Problems (strings) that keep fla's RWKV7ForCausalLM with this config.json from being the
    RWKV-7 tinyrwkv computes; [] when there are none."""
    problems = []
    if config.get("model_type") != "rwkv7":
        problems.append(f"model_type is {config.get('model_type')!r}, not 'rwkv7'")
    C = config.get("hidden_size")
    vd = config.get("value_dim")
    if vd is not None and any(int(x) != C for x in (vd if isinstance(vd, list) else [vd])):
        problems.append(f"value_dim {vd} is not hidden_size {C}")
    if config.get("attn"):
        problems.append("it has softmax-attention layers (`attn`): a hybrid, not RWKV-7")
    if not config.get("norm_first", True):
        problems.append("norm_first is false: no ln0")
    if config.get("hidden_act", "sqrelu") != "sqrelu":
        problems.append(f"hidden_act is {config.get('hidden_act')!r}, not 'sqrelu'")
    return problems


def fla_state_arrays(state, n_layer, n_embd, n_head, head_size):
    """A tinyrwkv State as fla's per-layer cache entries (NumPy): a list of n_layer dicts
    {recurrent_state (1, H, K, V) float32: wkv[i] transposed, conv_state (1, C): att_shift[i],
    ffn_state (1, C): ffn_shift[i], attn_state None}. The shifts stay float64 here; record casts
    them to the model's dtype (exact in float32 for a float32 state)."""
    host = state.to_host() if hasattr(state, "to_host") else state
    att, wkv, ffn = (np.asarray(getattr(host, n), dtype=np.float64)
                     for n in ("att_shift", "wkv", "ffn_shift"))
    want = {"att_shift": (n_layer, n_embd), "wkv": (n_layer, n_head, head_size, head_size),
            "ffn_shift": (n_layer, n_embd)}
    for name, arr in (("att_shift", att), ("wkv", wkv), ("ffn_shift", ffn)):
        if arr.shape != want[name]:
            raise ValueError(f"state.{name} has shape {arr.shape}, but this model needs "
                             f"{want[name]}: a state of another model?")
    return [{"recurrent_state": np.ascontiguousarray(np.swapaxes(wkv[i], -1, -2)[None],
                                                     dtype=np.float32),
             "conv_state": att[i][None].copy(), "ffn_state": ffn[i][None].copy(),
             "attn_state": None} for i in range(n_layer)]


def state_from_fla_arrays(layers):
    """fla's per-layer cache entries (NumPy arrays, batch 1) as a tinyrwkv State in float64:
    recurrent_state [1][H][K][V] -> wkv [H][V][K]; conv_state -> att_shift; ffn_state ->
    ffn_shift."""
    from ..model import State
    wkv = np.stack([np.swapaxes(np.asarray(d["recurrent_state"], np.float64)[0], -1, -2)
                    for d in layers])
    att = np.stack([np.asarray(d["conv_state"], np.float64).reshape(-1) for d in layers])
    ffn = np.stack([np.asarray(d["ffn_state"], np.float64).reshape(-1) for d in layers])
    return State(att, wkv, ffn)


def pieces(T, mode, piece=PIECE):
    """The calls fla is given: a list of (start, stop) token ranges."""
    if mode == "chunk":
        return [(0, T)]
    size = 1 if mode == "decode" else int(piece)
    if not 1 <= size <= MAX_PIECE:
        raise ValueError(f"piece must be 1..{MAX_PIECE} tokens (fla runs its chunked kernel for "
                         f"calls of 64 or more), not {piece}")
    return [(s, min(s + size, T)) for s in range(0, T, size)]


def kept_state_rows(T, calls, select):
    """The tokens after which L{i}.state is recorded: the ends of the calls, those the selection
    keeps (select.state_rows; None there keeps them all)."""
    ends = [stop - 1 for _, stop in calls]
    wanted = select.state_rows(T)
    if wanted is not None:
        wanted = set(wanted.tolist())
        ends = [t for t in ends if t in wanted]
    return np.array(ends, dtype=np.int64)


def wanted_layer_names(select, n_layer):
    """{layer: [op, ...]}: the names of RECORDED this selection keeps, per layer."""
    return {i: [op for op in RECORDED if select.wants(f"L{i}.{op}")] for i in range(n_layer)}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def _import_fla(device):
    try:
        import torch
    except ImportError as e:
        raise FlaError(f"the fla bridge needs torch ({e}): pip install torch") from None
    try:
        import triton  # noqa: F401 - fla's kernels are Triton kernels
    except ImportError as e:
        raise FlaError(f"the fla bridge needs triton ({e}): pip install triton (it comes with "
                       "torch's CUDA wheels)") from None
    try:
        import fla
        from fla.models.cache_utils import Cache
        from fla.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    except ImportError as e:
        raise FlaError(f"the fla bridge needs flash-linear-attention ({type(e).__name__}: {e}): "
                       f"pip install flash-linear-attention=={FLA_VERSION}") from None
    if not str(device).startswith("cuda"):
        raise FlaError(f"device {device!r}: fla's RWKV-7 kernels are Triton GPU kernels; give a "
                       "CUDA device (device='cuda')")
    if not torch.cuda.is_available():
        raise FlaError("fla's RWKV-7 kernels are Triton GPU kernels and torch sees no CUDA GPU "
                       "here: run on a machine with one (and a CUDA build of torch)")
    version = getattr(fla, "__version__", "?")
    if version != FLA_VERSION:
        warnings.warn(f"fla {version}: this bridge was written against fla {FLA_VERSION}'s "
                      "source; submodule names or kernel choice may differ", stacklevel=3)
    return torch, Cache, RWKV7Config, RWKV7ForCausalLM


@contextlib.contextmanager
def _fla_folder(model_path):
    """A folder fla can load: the folder itself (with config.json), or a temporary float32 one
    written by tinyrwkv from any model file it reads."""
    path = Path(model_path)
    if path.is_dir() and (path / "config.json").is_file():
        yield path
        return
    from ..formats import open_model
    from ..formats.hf import write_hf
    from ..formats import as_source
    source = as_source(open_model(path))
    if any(".ffn.s_emb" in k for k in source.keys()):
        raise FlaError(f"{model_path} is a DeepEmbed RWKV-7; fla's RWKV7ForCausalLM has no "
                       "DeepEmbed, so it cannot run this model")
    with tempfile.TemporaryDirectory(prefix="tinyrwkv-fla-") as tmp:
        yield write_hf(Path(tmp) / "model", source, dtype="float32")


def _load_model(torch, RWKV7Config, RWKV7ForCausalLM, folder, model_path, device, dtype):
    config_json = json.loads((folder / "config.json").read_text())
    problems = check_config(config_json)
    if problems:
        raise FlaError(f"{model_path}: fla's RWKV7ForCausalLM with this config.json is not the "
                       f"RWKV-7 tinyrwkv traces: {'; '.join(problems)}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FlaError(f"{folder} holds no .safetensors file: the fla bridge loads safetensors "
                       "(write a folder with `tinyrwkv convert MODEL OUT_FOLDER --type f32`)")
    from safetensors.torch import load_file
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    config = RWKV7Config.from_pretrained(str(folder))
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embeddings.weight"]
    with warnings.catch_warnings(), torch.device(device):    # fla's initialisation, on device
        warnings.filterwarnings("ignore", message=".*potentially buggy FLA implementation.*")
        model = RWKV7ForCausalLM(config)
    try:
        torch.nn.Module.load_state_dict(model, weights, strict=True)
    except RuntimeError as e:
        raise FlaError(f"fla's RWKV7ForCausalLM cannot take the tensors of {model_path}: {e}; "
                       "give a folder with fla's tensor names (tinyrwkv convert MODEL "
                       "OUT_FOLDER)") from None
    torch_dtype = getattr(torch, dtype)
    model = model.to(device=device, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    return model, config


class _Recorder:
    """Collects the hooked tensors of each call, and the states after it."""

    def __init__(self, torch, names, state_after):
        self.torch, self.names, self.state_after = torch, names, state_after
        self.parts = {}            # trace name -> [tensor per call]
        self.call = {}             # this call's tensors needed by later hooks (v, v_first)

    def keep(self, name, tensor):
        t = tensor.detach()
        t = t.reshape(-1, t.shape[-1]).clone()        # (1, T, X) or (T, X) -> (T, X)
        self.parts.setdefault(name, []).append(t)

    def hooks(self, model, n_layer):
        """(module, hook function) pairs for the wanted names."""
        torch, out = self.torch, []
        layers = model.model.layers

        def first(x):
            return x[0] if isinstance(x, (tuple, list)) else x

        def module_at(i, path):
            m = layers[i]
            for part in filter(None, path.split(".")):
                m = getattr(m, part)
            return m

        def add(module, fn):
            out.append((module, fn))

        if "ln0" in self.names:
            add(layers[0].pre_norm, lambda m, args, o: self.keep("ln0", first(o)))
        for i in range(n_layer):
            ops = self.names.get(i, [])
            for op in ops:
                if op not in HOOKED:
                    continue
                path, side = HOOKED[op]
                name = f"L{i}.{op}"
                if side == "in":
                    fn = (lambda name: lambda m, args, o: self.keep(name, args[0]))(name)
                else:
                    fn = (lambda name: lambda m, args, o: self.keep(name, first(o)))(name)
                add(module_at(i, path), fn)
            attn = layers[i].attn
            if "w_log" in ops:
                add(attn.w_lora, (lambda name: lambda m, args, o:
                                  self.keep(name, LOG_DECAY_SCALE * o.sigmoid()))(f"L{i}.w_log"))
            if "a" in ops:
                add(attn.a_lora, (lambda name: lambda m, args, o:
                                  self.keep(name, o.sigmoid()))(f"L{i}.a"))
            if i == 0:                      # v_first: layer 0's v, for every later v_res
                def v0(m, args, o):
                    self.call["v_first"] = o
                add(attn.v_proj, v0)
            if "v_res" in ops:
                if i == 0:
                    add(attn.v_proj, lambda m, args, o: self.keep("L0.v_res", o))
                else:
                    def vi(m, args, o):
                        self.call["v"] = o
                    add(attn.v_proj, vi)
                    add(attn.v_lora, (lambda name: lambda m, args, o: self.keep(
                        name, torch.lerp(self.call["v"], self.call["v_first"], o.sigmoid()))
                    )(f"L{i}.v_res"))
        if "logits" in self.names:
            add(model.lm_head, lambda m, args, o: self.keep("logits", first(o)))
        return out

    def states(self, cache, n_layer, stop):
        """After a call ending at token stop - 1: L{i}.state rows, if wanted then."""
        if (stop - 1) not in self.state_after:
            return
        for i in range(n_layer):
            if "state" in self.names.get(i, []):
                S = cache[i]["recurrent_state"].detach()[0].transpose(-1, -2).clone()
                self.parts.setdefault(f"L{i}.state", []).append(S[None])

    def arrays(self, rows):
        """{name: float64 NumPy array}, the calls joined on the token axis, rows cut."""
        out = {}
        for name in list(self.parts):
            parts = self.parts.pop(name)
            t = self.torch.cat(parts) if len(parts) > 1 else parts[0]
            a = t.to("cpu", self.torch.float64).numpy()
            if rows is not None and not name.endswith(".state"):
                a = a[rows]
            out[name] = a
        return out


def record(model_path, ids, state=None, select=None, progress=None, device="cuda",
           dtype="float32", mode="chunk", piece=PIECE):
    """Run fla's RWKV7ForCausalLM on `ids` (from `state`, a tinyrwkv State) and return
    (trace, final): what it computed under trace names (module docstring), and its final state as
    a tinyrwkv State (float64). dtype: the model's torch dtype, "float32", "float16" or
    "bfloat16". mode: "chunk" (one call, fla's chunked kernel), "fused_recurrent" (calls of
    `piece` <= 63 tokens, default 32, fla's recurrent kernel) or "decode" (one token per
    call). progress: called as progress(tokens_done, T) after each call. The trace's `info`
    attribute says what ran: fla's version, device, dtype, mode, calls, load_s and run_s."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    select = select or oracle.Selection()
    ids = np.atleast_1d(np.asarray(ids))
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError("token ids must be a non-empty list of integers")
    select.token_rows(len(ids))                 # a selected token past the end: say so now
    pieces(len(ids), mode, piece)               # a bad piece size: say so now
    return _record(_import_fla(device), model_path, ids, state, select, progress, device, dtype,
                   mode, piece)


def _record(fla, model_path, ids, state, select, progress, device, dtype, mode, piece):
    """record, after the checks, with fla = (torch, Cache, RWKV7Config, RWKV7ForCausalLM)."""
    torch, Cache, RWKV7Config, RWKV7ForCausalLM = fla
    T = len(ids)
    rows = select.token_rows(T)
    calls = pieces(T, mode, piece)
    t0 = time.perf_counter()
    with _fla_folder(model_path) as folder:
        model, config = _load_model(torch, RWKV7Config, RWKV7ForCausalLM, folder, model_path,
                                    device, dtype)
    L, C, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    H, N = C // config.head_dim, config.head_dim
    bad = ids[(ids < 0) | (ids >= V)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is out of range for this model's vocabulary "
                         f"(0..{V - 1})")

    cache = None
    if state is not None:
        entries = fla_state_arrays(state, L, C, H, N)
        torch_dtype = getattr(torch, dtype)
        legacy = tuple({"recurrent_state": torch.from_numpy(d["recurrent_state"]).to(device),
                        "conv_state": torch.from_numpy(d["conv_state"]).to(device, torch_dtype),
                        "ffn_state": torch.from_numpy(d["ffn_state"]).to(device, torch_dtype),
                        "attn_state": None} for d in entries)
        cache = Cache.from_legacy_cache(legacy)

    names = wanted_layer_names(select, L)
    for extra in ("ln0", "logits"):
        if select.wants(extra):
            names[extra] = True
    state_after = set(kept_state_rows(T, calls, select).tolist())
    rec = _Recorder(torch, names, state_after)
    t1 = time.perf_counter()
    handles = []
    grad = torch.enable_grad if mode == "chunk" else torch.no_grad
    try:
        for module, fn in rec.hooks(model, L):
            handles.append(module.register_forward_hook(fn))
        with grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not support float32 on some.*")
            for start, stop in calls:
                rec.call.clear()
                x = torch.tensor(ids[start:stop][None], dtype=torch.long, device=device)
                out = model(input_ids=x, past_key_values=cache, use_cache=True,
                            return_dict=True)
                cache = out.past_key_values
                del out
                rec.states(cache, L, stop)
                if progress:
                    progress(stop, T)
    finally:
        for h in handles:
            h.remove()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()

    t2 = time.perf_counter()
    tr = oracle.Trace(rec.arrays(rows))
    import fla as package
    tr.info = dict(impl="fla", fla_version=getattr(package, "__version__", "?"),
                   device=(torch.cuda.get_device_name(torch.device(device))
                           if str(device).startswith("cuda") else str(device)),
                   dtype=dtype, mode=mode, calls=len(calls), load_s=round(t1 - t0, 3),
                   run_s=round(t2 - t1, 3))
    final_layers = [{k: cache[i][k].detach().to("cpu", torch.float64).numpy()
                     for k in ("recurrent_state", "conv_state", "ffn_state")} for i in range(L)]
    final = state_from_fla_arrays(final_layers)
    tr["final.att_shift"], tr["final.wkv"], tr["final.ffn_shift"] = (
        final.att_shift, final.wkv, final.ffn_shift)
    tr.tokens = rows
    rows_of_state = np.array(sorted(state_after), dtype=np.int64)
    tr.state_tokens = None if np.array_equal(rows_of_state, np.arange(T)) else rows_of_state
    return tr, final
