"""Print the repository's file tree with each file's one-line summary (for the README).

    python benchmarks/tree.py

The summary is the first line of a Python module's docstring, or of a Markdown file's first
paragraph; other files get a short description from the table below.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OTHER = {
    "pyproject.toml": "package metadata, dependencies, extras, console script, pytest markers",
    "README.md": "this file",
    ".ci/run": "CI: install from scratch, run the README's test command",
    ".gitignore": "ignored build outputs",
    "vlmopt/py.typed": "marks the package as typed (PEP 561)",
}


def summary(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    if rel in OTHER:
        return OTHER[rel]
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        paragraph = " ".join(doc.strip().split("\n\n")[0].split())
        return paragraph.split(". ")[0].rstrip(".") if paragraph else ""
    if path.suffix in (".md", ".txt"):
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                return line.strip()[:100]
    return ""


def main() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in sorted(files):
        if rel.endswith((".safetensors", ".json")) and rel.startswith("models/"):
            continue
        print(f"{rel:<48} {summary(ROOT / rel)}")


if __name__ == "__main__":
    main()
