"""The registry is the one place that knows the families: the README's supported-models table is its
output, refusals carry their reasons, and no code outside ``vlmopt/adapters/`` names a family."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from vlmopt.adapters import families
from vlmopt.adapters.support import COLUMNS, family_support, support_table

ROOT = Path(__file__).resolve().parents[2]

#: The families of issue 43, as code would spell them (test modules may name them).
NEW_FAMILIES = ("internvl", "gemma3", "smolvlm", "idefics", "mistral3", "pixtral")


@pytest.fixture(scope="module")
def table() -> str:
    return support_table()


def test_the_readme_table_is_the_registrys(table):
    block = re.search(r"<!-- supported-models -->\n(.*?)<!-- /supported-models -->", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no <!-- supported-models --> block"
    assert block.group(1) == table, "README's supported-models table differs from `python -m vlmopt.adapters.support`; paste its output"


def test_every_family_has_a_row_and_every_refusal_a_reason(table):
    rows = [line for line in table.splitlines() if line.startswith("| ") and "random config" not in line]
    assert len(rows) == len(families())
    for cls in families():
        assert any(name in row for row in rows for name in cls.model_classes.values()), cls.__name__
    notes = set(re.findall(r"^- \[(\d+)\] .+\.$", table, re.M))
    assert notes == set(re.findall(r"no \[(\d+)\]", table)) and notes


@pytest.mark.parametrize("cls", families(), ids=lambda cls: cls.family)
def test_refusals_are_what_compile_says(cls):
    """A family's refused pass columns are exactly the passes ``vlmopt.compile`` refuses on it, and the
    reason of a refused capability (streams, export, torchrun's frames) is the family's own."""
    import vlmopt
    from vlmopt import configs
    from vlmopt.errors import IncompatiblePassError

    support = family_support(cls)
    model = configs.build(configs.CONFIGS[support.config](), device="meta")
    for column, spec in COLUMNS.items():
        mode = "train" if column == "regate" else "infer"
        if column in support.refusals:
            with pytest.raises(IncompatiblePassError):
                vlmopt.compile(model, passes=[spec], mode=mode)
        else:
            vlmopt.compile(model, passes=[spec], mode=mode)
    for column, need in (("hermes", "stream"), ("export", "export"), ("torchrun", "frames")):
        if need in cls.lacks:
            assert support.refusals[column] == cls.lacks[need]
        if need in cls.capabilities and column != "torchrun":
            assert column not in support.refusals


def code_tokens(source: str):
    """(line, text) of the names and string literals of ``source`` that are not docstrings."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NAME, tokenize.STRING) and token.start[0] not in docstrings:
            yield token.start[0], token.string


def test_code_tokens_skip_docstrings_and_comments():
    source = '"""internvl."""\nx = "gemma3"  # smolvlm\ndef f():\n    """pixtral"""\n    return mistral3\n'
    assert [text for _, text in code_tokens(source)] == ["x", '"gemma3"', "def", "f", "return", "mistral3"]


def test_no_code_outside_the_adapters_names_a_new_family():
    offenders = []
    for file in sorted((ROOT / "vlmopt").rglob("*.py")):
        if file.is_relative_to(ROOT / "vlmopt" / "adapters"):
            continue
        for line, text in code_tokens(file.read_text()):
            if any(name in text.lower() for name in NEW_FAMILIES):
                offenders.append(f"{file.relative_to(ROOT)}:{line}: {text}")
    assert offenders == []
