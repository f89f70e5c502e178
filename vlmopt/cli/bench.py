"""``vlmopt bench``: FLOPs, prefill time, peak memory and KV-cache bytes of pass lists, side by side.

FLOPs and KV-cache bytes are counted at the real model's full width on fake tensors (no memory, no
arithmetic); prefill time and peak memory are measured for real at ``--width`` (a scaled-down width
that runs on a CPU, same depth, heads and token counts). Every pass list is measured in the same
run as the baseline (no passes), timed alternately with it (ABBA), and reported as ratios against it.
"""

from __future__ import annotations

import argparse
import inspect
import json

from vlmopt.cli.common import add_passes_argument, markdown_table, pass_lists, positive_int, unit_fraction

#: Text around the benchmark image (the image's patch grid is the config's ``NamedConfig.image_grid``).
PROMPT_SHAPE = {"text_before": 5, "question": 30}


def bench_shape(config: str) -> dict:
    """The benchmark prompt of ``config``: its image grid (None: the tower's fixed size), text before, question."""
    from vlmopt import configs

    return {"image_grid": configs.CONFIGS.named(config).image_grid, **PROMPT_SHAPE}

#: Roles of nodes that passes insert (their time is the passes' own overhead).
PASS_ROLES = (
    "prune_score", "prune_select", "prune_kinds", "prune_layout", "prune_pool", "visual_positions",
    "sequence_index", "sequence_gather", "sequence_cut", "visual_span",
)


def add_parsers(subparsers) -> None:
    from vlmopt.configs import CONFIGS

    parser = subparsers.add_parser("bench", help="FLOPs, time, memory and KV bytes of pass lists on 7B-shaped models")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llava-1.5-7b-shape",
                        help="a 7B-shaped config (measured at --width) or a tiny random one")
    add_passes_argument(parser)
    parser.add_argument("--width", type=unit_fraction, default=0.125,
                        help="width scale for the timed runs, in (0, 1] (1 = real)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed prefill repeats per pass list")
    parser.add_argument("--threads", type=positive_int,
                        help="PyTorch CPU threads for the timed runs (default: PyTorch's; on a shared machine 1 is "
                        "steadier)")
    parser.add_argument("--stream", action="store_true",
                        help="time a question after a video streamed in (vlmopt.stream) against re-prefilling it")
    parser.add_argument("--video-frames", type=positive_int,
                        help="frames of the video: with --stream the streamed video (default 64); with apbv the "
                        "long-video context at the config's image grid (instead of --context-tokens)")
    parser.add_argument("--frame-size", type=positive_int, default=112, help="--stream: frame side in pixels")
    parser.add_argument("--context-tokens", type=positive_int,
                        help="APB-V: a long-video context of this many tokens (FLOPs per host, one layer's CPU time)")
    parser.add_argument("--time-tokens", type=positive_int, default=2048,
                        help="APB-V: context tokens of the CPU timing of one layer's attention (default 2048)")
    parser.add_argument("--json", help="write the results to this file")
    parser.set_defaults(run=run)


def _batch(model, config: str):
    from vlmopt import configs

    shape = bench_shape(config)
    spec = [configs.PromptSpec(text_before=shape["text_before"], text_after=shape["question"])]
    grid = [shape["image_grid"]] if shape["image_grid"] else None
    return configs.synthetic_batch(model, spec, image_grids=grid, seed=0)


