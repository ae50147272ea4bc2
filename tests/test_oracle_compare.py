"""compare's checks of the other trace (no silent passes) and its explanations (--json, --heatmap,
the first divergence's ratio to its tolerance). Every trace here is crafted from a real one."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import oracle
from tinyrwkv.cli import main
from tinyrwkv.model import STEPS, group_norm
from tinyrwkv.synthetic import make_weights

from conftest import ROOT

IDS = [3, 1, 4, 1, 5, 9, 2]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """The float64 reference, a correct float32 trace and one with a planted bug (group norm eps
    1e-5 in every layer), as dicts and as files."""
    w = make_weights(2, 64, 97, seed=3)
    model = tinyrwkv.RWKV7(w, dtype="float64")
    ref = oracle.trace(model, IDS)
    f32 = oracle.trace(tinyrwkv.RWKV7(w, dtype="float32"), IDS)
    buggy = oracle.trace(model, IDS, steps=replace(
        STEPS, group_norm=lambda x, w, b, H: group_norm(x, w, b, H, eps=1e-5)))
    folder = tmp_path_factory.mktemp("traces")
    for name, tr in (("ref", ref), ("f32", f32), ("buggy", buggy)):
        oracle.save_trace(folder / f"{name}.npz", tr)
    return dict(ref=ref, f32=f32, buggy=buggy, folder=folder)


def cli(capsys, *args):
    """`tinyrwkv ARGS` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("tinyrwkv: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def saved(traces, name, tr):
    return oracle.save_trace(traces["folder"] / f"{name}.npz", tr)


def misspelled(tr):
    """The buggy trace as an implementation with its own names would write it: `key` for `k`,
    `norm` for `gn` (the tensors that hold the bug), and no logits."""
    out = {}
    for name, value in tr.items():
        if name == "logits":
            continue
        layer, _, op = name.rpartition(".")
        out[f"{layer}.{ {'k': 'key', 'gn': 'norm'}.get(op, op) }" if layer.startswith("L")
            else name] = value
    return out


# ---- item 2: no silent passes -----------------------------------------------------------------

def test_misspelled_names_and_no_logits_are_errors_naming_each(traces, capsys):
    """Before: 'all tensors within tolerance', exit 0 (the bug sat under names compare ignored)."""
    path = saved(traces, "misspelled", misspelled(traces["buggy"]))
    with pytest.raises(oracle.TraceProblems) as e:
        oracle.compare(traces["ref"], misspelled(traces["buggy"]))
    kinds = {p["kind"] for p in e.value.problems}
    assert kinds == {"unknown", "missing_logits"}
    assert {p["name"] for p in e.value.problems if p["kind"] == "unknown"} == {
        "L0.key", "L1.key", "L0.norm", "L1.norm"}
    rc, out, err = cli(capsys, "compare", traces["folder"] / "ref.npz", path)
    line = error_line(err)
    assert rc == 1 and "within tolerance" not in out
    for word in ("L0.key (did you mean L0.k?)", "L1.key", "L0.norm", "L1.norm", "no logits",
                 "add them under that name", "--warn"):
        assert word in line, line


def test_a_layer_the_model_does_not_have_is_unknown(traces):
    other = dict(traces["f32"], **{"L2.k": traces["f32"]["L1.k"]})
    with pytest.raises(oracle.TraceProblems, match=r"L2.k \(the model has 2 layers, L0-L1\)"):
        oracle.compare(traces["ref"], other)


def test_missing_logits_alone_is_an_error(traces, capsys):
    other = {k: v for k, v in traces["buggy"].items() if k != "logits"}
    with pytest.raises(oracle.TraceProblems, match="no logits"):
        oracle.compare(traces["ref"], other)
    rc, out, err = cli(capsys, "compare", traces["folder"] / "ref.npz", saved(traces, "nologits", other))
    assert rc == 1 and "every trace must hold `logits`" in error_line(err)


@pytest.mark.parametrize("name, change, kind, words", [
    ("L1.k", lambda x: x.T, "token_axis", ["L1.k is (64, 7) with its 7 tokens on axis 1",
                                           "np.moveaxis(x, 1, 0)"]),
    ("L0.state", lambda x: np.moveaxis(x, 0, -1), "token_axis", ["tokens on axis 3"]),
    ("L0.g", lambda x: x[-1], "token_axis", ["one token's worth", "record it for every token"]),
    ("logits", lambda x: x[:5], "tokens", ["logits has 5 tokens, the reference 7",
                                           "trace the same token ids"]),
    ("L0.state", lambda x: x.reshape(len(x), -1), "shape",
     ["L0.state is (7, 4096), the reference (7, 1, 64, 64)", "the same number of values"]),
    ("final.wkv", lambda x: x[0], "shape", ["final.wkv is (1, 64, 64), the reference (2, 1, 64, 64)"]),
])
def test_wrong_shapes_and_token_axis_are_errors(traces, capsys, name, change, kind, words):
    """Before: the token-axis and shape cases were a row 'shape ... BEYOND' among the others, with
    no word on what was wrong or how to fix it."""
    other = dict(traces["f32"], **{name: np.ascontiguousarray(change(traces["f32"][name]))})
    with pytest.raises(oracle.TraceProblems) as e:
        oracle.compare(traces["ref"], other)
    assert [(p["kind"], p["name"]) for p in e.value.problems] == [(kind, name)]
    rc, out, err = cli(capsys, "compare", traces["folder"] / "ref.npz", saved(traces, "shape", other))
    line = error_line(err)
    assert rc == 1 and out == ""
    for word in words:
        assert word in line, line


def test_warn_lists_every_problem_and_compares_the_rest(traces, capsys):
    other = misspelled(traces["f32"])
    other["L0.r"] = other["L0.r"].T.copy()
    rc, out, err = cli(capsys, "compare", traces["folder"] / "ref.npz",
                       saved(traces, "warn", other), "--warn")
    warnings = [line for line in err.splitlines() if line.startswith("tinyrwkv: warning:")]
    assert len(warnings) == 4 + 1 + 1, err                # 4 names, no logits, L0.r's axis
    assert any("L0.r is (64, 7)" in w for w in warnings) and any("no logits" in w for w in warnings)
    assert rc == 1 and "L0.r" in out and "BEYOND" in out   # a wrong shape never passes
    del other["L0.r"]
    rc, out, err = cli(capsys, "compare", traces["folder"] / "ref.npz",
                       saved(traces, "warn", other), "--warn")
    assert rc == 0 and err.count("tinyrwkv: warning:") == 5
    assert "but the trace has 5 problems (warnings)" in out
    report = oracle.compare(traces["ref"], other, problems="warn")
    assert report["ok"] and len(report["problems"]) == 5
    assert "WARNING: L0.key: not a trace name (did you mean L0.k?)" in oracle.format_report(report)
    with pytest.raises(ValueError, match="problems must be"):
        oracle.compare(traces["ref"], other, problems="ignore")


def test_partial_traces_and_names_the_reference_lacks_stay_allowed(traces, capsys):
    """A subset with logits passes; so does a trace with names a (partial or older) reference did
    not record, such as the kernel forms w_log and w_cuda, and the old name L{i}.wkv."""
    ref = {k: v for k, v in traces["ref"].items() if not k.endswith((".w_log", ".w_cuda"))}
    for subset in (["logits"], ["logits", "final.wkv", "L0.state", "L1.state"], list(traces["f32"])):
        other = {k: traces["f32"][k] for k in subset}
        report = oracle.compare(ref, other)
        assert report["ok"] and not report["problems"]
    assert report["extra"] == ["L0.w_log", "L0.w_cuda", "L1.w_log", "L1.w_cuda"]
    old = dict(traces["f32"], **{"L0.wkv": traces["f32"]["L0.y"]})
    del old["L0.y"]
    assert oracle.compare(traces["ref"], old)["ok"]
    oracle.save_trace(traces["folder"] / "ref_old.npz", ref)
    rc, out, err = cli(capsys, "compare", traces["folder"] / "ref_old.npz",
                       traces["folder"] / "f32.npz")
    assert rc == 0 and "not in the reference (4, not compared): L0.w_log" in out
    assert "does not name its model" in err        # so one fixed tolerance, and it says so
    assert "all tensors within tolerance" in out


# ---- item 6: compare that explains -------------------------------------------------------------

def test_first_divergence_says_its_ratio_to_the_tolerance(traces, capsys):
    rc, out, err = cli(capsys, "compare", traces["folder"] / "ref.npz", traces["folder"] / "buggy.npz")
    report = oracle.compare(traces["ref"], traces["buggy"])
    first = report["first"]
    assert rc == 1 and (first["layer"], first["op"], first["token"]) == (0, "gn", 0)
    assert first["ratio"] == pytest.approx(first["error"] / oracle.TOLERANCES["fp32"]) and first["ratio"] > 1
    assert f"FIRST DIVERGENCE: layer 0, op gn, token 0 (L0.gn): max|d|/std {first['error']:.2e} " \
           f"at that token, {first['ratio']:.3g}x the tolerance" in out


def test_json_report(traces, capsys):
    folder = traces["folder"]
    rc, out, err = cli(capsys, "compare", folder / "ref.npz", folder / "buggy.npz",
                       "--json", folder / "report.json")
    data = json.loads((folder / "report.json").read_text())
    assert rc == 1 and data["format"] == "tinyrwkv-compare-v1" and data["ok"] is False
    assert data["dtype"] == "fp32" and data["tol"] == 1e-4
    assert data["reference"].endswith("ref.npz") and data["other"].endswith("buggy.npz")
    tensors = {t["name"]: t for t in data["tensors"]}
    assert list(tensors) == oracle.order(traces["ref"])
    report = oracle.compare(traces["ref"], traces["buggy"])
    for row in report["rows"]:
        t = tensors[row["name"]]
        assert t["error"] == pytest.approx(row["max_rel"]) and t["tol"] == 1e-4
        assert t["ratio"] == pytest.approx(row["max_rel"] / 1e-4)
        assert t["beyond"] == (t["ratio"] > 1) and t["shape"] == list(traces["ref"][row["name"]].shape)
    assert not tensors["L0.k"]["beyond"] and tensors["L0.gn"]["beyond"]
    assert tensors["L0.gn"]["first_token"] == 0 and tensors["L0.k"]["first_token"] is None
    first = data["first"]
    assert (first["name"], first["layer"], first["op"], first["token"]) == ("L0.gn", 0, "gn", 0)
    assert first["ratio"] == pytest.approx(first["error"] / 1e-4) and first["ratio"] > 1
    assert data["missing"] == [] and data["extra"] == [] and data["problems"] == []


def test_json_is_strict_with_nan_and_lists_problems(traces, capsys):
    folder = traces["folder"]
    nan = dict(traces["f32"], **{"L1.v": np.full_like(traces["f32"]["L1.v"], np.nan)})
    cli(capsys, "compare", folder / "ref.npz", saved(traces, "nan", nan), "--json", folder / "nan.json")
    text = (folder / "nan.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    v = next(t for t in data["tensors"] if t["name"] == "L1.v")
    assert v["error"] is None and v["ratio"] is None and v["beyond"] and "in the other" in v["nonfinite"]
    rc, out, err = cli(capsys, "compare", folder / "ref.npz", saved(traces, "mis", misspelled(nan)),
                       "--json", folder / "mis.json")
    data = json.loads((folder / "mis.json").read_text())
    assert rc == 1 and data["ok"] is False
    assert {p["kind"] for p in data["problems"]} == {"unknown", "missing_logits"}


def test_output_files_never_overwrite_a_trace(traces, capsys):
    folder = traces["folder"]
    before = (folder / "f32.npz").read_bytes()
    rc, out, err = cli(capsys, "compare", folder / "ref.npz", folder / "f32.npz",
                       "--json", folder / "f32.npz")
    assert rc == 1 and "f32.npz" in error_line(err) and (folder / "f32.npz").read_bytes() == before


def png_layout(path):
    """(width, height, the layout in the PNG's Description text) of a PNG file."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    at = data.index(b"tEXtDescription\x00")               # a chunk: length, type, data
    length = int.from_bytes(data[at - 4:at], "big")
    keyword, text = data[at + 4:at + 4 + length].split(b"\x00", 1)
    return width, height, json.loads(text.decode("latin-1"))


def test_heatmap_is_a_png_of_layers_by_ops(traces, capsys):
    pytest.importorskip("matplotlib")
    folder = traces["folder"]
    rc, out, err = cli(capsys, "compare", folder / "ref.npz", folder / "buggy.npz",
                       "--heatmap", folder / "all.png")
    width, height, layout = png_layout(folder / "all.png")
    assert rc == 1 and layout == dict(layers=[0, 1], ops=list(oracle.LAYER_NAMES))
    layers, ops, ratios = oracle.heatmap_grid(oracle.compare(traces["ref"], traces["buggy"]))
    assert ratios.shape == (2, len(oracle.LAYER_NAMES)) and ratios[0, ops.index("gn")] > 1
    assert ratios[0, ops.index("k")] < 1
    part = {k: v for k, v in traces["buggy"].items()
            if k == "logits" or k.endswith((".k", ".gn", ".state"))}
    rc, out, err = cli(capsys, "compare", folder / "ref.npz", saved(traces, "part", part),
                       "--heatmap", folder / "part.png")
    w2, h2, layout = png_layout(folder / "part.png")
    assert rc == 1 and layout == dict(layers=[0, 1], ops=["k", "state", "gn"])
    assert w2 < width                                     # one column per op compared


def test_heatmap_without_matplotlib_is_a_clear_error(traces, tmp_path):
    """A Python where `import matplotlib` fails (a package of that name that raises, first on
    the path): one error line with the fix, before any trace is read."""
    (tmp_path / "shim" / "matplotlib").mkdir(parents=True)
    (tmp_path / "shim" / "matplotlib" / "__init__.py").write_text(
        "raise ImportError('No module named matplotlib', name='matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shim"), str(ROOT)]))
    p = subprocess.run([sys.executable, "-m", "tinyrwkv", "compare", "missing-ref.npz",
                        "missing-other.npz", "--heatmap", str(tmp_path / "h.png")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "--heatmap needs matplotlib" in p.stderr and "pip install matplotlib" in p.stderr
    assert not (tmp_path / "h.png").exists()
