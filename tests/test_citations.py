"""Every citation in the chapters, the docs, the README and the library's comments resolves inside
the repository, and none leads outside it.

What counts as a citation, and how each is resolved:
- `docs/<name>.md §N` or `§N.M` (the form docs/README.md asks for): the file must exist and have a
  numbered heading "N" or "N.M" (`## 3. Time mix`, `### 3.10 Decay`). Lists and ranges after one
  file name are citations of that file too: `§3, §4`, `§3.1-3.10`, `§2-§4` (a range's two ends are
  checked). The § may be on the next line of a wrapped comment.
- A § with no file name before it: in a docs page, a section of that page (or of the page a
  markdown link around it points to); in the library's code, a section of the docs page the same
  file named last before it (tinyrwkv/model.py says once that it follows docs/architecture.md),
  and the same in a chapter's code cells (dense comments); in a chapter's prose or the README,
  an error: name the file.
- `chapter NN §M` (or `ch NN §M`): a numbered heading ("## M · ..." or "## M. ...") of that chapter.
- `<file>.md#anchor`, in a link or in text: the anchor must be one GitHub makes from a heading of
  that file; a link whose text cites one § must point at that section's heading.
- Every relative markdown link in the docs, the README and the chapters' markdown must name an
  existing file or folder.
- Nothing cites the shared RWKV-7 notes (rwkv7 dot md) or points at ../shared or /work: those
  are outside the repository.
"""
import functools
import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "chapters"))
import build  # noqa: E402  (chapters/build.py: the chapters' cells)

DOCS = ROOT / "docs"
CHAPTERS = ROOT / "chapters"


def scanned():
    files = [*sorted((CHAPTERS / "src").glob("*.py")), *sorted(DOCS.glob("*.md")),
             ROOT / "README.md",
             *sorted((ROOT / "tinyrwkv").rglob("*.py"))]
    if (CHAPTERS / "README.md").exists():
        files.append(CHAPTERS / "README.md")
    return files


# --- what a file offers to be cited ------------------------------------------------------------

def slug(heading):
    """The anchor GitHub makes from a heading's text: markdown links reduced to their text, lower
    case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


NUMBERED = re.compile(r"^(\d+(?:\.\d+)*)\.?(?:\s|$)")


@functools.cache
def headings(md_path):
    """{anchor: section number or None} of a markdown file's headings (not those in code blocks);
    a repeated anchor gets -1, -2... as on GitHub."""
    anchors, seen, fenced = {}, {}, False
    for line in Path(md_path).read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        text = match.group(1)
        base = slug(text)
        anchor = base if base not in seen else f"{base}-{seen[base]}"
        seen[base] = seen.get(base, 0) + 1
        number = NUMBERED.match(text)
        anchors[anchor] = number.group(1) if number else None
    return anchors


def sections(md_path):
    return {n for n in headings(md_path).values() if n}


@functools.cache
def chapter_sections(number):
    """The numbered sections of chapter `number` ("## 3 · The decay", "## 1. The recurrence"), or
    None if there is no such chapter."""
    found = sorted((CHAPTERS / "src").glob(f"{int(number):02d}_*.py"))
    if not found:
        return None
    numbers = set()
    for kind, text in build.cells_of(found[0].read_text(encoding="utf-8")):
        if kind == "markdown":
            numbers |= set(re.findall(r"^#{1,6}\s+(\d+(?:\.\d+)*)\s*[.·]", text, re.M))
    return numbers


# --- reading citations out of a file -----------------------------------------------------------

# A path to a markdown file that is not the tail of a URL or of a longer path.
MENTION = re.compile(
    r"(?<![\w/.-])(?P<path>(?:\.\./)*(?:[\w-]+/)*[\w-]+\.md)(?:#(?P<anchor>[\w-]+))?")
NUMBER = r"§\s?\d+(?:\.\d+)*"
# §N, then more of the same file: a range (§3.1-3.10, §2-§4) or a list (§3, §4; §3 and §4).
GROUP = re.compile(NUMBER + r"(?:\s*[-–]\s*(?:§\s?)?\d+(?:\.\d+)*|(?:\s*,\s*|\s+and\s+|\s+or\s+)"
                   + NUMBER + r")*")
# What may stand between a file name and its §: a closing quote, spaces, one line break (with the
# "#" of a wrapped comment or markdown cell).
ATTACHED = re.compile(r"(?<![\w/.-])(?P<path>(?:\.\./)*(?:[\w-]+/)*[\w-]+\.md)[`'\"]?[ \t]*"
                      r"(?:\n[ \t]*#?[ \t]*)?$")
CHAPTER_REF = re.compile(r"(?i)\b(?:chapter|ch\.?)\s*(?P<n>\d{1,2})[ \t]*$")
LINK = re.compile(
    r"\[(?P<text>(?:[^\[\]\n]|\[[^\]\n]*\])*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
FORBIDDEN = [
    (re.compile(r"rwkv7\.md"), "cites the shared RWKV-7 notes, which are not in the repository"),
    (re.compile(r"\.\./shared\b"), "points at ../shared, outside the repository"),
    (re.compile(r"(?<![\w.~-])/work\b"), "points at /work, a folder on one machine"),
]


def kind_of(path):
    path = Path(path)
    if path.parent == CHAPTERS / "src":
        return "chapter"
    return "markdown" if path.suffix == ".md" else "code"


def markdown_spans(path, text):
    """(start, end) offsets of the text where markdown links are read: a whole .md file, a
    chapter's markdown cells, nothing of library code (where `f[i](x)` is not a link)."""
    kind = kind_of(path)
    if kind == "markdown":
        return [(0, len(text))]
    if kind == "code":
        return []
    spans, start, offset, in_markdown = [], None, 0, False
    for line in text.splitlines(True):
        if line.startswith("# %%"):
            if in_markdown:
                spans.append((start, offset))
            in_markdown, start = "[markdown]" in line, offset + len(line)
        offset += len(line)
    if in_markdown:
        spans.append((start, offset))
    return spans


