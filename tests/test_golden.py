"""Golden vectors (tinyrwkv/golden.py, docs/formats.md §8.2): written once per module, then read
back and recomputed (the float64 model, the tokenizers, the sampler), each new kind of case
present, manifest.txt saying what manifest.json says, and the C reader example compiled and run
against the folder when a C compiler is there."""

import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import golden
from tinyrwkv.model import State
from tinyrwkv.sampling import Penalties, SamplingParams, sampling_probs

from conftest import ROOT, have


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "golden"
    return out, golden.write_golden(out)


def read_txt(path):
    """manifest.txt -> a list of {key: value} records (as a C program reads it)."""
    records = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            records.append(dict(field.split("=", 1) for field in line.split(" ")))
    return records


def bin_state(out, case, when):
    files = case["files"]
    if f"{when}_wkv.bin" not in files:
        return None
    L, C = case["config"]["n_layer"], case["config"]["n_embd"]
    wkv_shape = case["shapes"]["wkv"]
    read = lambda key, shape: np.fromfile(out / files[f"{when}_{key}.bin"]["path"], "<f8").reshape(shape)
    return State(read("att_shift", (L, C)), read("wkv", wkv_shape), read("ffn_shift", (L, C)))


def test_golden_vectors(folder):
    """Every model case reproduces: the checkpoint loaded in float64, the ids run from the case's
    initial state in its one or two calls, logits, middle and final states as written."""
    out, manifest = folder
    assert json.loads((out / "manifest.json").read_text())["format"] == "tinyrwkv-golden-v2"
    for case in manifest["cases"]:
        for f in case["files"].values():
            assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
        model = tinyrwkv.load(out / case["files"]["safetensors"]["path"], dtype="float64")
        exp = np.load(out / case["files"]["expected"]["path"])
        ids = np.fromfile(out / case["files"]["ids.bin"]["path"], "<i4")
        assert ids.tolist() == case["ids"] == exp["ids"].tolist()
        init, split = bin_state(out, case, "init"), case["split"]
        logits, state, mid = golden.run_case(model, ids, init, split)
        scale = exp["logits"].std()
        assert np.abs(logits - exp["logits"]).max() < 1e-9 * scale, case["name"]
        raw = np.fromfile(out / case["files"]["logits.bin"]["path"], "<f8")
        assert np.array_equal(raw.reshape(case["shapes"]["logits"]), exp["logits"])
        for key in golden.STATE_KEYS:
            want = np.fromfile(out / case["files"][f"{key}.bin"]["path"], "<f8")
            assert np.allclose(getattr(state, key).ravel(), want, rtol=0, atol=1e-10), (case["name"], key)
        if split:
            want = bin_state(out, case, "mid")
            for key in golden.STATE_KEYS:
                assert np.allclose(getattr(mid, key), getattr(want, key), rtol=0, atol=1e-10)
            # a continued call is the same function as one call over all the ids
            whole, _, _ = golden.run_case(model, ids, init, 0)
            assert np.abs(whole - exp["logits"]).max() < 1e-9 * scale
        if case["files"].get("trace"):
            trace = tinyrwkv.oracle.load_trace(out / case["files"]["trace"]["path"])
            assert np.abs(trace["logits"] - exp["logits"]).max() < 1e-9 * scale
    ranks = next(c for c in manifest["cases"] if c["name"] == "official_ranks_L2_C256")["config"]
    assert (ranks["d_decay"], ranks["d_aaa"], ranks["d_mv"], ranks["d_gate"]) == (64, 64, 32, 128)


def test_each_new_kind_of_case_exists(folder):
    out, manifest = folder
    cases = manifest["cases"]
    assert any(c["split"] for c in cases)                                 # a continued call
    assert any(c["initial_state"] != "zero" and c["split"] for c in cases)
    init = next(c for c in cases if c["initial_state"] != "zero")
    assert np.abs(bin_state(out, init, "init").wkv).max() > 0.1          # really non-zero
    long = [c for c in cases if len(c["ids"]) >= 200]
    assert long and any(0 < c["split"] and c["split"] % 64 and len(c["ids"]) - c["split"] > 128
                        for c in long)                                    # chunk boundaries crossed
    world = next(c for c in cases if c["config"]["vocab_size"] == 65536)
    assert min(world["ids"]) >= 32768 and {32768, 65535} <= set(world["ids"])
    bf16 = [c for c in cases if c["storage"] == "bf16"]
    assert len(bf16) >= 2
    for c in bf16:   # stored as BF16, and the expectation is of exactly those numbers
        path = out / c["files"]["safetensors"]["path"]
        header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    unequal = [c for c in cases if len({c["config"][k] for k in ("d_decay", "d_aaa", "d_mv", "d_gate")}) == 4]
    assert unequal
    kinds = {c["tokenizer"] for c in manifest["tokenizer_cases"]}
    assert "world" in kinds
    if golden.bpe_tokenizer_path() is not None and have("tokenizers"):
        assert "bpe" in kinds
    texts = {c["text"] for c in manifest["tokenizer_cases"]}
    assert "" in texts and any("\u200d" in t for t in texts) and any("\r\n" in t for t in texts)
    sampling = manifest["sampling_cases"]
    assert any(c["top_p"] < 1 for c in sampling) and any(c["top_k"] > 0 for c in sampling)
    assert any(c["temperature"] != 1 for c in sampling) and any(c["occurrence"] for c in sampling)
    assert any(c["ban_tokens"] for c in sampling) and any(0 in c["history_exempt"] and 1 in
                                                          c["history_exempt"] for c in sampling)


