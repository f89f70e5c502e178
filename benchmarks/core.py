"""Core benchmarks (issue: core capture): compile time, identity-compiled prefill time, FLOPs.

    python benchmarks/core.py [--json out.json]

1. Compile time of a Qwen2.5-VL with the 7B model's depth (28 decoder layers, 32 vision blocks) at
   tiny width (goal < 2 s): median of 5 ``vlmopt.compile`` calls.
2. Prefill time of the identity-compiled model against HF eager on the same inputs (goal ≤ 1.05):
   LLaVA-1.5-shaped and Qwen2.5-VL-7B-shaped models at reduced width, one 336 px / 448 px image and a
   ~30-token question, runs interleaved, median of N each (planning included for vlmopt).
3. Prefill FLOPs with RandomPrune(keep_ratio=1/3) against none on the full-width LLaVA-1.5-7B shape
   (576 visual tokens), on fake tensors, checked against the analytic count of the LLM.
"""

from __future__ import annotations

import argparse
import json

import torch

import vlmopt
from vlmopt import configs
from vlmopt.measure import hf_prefill_runner, measure, prefill_runner
from vlmopt.adapters.llava import llava_15_7b_shape
from vlmopt.adapters.qwen2_5_vl import qwen25vl_7b_shape


def compile_time(repeats: int = 5) -> dict:
    model = configs.build(qwen25vl_7b_shape(width=0.02))
    timing = measure(lambda: vlmopt.compile(model), repeats=repeats, warmup=0)
    text, vision = model.config.text_config, model.config.vision_config
    return {
        "model": f"qwen2.5-vl-7b-shape at width 0.02 ({text.num_hidden_layers} decoder layers, {vision.depth} vision blocks)",
        "compile_seconds_median": timing.median_s,
        "compile_seconds_all": list(timing.samples_s),
    }


def prefill_ratio(name: str, config, image_grid, repeats: int) -> dict:
    model = configs.build(config)
    spec = [configs.PromptSpec(text_before=6, text_after=30)]
    batch = configs.synthetic_batch(model, spec, image_grids=[image_grid] if image_grid else None)
    compiled = vlmopt.compile(model)
    runners = {"hf": hf_prefill_runner(model, batch), "vlmopt": prefill_runner(compiled, batch)}
    times = measure(runners, repeats=repeats, warmup=2)  # alternating ABBA, medians
    hf, ours = times["hf"].median_s, times["vlmopt"].median_s
    return {
        "model": name,
        "tokens": int(batch["input_ids"].shape[1]),
        "hf_seconds": hf,
        "vlmopt_seconds": ours,
        "ratio": ours / hf,
        "ratio_of_minimums": times["vlmopt"].min_s / times["hf"].min_s,
    }


def analytic_llm_flops(text, tokens: int) -> int:
    d, layers, inter = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    head_dim = d // heads
    per_token = 4 * d * heads * head_dim + 4 * d * kv * head_dim + 6 * d * inter
    return layers * (tokens * per_token + 4 * heads * tokens * tokens * head_dim)


def flops_random_prune() -> dict:
    model = configs.build(llava_15_7b_shape(), device="meta")
    batch = configs.synthetic_batch(model, [configs.PromptSpec(text_before=5, text_after=30)])
    seq = int(batch["input_ids"].shape[1])
    base = vlmopt.flops(model, batch)
    pruned = vlmopt.flops(vlmopt.compile(model, ["random_prune:keep_ratio=1/3"]), batch)
    kept = seq - 576 + 192
    text = model.config.text_config
    return {
        "model": "llava-1.5-7b-shape (full width, fake tensors)",
        "prompt_tokens": seq,
        "visual_tokens": [576, 192],
        "prefill_flops": [base.total, pruned.total],
        "llm_prefill_flops": [base.llm, pruned.llm],
        "analytic_llm_flops": [analytic_llm_flops(text, seq), analytic_llm_flops(text, kept)],
        "analytic_match": [base.llm == analytic_llm_flops(text, seq), pruned.llm == analytic_llm_flops(text, kept)],
        "total_reduction": 1 - pruned.total / base.total,
        "llm_reduction": 1 - pruned.llm / base.llm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {
        "compile": compile_time(),
        "prefill": [
            prefill_ratio("llava-1.5-7b-shape, width 0.125", llava_15_7b_shape(width=0.125), None, args.repeats),
            prefill_ratio("qwen2.5-vl-7b-shape, width 0.125", qwen25vl_7b_shape(width=0.125), (32, 32), args.repeats),
        ],
        "flops": flops_random_prune(),
    }
    c = results["compile"]
    print(f"compile: {c['compile_seconds_median']:.3f} s median  ({c['model']})")
    for r in results["prefill"]:
        print(f"prefill: {r['model']}, {r['tokens']} tokens: HF {r['hf_seconds'] * 1e3:.1f} ms, "
              f"vlmopt {r['vlmopt_seconds'] * 1e3:.1f} ms, ratio of medians {r['ratio']:.3f} "
              f"(of minimums {r['ratio_of_minimums']:.3f})")
    f = results["flops"]
    print(f"flops: {f['model']}: {f['prefill_flops'][0] / 1e12:.3f} → {f['prefill_flops'][1] / 1e12:.3f} TFLOPs "
          f"(−{f['total_reduction']:.1%} total, −{f['llm_reduction']:.1%} LLM); analytic LLM match: {f['analytic_match']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
