"""Build the chapter notebooks (chapters/*.ipynb) from their plain-text sources (chapters/src/*.py).

The sources are the truth: they diff and review like code. Each is in the "percent" format that
jupytext and VS Code understand:

    # %% [markdown]
    # # A title
    # Some text, each line behind "# ".

    # %%
    x = 1 + 1

The notebooks are committed executed, with their outputs (figures as PNG, printed text), so a
reader browsing the repository sees every figure without running anything. After editing a source:

    python chapters/build.py --execute        # all chapters; or name some: --execute 01 04

runs each chapter top to bottom in a fresh python3 kernel (working directory chapters/, so
chapters/matplotlibrc sets the figures' size) and writes its notebook with the outputs; commit the
source and the notebook together. Without --execute, `python chapters/build.py` only re-renders
the cells from the sources (no Jupyter needed): a notebook whose code cells are unchanged keeps
its outputs (an edit to markdown only keeps them too); one whose code changed loses them, and the
build says which to execute.

CI (tests/test_chapters.py) checks that each committed notebook's cells (kind and source text)
match its source, that its outputs, if any, come from one clean top-to-bottom run, and runs every
chapter, rendered fresh from its source, top to bottom.

A notebook holds nothing that changes from run to run besides the outputs themselves: no timing
metadata, no kernel or Python version, execution counts 1, 2, 3... Outputs that measure this
machine (timings in chapters 03 and 05) and the PNG bytes do change when re-executed.
"""
import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CELL = re.compile(r"^# %%(.*)$")
# The notebook-level metadata every chapter carries, and all it carries: executing a notebook adds
# the kernel's Python version and more, which would change with every contributor's machine.
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}
# nbformat writes these kinds of output text as lists of lines (as Jupyter does when it saves),
# so that a changed line of output is a changed line in the diff.
SPLIT_MIMES = ("application/javascript", "image/svg+xml")


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
    """The notebook (a dict, nbformat 4.5) of a percent-format source, without outputs."""
    cells = []
    for i, (kind, text) in enumerate(cells_of(source)):
        cell = {"cell_type": kind, "id": f"cell-{i}", "metadata": {}, "source": text}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": copy.deepcopy(METADATA), "nbformat": 4, "nbformat_minor": 5}


def _text(value):
    """A notebook string field, stored either as one string or as a list of lines."""
    return "".join(value) if isinstance(value, list) else value


def to_json(nb):
    """The file text of a notebook, byte for byte as nbformat (and so Jupyter) writes it: keys
    sorted, indent 1, multi-line text as lists of lines, and a final newline."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        cell["source"] = _text(cell["source"]).splitlines(True)
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = _text(out["text"]).splitlines(True)
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/") or mime in SPLIT_MIMES:
                    out["data"][mime] = _text(value).splitlines(True)
    text = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False, separators=(",", ": "))
    return text + "\n"


def render(src_path):
    """The file text of a source's notebook, without outputs."""
    return to_json(notebook_of(Path(src_path).read_text()))


def cell_texts(nb):
    """[(kind, source text)] of a notebook (a dict): what must match the source; outputs,
    execution counts, ids and metadata are ignored."""
    return [(cell["cell_type"], _text(cell["source"])) for cell in nb["cells"]]


def code_cells(nb):
    return [cell for cell in nb["cells"] if cell["cell_type"] == "code"]


def is_executed(nb):
    """True when any code cell of the notebook has run (has an execution count or an output)."""
    return any(cell.get("execution_count") is not None or cell.get("outputs")
               for cell in code_cells(nb))


def clean(nb):
    """Strip what changes from run to run although the chapter did not: the kernel's language_info
    (Python version etc.), cell metadata (nbclient's execution timestamps) and transient display
    ids. Returns a plain dict."""
    nb = json.loads(json.dumps(nb))              # a NotebookNode to plain dicts, and a copy
    nb["metadata"] = copy.deepcopy(METADATA)
    for cell in nb["cells"]:
        cell["metadata"] = {}
        for out in cell.get("outputs", []):
            out.pop("transient", None)
    return nb


def execute(nb, timeout=600):
    """Run a notebook (a dict) top to bottom in a fresh python3 kernel whose working directory is
    chapters/, and return it with its outputs, cleaned. Raises nbclient's CellExecutionError (it
    names the cell and has the traceback) when a cell fails. Needs nbclient, nbformat and
    ipykernel (pip install -e '.[test]')."""
    import nbclient
    import nbformat
    node = nbformat.from_dict(copy.deepcopy(nb))
    nbformat.validate(node)
    client = nbclient.NotebookClient(node, timeout=timeout, kernel_name="python3",
                                     record_timing=False,        # no per-cell timestamps
                                     resources={"metadata": {"path": str(HERE)}})
    client.execute()
    return clean(node)


def count_figures(nb):
    return sum("image/png" in out.get("data", {})
               for cell in code_cells(nb) for out in cell.get("outputs", []))


