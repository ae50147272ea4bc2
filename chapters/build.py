"""Build the chapter notebooks (chapters/*.ipynb) from their plain-text sources (chapters/src/*.py).

The sources are the truth: they diff and review like code. Each is in the "percent" format that
jupytext and VS Code understand:

    # %% [markdown]
    # # A title
    # Some text, each line behind "# ".

    # %%
    x = 1 + 1

The notebooks are written without outputs; CI executes every one of them (tests/test_chapters.py)
and checks that they match their sources. Run `python chapters/build.py` after editing a source.
"""
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CELL = re.compile(r"^# %%(.*)$")


def cells_of(source):
    """Split a percent-format source into [(kind, text)], kind "markdown" or "code"."""
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind is not None and text.strip():
            cells.append((kind, text))

    for line in source.splitlines():
        match = CELL.match(line)
        if match:
            flush()
            kind, lines = ("markdown" if "[markdown]" in match.group(1) else "code"), []
        elif kind == "markdown":
            if line.strip() and not line.startswith("#"):
                raise ValueError(f"markdown line without '# ': {line!r}")
            lines.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        elif kind == "code":
            lines.append(line)
    flush()
    return cells


def notebook_of(source):
    def lines(text):
        parts = text.split("\n")
        return [p + "\n" for p in parts[:-1]] + [parts[-1]]

    cells = []
    for i, (kind, text) in enumerate(cells_of(source)):
        cell = {"cell_type": kind, "id": f"cell-{i}", "metadata": {}, "source": lines(text)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def render(src_path):
    return json.dumps(notebook_of(Path(src_path).read_text()), indent=1, ensure_ascii=False) + "\n"


def sources():
    return sorted((HERE / "src").glob("[0-9][0-9]_*.py"))


def target(src_path):
    return HERE / (Path(src_path).stem + ".ipynb")


def main(check=False):
    stale = []
    for src in sources():
        text = render(src)
        out = target(src)
        if check:
            if not out.exists() or out.read_text() != text:
                stale.append(out.name)
        else:
            out.write_text(text)
            print(f"wrote {out.relative_to(HERE.parent)}")
    if stale:
        sys.exit(f"out of date (run python chapters/build.py): {', '.join(stale)}")


if __name__ == "__main__":
    main(check="--check" in sys.argv)
