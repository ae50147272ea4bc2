"""tinyrwkv where the platform is not the Linux it is developed on: without the Unix-only modules
and /proc (Windows), and without numba (optional: the NumPy backend runs instead).

A module is made missing the way Python itself spells it: `sys.modules[name] = None` in a fresh
interpreter, so that `import name` raises ImportError there, as on a platform without it."""
import ast
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

PACKAGE = ROOT / "tinyrwkv"
UNIX_ONLY = ("resource", "fcntl", "termios", "pwd", "grp")
needs_shipped = pytest.mark.skipif(not (ROOT / "weights" / "model.safetensors").is_file(),
                                   reason="no shipped model in weights/")


def run_without(missing, *code, cwd, pythonpath=()):
    """Run the `code` parts in a fresh Python where the modules `missing` cannot be imported,
    with this checkout's tinyrwkv (and `pythonpath`) first on the path, in the folder `cwd`."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in missing)
    path = [*map(str, pythonpath), str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p),
               PYTHONIOENCODING="utf-8")
    code = prelude + "".join(textwrap.dedent(part) for part in code)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


# The CLI in-process, its exit status checked and its stdout returned (for the child processes).
CLI = """
import contextlib, io
from tinyrwkv.cli import main

def cli(*argv, status=0):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(list(argv))
        except SystemExit as e:
            assert (e.code or 0) == status, (argv, e.code)
    return out.getvalue()
"""


# --------------------------------------------------------------------------------------------
# Without the Unix-only modules and /proc (Windows)
# --------------------------------------------------------------------------------------------

def test_the_package_imports_no_unix_only_module_and_reads_no_proc():
    """Not at import time, not in any command: nothing in tinyrwkv/ needs them (the CPU
    benchmark, which does, lives in benchmarks/)."""
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{f.name}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in UNIX_ONLY]
            if isinstance(node, ast.Constant) and str(node.value).startswith("/proc"):
                found.append(f"{f.name}:{node.lineno} reads {node.value}")
    assert not found, found


@needs_shipped
def test_cli_and_library_without_unix_only_modules(tmp_path):
    """import tinyrwkv, every command's --help, and a generation from the shipped model, run
    from another folder."""
    rc, out, err = run_without(UNIX_ONLY, CLI, """
        import re
        import tinyrwkv
        commands = re.findall(r"^    ([a-z][a-z-]*)", cli("--help"), re.M)
        assert {"generate", "chat", "bench", "train", "info"} <= set(commands), commands
        for command in commands:      # bench's help is the benchmark script's, printed by itself
            text = cli(command, "--help")
            assert command == "bench" or f"usage: tinyrwkv {command}" in text, (command, text)
        print("GENERATED:" + cli("generate", "Once", "--max-tokens", "5", "--seed", "1"))
    """, cwd=tmp_path)
    assert rc == 0, err[-3000:]
    assert "usage: python benchmarks/bench_cpu.py" in out           # tinyrwkv bench --help
    assert out.split("GENERATED:")[1].strip(), out
    assert "tok/s" in err and "model.safetensors" in err, err


def test_the_benchmark_says_it_is_unix_only(tmp_path):
    """benchmarks/bench_cpu.py: its --help works anywhere; a run without `resource` stops with
    a message that says why (not a traceback)."""
    code = "import bench_cpu\nbench_cpu.main({!r})\n"
    rc, out, err = run_without(UNIX_ONLY, code.format(["--help"]), cwd=tmp_path,
                                pythonpath=[ROOT / "benchmarks"])
    assert rc == 0 and "--quick" in out, err
    rc, out, err = run_without(UNIX_ONLY, code.format(["--quick"]), cwd=tmp_path,
                                pythonpath=[ROOT / "benchmarks"])
    assert rc == 1 and "runs on Unix only" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------------------------
# Without numba
# --------------------------------------------------------------------------------------------

@needs_shipped
def test_library_without_numba(tmp_path):
    """tinyrwkv.load() falls back to the NumPy backend and says so in model.backend; generation
    and training's backward run; asking for numba says how to get it."""
    rc, out, err = run_without(["numba"], """
        import numpy as np
        import tinyrwkv
        from tinyrwkv.loader import default_backend, parse_strategy
        from tinyrwkv.synthetic import make_weights
        model = tinyrwkv.load()
        assert model.backend == "numpy", model.backend
        assert default_backend() == "numpy" and parse_strategy("cpu fp32")[0] == "numpy"
        assert "".join(tinyrwkv.generate(model, "Once upon a time", max_tokens=8, seed=0))
        ids = np.arange(8)[None] % 300
        loss, grads = tinyrwkv.train.loss_and_grad(make_weights(n_embd=64), ids, (ids + 1) % 300)
        assert np.isfinite(loss) and grads
        try:
            tinyrwkv.load(backend="numba")
        except ValueError as e:
            print(e)
        else:
            raise AssertionError("backend='numba' loaded without numba")
    """, cwd=tmp_path)
    assert rc == 0, err[-3000:]
    assert "numba is not available" in out and "pip install numba" in out, out


@needs_shipped
def test_cli_without_numba(tmp_path):
    """`tinyrwkv generate` runs on the NumPy backend and says why; `tinyrwkv train` falls back
    to the NumPy WKV; asking for numba is an error that says how to get it."""
    text = "Once upon a time there was a little dog. The dog liked to run in the park.\n" * 40
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(text[:800])
    rc, out, err = run_without(["numba"], CLI, """
        print("GENERATED:" + cli("generate", "Once", "--max-tokens", "5", "--seed", "1"))
        cli("generate", "Once", "--backend", "numba", status=1)
        cli("train", "--data", "train.txt", "--out", "run", "--backend", "numba", status=1)
        cli("train", "--data", "train.txt", "--out", "run", "--vocab", "300", "--layers", "1",
            "--width", "64", "--head-size", "32", "--batch", "2", "--ctx", "16", "--steps", "2",
            "--warmup", "1", "--eval-every", "2", "--eval-windows", "2", "--sample-every", "0")
    """, cwd=tmp_path)
    assert rc == 0, err[-3000:]
    assert out.split("GENERATED:")[1].strip(), out
    assert "backend numpy, not the faster numba" in err, err
    assert "backend 'numba': numba is not available" in err and "pip install numba" in err, err
    assert "--backend numba: numba is not available" in err, err
    assert "tinyrwkv train: backend numpy, not the faster numba" in err and "numpy backend" in err, err
    assert (tmp_path / "run" / "model.safetensors").is_file(), err
