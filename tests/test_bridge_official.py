"""The official-package bridge (tinyrwkv/bridges/official.py): its trace of the `rwkv` package
agrees with the float64 oracle, a bug planted in the package's input is caught, selections are
the full trace's rows, and the package's functions are put back."""
import numpy as np
import pytest

from conftest import needs_official
from tinyrwkv import RWKV7, oracle
from tinyrwkv.model import State
from tinyrwkv.synthetic import make_weights

pytestmark = needs_official

OBSERVED = {"ln0", "logits", "L0.v", "L0.v_res", "final.att_shift", "final.wkv", "final.ffn_shift"}
PER_LAYER = ("ln1", "state", "att", "ffn", "block")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    import torch
    w = make_weights(2, 128, 300, head_size=32, ranks=(8, 12, 16, 20), seed=3)
    path = tmp_path_factory.mktemp("official") / "m.pth"
    torch.save({k: torch.tensor(v) for k, v in w.items()}, path)
    rng = np.random.default_rng(7)
    z = State.zeros(RWKV7(w).config)
    state = State(*(0.3 * rng.standard_normal(a.shape).astype(np.float32)
                    for a in (z.att_shift, z.wkv, z.ffn_shift)))
    ids = rng.integers(0, 300, 24)
    ref = oracle.trace(RWKV7(w, dtype="float64"), ids, state=state)
    return w, path, state, ids, ref


def official():
    from tinyrwkv.bridges import bridge
    return bridge("official")


FINE = ("xr", "xw", "xk", "xv", "xa", "xg", "r", "w", "k", "v", "a", "g", "kk", "k_tilde",
        "v_res", "y", "gn", "ffn_hidden")


