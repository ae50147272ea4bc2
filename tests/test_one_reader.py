"""One reader, one schema: every file `load` reads, `info`, `convert`, `merge-lora` (base and
adapter) and `trace` read too, through tinyrwkv.formats.open_model, and they agree; the x070
shapes come from one function (tinyrwkv.schema.x070_shapes)."""
import json

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import CheckpointError
from tinyrwkv.cli import main
from tinyrwkv.formats import open_model, save_safetensors, write_gguf, write_hf
from tinyrwkv.formats.hf import fla_table
from tinyrwkv.formats.lora import merge_lora
from tinyrwkv.schema import (LAYER0_UNUSED, OFFICIAL_SIZES, check_x070_keys, lora_ranks,
                             x070_shapes)
from tinyrwkv.synthetic import make_weights

from conftest import have

FORMATS = ["pth", "safetensors", "gguf", "hf-folder", "fla-safetensors"]
IDS = np.arange(1, 12)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same float32 model (unequal ranks, like the releases) in every format."""
    d = tmp_path_factory.mktemp("one_reader")
    w = make_weights(2, 64, 97, head_size=32, ranks=(32, 64, 16, 48), seed=21)
    paths = {"safetensors": d / "m.safetensors", "gguf": d / "m.gguf", "hf-folder": d / "hf",
             "fla-safetensors": d / "hf" / "model.safetensors", "pth": d / "m.pth"}
    save_safetensors(paths["safetensors"], w)
    if have("gguf"):
        write_gguf(paths["gguf"], w, "f32")
    write_hf(paths["hf-folder"], w)
    if have("torch"):
        import torch
        torch.save({k: torch.from_numpy(v) for k, v in w.items()}, paths["pth"])
    return w, paths


def path_of(files, fmt):
    needs = {"gguf": "gguf", "pth": "torch"}.get(fmt)
    if needs and not have(needs):
        pytest.skip(f"{needs} is not installed")
    return files[1][fmt]


def cli(capsys, *args):
    main([str(a) for a in args])
    return capsys.readouterr()


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_reads_every_format_alike(files, fmt):
    w, _ = files
    ref = tinyrwkv.RWKV7(w).forward(IDS)[0]
    model = tinyrwkv.load(path_of(files, fmt), backend="numpy")
    assert np.array_equal(model.forward(IDS)[0], ref)          # f32 everywhere: the same numbers


@pytest.mark.parametrize("fmt", FORMATS)
def test_info_reads_every_format_alike(files, fmt, capsys):
    out = cli(capsys, "info", path_of(files, fmt)).out
    rows = dict(line.split("  ", 1) for line in out.splitlines())
    assert rows["LoRA ranks w/a/v/g"].strip() == "32/64/16/48"
    assert rows["layers"].strip() == "2" and rows["vocabulary rows"].strip() == "97"
    n = sum(v.size for k, v in files[0].items() if k not in LAYER0_UNUSED)
    assert rows["parameters"].strip().startswith(f"{n:,} ")
    assert {"gguf": "GGUF", "hf-folder": "fla folder", "fla-safetensors": "fla names",
            "pth": "pth", "safetensors": "safetensors"}[fmt] in rows["format"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_reads_every_format(files, fmt, tmp_path, capsys):
    """Any format -> safetensors (f32: exact) -> load: the original logits."""
    w, _ = files
    out = tmp_path / "out.safetensors"
    cli(capsys, "convert", path_of(files, fmt), out, "--type", "f32")
    back = open_model(out).read_all()
    assert all(np.array_equal(back[k], w[k]) for k in back)
    assert set(w) - set(back) <= set(LAYER0_UNUSED)
    assert np.array_equal(tinyrwkv.load(out, backend="numpy").forward(IDS)[0],
                          tinyrwkv.RWKV7(w).forward(IDS)[0])


def test_convert_chain_through_every_writer(files, tmp_path, capsys):
    """safetensors -> HF folder -> GGUF -> pth -> safetensors (bf16): what each writer writes,
    the next reads, and the bf16 result is the original rounded once."""
    if not (have("gguf") and have("torch")):
        pytest.skip("needs gguf and torch")
    from tinyrwkv.formats import to_bf16_bits, bf16_to_float32
    w, paths = files
    chain = [paths["safetensors"], tmp_path / "hf", tmp_path / "m.gguf", tmp_path / "m.pth",
             tmp_path / "end.safetensors"]
    for src, dst in zip(chain, chain[1:]):
        cli(capsys, "convert", src, dst, "--type", "f32" if dst != chain[-1] else "bf16")
    end = open_model(chain[-1])
    assert {t.dtype for t in end.tensors().values()} == {"bf16"}
    got = end.read_all()
    assert all(np.array_equal(got[k], bf16_to_float32(to_bf16_bits(w[k]))) for k in got)


def lora_pairs(w, rng, r=4):
    """{official stem: (A (r, in), B (out, r))} on two Linear layers."""
    out = {}
    for stem in ("blocks.0.att.key", "blocks.1.ffn.value"):
        o, i = w[stem + ".weight"].shape
        out[stem] = (rng.standard_normal((r, i)).astype(np.float32) * 0.1,
                     rng.standard_normal((o, r)).astype(np.float32) * 0.1)
    return out


def write_adapter(kind, pairs, d):
    """The same LoRA as an RWKV-PEFT .safetensors, a PEFT folder (fla names) or a llama.cpp GGUF."""
    if kind == "rwkv-peft":
        path = d / "lora.safetensors"
        save_safetensors(path, {f"model.{s}.lora_{x}": m for s, (A, B) in pairs.items()
                                for x, m in (("A", A), ("B", B))})
        return path
    if kind == "peft-folder":
        path = d / "adapter"
        path.mkdir()
        fla = {k[: -len(".weight")]: name[: -len(".weight")] for k, (name, _) in fla_table(2).items()
               if k.endswith(".weight")}
        save_safetensors(path / "adapter_model.safetensors",
                         {f"base_model.model.{fla[s]}.lora_{x}.weight": m
                          for s, (A, B) in pairs.items() for x, m in (("A", A), ("B", B))})
        (path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16, "r": 4}))
        return path
    import gguf
    path = d / "adapter.gguf"
    names = {"blocks.0.att.key": "blk.0.time_mix_key.weight",
             "blocks.1.ffn.value": "blk.1.channel_mix_value.weight"}
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    for stem, (A, B) in pairs.items():
        writer.add_tensor(names[stem] + ".lora_a", A)          # (r, in)
        writer.add_tensor(names[stem] + ".lora_b", B)          # (out, r)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("adapter", ["rwkv-peft", "peft-folder", "gguf-adapter"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_lora_reads_every_format(files, fmt, adapter, tmp_path, capsys):
    if adapter == "gguf-adapter" and not have("gguf"):
        pytest.skip("gguf is not installed")
    w, _ = files
    pairs = lora_pairs(w, np.random.default_rng(3))
    lora = write_adapter(adapter, pairs, tmp_path)
    out = tmp_path / "merged.safetensors"
    cli(capsys, "merge-lora", path_of(files, fmt), lora, out, "--alpha", "16", "--type", "f32")
    want = merge_lora(w, {f"{s}.lora_{x}": m for s, (A, B) in pairs.items()
                          for x, m in (("A", A), ("B", B))}, 16)
    got = open_model(out).read_all()
    assert all(np.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in got)
    assert not np.array_equal(got["blocks.0.att.key.weight"], w["blocks.0.att.key.weight"])


def test_merge_lora_into_gguf_output(files, tmp_path, capsys):
    if not have("gguf"):
        pytest.skip("gguf is not installed")
    w, paths = files
    pairs = lora_pairs(w, np.random.default_rng(4))
    lora = write_adapter("rwkv-peft", pairs, tmp_path)
    cli(capsys, "merge-lora", paths["gguf"], lora, tmp_path / "merged.gguf", "--alpha", "8",
        "--type", "f32")
    got = open_model(tmp_path / "merged.gguf").read("blocks.1.ffn.value.weight")
    A, B = pairs["blocks.1.ffn.value"]
    assert np.allclose(got, w["blocks.1.ffn.value.weight"] + (B @ A) * 8 / 4, atol=1e-6)


def test_trace_and_state_read_through_the_entry_point(files, tmp_path, capsys):
    if not have("gguf"):
        pytest.skip("gguf is not installed")
    _, paths = files
    (tmp_path / "ids.txt").write_text("1 2 3")
    cli(capsys, "trace", "--model", paths["gguf"], "--ids", tmp_path / "ids.txt", "--out",
        tmp_path / "t.npz", "--dtype", "float32")
    assert (tmp_path / "t.npz").exists()
    from tinyrwkv.cli import load_state                  # generate --state FILE
    config = tinyrwkv.load(paths["gguf"], backend="numpy").config
    ts = {f"blocks.{i}.att.time_state": np.full((2, 32, 32), i + 1.0, np.float32) for i in range(2)}
    save_safetensors(tmp_path / "state.safetensors", ts)
    state = load_state(tmp_path / "state.safetensors", config)
    assert np.array_equal(state.wkv[1], ts["blocks.1.att.time_state"])


def test_errors_name_the_file_and_the_fix(files, tmp_path, capsys):
    w, paths = files
    with pytest.raises(SystemExit):
        cli(capsys, "info", tmp_path / "nope.gguf")
    assert "no checkpoint at" in capsys.readouterr().err
    bad = dict(w)
    del bad["blocks.1.att.k_a"]
    save_safetensors(tmp_path / "bad.safetensors", bad)
    for command in (["info", tmp_path / "bad.safetensors"],
                    ["convert", tmp_path / "bad.safetensors", tmp_path / "x.safetensors"]):
        with pytest.raises(SystemExit):
            cli(capsys, *command)
        err = capsys.readouterr().err
        assert "bad.safetensors" in err and "blocks.1.att.k_a" in err
    pairs = lora_pairs(w, np.random.default_rng(5), r=2)
    pairs["blocks.0.att.key"] = (pairs["blocks.0.att.key"][0][:, :10], pairs["blocks.0.att.key"][1])
    lora = write_adapter("rwkv-peft", pairs, tmp_path)                    # A (2, 10): wrong width
    for base_and_lora, message in (([paths["safetensors"], lora], "do not fit"),
                                   ([paths["safetensors"], paths["safetensors"]], "no LoRA pairs")):
        with pytest.raises(SystemExit):
            cli(capsys, "merge-lora", *base_and_lora, tmp_path / "x.safetensors", "--alpha", "1")
        err = capsys.readouterr().err
        assert message in err and str(base_and_lora[1]) in err, err
    if have("gguf"):                          # a GGUF missing a tensor: named, with the fix
        import gguf
        writer = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "rwkv7")
        writer.add_wkv_head_size(32)
        writer.add_tensor("token_embd.weight", np.zeros((97, 64), np.float32))
        writer.add_tensor("blk.0.time_mix_w1.weight", np.zeros((32, 64), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(CheckpointError, match="cut.gguf.*re-convert"):
            open_model(tmp_path / "cut.gguf")


# ---- the schema ----

def test_make_weights_has_the_schema_shapes():
    w = make_weights(3, 64, 97, head_size=32, ranks=(32, 64, 16, 48), deep_embed=True,
                     d_deepembed=8)
    shapes = x070_shapes(3, 64, 97, 32, ranks=(32, 64, 16, 48), d_deepembed=8)
    assert list(w) == list(shapes)                             # same keys, same order
    assert all(w[k].shape == shapes[k] for k in w)
    check_x070_keys(w)


def test_official_sizes():
    """The released ranks follow the training code's formula (schema.lora_ranks) except the
    0.4B's gate rank (128, where the formula gives 160)."""
    for name, size in OFFICIAL_SIZES.items():
        formula = lora_ranks(size.n_embd)
        if name == "0.4B":
            assert formula[:3] == size.ranks[:3] and (formula[3], size.ranks[3]) == (160, 128)
        else:
            assert formula == size.ranks, name
    shapes = OFFICIAL_SIZES["0.1B"].shapes()
    assert shapes["blocks.11.att.v1"] == (768, 32) and shapes["blocks.0.att.a1"] == (768, 64)
    assert shapes["blocks.0.att.g2"] == (128, 768) and shapes["emb.weight"] == (65536, 768)
    assert "blocks.0.att.v1" not in OFFICIAL_SIZES["0.1B"].shapes(layer0_v=False)
    n = sum(int(np.prod(s)) for k, s in shapes.items() if k not in LAYER0_UNUSED)
    assert round(n / 1e6) == 191                               # 0.1B: 191M with the vocabulary
