"""Tolerances that follow the numbers (docs/formats.md §8.5): correct implementations computed
another way pass, planted bugs fail where they were planted, and the local op check names the op
a bug is in even behind an earlier one."""
import json
import subprocess
import sys

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import oracle
from tinyrwkv.synthetic import make_weights

from conftest import ROOT
from oracle_cases import BUGS, bug_trace, variant_steps

# Awkward but official in kind: 3 heads of 64, unequal LoRA ranks (Dw, Da, Dv, Dg), a vocabulary
# past 32768 (ids >= 32768 are used), a non-zero initial state, a 16-token chunk boundary crossed.
L, C, V, T = 3, 192, 40000, 40


@pytest.fixture(scope="module")
def case():
    w = make_weights(L, C, V, head_size=64, ranks=(32, 16, 24, 48), seed=11)
    model = tinyrwkv.RWKV7(w, dtype="float64")
    rng = np.random.default_rng(11)
    _, state = model.forward(rng.integers(0, V, 12))
    ids = rng.integers(0, V, T)
    ids[:3] = [V - 1, 32768, 39000]
    ref = oracle.trace(model, ids, state=state)
    noise = {d: oracle.noise_scales(model, ref, d, ids, state) for d in ("fp32", "bf16")}
    return w, model, ids, state, ref, noise


def calibrated(case, other, dtype="fp32", **kw):
    w, model, ids, state, ref, noise = case
    return oracle.compare(ref, other, dtype, model=model, ids=ids, state=state,
                          noise=noise.get(dtype), **kw)


def test_round_to():
    """Round-to-nearest-even at the precision's significand, and unbiased stochastic rounding."""
    one = np.float32(1.0)
    assert oracle.round_to(np.float32(1 + 2**-8), "bf16") == one             # a tie: to even
    assert oracle.round_to(np.float32(1 + 3 * 2**-8), "bf16") == np.float32(1 + 2**-6)
    assert oracle.round_to(np.float32(1 + 2**-12), "tf32") == one
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert np.array_equal(oracle.round_to(x, "fp16"), x.astype(np.float16).astype(np.float32))
    assert np.all(np.abs(oracle.round_to(x, "bf16") - x) <= 2**-8 * np.abs(x))   # half an ulp
    rng = np.random.default_rng(1)
    v = np.full(200000, 1 + 2**-10)
    sr = oracle.round_to(v, "bf16", rng)
    assert set(np.unique(sr)) == {1.0, 1 + 2**-7}
    # unbiased: the mean of 2e5 draws lands within 5 standard errors (ulp 2^-7, p = 1/8)
    assert abs(sr.mean() - v[0]) < 5 * 2**-7 * np.sqrt(0.125 * 0.875 / v.size)


@pytest.mark.parametrize("dtype,ways", [("fp32", w) for w in
                                        ("plain", "norms", "fused_wkv", "products", "einsum",
                                         "pointwise", "all")]
                         + [("bf16", "all"), ("bf16", "fused_wkv")])
def test_correct_variants_pass(case, dtype, ways):
    """The same functions computed another way (tests/oracle_cases.py): no false alarm."""
    w, model, ids, state, ref, noise = case
    other = oracle.trace(tinyrwkv.RWKV7(w, dtype="float32", steps=variant_steps(ways, dtype)),
                         ids, state=state)
    report = calibrated(case, other, dtype)
    worst = max(r["max_rel"] / r["tol"] for r in report["rows"])
    worst_local = max(r["local"]["ratio"] for r in report["rows"] if "local" in r)
    print(f"{dtype} {ways}: worst error/tolerance {worst:.2f} global, {worst_local:.2f} local")
    assert report["ok"] and report["first"] is None and report["local"] == "done"
    assert worst_local > 0                                  # the local check did compare


@pytest.mark.parametrize("bug", list(BUGS))
def test_planted_bugs_fail_locally_where_planted(case, bug):
    w, model, ids, state, ref, noise = case
    report = calibrated(case, bug_trace(w, ids, state.copy(), bug))
    layer, op = BUGS[bug][3]
    first = report["first"]
    assert not report["ok"] and first is not None
    assert (first["layer"], first["op"], first["check"]) == (layer, op, "local"), first