def test_tokenizer_cases_reproduce(folder):
    out, manifest = folder
    tokenizers = {kind: tok for kind, tok, _ in golden.golden_tokenizers()}
    for case in manifest["tokenizer_cases"]:
        tok = tokenizers[case["tokenizer"]]
        assert bytes.fromhex(case["text_hex"]).decode("utf-8") == case["text"]
        assert tok.encode(case["text"]) == case["ids"], case["name"]
        assert tok.decode_bytes(case["ids"]) == case["text"].encode("utf-8") or case["tokenizer"] == "bpe"
    # the copied vocabulary is the one the World tokenizer reads
    world = tinyrwkv.tokenizer.WorldTokenizer(out / "world_vocab.txt")
    for case in manifest["tokenizer_cases"]:
        if case["tokenizer"] == "world":
            assert world.encode(case["text"]) == case["ids"]


def test_sampling_cases_reproduce(folder):
    """From the written logits and the manifest's parameters and history, the sampler gives the
    written penalised logits and probabilities exactly, and the allowed set is where p > 0."""
    out, manifest = folder
    for case in manifest["sampling_cases"]:
        read = lambda key, dtype: np.fromfile(out / case["files"][key]["path"], dtype)
        logits, penalised, probs = read("logits", "<f4"), read("penalised", "<f4"), read("probs", "<f8")
        params = SamplingParams(temperature=case["temperature"], top_p=case["top_p"],
                                top_k=case["top_k"], presence_penalty=case["presence_penalty"],
                                frequency_penalty=case["frequency_penalty"],
                                penalty_decay=case["penalty_decay"],
                                penalty_exempt=case["penalty_exempt"],
                                ban_tokens=tuple(case["ban_tokens"]))
        penalties = Penalties(params)
        for token, text in case["history"]:
            penalties.update(token, text)
        assert {str(k): v for k, v in penalties.occurrence.items()} == case["occurrence"]
        assert np.array_equal(penalties.apply(logits), penalised)
        mine = sampling_probs(penalised, params.temperature, params.top_p, params.top_k)
        assert np.array_equal(mine, probs), case["name"]
        assert np.flatnonzero(probs > 0).tolist() == case["allowed"]
        assert probs[case["allowed"]].tolist() == case["probs_allowed"]
        assert abs(probs.sum() - 1) < 1e-12


def test_manifest_txt_says_what_the_json_says(folder):
    out, manifest = folder
    records = read_txt(out / "manifest.txt")
    assert records[0]["kind"] == "meta" and float(records[0]["tol_fp32"]) == 1e-4
    models = [r for r in records if r["kind"] == "model"]
    assert [r["name"] for r in models] == [c["name"] for c in manifest["cases"]]
    for r, c in zip(models, manifest["cases"]):
        cfg = c["config"]
        assert (int(r["L"]), int(r["C"]), int(r["N"]), int(r["V"]), int(r["d_mv"])) == (
            cfg["n_layer"], cfg["n_embd"], cfg["head_size"], cfg["vocab_size"], cfg["d_mv"])
        assert int(r["T"]) == len(c["ids"]) and int(r["split"]) == c["split"]
        assert r["storage"] == c["storage"] and (r["init"] == "file") == (c["initial_state"] != "zero")
        for key, f in c["files"].items():
            if key.endswith(".bin"):
                assert r[key[:-4]] == f["path"]
    toks = [r for r in records if r["kind"] == "tokenizer"]
    assert len(toks) == len(manifest["tokenizer_cases"])
    for r, c in zip(toks, manifest["tokenizer_cases"]):
        assert bytes.fromhex(r["text_hex"]).decode() == c["text"]
        assert [int(i) for i in r["ids"].split(",") if i] == c["ids"] and int(r["n_ids"]) == len(c["ids"])
    samp = [r for r in records if r["kind"] == "sampling"]
    for r, c in zip(samp, manifest["sampling_cases"], strict=True):
        assert float(r["top_p"]) == c["top_p"] and int(r["top_k"]) == c["top_k"]
        assert [int(i) for i in r["allowed"].split(",")] == c["allowed"]
        occ = dict(kv.split(":") for kv in r["occurrence"].split(",") if kv)
        assert {k: float(v) for k, v in occ.items()} == c["occurrence"]


def test_c_reader_example(folder, tmp_path):
    """examples/golden_check.c reads manifest.txt (no JSON parser), checks every file's size and
    recomputes the sampling cases; compiled and run only where a C compiler is installed."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc or gcc) on PATH: examples/golden_check.c not compiled")
    out, manifest = folder
    exe = tmp_path / "golden_check"
    subprocess.run([cc, "-O2", "-std=c99", "-o", str(exe), str(ROOT / "examples/golden_check.c"),
                    "-lm"], check=True, capture_output=True, text=True)
    p = subprocess.run([str(exe), str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    n = (len(manifest["cases"]), len(manifest["tokenizer_cases"]), len(manifest["sampling_cases"]))
    assert f"{n[0]} model, {n[1]} tokenizer, {n[2]} sampling cases checked, 0 failures" in p.stdout
    # and it does fail: a truncated file, a wrong probability
    logits = out / manifest["cases"][0]["files"]["logits.bin"]["path"]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / logits.name).write_bytes(logits.read_bytes()[:-8])
    probs = broken / manifest["sampling_cases"][0]["files"]["probs"]["path"]
    p_arr = np.fromfile(probs, "<f8")
    p_arr[manifest["sampling_cases"][0]["allowed"][0]] += 1e-3
    p_arr.tofile(probs)
    p = subprocess.run([str(exe), str(broken)], capture_output=True, text=True)
    assert p.returncode == 1, p.stdout
    assert f"FAIL {manifest['cases'][0]['name']}: {logits.name}" in p.stdout
    assert f"FAIL {manifest['sampling_cases'][0]['name']}: probabilities differ" in p.stdout