def bench_report(config: str, lists: list[list[str]], width: float, repeats: int) -> dict:
    import vlmopt
    from vlmopt import configs
    from vlmopt.measure import (
        cache_bytes,
        measure,
        peak_prefill_bytes,
        prefill_runner,
        time_by_role,
    )

    make = configs.CONFIGS[config]
    scalable = "width" in inspect.signature(make).parameters
    full = configs.build(make(), device="meta")
    small = configs.build(make(width=width) if scalable else make())
    full_batch, small_batch = _batch(full, config), _batch(small, config)
    results, runners = [], {}
    for index, passes in enumerate([[]] + lists):
        compiled_full = vlmopt.compile(full, passes=passes)
        full_cache = compiled_full.new_cache()
        flops = vlmopt.flops(compiled_full, full_batch, cache=full_cache)
        compiled = vlmopt.compile(small, passes=passes)
        prompt = compiled.plan(small_batch, for_generation=True)
        total, kept = prompt.layout.total, compiled.visual_tokens_kept(prompt)
        run = runners[str(index)] = prefill_runner(compiled, small_batch)
        roles = time_by_role(compiled, small_batch, repeats=max(1, repeats // 2))
        graph_seconds = sum(roles.values())
        overhead = sum(seconds for role, seconds in roles.items() if role in PASS_ROLES)
        results.append({
            "passes": " + ".join(passes),
            "visual_tokens": kept,
            "visual_tokens_total": total,
            "prefill_flops": flops.total,
            "llm_prefill_flops": flops.llm,
            "flops_by_stage": flops.by_stage,
            "pass_overhead_seconds": overhead,
            "pass_overhead_share": overhead / graph_seconds if graph_seconds else 0.0,
            "time_by_role": dict(sorted(roles.items(), key=lambda item: -item[1])),
            "peak_bytes": peak_prefill_bytes(run),
            "kv_bytes": cache_bytes(full_cache),
        })
    # Every pass list is timed side by side with the baseline, alternating (ABBA): a load that comes
    # and goes on a shared machine then slows all lists alike instead of whichever ran at the time.
    timings = measure(runners, repeats=repeats, warmup=1)
    for index, entry in enumerate(results):
        entry["prefill_seconds"] = timings[str(index)].median_s
        entry["prefill_seconds_all"] = list(timings[str(index)].samples_s)
    baseline, runs = results[0], results[1:]
    for entry in runs:
        for key in ("prefill_flops", "llm_prefill_flops", "prefill_seconds", "peak_bytes", "kv_bytes"):
            if baseline[key] and entry[key] is not None:
                entry[f"{key}_ratio"] = entry[key] / baseline[key]
    return {"config": config, "timed_width": width if scalable else 1.0, "baseline": baseline, "runs": runs}


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    lists = pass_lists(args.passes)
    if args.stream:
        from vlmopt.stream.bench import print_report, stream_bench

        from vlmopt import configs
        from vlmopt.adapters import adapter_for_config

        capabilities = adapter_for_config(configs.CONFIGS[args.config]()).capabilities
        if not {"stream", "video"} <= capabilities:
            from vlmopt.errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"bench --stream needs a family that streams frames and takes whole videos (its baseline re-prefills the "
                f"video in one prompt); {args.config} does not"
            )

        def one(passes):
            return stream_bench(args.config, passes, args.video_frames or 64, args.width, args.repeats, args.frame_size)

        report = {"config": args.config, "mode": "stream", "baseline": one([]), "runs": [one(p) for p in lists if p]}
        for entry in [report["baseline"], *report["runs"]]:
            print_report(entry)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=2)
        return 0
    if args.context_tokens is not None or args.video_frames is not None:
        from vlmopt.cli.bench_apbv import run_apbv

        return run_apbv(args, lists, bench_shape(args.config))
    report = bench_report(args.config, lists, args.width, args.repeats)
    rows = []
    for entry in [report["baseline"]] + report["runs"]:
        def ratio(key):
            return f"{entry[key + '_ratio']:.3f}" if key + "_ratio" in entry else "1"

        peak = entry["peak_bytes"]
        rows.append([
            entry["passes"] or "(none)",
            f"{entry['visual_tokens']} / {entry['visual_tokens_total']}",
            f"{entry['prefill_flops'] / 1e12:.3f} ({ratio('prefill_flops')})",
            f"{entry['llm_prefill_flops'] / 1e12:.3f} ({ratio('llm_prefill_flops')})",
            f"{entry['prefill_seconds'] * 1e3:.1f} ({ratio('prefill_seconds')})",
            f"{entry['pass_overhead_share']:.1%}",
            "n/a" if peak is None else f"{peak / 2**20:.1f} ({ratio('peak_bytes')})",
            f"{entry['kv_bytes'] / 2**20:.1f} ({ratio('kv_bytes')})",
        ])
    print(f"{report['config']}: FLOPs and KV bytes at full width (fake tensors); time and peak memory at "
          f"width {report['timed_width']} on this machine")
    print(markdown_table(
        ["passes", "visual tokens", "prefill TFLOPs (ratio)", "LLM TFLOPs (ratio)", "prefill ms (ratio)",
         "pass overhead", "peak MiB (ratio)", "KV MiB (ratio)"],
        rows,
    ))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0
