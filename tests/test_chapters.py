"""Every chapter notebook matches its source and runs top to bottom without an error or a failed
assert (each chapter ends by asserting that what it built equals the library)."""
import importlib.util
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "chapters"))
import build  # noqa: E402  (chapters/build.py)

SOURCES = build.sources()
needs_jupyter = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("nbclient", "nbformat", "ipykernel", "matplotlib")),
    reason="chapters need nbclient, nbformat, ipykernel and matplotlib: pip install -e '.[test]'")


def test_there_are_chapters():
    assert len(SOURCES) >= 5


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_matches_its_source(src):
    nb = build.target(src)
    assert nb.exists(), f"{nb.name} missing: run python chapters/build.py"
    assert nb.read_text() == build.render(src), f"{nb.name} is stale: run python chapters/build.py"


@needs_jupyter
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_chapter_runs(src):
    import nbclient
    import nbformat
    nb = nbformat.read(build.target(src), as_version=4)
    nbformat.validate(nb)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "chapters")}})
    client.execute()          # raises CellExecutionError, with the cell and traceback, on failure
    figures = sum("image/png" in out.get("data", {}) for cell in nb.cells
                  for out in cell.get("outputs", []))
    if src.stem != "00_quickstart":
        assert figures >= 1, f"{src.stem} should draw at least one figure"
