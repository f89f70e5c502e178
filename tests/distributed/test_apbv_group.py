"""APB-V on real gloo process groups of 2 and 4 ranks (subprocesses on a free port) gives the
single-process simulation's last-token logits and tokens; a wrong host count and a failing rank give
clear errors, not a hang."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vlmopt
from tests.distributed.apbv_worker import SETTINGS, run, tiny_model, video_prompt
from vlmopt.passes import APBV

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path, world: int, **options) -> tuple[list[dict], float]:
    port, began = free_port(), time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    extra = [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.distributed.apbv_worker", "--rank", str(rank), "--world", str(world),
                          "--port", str(port), "--out", str(tmp_path), *extra], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rank in range(world)
    ]
    for proc in procs:
        proc.wait(timeout=120)
    results = [torch.load(tmp_path / f"rank{rank}.pt") if (tmp_path / f"rank{rank}.pt").exists() else {"error": "no result"}
               for rank in range(world)]
    return results, time.perf_counter() - began


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_group_matches_the_simulation(tmp_path, world):
    model = tiny_model()
    expected_logits, expected_tokens, expected_text = run(
        vlmopt.compile(model, passes=[APBV(hosts=world, **SETTINGS)]), video_prompt(model)
    )
    results, _ = launch(tmp_path, world)
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        torch.testing.assert_close(result["logits"], expected_logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(result["tokens"], expected_tokens), f"rank {rank} generated other tokens"
        assert torch.equal(result["text_tokens"], expected_text), f"rank {rank}: text-only prompt differs"


def test_hosts_must_equal_the_group_size(tmp_path):
    results, _ = launch(tmp_path, 2, hosts=3)
    for result in results:
        assert "hosts must equal the group's size; use apbv:hosts=2" in result["error"]


def test_a_failing_rank_stops_the_others_naming_it(tmp_path):
    results, _ = launch(tmp_path, 3, fail_rank=1)
    assert "injected failure" in results[1]["error"]
    for rank in (0, 2):
        assert "rank 1 failed" in results[rank]["error"], results[rank]["error"]
        assert results[rank]["at"] - results[1]["at"] < 30, "the others stop within the group's timeout"