def with_old_outputs(fresh, old):
    """The fresh notebook with the old notebook's outputs and execution counts when both have the
    same code cells (markdown may differ); otherwise None."""
    if old is None or not is_executed(old):
        return None
    if [c["source"] for c in code_cells(fresh)] != [_text(c["source"]) for c in code_cells(old)]:
        return None
    nb = copy.deepcopy(fresh)
    for new, prev in zip(code_cells(nb), code_cells(old)):
        new["execution_count"] = prev.get("execution_count")
        new["outputs"] = copy.deepcopy(prev.get("outputs", []))
    return nb


def write_atomically(path, text):
    """Write a file so that it is, at every moment, either the old file or the new one, whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_notebook(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def sources():
    return sorted((HERE / "src").glob("[0-9][0-9]_*.py"))


def target(src_path):
    return HERE / (Path(src_path).stem + ".ipynb")


def select(names):
    """The sources named on the command line ("01", "01_time_mixing" or a path), or all."""
    every = sources()
    if not names:
        return every
    chosen = []
    for name in names:
        stem = Path(name).stem
        hits = [s for s in every if s.stem == stem or s.stem.startswith(stem + "_")]
        if len(hits) != 1:
            sys.exit(f"no chapter {name!r}: choose from {', '.join(s.stem for s in every)}")
        chosen += [s for s in hits if s not in chosen]
    return chosen


def rel(path):
    return path.relative_to(HERE.parent).as_posix()


def build(srcs):
    """Re-render the notebooks from the sources, keeping outputs where the code is unchanged."""
    to_execute = []
    for src in srcs:
        out = target(src)
        fresh = notebook_of(src.read_text(encoding="utf-8"))
        old = read_notebook(out)
        kept = with_old_outputs(fresh, old)
        text = to_json(kept if kept is not None else fresh)
        if kept is not None:
            note = "outputs kept (code unchanged)"
        elif old is not None and is_executed(old):
            note = "outputs dropped (code changed)"
            to_execute.append(src.stem[:2])
        else:
            note = "no outputs"
            to_execute.append(src.stem[:2])
        if old is not None and out.read_text(encoding="utf-8") == text:
            print(f"{rel(out)}: up to date, {note}")
        else:
            write_atomically(out, text)
            print(f"wrote {rel(out)}: {note}")
    if to_execute:
        print(f"to show outputs: python chapters/build.py --execute {' '.join(to_execute)}")


def build_executed(srcs, timeout):
    """Execute each chapter, rendered fresh from its source, and write it with its outputs."""
    failed, start = [], time.perf_counter()
    for src in srcs:
        out = target(src)
        print(f"{src.stem}: running...", flush=True)
        t0 = time.perf_counter()
        try:
            nb = execute(notebook_of(src.read_text(encoding="utf-8")), timeout=timeout)
        except Exception as e:                   # CellExecutionError, a timeout, a dead kernel
            print(f"{src.stem}: FAILED after {time.perf_counter() - t0:.1f} s; {rel(out)} left "
                  f"as it was\n{e}", flush=True)
            failed.append(src.stem)
            continue
        text = to_json(nb)
        write_atomically(out, text)
        print(f"{src.stem}: {time.perf_counter() - t0:.1f} s, {count_figures(nb)} figures, "
              f"{len(text.encode()) / 1024:.0f} KiB -> {rel(out)}", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s for {len(srcs)} chapters")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def check(srcs):
    """Exit with an error if a notebook's cells do not match its source."""
    stale = [target(s).name for s in srcs
             if not target(s).exists()
             or cell_texts(read_notebook(target(s))) != cells_of(s.read_text(encoding="utf-8"))]
    if stale:
        sys.exit(f"out of date (run python chapters/build.py --execute): {', '.join(stale)}")
    print(f"{len(srcs)} notebooks match their sources")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python chapters/build.py",
        description="Build chapters/NN_name.ipynb from chapters/src/NN_name.py. After editing a "
                    "source, run `python chapters/build.py --execute` and commit the source with "
                    "its notebook.",
        epilog="Without --execute, the cells are re-rendered from the sources and a notebook "
               "keeps its outputs if its code cells are unchanged (it loses them otherwise). "
               "--execute needs nbclient, nbformat, ipykernel and matplotlib "
               "(pip install -e '.[test]').")
    parser.add_argument("chapters", nargs="*", metavar="CHAPTER",
                        help="which chapters: a number (01), a name (01_time_mixing) or a source "
                             "path; default all")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--execute", action="store_true",
                      help="run each chapter top to bottom in a fresh python3 kernel (working "
                           "directory chapters/) and write its notebook with the outputs "
                           "(figures, printed text); prints each chapter's runtime")
    mode.add_argument("--check", action="store_true",
                      help="write nothing; fail if a notebook's cells do not match its source")
    parser.add_argument("--timeout", type=float, default=600, metavar="S",
                        help="with --execute: the most seconds one cell may run (default 600)")
    args = parser.parse_args(argv)
    srcs = select(args.chapters)
    if args.check:
        check(srcs)
    elif args.execute:
        build_executed(srcs, args.timeout)
    else:
        build(srcs)


if __name__ == "__main__":
    main()
