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


MODEL_FILES = {
    "README.md": "model card: architecture, prompt, training, measured accuracy per question family, targets",
    "config.json": "Hugging Face model config",
    "generation_config.json": "greedy decoding defaults and special token ids",
    "model.safetensors": "weights (float32)",
    "eval.json": "every number of the model card, the validation curve and the fixed test set tests/models re-checks",
    "tasks.json": "the task configs the model was trained and evaluated with",
    "tokenizer.json": "word-level tokenizer",
    "tokenizer_config.json": "tokenizer settings and special tokens",
    "processor_config.json": "image processor settings",
    "chat_template.jinja": "chat template (the training prompt format)",
    "TRAINING.md": "how the model was trained: what each training option was measured to do, the recipes tried and their accuracy",
}
RESULTS = {
    ".png": "plot or picture written by the command in the README's section on it",
    ".json": "measured numbers (--json output of the command in the README)",
}


def summary(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    if rel in OTHER:
        return OTHER[rel]
    if rel.startswith("models/") and path.suffix != ".py":  # a model directory's files; the training code has docstrings
        return MODEL_FILES.get(path.name, "")
    if rel.startswith("benchmarks/results/"):
        return RESULTS.get(path.suffix, "")
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
