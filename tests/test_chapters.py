"""The chapter notebooks: each committed notebook has its source's cells, its outputs (when it has
them) come from one clean run, and each chapter, rendered fresh from its source, runs top to bottom
without an error or a failed assert (each chapter ends by asserting that what it built equals the
library). chapters/build.py writes the notebooks; its docstring says how."""
import importlib.util
import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "chapters"))
import build  # noqa: E402  (chapters/build.py)

SOURCES = build.sources()
needs_jupyter = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("nbclient", "nbformat", "ipykernel", "matplotlib")),
    reason="chapters need nbclient, nbformat, ipykernel and matplotlib: pip install -e '.[test]'")


def committed(src):
    nb = build.target(src)
    assert nb.exists(), f"{nb.name} missing: run python chapters/build.py --execute {src.stem[:2]}"
    return json.loads(nb.read_text(encoding="utf-8"))


def test_there_are_chapters():
    assert len(SOURCES) >= 5


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_matches_its_source(src):
    """Cell by cell, the kind and the source text; outputs, execution counts, ids and metadata are
    not compared."""
    got = build.cell_texts(committed(src))
    want = build.cells_of(src.read_text(encoding="utf-8"))
    assert got == want, (f"{build.target(src).name} is stale: run "
                         f"python chapters/build.py --execute {src.stem[:2]}")


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_outputs_come_from_one_clean_run(src):
    """A notebook is either not executed at all, or executed top to bottom once (counts 1, 2, 3...)
    without an error, and carries no metadata that changes from run to run."""
    nb = committed(src)
    assert nb["metadata"] == build.METADATA, "notebook metadata beyond the kernel name: rebuild it"
    assert all(cell["metadata"] == {} for cell in nb["cells"]), "cell metadata (timings?): rebuild"
    code = build.code_cells(nb)
    if not build.is_executed(nb):
        return
    counts = [cell["execution_count"] for cell in code]
    assert counts == list(range(1, len(code) + 1)), \
        f"{src.stem} was not run top to bottom in one go (execution counts {counts})"
    errors = [out for cell in code for out in cell["outputs"] if out["output_type"] == "error"]
    assert not errors, f"{src.stem} has an error output: {errors[0].get('ename')}"


def test_all_notebooks_executed_or_none():
    """Once the notebooks are committed with their outputs, a chapter whose code changed must be
    executed again: `python chapters/build.py` drops the outputs of a notebook whose code cells
    changed, and this test then names it."""
    executed = {src.stem: build.is_executed(committed(src)) for src in SOURCES}
    if any(executed.values()):
        missing = [stem for stem, done in executed.items() if not done]
        assert not missing, ("no outputs in " + ", ".join(missing) + ": run python "
                             "chapters/build.py --execute " + " ".join(s[:2] for s in missing))


def test_render_is_what_nbformat_writes():
    """build.to_json writes what Jupyter would save, so opening and saving a notebook in Jupyter
    changes nothing; and the notebooks it writes are valid nbformat 4."""
    nbformat = pytest.importorskip("nbformat")
    for src in SOURCES:
        text = build.render(src)
        node = nbformat.reads(text, as_version=4)
        nbformat.validate(node)
        assert nbformat.writes(node) + "\n" == text, src.stem


def test_kept_outputs_follow_the_code():
    """`python chapters/build.py` keeps a notebook's outputs when only markdown changed, and drops
    them when code changed."""
    source = "# %% [markdown]\n# Hello\n\n# %%\nprint(1)\n"
    old = build.notebook_of(source)
    old["cells"][1].update(execution_count=1, outputs=[
        {"name": "stdout", "output_type": "stream", "text": "1\n"}])
    kept = build.with_old_outputs(build.notebook_of(source.replace("Hello", "Hi")), old)
    assert kept["cells"][1]["outputs"] == old["cells"][1]["outputs"]
    assert kept["cells"][0]["source"] == "Hi"
    assert build.with_old_outputs(build.notebook_of(source.replace("1)", "2)")), old) is None


@needs_jupyter
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_chapter_runs(src):
    """Rendered fresh from its source, executed as `python chapters/build.py --execute` does."""
    nb = build.execute(build.notebook_of(src.read_text(encoding="utf-8")))
    if src.stem != "00_quickstart":
        assert build.count_figures(nb) >= 1, f"{src.stem} should draw at least one figure"
