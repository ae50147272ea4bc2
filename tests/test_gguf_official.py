"""GGUFs of official-shape models load: the released sizes have unequal LoRA ranks (0.1B: Dw/Da/Dv/
Dg = 64/64/32/128), and llama.cpp's layout puts copies of a0/a1/a2 (rank Da = 64) where layer 0's
unused v0/v1/v2 (rank Dv = 32) would be. Files from our writer and from llama.cpp's converter
(emulated below with the gguf package, as its Rwkv7Model does it) must load, agree with the float32
model, convert to a safetensors file that loads, and expose their quantised blocks unwidened.

The model: 0.1B's width, vocabulary and ranks with 2 layers instead of 12 (the layer count changes
no shape), synthetic weights (tinyrwkv.synthetic).
"""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.formats import open_model, write_gguf
from tinyrwkv.formats.hf import fla_table, fla_shape
from tinyrwkv.schema import OFFICIAL_SIZES
from tinyrwkv.synthetic import make_weights

from conftest import have, rel_err

pytestmark = pytest.mark.skipif(not have("gguf"), reason="the gguf package is not installed "
                                                         "(pip install -e '.[gguf]')")

SIZE = OFFICIAL_SIZES["0.1B"]
TYPES = ["f32", "f16", "q8_0"]

# max|d|/std of the logits against the float32 model (12 tokens, seed 11):
#   f32: the file holds the very numbers; the loaded model computes the same float32 products in
#        the same order: measured 0. The bound, 1e-5, is float32 reordering noise (~6e-8 per op
#        over C = 768-long sums and 2 layers), far below any mapping bug (O(1)).
#   f16: every matrix rounded to 11 significant bits (u = 4.9e-4): measured 2.0e-3; bound 1e-2.
#   q8_0: blocks of 32 on a 255-level grid scaled by the block's largest value; these random
#        weights are harder on it than trained ones: measured 5.9e-2; bound 1.5e-1 (2.5x), still
#        well below the O(1) of a transposed matrix or a swapped lerp.
TOL = {"f32": 1e-5, "f16": 1e-2, "q8_0": 1.5e-1}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(weights, token ids, float32 logits, folder) for the 0.1B-shape model."""
    w = make_weights(2, SIZE.n_embd, SIZE.vocab_size, head_size=SIZE.head_size, ranks=SIZE.ranks,
                     seed=11)
    ids = np.random.default_rng(0).integers(0, SIZE.vocab_size, 12)
    logits, _ = tinyrwkv.RWKV7(w).forward(ids, full_output=True)
    return w, ids, logits, tmp_path_factory.mktemp("official")


def llama_cpp_gguf(path, w, out_type):
    """Write `w` as llama.cpp's convert_hf_to_gguf.py (Rwkv7Model) writes an fla-hub checkpoint:
    fla's names renamed its way, mapped by gguf's own RWKV7 tensor-name table, the six lerps
    stacked into time_mix_lerp_fused (r, w, k, v, a, g), every other tensor squeezed, r_k
    flattened, fla's LoRA matrices kept as stored (no transpose for fla names), and in layer 0 a
    copy of each a0/a1/a2 written first under the v name. Types: F32 for 1-D tensors, w1/w2 and
    the fused lerps; the file type for the rest, F16 where rows are not whole blocks."""
    import gguf
    L = 2
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.RWKV7, L)
    Q = gguf.GGMLQuantizationType
    wanted = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[out_type]
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    Dw, Da, Dv, Dg = SIZE.ranks
    writer.add_context_length(1048576)
    writer.add_embedding_length(SIZE.n_embd)
    writer.add_block_count(L)
    writer.add_layer_norm_eps(1e-5)
    writer.add_wkv_head_size(SIZE.head_size)
    writer.add_decay_lora_rank(Dw)
    writer.add_iclr_lora_rank(Da)
    writer.add_value_residual_mix_lora_rank(Dv)
    writer.add_gate_lora_rank(Dg)
    writer.add_feed_forward_length(4 * SIZE.n_embd)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[out_type])
    writer.add_head_count(0)

    def add(name, data):
        data = np.asarray(data, np.float32)
        keep_f32 = data.ndim <= 1 or any(s in name for s in ("time_mix_w1", "time_mix_w2",
                                                               "lerp_fused"))
        qtype = Q.F32 if keep_f32 else wanted
        if qtype == Q.Q8_0 and data.shape[-1] % 32:
            qtype = Q.F16                                    # llama.cpp's QuantError fallback
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        elif qtype == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    lerps = {}
    for key, (fla, how) in fla_table(L).items():             # an fla-hub checkpoint's tensors
        data = np.asarray(w[key]).T if how == "T" else np.asarray(w[key])
        data = data.reshape(fla_shape(w[key].shape, how, key))
        name = (fla.replace("ffn", "feed_forward").replace("attn", "attention")
                .replace("feed_forward_norm", "ln2").replace("g_norm", "ln_x")
                .replace("_lora.lora.0.weight", "1.weight").replace("_lora.lora.2.weight", "2.weight")
                .replace("_lora.lora.2.bias", "0.weight"))
        bid = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if ".attention.x_" in name:
            lerps.setdefault(bid, {})[name[-1]] = data       # (1, 1, C) each
            if len(lerps[bid]) == 6:
                add(f"blk.{bid}.time_mix_lerp_fused.weight",
                    np.stack([lerps[bid][c] for c in "rwkvag"]))            # (6, 1, 1, C)
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        new = new if new.endswith((".weight", ".bias")) else new + ".weight"
        data = np.squeeze(data)
        if "r_k" in new:
            data = data.reshape(-1)
        if bid == 0 and "time_mix_a" in new:                 # the dummy layer-0 v0/v1/v2
            add(new.replace("time_mix_a", "time_mix_v"), data)
        add(new, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write(official, layout, out_type):
    w, _, _, folder = official
    path = folder / f"{layout}_{out_type}.gguf"
    if not path.exists():
        (write_gguf if layout == "ours" else llama_cpp_gguf)(path, w, out_type)
    return path


@pytest.mark.parametrize("out_type", TYPES)
@pytest.mark.parametrize("layout", ["ours", "llama.cpp"])
def test_official_shape_gguf_loads_and_agrees(official, layout, out_type):
    w, ids, ref, _ = official
    path = write(official, layout, out_type)
    model = tinyrwkv.load(path, backend="numpy")
    c = model.config
    assert (c.d_decay, c.d_aaa, c.d_mv, c.d_gate) == SIZE.ranks
    logits, _ = model.forward(ids, full_output=True)
    err = rel_err(logits, ref)
    print(f"{layout} {out_type}: max|d|/std {err:.2e}")
    assert err < TOL[out_type]
    source = open_model(path)
    assert not {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"} & set(source.tensors())
    if layout == "llama.cpp":          # the same quantiser on the same numbers: the same model
        ours = tinyrwkv.load(write(official, "ours", out_type), backend="numpy")
        assert np.array_equal(logits, ours.forward(ids, full_output=True)[0])


def test_our_writer_lays_out_layer_0_as_llama_cpp(official):
    """Layer 0's v0/v1/v2 in our GGUF are the a0/a1/a2 copies llama.cpp requires."""
    import gguf
    w, *_ = official
    reader = gguf.GGUFReader(str(write(official, "ours", "f32")))
    t = {x.name: np.asarray(x.data) for x in reader.tensors}
    for n in "012":
        assert np.array_equal(t[f"blk.0.time_mix_v{n}.weight"], t[f"blk.0.time_mix_a{n}.weight"])
    assert t["blk.0.time_mix_v1.weight"].shape == (SIZE.ranks[1], SIZE.n_embd)     # Da, not Dv
    assert t["blk.1.time_mix_v1.weight"].shape == (SIZE.ranks[2], SIZE.n_embd)
    assert t["blk.1.time_mix_lerp_fused.weight"].shape == (6, 1, 1, SIZE.n_embd)
    assert np.array_equal(t["blk.1.time_mix_lerp_fused.weight"][4].reshape(-1),
                          w["blocks.1.att.x_a"].reshape(-1))


