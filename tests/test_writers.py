"""Files that cannot destroy files (issue 13, item 2), and state files read as hostile input.

Every writer (convert to .safetensors / .gguf / .pth / an HF folder, merge-lora, train's model and
checkpoint, state files, trace, golden):
  (a) refuses to write onto its own input, which stays byte-identical;
  (b) killed with SIGKILL at moments spread over its write (POSIX), leaves the old target, the
      complete new one, or none: never a partial file;
  (c) an exception while writing leaves no temporary behind and the old target untouched.
CI kills each writer twice; TINYRWKV_LONG_TESTS=1 kills each ten times.
"""
import collections
import hashlib
import json
import os
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.cli import main
from tinyrwkv.errors import CheckpointError
from tinyrwkv.files import (OutputError, atomic_folder, atomic_open, atomic_path,
                            refuse_overwriting, temporaries_of)
from tinyrwkv.formats import InMemory, open_model, save_safetensors, write_gguf, write_hf
from tinyrwkv.formats.safetensors import write_safetensors
from tinyrwkv.synthetic import make_weights

from conftest import ROOT, have

LONG = os.environ.get("TINYRWKV_LONG_TESTS") == "1"
posix_only = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and fork timing: POSIX only")
ENV = dict(os.environ, PYTHONIOENCODING="utf-8",
           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def cli(*args):
    """Run the command in this process: (exit status, stderr is read by the caller's capsys)."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code or 0
    return 0


def snapshot(path):
    """Every byte at `path`: bytes for a file, {relative name: bytes} for a folder, None if
    absent."""
    path = Path(path)
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes()
                for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes() if path.exists() else None


def lora_for(w, rng, r=4):
    """An RWKV-PEFT LoRA for two matrices of `w` (tests/test_adapters.py's layout)."""
    lora = {}
    for stem in ("blocks.0.att.key", "blocks.1.ffn.value"):
        out_dim, in_dim = w[stem + ".weight"].shape
        lora[f"model.{stem}.lora_A"] = rng.standard_normal((r, in_dim)).astype(np.float32) * 0.1
        lora[f"model.{stem}.lora_B"] = rng.standard_normal((out_dim, r)).astype(np.float32) * 0.1
    return lora


def story_text(seed, sentences):
    """Synthetic story text for `train`: enough repetition for a BPE tokenizer, no data files."""
    rng = np.random.default_rng(seed)
    who = ["Lily", "Tom", "the dog", "a bird", "the old man", "Mia"]
    did = ["ran to the park", "found a red ball", "was very happy", "ate a big cake",
           "saw a little cat", "went home"]
    return "\n".join(f"Once upon a time {who[rng.integers(6)]} {did[rng.integers(6)]}."
                     for _ in range(sentences))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The inputs: a model large enough that writing it takes tens of ms (L4 C256 V4096, 22 MB
    float32), a LoRA for it, its float32 GGUF, a World-vocabulary model for generate, and texts."""
    d = tmp_path_factory.mktemp("writers")
    w = make_weights(4, 256, 4096, seed=1)
    paths = {"model": d / "m.safetensors", "lora": d / "lora.safetensors",
             "world": d / "world.safetensors", "ids": d / "ids.txt",
             "train": d / "train.txt", "valid": d / "valid.txt"}
    save_safetensors(paths["model"], w)
    save_safetensors(paths["lora"], lora_for(w, np.random.default_rng(2)))
    save_safetensors(paths["world"], make_weights(2, 64, 65536, seed=3))
    paths["ids"].write_text(" ".join(str(i) for i in range(1, 33)))
    paths["train"].write_text(story_text(4, 400))
    paths["valid"].write_text(story_text(5, 100))
    if have("gguf"):
        paths["gguf"] = d / "m32.gguf"
        write_gguf(paths["gguf"], w, "f32")
    return paths


# ---------------------------------------------------------------------------------------------
# (a) writing onto the input is refused; the input is byte-identical afterwards
# ---------------------------------------------------------------------------------------------

def test_convert_onto_its_own_input_is_refused(files, tmp_path, capsys):
    """`convert m.safetensors m.safetensors` used to leave an 8 KB stub."""
    model = files["model"]
    before = snapshot(model)
    assert cli("convert", model, model) == 1
    assert "is the input" in capsys.readouterr().err
    assert snapshot(model) == before and not temporaries_of(model)


@pytest.mark.skipif(not have("gguf"), reason="gguf is not installed")
def test_float32_gguf_onto_itself_is_refused(files, capsys):
    """A float32 GGUF converted onto itself used to exit 0 with logits off by 1.45."""
    gguf = files["gguf"]
    before = snapshot(gguf)
    assert cli("convert", gguf, gguf, "--type", "f32") == 1
    assert "is the input" in capsys.readouterr().err
    assert snapshot(gguf) == before


def test_the_input_under_another_name_is_refused(files, tmp_path, capsys):
    """A symlink to the input, a hard link to it, and a folder that contains it."""
    model = files["model"]
    before = snapshot(model)
    hard = tmp_path / "hard.safetensors"
    os.link(model, hard)
    outputs = [hard, model.parent]                          # a hard link; the input's folder
    try:
        (tmp_path / "link.safetensors").symlink_to(model)
        outputs.append(tmp_path / "link.safetensors")
    except OSError:                                         # Windows without the privilege
        pass
    for out in outputs:
        assert cli("convert", model, out, "--type", "f32") == 1, out
        err = capsys.readouterr().err
        assert "input" in err and "give another output path" in err, err
    assert snapshot(model) == before


def test_merge_lora_onto_the_base_or_the_adapter_is_refused(files, capsys):
    base, lora = files["model"], files["lora"]
    before = snapshot(base), snapshot(lora)
    for out in (base, lora):
        assert cli("merge-lora", base, lora, out, "--alpha", "8") == 1
        err = capsys.readouterr().err
        assert "is the input" in err and "cannot be merged" not in err, err
    assert (snapshot(base), snapshot(lora)) == before


def test_train_refuses_an_input_among_its_outputs(files, tmp_path, capsys):
    """--data or --valid that is a file train writes in --out (here its log), and --out a file."""
    out = tmp_path / "run"
    out.mkdir()
    data = out / "log.jsonl"
    data.write_text(files["train"].read_text())
    before = snapshot(data)
    args = ["train", "--valid", files["valid"], "--vocab", "300", "--steps", "1"]
    assert cli(*args, "--data", data, "--out", out) == 1
    assert "is the input" in capsys.readouterr().err
    assert snapshot(data) == before
    assert cli(*args, "--data", files["train"], "--out", data) == 1
    assert "is a file" in capsys.readouterr().err
    assert snapshot(data) == before


def test_trace_onto_its_ids_is_refused(files, tmp_path, capsys):
    ids = tmp_path / "ids.npz"                  # a name ending in .npz, as a trace's does
    ids.write_text(files["ids"].read_text())
    assert cli("trace", "--model", files["model"], "--ids", ids, "--out", ids) == 1
    assert "is the input" in capsys.readouterr().err
    assert ids.read_text() == files["ids"].read_text()


def test_a_folder_of_other_files_is_never_replaced(files, tmp_path, capsys):
    """HF output and golden vectors replace a whole folder: one holding anything they do not
    write is refused, and every file in it stays."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "config.json").write_text("{}")
    before = snapshot(folder)
    assert cli("convert", files["model"], folder) == 1
    assert "notes.txt" in capsys.readouterr().err
    assert cli("golden", "--out", folder) == 1
    assert "notes.txt" in capsys.readouterr().err
    assert snapshot(folder) == before and not temporaries_of(folder)


def test_save_state_onto_the_state_it_read_is_done_safely(files, tmp_path, capsys):
    """--state s.npz --save-state s.npz: the old state is read whole before the new one is
    written, so this is allowed, and the file is the new state afterwards."""
    s = tmp_path / "s.npz"
    common = ["generate", "--model", files["world"], "-n", "2", "-t", "0", "--backend", "numpy"]
    assert cli(*common, "Hello", "--save-state", s) == 0
    first = tinyrwkv.load_state(s)
    assert cli(*common, " again", "--state", s, "--save-state", s) == 0
    second = tinyrwkv.load_state(s)
    assert not np.array_equal(first.wkv, second.wkv) and not temporaries_of(s)


def test_save_state_to_a_folder_is_refused_and_the_suffix_rule(files, tmp_path, capsys):
    """--save-state /tmp used to write /tmp.npz; a name without .npz gets it, and says so."""
    common = ["generate", "--model", files["world"], "-n", "1", "-t", "0", "--backend", "numpy",
              "Hi"]
    assert cli(*common, "--save-state", tmp_path) == 1
    assert "is a folder" in capsys.readouterr().err
    assert not tmp_path.with_name(tmp_path.name + ".npz").exists()
    assert cli(*common, "--save-state", tmp_path / "chat") == 0
    assert ".npz added" in capsys.readouterr().err
    assert (tmp_path / "chat.npz").is_file() and not (tmp_path / "chat").exists()
    assert cli(*common, "--save-state", tmp_path / "exact.npz") == 0
    assert "added" not in capsys.readouterr().err and (tmp_path / "exact.npz").is_file()


def test_refuse_overwriting_unit(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"x")
    refuse_overwriting(tmp_path / "b.bin", [a, None])           # another file: fine
    for out in (a, tmp_path, tmp_path / "sub" / ".." / "a.bin"):
        with pytest.raises(OutputError, match="give another output path"):
            refuse_overwriting(out, [a])
    with pytest.raises(OutputError, match="inside the input folder"):
        refuse_overwriting(tmp_path / "new.bin", [tmp_path])


# ---------------------------------------------------------------------------------------------
# (b) SIGKILL at moments spread over each writer's write
# ---------------------------------------------------------------------------------------------

def model_complete(path):
    open_model(path).read_all("float32", progress=False)


def state_complete(path):
    tinyrwkv.load_state(path)


def trace_complete(path):
    assert "logits" in tinyrwkv.oracle.load_trace(path)


def checkpoint_complete(path):
    with np.load(path, allow_pickle=False) as f:
        assert "meta" in f.files
        for name in f.files:
            f[name]


def golden_complete(path):
    manifest = json.loads((path / "manifest.json").read_text())
    for case in manifest["cases"]:
        for f in case["files"].values():
            assert hashlib.sha256((path / f["path"]).read_bytes()).hexdigest() == f["sha256"]


def old_file(target):
    Path(target).write_bytes(b"the old file, which a kill must not damage\n" * 1000)


def old_folder(names):
    def make(target):
        Path(target).mkdir()
        for name in names:
            (Path(target) / name).write_bytes(b"old " + name.encode() * 100)
    return make


STATE_SCRIPT = """
import sys
import numpy as np
import tinyrwkv
L, H, N = 32, 32, 64                                  # 17 MB of wkv: a write of tens of ms
rng = np.random.default_rng(0)
state = tinyrwkv.State(rng.standard_normal((L, H * N), np.float32),
                       rng.standard_normal((L, H, N, N), np.float32),
                       rng.standard_normal((L, H * N), np.float32))
tinyrwkv.save_state(state, sys.argv[1])
"""


def train_args(files, out):
    return ["train", "--data", files["train"], "--valid", files["valid"], "--out", out,
            "--vocab", "300", "--layers", "2", "--width", "128", "--head-size", "64",
            "--batch", "1", "--ctx", "16", "--steps", "2", "--warmup", "1", "--eval-every", "1",
            "--eval-windows", "1", "--sample-every", "0", "--backend", "numpy",
            "--save-dtype", "float32"]


@dataclass
class Writer:
    """A writer to kill: its output's name, its command (argv after `python`, given the input
    files and the output path), a check that raises unless the output is whole, how to make an
    old output to keep, and CI's second kill moment (s): about half the write on an idle 2-core
    machine, as the long mode measured it."""
    name: str
    argv: object
    complete: object
    make_old: object
    mid: float


def cmd(*args):
    return ["-m", "tinyrwkv", *args]


WRITERS = {
    "convert-safetensors": Writer("o.safetensors", lambda f, out: cmd(
        "convert", f["model"], out, "--type", "bf16"), model_complete, old_file, 0.05),
    "convert-gguf": Writer("o.gguf", lambda f, out: cmd(
        "convert", f["model"], out, "--type", "q8_0"), model_complete, old_file, 0.1),
    "convert-pth": Writer("o.pth", lambda f, out: cmd(
        "convert", f["model"], out, "--type", "f32"), model_complete, old_file, 0.04),
    "convert-hf": Writer("hf", lambda f, out: cmd(
        "convert", f["model"], out, "--type", "f32"), model_complete,
        old_folder(["config.json", "model.safetensors"]), 0.04),
    "merge-lora": Writer("merged.safetensors", lambda f, out: cmd(
        "merge-lora", f["model"], f["lora"], out, "--alpha", "8", "--type", "f32"),
        model_complete, old_file, 0.08),
    "train-model": Writer("model.safetensors", lambda f, out: cmd(*train_args(f, out.parent)),
                          model_complete, old_file, 0.005),
    "train-checkpoint": Writer("train_state.npz", lambda f, out: cmd(*train_args(f, out.parent)),
                               checkpoint_complete, old_file, 0.03),
    "state": Writer("s.npz", lambda f, out: ["-c", STATE_SCRIPT, out], state_complete, old_file,
                    0.02),
    "trace": Writer("t.npz", lambda f, out: cmd(
        "trace", "--model", f["model"], "--ids", f["ids"], "--out", out), trace_complete,
        old_file, 0.08),
    "golden": Writer("g", lambda f, out: cmd("golden", "--out", out), golden_complete,
                     old_folder(["manifest.json"]), 1.0),
}


def written_to(target, listing_before, stat_before):
    """True once the writer has started on `target`: something named after it appeared in its
    folder (a temporary), or the target itself changed (a writer that is not atomic)."""
    target = Path(target)
    new = set(os.listdir(target.parent)) - listing_before
    return any(target.name in name for name in new) or _stat(target) != stat_before


def _stat(path):
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns, st.st_ino
    except FileNotFoundError:
        return None


def run_until_writing(argv, target):
    """Start the writer; return (process, the moment it started writing `target`)."""
    target = Path(target)
    listing, stat = set(os.listdir(target.parent)), _stat(target)
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=target.parent, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not written_to(target, listing, stat):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"the writer ended (status {proc.returncode}) without writing "
                                 f"{target.name}: {proc.stderr.read().decode()[-800:]}")
        time.sleep(0.001)
    return proc, time.monotonic()


def stop(proc):
    proc.kill()                                         # SIGKILL on POSIX
    proc.wait()
    proc.stderr.close()


def measure_write(argv, target):
    """Seconds from the start of the write of a fresh `target` to the target in place (the
    writer is then killed: what it does after, evaluations, samples, is not needed)."""
    proc, started = run_until_writing(argv, target)
    while _stat(target) is None and proc.poll() is None:
        time.sleep(0.001)
    length = time.monotonic() - started
    stop(proc)
    return length


def kill_during_write(argv, target, delay):
    """Start the writer, wait until it starts writing `target`, wait `delay` s more, SIGKILL it.
    Returns True if it was killed, False if it had finished by then."""
    proc, _ = run_until_writing(argv, target)
    time.sleep(delay)
    finished = proc.poll() is not None
    stop(proc)
    return not finished


def outcome(target, old, complete):
    now = snapshot(target)
    if now is None:
        return "absent"
    if old is not None and now == old:
        return "old"
    try:
        complete(target)
    except Exception:
        return "PARTIAL"
    return "new"


@posix_only
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_kill_during_a_write_leaves_the_old_file_or_the_new_one(writer, files, tmp_path):
    """Kills right when the write starts and later (CI: at `mid`; long: a first run measures
    the write's length W, then ten kills from 0 to 1.1 W), every other one with an old target
    to keep. Counts are printed for the closing note (pytest -s)."""
    if writer == "convert-gguf" and not have("gguf"):
        pytest.skip("gguf is not installed")
    w = WRITERS[writer]
    if LONG:
        (tmp_path / "w").mkdir()
        target = tmp_path / "w" / w.name
        length = measure_write(w.argv(files, target), target)
        delays = np.linspace(0, 1.1 * length, 10)
    else:
        delays = (0.0, w.mid)
    counts = collections.Counter()
    for n, delay in enumerate(delays):
        (tmp_path / f"k{n}").mkdir()
        target = tmp_path / f"k{n}" / w.name
        if n % 2:
            w.make_old(target)
        old = snapshot(target)
        killed = kill_during_write(w.argv(files, target), target, delay)
        result = outcome(target, old, w.complete)
        counts[result] += 1
        counts["killed" if killed else "finished first"] += 1
        assert result != "PARTIAL", f"{writer}: a kill {delay:.3f} s into the write left a " \
                                    f"partial {target.name}"
        assert result != "absent" or old is None, f"{writer}: the old {target.name} was lost"
    print(f"\n{writer}: {len(delays)} kills up to {max(delays) * 1000:.0f} ms into the write: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    assert counts["killed"] >= 1


# ---------------------------------------------------------------------------------------------
# (c) an exception while writing leaves no temporary and the old target
# ---------------------------------------------------------------------------------------------

class Failing(InMemory):
    """A source whose third tensor cannot be read (a disk error, a bad tensor in the input)."""

    def read(self, key, dtype=None):
        if key == sorted(self.arrays)[2]:
            raise OSError(f"cannot read {key}")
        return super().read(key, dtype)


def assert_untouched(folder, listing, target, old):
    assert sorted(os.listdir(folder)) == listing, "a temporary was left behind"
    assert snapshot(target) == old


@pytest.mark.parametrize("existing", [False, True])
def test_an_error_during_a_write_leaves_nothing_behind(tmp_path, existing):
    w = make_weights(2, 64, 100, seed=5)
    targets = {"safetensors": tmp_path / "m.safetensors", "hf": tmp_path / "hf",
               "gguf": tmp_path / "m.gguf", "trace": tmp_path / "t.npz",
               "state": tmp_path / "s.npz"}
    if existing:
        for name, target in targets.items():
            old_folder(["config.json"])(target) if name == "hf" else old_file(target)
    olds = {name: snapshot(t) for name, t in targets.items()}
    listing = sorted(os.listdir(tmp_path))
    entries = {k: ("F32", v.shape) for k, v in w.items()}
    with pytest.raises(OSError, match="cannot read"):
        write_safetensors(targets["safetensors"], entries, Failing(w).read)
    with pytest.raises(OSError, match="cannot read"):
        write_hf(targets["hf"], Failing(w))
    if have("gguf"):
        with pytest.raises(OSError, match="cannot read"):
            write_gguf(targets["gguf"], Failing(w), "f32")

    class Unconvertible:
        def __array__(self, *args, **kwargs):
            raise OSError("cannot read this array")
    with pytest.raises(OSError, match="cannot read"):
        tinyrwkv.oracle.save_trace(targets["trace"], {"ln0": np.zeros(3), "x": Unconvertible()})
    with pytest.raises(OSError, match="cannot read"):
        with atomic_open(targets["state"]) as f:
            f.write(b"half a state")
            raise OSError("cannot read the rest")
    for name, target in targets.items():
        assert_untouched(tmp_path, listing, target, olds[name])


def test_interrupts_and_errors_in_the_atomic_helpers(tmp_path):
    """Ctrl-C (KeyboardInterrupt) is cleaned up like an error; the folder swap too."""
    target = tmp_path / "f.bin"
    old_file(target)
    old = snapshot(target)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half")
            raise KeyboardInterrupt
    folder = tmp_path / "d"
    old_folder(["a"])(folder)
    old_tree = snapshot(folder)
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(folder, {"a", "b"}) as tmp:
            (tmp / "b").write_bytes(b"new")
            raise KeyboardInterrupt
    assert snapshot(target) == old and snapshot(folder) == old_tree
    assert sorted(os.listdir(tmp_path)) == ["d", "f.bin"]
    with atomic_folder(folder, {"a", "b"}) as tmp:             # and a clean exit replaces it
        (tmp / "b").write_bytes(b"new")
    assert snapshot(folder) == {"b": b"new"} and sorted(os.listdir(tmp_path)) == ["d", "f.bin"]
    with atomic_open(target, "w") as f:                        # text mode is UTF-8 everywhere
        f.write("naïve")
    assert target.read_bytes().decode("utf-8").startswith("naïve")


def test_a_symlinked_target_stays_a_link(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    try:
        link.symlink_to(real)
    except OSError:
        pytest.skip("symlinks need a privilege here")
    with atomic_open(link) as f:
        f.write(b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


# ---------------------------------------------------------------------------------------------
# state files: every malformed file is one clear line; memory bounded by what the model needs
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A model, a state it produced, and that state's file."""
    model = tinyrwkv.RWKV7(make_weights(2, 128, 300, seed=6))
    _, state = model.forward([1, 2, 3])
    path = tinyrwkv.save_state(state, tmp_path / "s.npz")
    return model, state, path


def npz(path, compressed=False, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def one_line_error(path, config, match):
    """load_state refuses with one line naming the file."""
    with pytest.raises(CheckpointError, match=match) as e:
        tinyrwkv.load_state(path, config)
    message = str(e.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_state_file_roundtrip_keeps_everything(saved):
    model, state, path = saved
    back = tinyrwkv.load_state(path, model.config)
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert np.array_equal(getattr(back, name), getattr(state, name))
        assert getattr(back, name).flags.writeable     # forward_seq updates a state in place
    assert model.forward([4], back)[0].tolist() == model.forward([4], state)[0].tolist()


def test_truncated_and_crc_broken_state_files(saved, tmp_path):
    model, _, path = saved
    data = path.read_bytes()
    for n, cut in enumerate((0, 10, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1)):
        bad = tmp_path / f"cut{n}.npz"
        bad.write_bytes(data[:cut])
        one_line_error(bad, model.config, "state")
    start = data.index(np.ascontiguousarray(saved[1].wkv).tobytes()[:64])   # wkv's data
    flipped = bytearray(data)
    flipped[start + 200] ^= 0x40                # one bit in the data: only the CRC can tell
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    one_line_error(tmp_path / "crc.npz", model.config, "CRC|corrupt")


def test_state_files_with_the_wrong_arrays(saved, tmp_path):
    model, state, _ = saved
    good = dict(format=np.array("tinyrwkv-state-v1"), att_shift=state.att_shift, wkv=state.wkv,
                ffn_shift=state.ffn_shift)
    missing = {k: v for k, v in good.items() if k != "wkv"}
    one_line_error(npz(tmp_path / "missing.npz", **missing), model.config, "missing wkv")
    one_line_error(npz(tmp_path / "extra.npz", **good, extra=np.zeros(2)), model.config,
                   "unexpected extra")
    one_line_error(npz(tmp_path / "junk.npz", x=np.zeros(3)), None, "not a tinyrwkv state")
    one_line_error(npz(tmp_path / "tag.npz", **{**good, "format": np.array("other-v1")}), None,
                   "format tag")
    other = tinyrwkv.RWKV7(make_weights(3, 128, 300, seed=7)).config
    one_line_error(npz(tmp_path / "shape.npz", **good), other,
                   r"att_shift has shape \(2, 128\), this model needs \(3, 128\)")
    skewed = {**good, "ffn_shift": state.ffn_shift[:, :64]}
    one_line_error(npz(tmp_path / "skew.npz", **skewed), None, "not the .* of one model")


def test_state_files_with_the_wrong_dtypes(saved, tmp_path):
    model, state, _ = saved
    good = dict(format=np.array("tinyrwkv-state-v1"), att_shift=state.att_shift, wkv=state.wkv,
                ffn_shift=state.ffn_shift)
    cases = {"complex": state.wkv.astype(np.complex64), "integer": state.wkv.astype(np.int32),
             "bool": state.wkv > 0}
    for name, wkv in cases.items():
        one_line_error(npz(tmp_path / f"{name}.npz", **{**good, "wkv": wkv}), model.config,
                       "real float16/32/64")
    objects = np.empty(state.wkv.shape, object)                 # np.savez pickles object arrays
    one_line_error(npz(tmp_path / "object.npz", **{**good, "wkv": objects}), model.config,
                   "Python objects")
    nan = state.wkv.copy()
    nan[0, 0, 0, 0] = np.nan
    one_line_error(npz(tmp_path / "nan.npz", **{**good, "wkv": nan}), model.config, "NaN")


def test_a_state_member_is_checked_before_it_is_decompressed(saved, tmp_path):
    """A deflated wkv that declares 64x the model's state (2 GB for a model needing 32 MB would
    do the same; this keeps the test small): refused from its header, before its data is read,
    with and without the model's config; memory stays far below the declared size."""
    model, state, _ = saved
    big = np.zeros((2, 2, 64, 64 * 64), np.float32)            # 2 MiB, compresses to ~2 KB
    bomb = npz(tmp_path / "bomb.npz", compressed=True, format=np.array("tinyrwkv-state-v1"),
               att_shift=state.att_shift, wkv=big, ffn_shift=state.ffn_shift)
    att = np.zeros((2, 1024), np.float32)                     # shapes of one (wide) model:
    bomb2 = npz(tmp_path / "bomb2.npz", compressed=True,       # 8 MiB of zeros in ~10 KB
                format=np.array("tinyrwkv-state-v1"), att_shift=att,
                wkv=np.zeros((2, 2, 512, 512), np.float32), ffn_shift=att)
    del big
    assert bomb.stat().st_size < 40_000 and bomb2.stat().st_size < 40_000
    tracemalloc.start()
    try:
        one_line_error(bomb, model.config, "wkv has shape")
        one_line_error(bomb, None, "not the .* of one model")
        one_line_error(bomb2, None, "compression bomb")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak        # nothing near the 2-8 MiB declared was allocated


def test_state_paths_that_are_not_files(tmp_path):
    one_line_error(tmp_path / "nope.npz", None, "no state file")
    one_line_error(tmp_path, None, "not a regular file")
    if hasattr(os, "mkfifo"):          # reading a FIFO would block forever
        os.mkfifo(tmp_path / "fifo.npz")
        one_line_error(tmp_path / "fifo.npz", None, "not a regular file")


def test_the_cli_reports_a_broken_state_file_in_one_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert cli("generate", "--model", files["world"], "--backend", "numpy", "-n", "1", "--state",
               bad, "Hi") == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(bad) in errors[0] and "--save-state" in errors[0], errors


def test_a_complex_state_is_refused_by_forward(saved):
    """Its imaginary part used to be dropped silently by the cast to the model's dtype."""
    model, state, path = saved
    complex_state = tinyrwkv.State(state.att_shift, state.wkv + 1j * state.wkv, state.ffn_shift)
    with pytest.raises(ValueError, match="state.wkv is complex"):
        model.forward([1], complex_state)
    with pytest.raises(ValueError, match="real float16/32/64"):
        tinyrwkv.save_state(complex_state, path.parent / "complex.npz")
    assert not (path.parent / "complex.npz").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_a_device_or_fifo_is_not_a_target(tmp_path):
    """`trace --out /dev/full` once reported success while np.savez's bytes went nowhere, and an
    atomic rename onto a device would replace the node itself: a target that exists and is not a
    regular file is refused. Tested on a FIFO of our own, never on a real device, so that a
    regression replaces a file in tmp_path, not /dev/full."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        with atomic_open(fifo) as f:
            f.write(b"x")
    assert fifo.is_fifo()                            # still the FIFO, not replaced


def test_convert_refuses_a_model_with_nan_and_writes_nothing(tmp_path, capsys):
    from tinyrwkv.synthetic import make_weights
    w = make_weights(2, 64, 97, head_size=32, seed=3)
    w["blocks.1.att.key.weight"][3, 5] = np.nan
    save_safetensors(tmp_path / "nan.safetensors", w)
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "nan.safetensors"), str(tmp_path / "out.safetensors")])
    assert e.value.code == 1
    assert "blocks.1.att.key.weight" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    main(["convert", "--no-check-finite", str(tmp_path / "nan.safetensors"),
          str(tmp_path / "out.safetensors")])
    assert (tmp_path / "out.safetensors").is_file()


def test_a_damaged_training_checkpoint_is_one_clear_error(tmp_path):
    from tinyrwkv.trainer import read_training_checkpoint
    bad = tmp_path / "train_state.npz"
    np.savez(bad, meta=np.array("{not json"), **{"p:emb.weight": np.zeros((3, 4))})
    with pytest.raises(CheckpointError, match="meta record is damaged"):
        read_training_checkpoint(bad)
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="train_state.npz"):
        read_training_checkpoint(bad)