def test_a_bug_behind_another_is_still_named(case):
    """Two bugs: the local check fails at both ops and passes the correct ops between them, which
    compute from wrong inputs (the fixed tolerance sees only the first and everything after)."""
    w, model, ids, state, ref, noise = case
    other = bug_trace(w, ids, state.copy(), "relu not squared")   # layer 0 on, ffn_hidden
    other = oracle.Trace(other)
    other["L0.att"] = other["L0.att"] * 1.001                     # and one before it, in att
    report = calibrated(case, other)
    bad = [r["name"] for r in report["rows"] if r.get("local", {}).get("bad")]
    assert report["first"]["name"] == "L0.att"
    assert {"L0.att", "L0.ffn_hidden", "L1.ffn_hidden", "L2.ffn_hidden"} <= set(bad)
    assert not any(n.endswith((".gn", ".y", ".state", ".ln1")) for n in bad), bad


def test_states_at_chunk_ends_are_replayed(case):
    """A trace with the state every 8 tokens: the WKV is replayed from each recorded state."""
    w, model, ids, state, ref, noise = case
    select = oracle.Selection(state_every=8)
    ok = oracle.trace(tinyrwkv.RWKV7(w, dtype="float32"), ids, state=state, select=select)
    assert calibrated(case, ok)["ok"]
    bad = bug_trace(w, ids, state.copy(), "chunk read-out (every 16th token)", select=select)
    first = calibrated(case, bad)["first"]
    assert (first["name"], first["token"], first["check"]) == ("L0.y", 15, "local")


def test_logits_only_and_subsets(case):
    """Without the inputs of an op there is no local row for it, and a trace of a subset of the
    tokens skips the local check (with the reason) but is still calibrated."""
    w, model, ids, state, ref, noise = case
    full = oracle.trace(tinyrwkv.RWKV7(w, dtype="float32"), ids, state=state)
    report = calibrated(case, {"logits": full["logits"]})
    assert report["ok"] and "local" in report["rows"][0]      # logits from its replayed input
    part = oracle.trace(tinyrwkv.RWKV7(w, dtype="float32"), ids, state=state,
                        select=oracle.Selection(tokens=range(10, 30)))
    report = calibrated(case, part)
    assert report["ok"] and report["local"].startswith("skipped") and report["calibrated"]


def test_the_fixed_tolerance_false_alarm_is_gone(case):
    """bf16 activations computed another way: the first edition's one tolerance (0.2) flags the
    group norm; the calibrated one passes it, and still catches a bug in bf16."""
    w, model, ids, state, ref, noise = case
    other = oracle.trace(tinyrwkv.RWKV7(w, dtype="float32", steps=variant_steps("all", "bf16")),
                         ids, state=state)
    assert not oracle.compare(ref, other, "bf16")["ok"]
    assert calibrated(case, other, "bf16")["ok"]
    report = calibrated(case, bug_trace(w, ids, state.copy(), "kappa not normalised", "bf16"),
                        "bf16")
    assert (report["first"]["name"], report["first"]["check"]) == ("L0.kk", "local")


def test_calibration_needs_the_ids(case):
    w, model, ids, state, ref, noise = case
    with pytest.raises(ValueError, match="token ids"):
        oracle.compare(oracle.Trace(ref), ref, "fp32", model=model)


def test_compare_command_calibrates_from_the_trace(tmp_path):
    """`tinyrwkv compare` finds the model in the reference trace's meta, and says so."""
    from tinyrwkv.formats import save_safetensors
    path = tmp_path / "m.safetensors"
    save_safetensors(path, make_weights(2, 128, 300, head_size=32, seed=2))
    (tmp_path / "ids.txt").write_text(" ".join(map(str, range(5, 40))))
    run = lambda *a: subprocess.run([sys.executable, "-m", "tinyrwkv", *a], cwd=tmp_path,
                                    capture_output=True, text=True)
    for dtype in ("float64", "float32"):
        r = run("trace", "--model", str(path), "--ids", "ids.txt", "--out", f"{dtype}.npz",
                "--dtype", dtype)
        assert r.returncode == 0, r.stderr
    r = run("compare", "float64.npz", "float32.npz", "--json", "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "calibrated on" in r.stderr and "local op check" in r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["calibrated"] and report["local"] == "done"
    assert all("local" in t and t["local"]["ratio"] < 1 for t in report["tensors"]
               if not t["name"].startswith("final."))
    r = run("compare", "float64.npz", "float32.npz", "--fixed")
    assert r.returncode == 0 and "for every tensor" in r.stdout
    r = run("compare", "float32.npz", "float64.npz")
    assert r.returncode != 0 and "float32 trace" in r.stderr
