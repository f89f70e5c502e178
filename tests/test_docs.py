"""The README stays a short front door, its tree matches ``benchmarks/tree.py``, and no link in the
README or ``docs/`` points at a file that is not in the repository."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_BYTES = 15_000

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def load_tree():
    spec = importlib.util.spec_from_file_location("tree", ROOT / "benchmarks" / "tree.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_links(markdown: Path) -> list[str]:
    targets = LINK.findall(markdown.read_text())
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move detail to docs/ (limit {MAX_README_BYTES})"


def test_readme_links_stay_inside_the_repository():
    text = README.read_text()
    assert "../" not in text, "README.md points outside the repository (../)"
    assert "/work/" not in text, "README.md names a path of the machine it was written on"


def test_every_relative_link_points_to_a_file_in_the_repository():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1, "docs/ has no pages"
    broken = []
    for page in pages:
        for target in relative_links(page):
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT):
                broken.append(f"{page.name}: {target} (outside the repository)")
                continue
            if not path.exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, "broken links: " + "; ".join(broken)


def test_link_checker_sees_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](https://arxiv.org/abs/2508.00553) [a](a.md) ![b](img/b.png) [c](#anchor) [d](d.md#x)")
    assert relative_links(page) == ["a.md", "img/b.png", "d.md#x"]


def test_readme_tree_is_the_output_of_tree_py():
    tree = load_tree()
    block = re.search(r"## Tree\n.*?```text\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no ## Tree section with a ```text block"
    assert block.group(1) == tree.render(), "README tree differs from `python benchmarks/tree.py`; paste its output"


def test_every_tree_entry_exists():
    tree = load_tree()
    gone = tree.missing()
    assert not gone, f"benchmarks/tree.py lists paths that do not exist: {sorted(gone)}"


def test_tree_flags_a_missing_entry():
    tree = load_tree()
    entries = (("README.md", "exists"), ("no/such/file.py", "gone"), ("docs/", "a folder"), ("README.md/", "not a folder"))
    assert tree.missing(entries) == ["no/such/file.py", "README.md/"]
