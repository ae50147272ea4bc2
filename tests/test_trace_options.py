"""Traces you can afford (issue 16 item 4): selections of names, layers and tokens, states every K
tokens, an initial state in and the final state out, streaming to disk (docs/formats.md §8.4)."""
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import oracle
from tinyrwkv.formats.state_file import load_state, save_state
from tinyrwkv.synthetic import make_weights

from conftest import ROOT

T = 23


@pytest.fixture(scope="module")
def setup():
    w = make_weights(3, 64, 97, head_size=32, seed=7)
    model = tinyrwkv.RWKV7(w, dtype="float64")
    ids = np.random.default_rng(11).integers(0, 97, T)
    return w, model, ids, oracle.trace(model, ids)


def test_streamed_file_is_the_saved_trace(setup, tmp_path):
    """write_trace (layer by layer, states through a temporary file) writes the same members, in
    the same order, with the same bytes as save_trace(trace(...)); no row lists for a full trace."""
    _, model, ids, full = setup
    saved = oracle.save_trace(tmp_path / "saved.npz", full, meta={"k": 1})
    streamed, final = oracle.write_trace(tmp_path / "streamed", model, ids, meta={"k": 1})
    assert streamed.name == "streamed.npz"
    a, b = zipfile.ZipFile(saved), zipfile.ZipFile(streamed)
    assert a.namelist() == b.namelist()
    assert all(a.read(n) == b.read(n) for n in a.namelist())
    assert "__tokens__.npy" not in b.namelist() and "__state_tokens__.npy" not in b.namelist()
    assert np.array_equal(final.wkv, full["final.wkv"])
    loaded = oracle.load_trace(streamed)
    assert loaded.tokens is None and loaded.state_tokens is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trace-state-")]


def check_slice(full, sel, tokens=None, state_tokens=None):
    for name, value in sel.items():
        rows = None if name.startswith("final.") else (state_tokens if name.endswith(".state")
                                                       else tokens)
        want = full[name] if rows is None else full[name][rows]
        assert np.array_equal(value, want), name


@pytest.mark.parametrize("streamed", [False, True])
def test_names_and_layers(setup, tmp_path, streamed):
    _, model, ids, full = setup
    select = oracle.Selection(names=["y", "L0.*", "logits"], layers=[0, 2])
    if streamed:
        sel = oracle.load_trace(oracle.write_trace(tmp_path / "s.npz", model, ids, select=select)[0])
    else:
        sel = oracle.trace(model, ids, select=select)
    want = ([f"L0.{n}" for n in oracle.LAYER_NAMES] + ["L2.y", "logits"]
            + ["final.att_shift", "final.wkv", "final.ffn_shift"])
    assert sorted(sel) == sorted(want)
    check_slice(full, sel)
    assert sorted(oracle.trace(model, ids, select=oracle.Selection(layers=[1]))) == sorted(
        ["ln0", "logits", "final.att_shift", "final.wkv", "final.ffn_shift"]
        + [f"L1.{n}" for n in oracle.LAYER_NAMES])


@pytest.mark.parametrize("streamed", [False, True])
def test_tokens_and_state_every(setup, tmp_path, streamed):
    _, model, ids, full = setup
    tokens = [0, 3, 4, 5, 15, 16, 22]
    for select, rows, srows in (
            (oracle.Selection(tokens=tokens), tokens, tokens),
            (oracle.Selection(state_every=8), None, [7, 15, 22]),
            (oracle.Selection(state_every=5), None, [4, 9, 14, 19, 22]),
            (oracle.Selection(tokens=tokens, state_every=4), tokens, [3, 15, 22])):
        if streamed:
            path, _ = oracle.write_trace(tmp_path / "s.npz", model, ids, select=select)
            sel = oracle.load_trace(path)
        else:
            sel = oracle.trace(model, ids, select=select)
        assert sorted(sel) == sorted(full)
        assert (sel.tokens is None) == (rows is None)
        if rows is not None:
            assert sel.tokens.tolist() == rows
        assert sel.state_tokens.tolist() == srows
        check_slice(full, sel, rows, srows)
        assert sel["L1.state"].shape == (len(srows), 2, 32, 32)


