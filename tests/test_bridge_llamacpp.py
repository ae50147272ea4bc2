"""The llama.cpp bridge (tinyrwkv/bridges/llamacpp.py): llama.cpp's own intermediates, read through
its graph evaluation callback, agree with tinyrwkv's float64 oracle within the fp32 tolerance on a
small awkward model from a non-zero state; a weight changed in llama.cpp's file only is caught;
a whole-file checkpoint is converted. Skipped without llama-cpp-python."""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import oracle
from tinyrwkv.synthetic import make_weights

from conftest import have

pytestmark = [
    pytest.mark.skipif(not (have("llama_cpp") and have("gguf") and have("tokenizers")),
                       reason="llama-cpp-python, gguf and tokenizers are not installed "
                              "(pip install llama-cpp-python gguf tokenizers)"),
    pytest.mark.filterwarnings("ignore:.*head size 32 from the metadata"),
]

V = 300


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tinyrwkv.bridges.llamacpp import _placeholder_tokenizer
    from tinyrwkv.formats import write_gguf
    tmp = tmp_path_factory.mktemp("llamacpp")
    w = make_weights(2, 128, V, head_size=32, seed=3, ranks=(24, 16, 8, 40))
    tok = _placeholder_tokenizer(V, tmp)
    good, bad = tmp / "good.gguf", tmp / "bad.gguf"
    write_gguf(good, w, "f32", tokenizer=tok)
    planted = dict(w)
    planted["blocks.1.att.a0"] = w["blocks.1.att.a0"] + 0.05          # llama.cpp's file only
    write_gguf(bad, planted, "f32", tokenizer=tok)
    ref = tinyrwkv.load(good, dtype="float64", backend="numpy")
    rng = np.random.default_rng(0)
    _, state = ref.forward(rng.integers(0, V, 9))                     # a non-zero start
    ids = rng.integers(0, V, 12)
    return good, bad, ref, state, ids


def record(path, ids, **kw):
    from tinyrwkv.bridges import bridge
    return bridge("llama.cpp").record(path, ids, n_threads=2, **kw)


def test_agrees_with_the_oracle_from_a_state(files, tmp_path):
    good, _, ref, state, ids = files
    tr, final = record(good, ids, state=state)
    want = oracle.trace(ref, ids, state=state)
    report = oracle.compare(want, tr, "fp32")
    print(oracle.format_report(report))
    for op in ("ln1", "xg", "r", "w", "w_log", "w_pre", "k", "v", "a", "g", "kk", "k_tilde",
               "v_res", "state", "y", "gn", "bonus", "att", "ffn_hidden", "ffn", "block"):
        assert f"L1.{op}" in tr
    assert "L0.w_cuda" not in tr                      # llama.cpp never computes it
    assert list(tr.state_tokens) == [len(ids) - 1]    # one call: the state after its last token
    assert tr["logits"].shape == (len(ids), V) and tr["L1.state"].shape == (1, 4, 32, 32)
    _assert_passes(report)
    np.testing.assert_array_equal(final.wkv, tr["final.wkv"])
    saved = oracle.load_trace(oracle.save_trace(tmp_path / "llama.npz", tr))   # as the CLI does
    _assert_passes(oracle.compare(want, saved, "fp32"))


def test_one_token_per_call_gives_every_state(files):
    good, _, ref, state, ids = files
    sel = oracle.Selection(names=["state", "y", "logits"], layers=[1])
    tr, _ = record(good, ids, state=state, chunk=1, select=sel)
    assert tr.state_tokens is None and tr["L1.state"].shape[0] == len(ids)
    assert "L0.y" not in tr and "L1.k" not in tr
    _assert_passes(oracle.compare(oracle.trace(ref, ids, state=state, select=sel), tr, "fp32"))


def test_a_planted_difference_is_caught(files):
    _, bad, ref, state, ids = files
    tr, _ = record(bad, ids, state=state)
    report = oracle.compare(oracle.trace(ref, ids, state=state), tr, "fp32")
    text = oracle.format_report(report)
    print(text)
    assert not _passes(report)
    assert _first_failure(report) == "L1.a"             # a0 enters the graph at a, first


def test_converts_other_checkpoints(files, tmp_path):
    save_file = pytest.importorskip("safetensors.numpy").save_file
    _, _, ref, _, ids = files
    path = tmp_path / "m.safetensors"
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in ref.stored_tensors().items()},
              str(path))
    tr, _ = record(path, ids[:5], select=oracle.Selection(names=["logits"]))
    _assert_passes(oracle.compare(oracle.trace(ref, ids[:5]), tr, "fp32"))


def test_a_token_subset(files):
    good, _, ref, state, ids = files
    sel = oracle.Selection(tokens=[2, 5, 6])                  # not the last: no state row
    tr, _ = record(good, ids, state=state, select=sel)
    assert list(tr.tokens) == [2, 5, 6] and "L0.state" not in tr
    _assert_passes(oracle.compare(oracle.trace(ref, ids, state=state, select=sel), tr, "fp32"))


def test_missing_package_is_named(monkeypatch):
    import sys
    from tinyrwkv.bridges import bridge
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ImportError, match="pip install llama-cpp-python"):
        bridge("llama.cpp").record("x.gguf", [1])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        record(tmp_path / "nope.gguf", [1, 2])


def _passes(report):
    return bool(report["ok"])


def _assert_passes(report):
    assert _passes(report), oracle.format_report(report)


def _first_failure(report):
    return report["first"]["name"]
