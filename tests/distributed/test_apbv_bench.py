"""APB-V's per-host attention FLOPs: the count on fake tensors equals the closed form (odd lengths,
every host, GQA), the zigzag balances the passing load, the paper-scale ratio meets the goal, and
``vlmopt bench --context-tokens`` reports it."""

import json

import pytest

from vlmopt.cli import main
from vlmopt.distributed.bench import (
    AttentionShape,
    analytic_host_flops,
    bench_plan,
    full_causal_flops,
    host_flops,
)


@pytest.mark.parametrize("context,question,hosts,anchor,passing", [(301, 7, 3, 13, 5), (517, 11, 4, None, 9), (97, 3, 2, 0, 50)])
def test_counted_flops_equal_the_closed_form(context, question, hosts, anchor, passing):
    shape = AttentionShape(heads=6, kv_heads=2, head_dim=16)
    plan = bench_plan(context, question, hosts, anchor, passing)
    assert host_flops(plan, shape) == [analytic_host_flops(plan, h, shape) for h in range(hosts)]
    assert full_causal_flops(plan.length, shape) == 4 * 6 * 16 * plan.length * (plan.length + 1) // 2


def test_zigzag_gives_every_host_the_same_passing_load():
    plan = bench_plan(64 * 1024, 30, 8, None, None)
    loads = {sum(plan.keep_of(u) for v in plan.blocks_of(h) for u in range(v)) for h in range(8)}
    assert loads == {15 * 512}  # (2H − 1)·l_p on every host


def test_paper_scale_ratio():
    shape = AttentionShape(heads=28, kv_heads=4, head_dim=128)
    plan = bench_plan(131072, 30, 8, None, None)
    assert (plan.anchor, plan.keep) == (2048, 1024)
    ratio = max(host_flops(plan, shape)) / full_causal_flops(plan.length, shape)
    assert 1 / 40 < ratio <= 1 / 30


def bench_run(tmp_path, *sizing: str) -> dict:
    """The one run of ``vlmopt bench --config qwen2.5-vl-7b-shape <sizing> --passes apbv:hosts=4``."""
    out = tmp_path / "apbv.json"
    code = main(["bench", "--config", "qwen2.5-vl-7b-shape", *sizing, "--time-tokens", "300", "--repeats", "1",
                 "--passes", "apbv:hosts=4", "--json", str(out)])
    assert code == 0
    (run,) = json.loads(out.read_text())["runs"]
    return run


def test_bench_cli_reports_the_ratio(tmp_path, capsys):
    run = bench_run(tmp_path, "--context-tokens", "20000")
    assert run["host_attention_flops"] == run["host_attention_flops_analytic"]
    assert 0 < run["attention_flops_per_host_ratio"] < 1
    assert run["cpu_time_one_layer"]["sdpa_causal_seconds"] > 0
    assert "FLOPs per host ratio" in capsys.readouterr().out


def test_bench_by_video_frames_reports_the_tower_split(tmp_path, capsys):
    run = bench_run(tmp_path, "--video-frames", "21")
    assert sorted(run["vision_temporal_patches_per_host"]) == [2, 3, 3, 3]  # 21 frames fold into 11 temporal patches
    assert run["vision_share_busiest_host"] == 3 / 11
    assert "temporal patches per host" in capsys.readouterr().out
