"""The README's opening snippet runs as written."""

import re
from pathlib import Path


def test_readme_snippet_runs(capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "hiprune_select" in out and "@@ prefill" in out
    ratio = float(out.strip().splitlines()[-1])
    assert 0.2 < ratio < 1.0  # HiPrune at 1/3 of the tokens cuts prefill FLOPs
    assert namespace["ids"].shape[1] > namespace["batch"]["input_ids"].shape[1]
