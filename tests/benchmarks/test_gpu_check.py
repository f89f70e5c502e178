"""benchmarks/gpu_check.py without a GPU: its options, its parts' skip reasons, the JSON report, the
exit status when a part fails, the time budget. (Its CPU parts are the tests in tests/device.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402
import gpu_parts  # noqa: E402

GPU_PARTS = [part.name for part in gpu_parts.PARTS if not part.on_cpu]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the check says where there is no GPU")


def part(name: str, run, estimate_s: float = 1.0, blocker=lambda context: None) -> gpu_check.Part:
    return gpu_check.Part(name, f"the {name} part", run, blocker, estimate_s, on_cpu=True)


def test_the_parts_cover_the_issue_and_the_cpu_ones_are_the_audits():
    names = [p.name for p in gpu_parts.PARTS]
    assert len(set(names)) == len(names)
    assert {"audit", "bf16", "gpu_tests", "kernels", "apbv_gpu", "passes_bf16", "prefill_7b", "attention", "export_cuda"} <= set(names)
    assert [p.name for p in gpu_parts.PARTS if p.on_cpu] == ["audit", "bf16"]
    assert all(p.description and p.estimate_s > 0 for p in gpu_parts.PARTS)


@no_gpu
def test_dry_run_lists_every_gpu_part_with_its_reason(tmp_path):
    out = tmp_path / "check.json"
    status = gpu_check.main(["--dry-run", "--parts", ",".join(GPU_PARTS), "--json", str(out)])
    report = json.loads(out.read_text())
    assert status == 0 and report["schema"] == gpu_check.SCHEMA and report["dry_run"] and report["failed"] == []
    assert [p["name"] for p in report["parts"]] == GPU_PARTS
    for entry in report["parts"]:
        assert entry["status"] == "skipped" and "no NVIDIA GPU" in entry["reason"], entry
    export = next(p for p in report["parts"] if p["name"] == "export_cuda")
    assert "CUDAExecutionProvider" in export["reason"]  # every reason, not only the first
    assert {"torch", "cuda", "gpu", "packages"} <= set(report["environment"])


@no_gpu
def test_a_gpu_run_without_a_gpu_skips_everything_and_says_why(capsys):
    assert gpu_check.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("audit") and "runs on the CPU" in line for line in lines)
    assert sum("no NVIDIA GPU" in line for line in lines) == len(GPU_PARTS)
    assert lines[-1].startswith(f"{len(gpu_parts.PARTS)} parts: 0 passed, 0 failed, {len(gpu_parts.PARTS)} skipped")


def test_a_failing_part_fails_the_run_and_keeps_its_results(tmp_path):
    def fails(context):
        raise gpu_check.PartFailed("tokens differ", {"agreement": 0.5})

    def crashes(context):
        raise ValueError("a bug in the part")

    def works(context):
        return {"ratio": 1.01, "work": context.work.is_dir()}

    out = tmp_path / "check.json"
    parts = [part("works", works), part("fails", fails), part("crashes", crashes)]
    assert gpu_check.main(["--dry-run", "--json", str(out)], parts=parts) == 1
    report = json.loads(out.read_text())
    outcome = {p["name"]: p for p in report["parts"]}
    assert outcome["works"]["status"] == "passed" and outcome["works"]["result"] == {"ratio": 1.01, "work": True}
    assert outcome["fails"]["status"] == "failed" and outcome["fails"]["reason"] == "tokens differ"
    assert outcome["fails"]["result"] == {"agreement": 0.5}
    assert outcome["crashes"]["status"] == "failed" and "ValueError: a bug in the part" in outcome["crashes"]["result"]["traceback"]
    assert report["failed"] == ["fails", "crashes"]


def test_parts_that_do_not_fit_the_budget_are_skipped(tmp_path):
    ran = []
    parts = [part("short", lambda c: ran.append("short") or {}, 1), part("long", lambda c: ran.append("long") or {}, 600),
             part("blocked", lambda c: ran.append("blocked") or {}, 1, blocker=lambda c: "no such thing here")]
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--budget-s", "60", "--json", str(out)], parts=parts) == 0
    reasons = {p["name"]: p["reason"] for p in json.loads(out.read_text())["parts"]}
    assert ran == ["short"] and reasons["short"] is None
    assert reasons["long"].startswith("time budget: it takes about 600 s") and reasons["blocked"] == "no such thing here"


def test_a_dry_run_has_no_default_budget():
    ran = []
    assert gpu_check.main(["--dry-run"], parts=[part("slow", lambda c: ran.append("slow") or {}, 10_000)]) == 0
    assert ran == ["slow"]  # the CPU audits take longer than a GPU lease; the budget is the lease's


@pytest.mark.parametrize(("argv", "message"), [
    (["--parts", "kernels,warp_drive"], "unknown part(s) warp_drive"),
    (["--parts", ","], "unknown part(s) (none given)"),
    (["--budget-s", "0"], "--budget-s must be positive"),
    (["--samples", "-3"], "--samples must be positive"),
])
def test_bad_options_are_refused_with_the_known_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error
    if "part" in message:
        assert "known: audit, bf16, kernels" in error


@no_gpu
def test_the_script_runs_as_a_program(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--parts", "kernels,export_cuda", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p["status"] for p in json.loads(out.read_text())["parts"]] == ["skipped", "skipped"]