def test_selected_trace_compares_on_shared_tokens(setup, tmp_path):
    """A subset trace loads and compares against the full reference (and the reverse) on the
    tokens both hold; the first divergence is reported as a token index, not a row number."""
    w, model, ids, full = setup
    select = oracle.Selection(tokens=range(10, 20), state_every=4)
    path, _ = oracle.write_trace(tmp_path / "sel.npz", tinyrwkv.RWKV7(w, dtype="float32"), ids,
                                 select=select)
    sel = oracle.load_trace(path)
    ref_path = oracle.save_trace(tmp_path / "ref.npz", full)
    ref = oracle.load_trace(ref_path)
    report = oracle.compare(ref, sel, "fp32")
    assert report["ok"] and not report["missing"], oracle.format_report(report)
    assert oracle.compare(sel, ref, "fp32")["ok"]
    tight = oracle.compare(ref, sel, "fp32", tol=1e-13)
    assert not tight["ok"] and tight["first"]["token"] == 10
    # a planted error at token 17 of one name is found at token 17
    bad = oracle.Trace(sel)
    bad.tokens, bad.state_tokens = sel.tokens, sel.state_tokens
    bad["L1.gn"] = sel["L1.gn"].copy()
    bad["L1.gn"][7] += 1.0
    report = oracle.compare(ref, bad, "fp32")
    assert report["first"]["token"] == 17 and report["first"]["name"] == "L1.gn"


def test_initial_state_continues_the_call(setup, tmp_path):
    """trace(ids[a:], state after ids[:a]) is rows a... of the trace of ids, and its final state
    is the full call's; through state files as well."""
    _, model, ids, full = setup
    a = 9
    head = oracle.trace(model, ids[:a])
    _, st = model.forward(ids[:a])
    path = save_state(st, tmp_path / "head")
    rest = oracle.trace(model, ids[a:], state=load_state(path, model.config))
    assert sorted(rest) == sorted(full)
    for name, value in rest.items():
        want = full[name] if name.startswith("final.") else full[name][a:]
        np.testing.assert_allclose(value, want, rtol=1e-9, atol=1e-12, err_msg=name)
    for name in ("att_shift", "wkv", "ffn_shift"):
        np.testing.assert_allclose(head[f"final.{name}"], getattr(st, name), rtol=1e-12, atol=1e-14)


def test_trace_command_options(setup, tmp_path):
    w, model, ids, full = setup
    from tinyrwkv.formats import save_safetensors
    save_safetensors(tmp_path / "m.safetensors", w)
    m = tinyrwkv.load(tmp_path / "m.safetensors", dtype="float64", backend="numpy", progress=False)
    full = oracle.trace(m, ids)                        # the stored (float32) weights
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids[:9])))
    (tmp_path / "rest.txt").write_text(" ".join(map(str, ids[9:])))
    run = lambda *a: subprocess.run([sys.executable, "-m", "tinyrwkv", "trace", "--model",
                                     str(tmp_path / "m.safetensors"), *a], capture_output=True,
                                    text=True, cwd=ROOT)
    p = run("--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "head.npz"),
            "--final-state", str(tmp_path / "st.npz"), "--progress")
    assert p.returncode == 0, p.stderr
    assert "tracing:" in p.stderr and "100.0%" in p.stderr
    p = run("--ids", str(tmp_path / "rest.txt"), "--out", str(tmp_path / "rest.npz"),
            "--initial-state", str(tmp_path / "st.npz"), "--names", "y,gn", "--names", "logits",
            "--layers", "1-2", "--tokens", "0:4,10,13", "--state-every", "4")
    assert p.returncode == 0, p.stderr
    rest = oracle.load_trace(tmp_path / "rest.npz")
    assert sorted(rest) == sorted(["L1.y", "L1.gn", "L2.y", "L2.gn", "logits", "final.att_shift",
                                   "final.wkv", "final.ffn_shift"])
    assert rest.tokens.tolist() == [0, 1, 2, 3, 10, 13] and rest.state_tokens.tolist() == [3, 13]
    for name in ("L1.y", "L2.gn", "logits"):
        np.testing.assert_allclose(rest[name], full[name][[9, 10, 11, 12, 19, 22]], rtol=1e-9,
                                   atol=1e-12, err_msg=name)
    np.testing.assert_allclose(rest["final.wkv"], full["final.wkv"], rtol=1e-9, atol=1e-12)
    for bad, msg in ((("--tokens", "0:99"), "tokens"), (("--layers", "7"), "layers"),
                     (("--tokens", "x"), "--tokens"), (("--state-every", "0"), "state-every")):
        p = run("--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "x.npz"), *bad)
        assert p.returncode != 0 and msg in p.stderr, p.stderr


def test_parse_ranges():
    assert oracle.parse_ranges("0,3:6,8-9") == [0, 3, 4, 5, 8, 9]
    assert oracle.parse_ranges(":3") == [0, 1, 2]
    for bad in ("a", "5:2", "-1", "3:"):
        with pytest.raises(ValueError):
            oracle.parse_ranges(bad)
