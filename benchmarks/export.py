"""Lowering benchmark (issue: lowering): export time, ONNX sizes, onnxruntime vs PyTorch prefill.

    python benchmarks/export.py [--model tiny-llava] [--passes hiprune:keep_ratio=0.33] [--json out.json]

For each model and pass list: export to ONNX (time per graph and in total, with the onnxruntime
check), the size on disk of each graph, the largest |onnxruntime − PyTorch| the exporter measured,
and the prefill time of onnxruntime (vision graph + numpy planning + prefill graph) against PyTorch
eager (``CompiledVLM``: planning + prefill graph) on the same inputs, as a ratio (< 1: onnxruntime
is faster). Both sides use the same number of CPU threads (``--threads``, default 1: on a shared
2-core machine, 2 PyTorch threads next to another busy process collapse to ~100× slower from
OpenMP barrier waits); runs alternate (ABBA), median of N.

The default models are the reference models ``tiny-llava`` / ``tiny-qwen25vl`` when their weights
are in ``models/``, else the random configs ``tiny-llava-random`` / ``tiny-qwen25vl-random``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vlmopt
from vlmopt import configs
from vlmopt.cli.common import load_model
from vlmopt.export import ExportConfig, OnnxVLM, export_onnx
from vlmopt.export.graphs import one_image_batch
from vlmopt.measure import measure, prefill_runner

DEFAULT_PASSES = ["", "random_prune:keep_ratio=0.5", "pool_prune:keep_ratio=0.25", "hiprune:keep_ratio=0.33"]


def default_models() -> list[str]:
    from vlmopt import reference

    found = []
    for name, random in (("tiny-llava", "tiny-llava-random"), ("tiny-qwen25vl", "tiny-qwen25vl-random")):
        try:
            reference.path(name)
            found.append(name)
        except FileNotFoundError:
            found.append(random)
    return found


def measure_model(name: str, passes: list[str], repeats: int, out: Path, threads: int) -> dict:
    loaded = load_model(name)
    model = loaded.model
    torch.set_num_threads(threads)
    start = time.perf_counter()
    manifest = export_onnx(model, out, passes=passes, config=ExportConfig(), processor=loaded.processor, model_name=name)
    export_seconds = time.perf_counter() - start
    size = manifest["layout"]["image_size"][0]
    batch = one_image_batch(model, size, [configs.PromptSpec(text_before=6, text_after=30)], seed=17)
    compiled = vlmopt.compile(model, passes=passes)
    vlm = OnnxVLM(out, threads=threads)
    feeds = {k: v.numpy() for k, v in batch.items()}
    runners = {"pytorch": prefill_runner(compiled, batch), "onnxruntime": lambda: vlm.prefill(vlm.plan(**feeds))}
    times = measure(runners, repeats=repeats, warmup=2)  # alternating ABBA
    with torch.inference_mode():
        expected = runners["pytorch"]()["logits"].numpy()
    got = runners["onnxruntime"]()["logits"]
    torch_ms, ort_ms = (times[k].median_s * 1e3 for k in ("pytorch", "onnxruntime"))
    return {
        "model": name,
        "passes": manifest["passes"],
        "visual_tokens": f"{manifest['layout']['kept_per_image']} / {manifest['layout']['tokens_per_image']}",
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "export_seconds": round(export_seconds, 2),
        "export_seconds_per_graph": {g: e["export_seconds"] for g, e in manifest["graphs"].items()},
        "onnx_bytes": {g: e["bytes"] for g, e in manifest["graphs"].items()},
        "max_abs_error_at_export": max(e["max_abs_error"] for e in manifest["graphs"].values()),
        "max_abs_error_prefill_logits": float(np.abs(got - expected).max()),
        "prefill_ms_pytorch": round(torch_ms, 3),
        "prefill_ms_onnxruntime": round(ort_ms, 3),
        "ort_over_pytorch": round(ort_ms / torch_ms, 3),
        "threads": threads,
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model name or path (repeatable); default: see the docstring")
    parser.add_argument("--passes", action="append", help="pass spec, '' for none (repeatable)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both PyTorch and onnxruntime")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    rows = []
    for name in args.model or default_models():
        for spec in args.passes if args.passes is not None else DEFAULT_PASSES:
            passes = [p for p in spec.split("+") if p]
            with tempfile.TemporaryDirectory() as out:
                row = measure_model(name, passes, args.repeats, Path(out), args.threads)
            rows.append(row)
            sizes = ", ".join(f"{g} {b / 2**20:.2f} MiB" for g, b in row["onnx_bytes"].items())
            print(f"{name} [{' + '.join(passes) or 'no passes'}]: export {row['export_seconds']:.1f} s ({sizes}); "
                  f"prefill ORT {row['prefill_ms_onnxruntime']:.2f} ms vs PyTorch {row['prefill_ms_pytorch']:.2f} ms "
                  f"= {row['ort_over_pytorch']:.2f}x; max |err| {row['max_abs_error_prefill_logits']:.2g}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
