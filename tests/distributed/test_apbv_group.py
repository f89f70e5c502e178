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
from tests.distributed.apbv_worker import SETTINGS, batch_prompt, run, tiny_model, video_prompt
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


@pytest.mark.parametrize("world,frames", [(4, 6), (4, 16)])
def test_gloo_group_matches_the_simulation(tmp_path, world, frames):
    """Logits and tokens equal the simulation's; each rank's tower encodes only its frames (4 ranks
    over 3 temporal patches: one rank encodes a frame it does not send)."""
    model = tiny_model()
    compiled = vlmopt.compile(model, passes=[APBV(hosts=world, **SETTINGS)])
    batch = video_prompt(model, frames)
    expected_logits, expected_tokens, expected_text = run(compiled, batch)
    whole_tower = vlmopt.flops(compiled, batch).by_stage["vision"]
    results, _ = launch(tmp_path, world, frames=frames)
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        torch.testing.assert_close(result["logits"], expected_logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(result["tokens"], expected_tokens), f"rank {rank} generated other tokens"
        assert torch.equal(result["text_tokens"], expected_text), f"rank {rank}: text-only prompt differs"
    temporal_patches = frames // 2
    per_frame = whole_tower / temporal_patches
    encoded = [result["vision_flops"] / per_frame for result in results]
    assert all(abs(count - round(count)) < 1e-9 for count in encoded), encoded
    assert max(encoded) == -(-temporal_patches // world) or temporal_patches < world, encoded
    assert sum(encoded) == max(temporal_patches, world), f"every frame encoded once (plus one per idle rank): {encoded}"


def test_gloo_group_runs_batches(tmp_path, golden):
    """Two ranks, two left-padded rows of different lengths (images in one, a video in the other):
    every rank holds its tokens of both rows, and logits and tokens equal the simulation's. The
    graph diff: the rank's tower output is all-gathered before the merge, and the decoder layers run
    on the rank's rows only."""
    model = tiny_model()
    expected_logits, expected_tokens, expected_text = run(vlmopt.compile(model, passes=[APBV(hosts=2, **SETTINGS)]), batch_prompt(model))
    results, _ = launch(tmp_path, 2, batch=1)
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        torch.testing.assert_close(result["logits"], expected_logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(result["tokens"], expected_tokens), f"rank {rank} generated other tokens"
        assert torch.equal(result["text_tokens"], expected_text), f"rank {rank}: text-only prompt differs"
    golden("apbv_group_qwen2_5_vl", results[0]["diff"])
    assert results[1]["diff"] == results[0]["diff"].replace("apbv_plans, 0)", "apbv_plans, 1)"), "ranks differ only in their rank"


def test_hosts_must_equal_the_group_size(tmp_path):
    results, _ = launch(tmp_path, 2, hosts=3)
    for result in results:
        assert "hosts must equal the group's size; use apbv:hosts=2" in result["error"]


@pytest.mark.parametrize("where", ["attention", "vision"])
def test_a_failing_rank_stops_the_others_naming_it(tmp_path, where):
    results, _ = launch(tmp_path, 3, fail_rank=1, fail_in=where)
    assert "injected failure" in results[1]["error"]
    for rank in (0, 2):
        assert "rank 1 failed" in results[rank]["error"], results[rank]["error"]
        assert results[rank]["at"] - results[1]["at"] < 30, "the others stop within the group's timeout"


def test_graphs_compiled_for_another_setting_are_refused():
    """A model compiled outside a process group and run inside one (and the reverse) is refused
    with the fix, not run on graphs built for the other setting."""
    import contextlib
    from datetime import timedelta

    import torch.distributed as dist

    from vlmopt.errors import IncompatiblePassError

    model = tiny_model()
    batch = video_prompt(model)
    outside = vlmopt.compile(model, passes=[APBV(hosts=1, **SETTINGS)])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        with pytest.raises(IncompatiblePassError, match="compiled outside a torch.distributed process group and now runs inside"):
            outside.generate(**batch, max_new_tokens=2)
        inside = vlmopt.compile(model, passes=[APBV(hosts=1, **SETTINGS)])
        expected = inside.generate(**batch, max_new_tokens=3, eos_token_id=[])
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    with pytest.raises(IncompatiblePassError, match="compile the model where it runs"):
        inside.generate(**batch, max_new_tokens=2)
    assert torch.equal(outside.generate(**batch, max_new_tokens=3, eos_token_id=[]), expected)


def test_the_backend_follows_the_tensors_device():
    """NCCL moves CUDA tensors only: a group over CPU models (the CLI's) is gloo even where a GPU exists."""
    from vlmopt.distributed.group import backend_for

    assert backend_for("cpu") == backend_for(torch.device("cpu")) == "gloo"
    assert backend_for("cuda") == backend_for(torch.device("cuda", 1)) == "nccl"
