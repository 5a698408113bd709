"""The README keeps its promises: every ```python block runs as written, top to
bottom, in one interpreter (those of docs/training.md too); the file stays
under 15 KiB; its links to files in the checkout (docs/*.md and the like) and
to headings exist, and so do those of docs/performance.md and docs/training.md.

    python -m pytest test_readme.py -q
"""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent
README = ROOT / "README.md"

FENCE = re.compile(r"^( *)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s]+)\)")
DOC_REFERENCE = re.compile(r"(?<![\w./-])(docs/[\w./-]+\.md)")


def python_blocks(text: str) -> list:
    """The ```python blocks in order, each dedented by its fence's indentation."""
    blocks = []
    for match in FENCE.finditer(text):
        indent = len(match.group(1))
        lines = match.group(2).splitlines()
        blocks.append("\n".join(line[indent:] if line[:indent].isspace() else line
                                for line in lines))
    return blocks


def run_python_blocks(markdown: Path) -> None:
    """Run the file's ```python blocks in order in one namespace, as if pasted one
    after another into one interpreter started in the repository root.

    The problems in them are tiny (matrices of a few hundred rows), where a
    second BLAS/OpenMP thread only adds synchronisation; on a loaded 2-core
    machine that made them several times slower.  So they run with one torch
    thread (restored afterwards): seconds in all.  No time limit is asserted;
    a slow machine should not fail the suite.
    """
    blocks = python_blocks(markdown.read_text(encoding="utf-8"))
    assert blocks, f"{markdown.name} has no ```python block"
    namespace = {"__name__": "__main__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for number, source in enumerate(blocks, 1):
            code = compile(source, f"{markdown.name}, python block {number}", "exec")
            try:
                exec(code, namespace)
            except Exception as err:  # say which block failed, keep the traceback
                raise AssertionError(f"{markdown.name} python block {number} failed: "
                                     f"{err!r}") from err
    finally:
        torch.set_num_threads(threads)


def test_readme_python_blocks_run_in_order_in_one_namespace(monkeypatch):
    monkeypatch.chdir(ROOT)
    run_python_blocks(README)


def test_training_doc_python_blocks_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    run_python_blocks(ROOT / "docs" / "training.md")


def test_readme_is_at_most_15_kib():
    size = len(README.read_bytes())
    assert size <= 15 * 1024, f"README.md is {size} bytes; the limit is {15 * 1024}"


def linked_paths(text: str, bare_docs: bool = True) -> set:
    """Relative link targets (URLs and in-page anchors dropped, ``#anchor`` kept)
    and, with ``bare_docs``, mentions of docs/*.md in the text."""
    paths = set()
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        paths.add(target)
    if bare_docs:
        paths.update(DOC_REFERENCE.findall(text))
    return {p for p in paths if p}


def heading_anchors(text: str) -> set:
    """GitHub's anchors for a markdown file's headings (code blocks skipped)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def broken_references(markdown: Path) -> list:
    """Links of ``markdown`` to files that do not exist, or to headings they lack."""
    broken = []
    text = markdown.read_text(encoding="utf-8")
    # Bare docs/... mentions are relative to the root: count them in root files only.
    for target in sorted(linked_paths(text, bare_docs=markdown.parent == ROOT)):
        path, _, anchor = target.partition("#")
        file = (markdown.parent / path).resolve()
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(
                file.read_text(encoding="utf-8")):
            broken.append(f"{target} (no such heading)")
    for anchor in re.findall(r"\]\(#([^)\s]+)\)", text):
        if anchor not in heading_anchors(text):
            broken.append(f"#{anchor} (no such heading)")
    return broken


def test_readme_file_references_exist():
    assert "docs/ALGORITHM.md" in linked_paths(README.read_text(encoding="utf-8"))
    assert not broken_references(README), broken_references(README)


@pytest.mark.parametrize("name", ["performance.md", "training.md"])
def test_docs_links_exist(name):
    broken = broken_references(ROOT / "docs" / name)
    assert not broken, f"docs/{name}: {broken}"


@pytest.mark.parametrize("text,expected", [
    ("see [a](docs/a.md#x) and docs/b.md, [web](https://x.org/c.md), [top](#top)",
     {"docs/a.md#x", "docs/a.md", "docs/b.md"}),
    ("`../shared/docs/c.md` is not a docs reference", set()),
])
def test_link_extraction(text, expected):
    assert linked_paths(text) == expected


def test_heading_anchors():
    text = "# Which route runs, and how accurate it is\n```\n# not a heading\n```\n## `simple_example.py`\n"
    assert heading_anchors(text) == {"which-route-runs-and-how-accurate-it-is",
                                     "simple_examplepy"}


def test_broken_references_are_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[a](missing.md) [b](page.md#title) [c](page.md#nope) [d](#gone)\n")
    assert broken_references(page) == ["missing.md (no such file)",
                                       "page.md#nope (no such heading)", "#gone (no such heading)"]
