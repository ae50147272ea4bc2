"""What a plain (non-editable) install gets: the wheel and the sdist carry the shipped model, the
vocabulary and the CUDA kernels, and an installed tinyrwkv generates from another folder with no
--model.

The fast tests build with the setuptools already installed (no network). The end-to-end test
installs into a fresh virtual environment, which fetches numpy, tokenizers, numba and threadpoolctl
from PyPI: it runs only with TINYRWKV_WHEEL_TEST=1."""
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import PackageNotFoundError, version

import pytest

from conftest import ROOT, have

SHIPPED = ("model.safetensors", "model.tokenizer.json", "MODEL_CARD.md")


def can_build_wheels():
    """setuptools builds wheels itself from 70.1 on; before, with the `wheel` package."""
    try:
        major_minor = tuple(int(x) for x in re.findall(r"\d+", version("setuptools"))[:2])
    except PackageNotFoundError:
        return False
    return major_minor >= (70, 1) or (major_minor >= (64, 0) and have("wheel"))


pytestmark = [
    pytest.mark.skipif(not can_build_wheels(), reason="the build backend is not installed "
                       "(setuptools >= 70.1, or >= 64 with wheel): pip install setuptools"),
    pytest.mark.skipif(not (ROOT / "weights" / "model.safetensors").is_file(),
                       reason="no shipped model in weights/"),
]


def build_wheel(source, out):
    """`pip wheel` of `source` (the checkout, or an sdist) into `out`, offline; its path."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out)],
                          cwd=out, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("tinyrwkv-*.whl")
    return wheel


def check_carried(names, prefix, weights, also=()):
    """The package's data files under `prefix`, the shipped model under `weights` (and `also`)
    are in `names`; the training log is not."""
    want = [f"{prefix}tinyrwkv/backends/kernels.cu", f"{prefix}tinyrwkv/data/rwkv_vocab_v20230424.txt",
            *(f"{weights}/{name}" for name in SHIPPED), *(prefix + name for name in also)]
    assert not [n for n in want if n not in names], [n for n in want if n not in names]
    assert not [n for n in names if "train_log" in n], names


def test_the_wheel_carries_the_model_and_the_data(tmp_path):
    """Every file of tinyrwkv/ (modules of every subpackage, the vocabulary, the CUDA kernels)
    and the shipped model."""
    wheel = build_wheel(ROOT, tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        check_carried(names, "", "tinyrwkv/weights")
        package = [p.relative_to(ROOT).as_posix() for p in (ROOT / "tinyrwkv").rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]
        assert not [n for n in package if n not in names], [n for n in package if n not in names]
        assert not [n for n in names if "bench" in n], names     # the harness stays outside
        for name in SHIPPED:          # the files themselves, not placeholders
            size = (ROOT / "weights" / name).stat().st_size
            assert z.getinfo(f"tinyrwkv/weights/{name}").file_size == size, name


def test_the_sdist_carries_the_model_and_builds_a_wheel_that_does(tmp_path):
    """The sdist keeps the repository's layout (weights/ at the top; the tests, benchmarks and
    chapters beside the package), and a wheel built from it (what pip does with an sdist)
    carries the model as the checkout's wheel does."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist = tmp_path / proc.stdout.split()[-1]
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        check_carried(t.getnames(), f"{top}/", f"{top}/weights",
                      also=["tests/conftest.py", "benchmarks/bench_cpu.py",
                            "benchmarks/cpu_harness/worker.py", "chapters/00_quickstart.ipynb"])
    (tmp_path / "wheel").mkdir()
    with zipfile.ZipFile(build_wheel(sdist, tmp_path / "wheel")) as z:
        check_carried(z.namelist(), "", "tinyrwkv/weights")


@pytest.mark.skipif(os.environ.get("TINYRWKV_WHEEL_TEST") != "1",
                    reason="installs into a fresh venv from PyPI (network, minutes): "
                           "set TINYRWKV_WHEEL_TEST=1")
@pytest.mark.parametrize("how", ["wheel", "editable"])
def test_installed_tinyrwkv_generates_from_another_folder(tmp_path, how):
    """The README's set-up, as a user runs it: install into a fresh venv (from the built wheel, or
    `pip install -e .`), then `tinyrwkv generate "Once upon a time"` in an unrelated folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # only what is installed
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], env=env, check=True, timeout=600)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    target = ["-e", str(ROOT)] if how == "editable" else [str(build_wheel(ROOT, tmp_path))]
    proc = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", *target],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([str(bin_dir / "tinyrwkv"), "generate", "Once upon a time",
                           "--max-tokens", "20", "--seed", "1"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip()) > 20 and "model.safetensors" in proc.stderr
    where = subprocess.run([str(bin_dir / "python"), "-c", "import tinyrwkv.loader as l; "
                            "print(l.shipped_model_path())"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=600).stdout.strip()
    expected = ROOT / "weights" if how == "editable" else venv
    assert where.startswith(str(expected)), where       # the installed copy, or the checkout's
    proc = subprocess.run([str(bin_dir / "tinyrwkv"), "bench", "--help"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    if how == "wheel":                                  # the benchmark is not in the wheel
        assert proc.returncode == 1 and "python benchmarks/bench_cpu.py" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0 and "--quick" in proc.stdout, proc.stderr