@pytest.mark.parametrize("detail", ["coarse", "fine"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_agrees_with_the_oracle(case, mode, detail):
    w, path, state, ids, ref = case
    tr, final = official().record(path, ids, state=state, mode=mode, detail=detail)
    ops = PER_LAYER + (FINE if detail == "fine" else ())
    names = OBSERVED | {f"L{i}.{op}" for i in range(2) for op in ops}
    assert set(tr) == names
    report = oracle.compare(ref, tr, "fp32")
    assert report["ok"], oracle.format_report(report)
    T = len(ids)
    every_token = mode == "decode" or detail == "fine"
    assert tr["L1.state"].shape == ((T if every_token else 1), 4, 32, 32)
    assert (tr.state_tokens is None) if every_token else tr.state_tokens.tolist() == [T - 1]
    np.testing.assert_array_equal(tr["L1.state"][-1], final.wkv[1])
    np.testing.assert_array_equal(final.wkv, tr["final.wkv"])


@pytest.mark.parametrize("detail", ["coarse", "fine"])
def test_same_numbers_as_the_compiled_package(case, detail):
    """The bridge runs the package's forward source with its functions wrapped (detail="fine":
    their Python source): the logits are bit-identical to its compiled forward's, and the
    observed block is prev + att + ffn in float32."""
    import torch
    w, path, state, ids, ref = case
    import rwkv.model as rm
    model = rm.RWKV_x070(str(path)[:-4], "cpu fp32")
    st = []
    for i in range(2):
        st += [torch.tensor(state.att_shift[i]), torch.tensor(state.wkv[i]),
               torch.tensor(state.ffn_shift[i])]
    logits, _ = model.forward([int(t) for t in ids], st, full_output=True)
    one, _ = model.forward(int(ids[0]), None)
    tr, _ = official().record(path, ids, state=state, mode="prefill", detail=detail)
    np.testing.assert_array_equal(tr["logits"], logits.numpy())
    tr1, _ = official().record(path, ids[:1], mode="decode", detail=detail)
    np.testing.assert_array_equal(tr1["logits"][0], one.numpy())
    t = {k: torch.tensor(v) for k, v in tr.items()}
    np.testing.assert_array_equal(tr["L0.block"], ((t["ln0"] + t["L0.att"]) + t["L0.ffn"]).numpy())
    np.testing.assert_array_equal(tr["L1.block"],
                                  ((t["L0.block"] + t["L1.att"]) + t["L1.ffn"]).numpy())


def test_a_planted_bug_is_caught(case, tmp_path):
    """The package is given a file with one layer-1 weight nudged; compare points at layer 1."""
    import torch
    w, path, state, ids, ref = case
    bad = dict(w)
    bad["blocks.1.att.k_a"] = w["blocks.1.att.k_a"] * 1.01
    bad_path = tmp_path / "bad.pth"
    torch.save({k: torch.tensor(v) for k, v in bad.items()}, bad_path)
    tr, _ = official().record(bad_path, ids, state=state)
    report = oracle.compare(ref, tr, "fp32")
    assert not report["ok"]
    bad = {r["name"] for r in report["rows"] if r["bad"]}
    assert not any(n.startswith("L0.") or n == "ln0" for n in bad)      # layer 0 still agrees
    assert report["first"]["layer"] == 1 and report["first"]["op"] == "state"
    assert report["first"]["token"] == 0


def test_selection_keeps_the_full_traces_rows(case):
    w, path, state, ids, ref = case
    select = oracle.Selection(names=["state", "att", "logits"], layers=[1],
                              tokens=range(5, 17), state_every=4)
    full, _ = official().record(path, ids, state=state)
    part, _ = official().record(path, ids, state=state, select=select)
    assert set(part) == {"L1.state", "L1.att", "logits",
                         "final.att_shift", "final.wkv", "final.ffn_shift"}
    assert part.tokens.tolist() == list(range(5, 17))
    assert part.state_tokens.tolist() == [7, 11, 15]
    np.testing.assert_array_equal(part["L1.att"], full["L1.att"][5:17])
    np.testing.assert_array_equal(part["logits"], full["logits"][5:17])
    np.testing.assert_array_equal(part["L1.state"], full["L1.state"][[7, 11, 15]])
    pre, _ = official().record(path, ids, state=state, select=select, mode="prefill")
    assert "L1.state" not in pre and pre.tokens.tolist() == list(range(5, 17))
    np.testing.assert_allclose(pre["L1.att"], full["L1.att"][5:17], rtol=0, atol=1e-5)
    fine, _ = official().record(path, ids, state=state, select=select, mode="prefill",
                                detail="fine")
    assert fine.state_tokens.tolist() == [7, 11, 15] and len(fine["L1.state"]) == 3
    np.testing.assert_allclose(fine["L1.state"], full["L1.state"][[7, 11, 15]], rtol=0, atol=1e-5)


def test_other_formats_are_converted_and_functions_restored(case, tmp_path):
    from tinyrwkv.cli import write_weights
    import rwkv.model as rm
    w, path, state, ids, ref = case
    before = {name: getattr(rm, name) for name in official().WRAPPED}
    st_path = tmp_path / "m.safetensors"
    write_weights(st_path, w, "f32")
    a, _ = official().record(st_path, ids[:6], state=state)
    b, _ = official().record(path, ids[:6], state=state)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(ValueError, match="out of range"):
        official().record(path, [0, 300])

    def interrupt(done, total):                 # an error while the functions are wrapped
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        official().record(path, ids[:3], progress=interrupt)
    assert {name: getattr(rm, name) for name in official().WRAPPED} == before
    not_a_model = tmp_path / "x.pth"
    not_a_model.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="x.pth"):
        official().record(not_a_model, [0])


def test_a_process_with_the_other_setting_is_refused(case, tmp_path):
    """rwkv.model reads RWKV_DE_VERSION once, at import: a DeepEmbed model in a process that
    imported it for plain models is refused with the reason (not run wrongly)."""
    import torch
    w, path, state, ids, ref = case
    official().record(path, ids[:2])                        # rwkv.model imported, plain
    de = make_weights(1, 64, 100, head_size=32, deep_embed=True, seed=1)
    de_path = tmp_path / "de.pth"
    torch.save({k: torch.tensor(v) for k, v in de.items()}, de_path)
    with pytest.raises(official().OfficialError, match="DeepEmbed.*fresh process"):
        official().record(de_path, [1, 2])
