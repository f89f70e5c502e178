"""benchmarks/apbv_gpu.py: the paper's lengths, ZigZag balance, the CPU dry run end to end, and a
clear exit without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "apbv_gpu.py"
sys.path.insert(0, str(SCRIPT.parent))
import apbv_gpu


def test_lengths_follow_the_official_rounding():
    assert apbv_gpu.frames_to_tokens(64) == 8192  # 64/2 frame pairs · (448/14/2)² tokens
    assert apbv_gpu.apbv_lengths(8192, 8) == {"anchor": 128, "passing": 128, "block": 504, "kept_per_block": 128}
    assert apbv_gpu.apbv_lengths(131072, 8) == {"anchor": 2048, "passing": 1024, "block": 8064, "kept_per_block": 1024}
    assert apbv_gpu.apbv_lengths(1000, 4)["kept_per_block"] == 0  # blocks under 128 tokens pass nothing


@pytest.mark.parametrize("hosts", [2, 8])
def test_zigzag_pairs_balance_the_passing_keys(hosts):
    lengths = apbv_gpu.apbv_lengths(32768, hosts)
    totals = {sum(call["passing_len"] for call in apbv_gpu.host_calls(lengths, hosts, h)) for h in range(hosts)}
    assert totals == {(2 * hosts - 1) * lengths["kept_per_block"] + lengths["anchor"]}


def test_dry_run_end_to_end(tmp_path):
    result = apbv_gpu.main(["--dry-run", "--json", str(tmp_path / "apbv.json")])
    saved = json.loads((tmp_path / "apbv.json").read_text())
    assert saved["dry_run"] and saved["hosts"] == 2 and saved["context_tokens"] == 1024
    assert len(saved["rows"]) == 2 + 2 and all(row["ms"] > 0 for row in saved["rows"])
    assert 0 < saved["attention_flops_per_host_ratio"] < 1
    assert result["lengths"] == apbv_gpu.apbv_lengths(1024, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_without_a_gpu_it_says_so():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "needs an NVIDIA GPU" in result.stderr and "--dry-run" in result.stderr
