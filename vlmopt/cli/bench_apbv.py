"""``vlmopt bench --context-tokens N --passes apbv:hosts=H``: APB-V's attention cost per host.

Part of ``vlmopt bench`` (not its own verb): with ``--context-tokens`` or ``--video-frames`` the
bench sizes a long-video prompt instead of running the config's one-image prompt, and reports per
APB-V pass list ``attention_flops_per_host_ratio`` (FLOPs on fake tensors, checked against the
closed form) and one layer's CPU attention time against SDPA (:mod:`vlmopt.distributed.bench`); with
``--video-frames`` also how the ranks share the vision tower (:func:`frame_split`).
"""

from __future__ import annotations

import argparse
import json

from vlmopt.cli.common import markdown_table
from vlmopt.errors import InputError


def context_tokens(args: argparse.Namespace, shape: dict, vision_config) -> int:
    """``--context-tokens``, or the tokens of ``--video-frames`` frames at the config's image grid
    (the temporal patch folds frames in pairs, the 2×2 merge leaves h·w/4 tokens per pair) plus the
    text before the video."""
    if args.context_tokens is not None and args.video_frames is not None:
        raise InputError("give --context-tokens or --video-frames, not both")
    if args.context_tokens is not None:
        return args.context_tokens
    grid = shape.get("image_grid")
    if grid is None:
        raise InputError(f"--video-frames needs a Qwen2.5-VL config with an image grid; {args.config} has none")
    merge, temporal = vision_config.spatial_merge_size, vision_config.temporal_patch_size
    pairs = -(-args.video_frames // temporal)
    return shape["text_before"] + 2 + pairs * (grid[0] // merge) * (grid[1] // merge)


def frame_split(frames: int, grid: tuple[int, int], vision_config, hosts: int) -> dict:
    """How a group of ``hosts`` ranks shares the tower's work on ``frames`` video frames: frames
    (temporal patches) per rank, and the busiest rank's share of the visual tokens, which is its
    share of the tower's FLOPs (the tower never attends across frames)."""
    from vlmopt.distributed.frames import split_frames

    merge, temporal = vision_config.spatial_merge_size, vision_config.temporal_patch_size
    per_patch = (grid[0] // merge) * (grid[1] // merge)
    patches = [per_patch] * -(-frames // temporal)
    ranges = split_frames(patches, hosts)
    shares = [sum(patches[a:b]) for a, b in ranges]
    return {"vision_temporal_patches_per_host": [b - a for a, b in ranges],
            "vision_share_busiest_host": max(shares) / sum(patches)}


def run_apbv(args: argparse.Namespace, lists: list[list[str]], shape: dict) -> int:
    from vlmopt import configs, passes
    from vlmopt.distributed.bench import apbv_report
    from vlmopt.passes.apbv import APBV

    config = configs.CONFIGS[args.config]()
    apbv_lists = []
    for specs in lists:
        parsed = [passes.parse(spec) for spec in specs]
        found = [p for p in parsed if isinstance(p, APBV)]
        if len(parsed) != 1 or not found:
            raise InputError(
                f"--context-tokens / --video-frames measure APB-V alone; give --passes apbv:hosts=H (got {'+'.join(specs)})"
            )
        apbv_lists.append(found[0])
    if not apbv_lists:
        raise InputError("--context-tokens / --video-frames need --passes apbv:hosts=H")
    vision_config = getattr(config, "vision_config", None)
    context = context_tokens(args, shape, vision_config)
    question = shape.get("question", 30)
    reports = []
    for item in apbv_lists:
        report = apbv_report(
            config.get_text_config(), context, question, item.hosts, item.anchor_len, item.passing_len, item.pool,
            time_context=args.time_tokens, repeats=args.repeats,
        )
        if args.video_frames is not None:
            report |= frame_split(args.video_frames, shape["image_grid"], vision_config, item.hosts)
        reports.append({"passes": item.spec(), **report})
    rows = []
    for entry in reports:
        timing = entry["cpu_time_one_layer"]
        rows.append([
            entry["passes"], f"{entry['context_tokens']:,}", f"{entry['anchor_len']} / {entry['passing_len']}",
            f"{entry['attention_flops_per_host_ratio']:.4f} (1/{1 / entry['attention_flops_per_host_ratio']:.1f})",
            f"{entry['analytic_ratio']:.4f}",
            f"{timing['sdpa_causal_seconds'] * 1e3:.1f} / {timing['apbv_one_host_seconds'] * 1e3:.1f} ({timing['tokens']} tokens)",
        ])
    print(f"{args.config}: one layer's attention, one APB-V host against one device's full causal attention")
    for entry in reports:
        if "vision_share_busiest_host" in entry:
            print(f"{entry['passes']}: the vision tower encodes {entry['vision_temporal_patches_per_host']} temporal patches "
                  f"per host; the busiest host's share of its FLOPs is {entry['vision_share_busiest_host']:.4f}")
    print(markdown_table(
        ["passes", "context tokens", "anchor / passing", "FLOPs per host ratio (fake tensors)", "analytic",
         "CPU ms SDPA / APB-V host"],
        rows,
    ))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": args.config, "runs": reports}, handle, indent=2)
    return 0
