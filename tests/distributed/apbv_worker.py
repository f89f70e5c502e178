"""One rank of the APB-V gloo tests (run as ``python -m tests.distributed.apbv_worker``): joins a
group, runs a prefill and a greedy generation of a tiny random Qwen2.5-VL (or Qwen3-VL) on a video prompt, and
writes its last-token logits and tokens, its vision-tower FLOPs and its graph diff (or its error) to
``<out>/rank<r>.pt``."""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import vlmopt
from vlmopt import configs
from vlmopt.adapters.qwen2_5_vl import qwen25vl_config
from vlmopt.adapters.qwen3_vl import qwen3vl_config
from vlmopt.passes import APBV

SETTINGS = {"anchor_len": 5, "passing_len": 3}
"""The APB-V lengths the tests use (small, so the passing blocks really compress)."""


def video_prompt(model, frames: int = 6):
    """One video of ``frames`` frames after a short text; for a family without video, ``frames`` images."""
    from vlmopt.adapters import adapter_for_config

    if "video" not in adapter_for_config(model.config).capabilities:
        return configs.synthetic_batch(model, [configs.PromptSpec(images=frames, text_before=3, text_after=6)], seed=81)
    spec = [configs.PromptSpec(images=0, text_before=3, text_after=6)]
    return configs.synthetic_batch(model, spec, video_grids=[(frames, 8, 8)], seed=81)


def batch_prompt(model):
    """Two left-padded rows: two images, and a video after text; their frames span both rows."""
    specs = [configs.PromptSpec(images=2, text_before=3, text_after=6), configs.PromptSpec(images=0, text_before=9, text_after=4)]
    return configs.synthetic_batch(model, specs, video_grids=[(6, 8, 8)], seed=82)


def tiny_model(family: str = "qwen2_5_vl"):
    """The tiny random Qwen2.5-VL (or, with ``family="qwen3_vl"``, Qwen3-VL with DeepStack; another
    registered family: its ``tiny-*-random`` config) of the tests."""
    if family == "qwen3_vl":
        return configs.build(qwen3vl_config(), seed=3)
    if family != "qwen2_5_vl":
        from vlmopt.adapters import families

        adapter = next(cls for cls in families() if cls.family == family)
        name = next(name for name in adapter.configs if name.endswith("-random"))
        return configs.build(configs.CONFIGS[name](), seed=3)
    return configs.build(qwen25vl_config(), seed=3)


def run(compiled, batch):
    """Last-token logits of the prefill, greedy tokens of the video prompt, and greedy tokens of a
    text-only prompt (which APB-V leaves to full attention on every host)."""
    with torch.no_grad():
        logits = compiled(**batch, logits_to_keep=1).logits[:, -1]
    tokens = compiled.generate(**batch, max_new_tokens=5, eos_token_id=[])
    text = {"input_ids": torch.tensor([[11, 23, 35, 47], [0, 0, 52, 19]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}
    return logits, tokens, compiled.generate(**text, max_new_tokens=4, eos_token_id=[])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--hosts", type=int)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--fail-in", choices=("attention", "vision"), default="attention")
    parser.add_argument("--batch", type=int, default=0, help="1: run the two-row batch instead of one video")
    parser.add_argument("--family", default="qwen2_5_vl", help="a registered adapter's family name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.world, timeout=timedelta(seconds=30))
        model = tiny_model(args.family)
        compiled = vlmopt.compile(model, passes=[APBV(hosts=args.hosts or args.world, **SETTINGS)])
        if args.rank == args.fail_rank:
            from vlmopt.distributed import attention

            def broken(*_, **__):
                raise RuntimeError("injected failure")

            if args.fail_in == "vision":
                model.model.visual.blocks[0].forward = broken
            else:
                attention.host_attention = broken
        batch = batch_prompt(model) if args.batch else video_prompt(model, frames=args.frames)
        result["logits"], result["tokens"], result["text_tokens"] = run(compiled, batch)
        result["vision_flops"] = vlmopt.flops(compiled, batch).by_stage["vision"]
        result["diff"] = vlmopt.graph.diff(vlmopt.compile(model).graph, compiled.graph)
    except Exception as error:  # noqa: BLE001 - the test reads the message
        result["error"], result["at"] = f"{type(error).__name__}: {error}", time.time()
    torch.save(result, os.path.join(args.out, f"rank{args.rank}.pt"))
    if "error" in result:
        os._exit(1)  # leave without a barrier, as a crashed rank would
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