def resolve(path, ref, is_link):
    """The file a reference `ref` in `path` names, or an error message."""
    path = Path(path)
    if is_link:       # relative to where the reader opens it: a chapter's notebook is in chapters/
        base = CHAPTERS if kind_of(path) == "chapter" else path.parent
        return (base / ref).resolve()
    if ref.startswith("docs/"):
        return ROOT / ref
    if path.parent == DOCS and "/" not in ref:
        return DOCS / ref
    return f"cite a docs page as docs/<name>.md, not {ref!r}"


def problems(path, text=None):
    """[(line, message)] for every citation in `path` (or in `text`, read as if it were that file)
    that does not resolve."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if text is None else text
    kind = kind_of(path)
    found = []

    def line_of(offset):
        return text.count("\n", 0, offset) + 1

    def check_section(offset, file, numbers, what):
        have = sections(file)
        for number in numbers:
            if number not in have:
                found.append((line_of(offset), f"{what} §{number}: no heading numbered {number} in "
                                               f"{file.relative_to(ROOT).as_posix()}"))

    def check_anchor(offset, file, anchor, cited=None):
        where = file.relative_to(ROOT).as_posix()
        if anchor not in headings(file):
            found.append((line_of(offset), f"#{anchor}: no heading of {where} has this anchor"))
        elif cited is not None and headings(file)[anchor] != cited:
            found.append((line_of(offset), f"the link text cites §{cited} but #{anchor} is "
                                           f"§{headings(file)[anchor]} of {where}"))

    # Markdown links: the target exists, inside the repository; an anchor names a heading of it.
    links, targets = [], []           # (text start, text end, file); (start, end) of each target
    for start, end in markdown_spans(path, text):
        for m in LINK.finditer(text, start, end):
            targets.append((m.start("target"), m.end("target")))
            target = m.group("target")
            if re.match(r"^[a-z][a-z+.-]*:", target):          # http:, https:, mailto:
                continue
            ref, _, anchor = target.partition("#")
            if not ref:                                          # #anchor: this page
                if kind == "markdown" and anchor:
                    check_anchor(m.start(), path, anchor)
                continue
            file = resolve(path, ref, is_link=True)
            if not file.is_relative_to(ROOT):
                found.append((line_of(m.start()), f"link to {ref}: outside the repository"))
                continue
            if not file.exists():
                found.append((line_of(m.start()), f"link to {ref}: no such file"))
                continue
            links.append((m.start("text"), m.end("text"), file))
            if anchor and file.suffix == ".md":
                cited = re.findall(r"§\s?(\d+(?:\.\d+)*)", m.group("text"))
                check_anchor(m.start(), file, anchor, cited[0] if len(cited) == 1 else None)

    # Paths to markdown files named in the text: docs/ ones must exist; anchors must resolve.
    named = []                                   # (offset, file) of each docs page named
    for m in MENTION.finditer(text):
        if any(s <= m.start() < e for s, e in targets):
            continue                             # checked as a link above
        ref, anchor = m.group("path"), m.group("anchor")
        cited_here = re.match(r"[`'\"]?[ \t]*(?:\n[ \t]*#?[ \t]*)?§", text[m.end():])
        if not (ref.startswith("docs/") or anchor or cited_here
                or (path.parent == DOCS and "/" not in ref)):
            continue                             # MODEL_CARD.md and the like: not a citation
        file = resolve(path, ref, is_link=False)
        if isinstance(file, str):
            found.append((line_of(m.start()), file))
        elif not file.exists():
            found.append((line_of(m.start()), f"{ref}: no such file"))
        else:
            named.append((m.start(), file))
            if anchor:
                check_anchor(m.start(), file, anchor)

    # § citations.
    prose = markdown_spans(path, text) if kind == "chapter" else []
    for m in GROUP.finditer(text):
        numbers = re.findall(r"\d+(?:\.\d+)*", m.group())
        before = text[max(0, m.start() - 300):m.start()]
        attached, chapter = ATTACHED.search(before), CHAPTER_REF.search(before)
        link = next((file for s, e, file in links if s <= m.start() < e), None)
        if chapter:
            have = chapter_sections(chapter.group("n"))
            if have is None:
                found.append((line_of(m.start()), f"chapter {chapter.group('n')}: no such chapter"))
            for number in numbers:
                if have is not None and number not in have:
                    found.append((line_of(m.start()), f"chapter {chapter.group('n')} has no "
                                                      f"section {number}"))
            continue
        if attached:
            file = resolve(path, attached.group("path"), is_link=False)
            if not isinstance(file, str) and file.exists() and file.suffix == ".md":
                check_section(m.start(), file, numbers, attached.group("path"))
            continue                             # a bad file name is reported above
        if link is not None and link.suffix == ".md":
            check_section(m.start(), link, numbers, link.name)
        elif kind == "markdown" and path.parent == DOCS:
            check_section(m.start(), path, numbers, path.name)
        elif ((kind == "code" or kind == "chapter" and not any(s <= m.start() < e for s, e in prose))
              and any(offset < m.start() for offset, _ in named)):
            file = [f for offset, f in named if offset < m.start()][-1]
            check_section(m.start(), file, numbers, f"{file.name} (named last above)")
        else:
            found.append((line_of(m.start()), f"{m.group()} without a file: write "
                                              f"docs/<name>.md {m.group()}"))

    # Nothing outside the repository.
    for pattern, message in FORBIDDEN:
        for m in pattern.finditer(text):
            found.append((line_of(m.start()), message))
    return sorted(set(found))


FILES = scanned()


def test_files_are_found():
    assert len([f for f in FILES if kind_of(f) == "chapter"]) >= 5
    assert DOCS / "architecture.md" in FILES and ROOT / "tinyrwkv" / "model.py" in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_citations_resolve(path):
    found = problems(path)
    assert not found, "\n".join(f"{path.relative_to(ROOT).as_posix()}:{line}: {message}"
                                for line, message in found)


# The checker itself: each kind of mistake it must catch, and the forms it must accept.

def messages(path, text):
    return [message for _, message in problems(ROOT / path, text)]


def test_good_citations_pass():
    for text in ["docs/architecture.md §3.10", "(docs/architecture.md §3, §4)",
                 "docs/architecture.md §3.1-3.10 and docs/formats.md §4.5",
                 "see docs/architecture.md\n# §10, then", "docs/architecture.md#310-decay"]:
        assert messages("tinyrwkv/example.py", text) == [], text
    assert messages("docs/architecture.md", "as §3.10 says") == []
    assert messages("docs/formats.md", "[§4](architecture.md#4-channel-mix)") == []
    assert messages("tinyrwkv/example.py", "docs/architecture.md §6\n... (§6.4)") == []
    assert messages("chapters/src/99_example.py",
                    "# %% [markdown]\n# [decay](../docs/architecture.md#310-decay)\n") == []


def test_bad_citations_are_caught():
    assert messages("tinyrwkv/example.py", "docs/architecture.md §3.99")
    assert messages("tinyrwkv/example.py", "docs/architecture.md §3.1-3.99")
    assert messages("tinyrwkv/example.py", "docs/architecture.md §3, §42")
    assert messages("tinyrwkv/example.py", "docs/nothing.md §1")
    assert messages("tinyrwkv/example.py", "docs/architecture.md#no-such-heading")
    assert messages("tinyrwkv/example.py", "architecture.md §3")             # no docs/
    assert messages("chapters/src/99_example.py", "# %% [markdown]\n# as §3 says")   # which file?
    assert messages("chapters/src/99_example.py", "# %%\nx = 1  # §3")      # none named above
    assert messages("chapters/src/99_example.py", "# see chapter 01 §99")
    assert messages("docs/README.md", "[x](architecture.md#310-decay-nope)")
    assert messages("docs/README.md", "[architecture.md §3.11](architecture.md#310-decay)")
    assert messages("README.md", "[y](docs/nothing.md)")
    assert messages("docs/README.md", "see §99")
    # (the forbidden names are assembled here, so that this file does not itself contain them)
    for text in ["rwkv7" + ".md §3", ".." + "/shared/reference", "/" + "work/shared/x"]:
        assert messages("tinyrwkv/example.py", text), text