def test_gguf_converts_to_safetensors_that_loads(official, tmp_path):
    """The reported failure: `convert x.gguf y.safetensors` wrote a file that did not load."""
    import subprocess
    import sys
    from conftest import ROOT
    _, ids, _, _ = official
    src = write(official, "llama.cpp", "q8_0")
    out = tmp_path / "back.safetensors"
    p = subprocess.run([sys.executable, "-m", "tinyrwkv", "convert", str(src), str(out),
                        "--type", "f32"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    back = tinyrwkv.load(out, backend="numpy")
    direct = tinyrwkv.load(src, backend="numpy")
    assert np.array_equal(back.forward(ids)[0], direct.forward(ids)[0])   # f32 holds q8_0 exactly


def test_quantised_blocks_are_available_unwidened(official):
    """GGUFModel.quantized: the stored q8_0 blocks and type, which dequantise to what read gives."""
    import gguf
    source = open_model(write(official, "ours", "q8_0"))
    q = source.quantized("blocks.1.att.key.weight")
    assert q.ggml_type == "q8_0" and q.shape == (SIZE.n_embd, SIZE.n_embd) and not q.transposed
    assert q.blocks.dtype == np.uint8 and q.blocks.shape == (SIZE.n_embd, SIZE.n_embd // 32 * 34)
    values = gguf.quants.dequantize(np.asarray(q.blocks), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(values, source.read("blocks.1.att.key.weight"))
    w1 = source.quantized("blocks.0.att.w1")
    assert w1.ggml_type == "f32" and w1.transposed and w1.shape == (SIZE.ranks[0], SIZE.n_embd)
    with pytest.raises(ValueError, match="row 0 of"):
        source.quantized("blocks.0.att.x_r")
