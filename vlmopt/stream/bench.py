"""``vlmopt bench --stream``: time to first token of a question asked after a video has streamed
in, against re-prefilling the whole history with the plain model, and KV bytes after each chunk.

The model is the config's random-weight shape at ``width`` (same depth, heads and token counts, run
for real on this machine); frames are seeded random uint8 images of ``frame_size`` px; the question is
a fixed sentence. ``ttft_seconds`` is the median over ``repeats`` questions of the stream's question
prefill + first token (the cache is restored after each); ``reprefill_seconds`` the median one-shot
prefill (vision tower included, as a model without a stream would pay at every question) of the same
frames and question with no passes; ``ttft_ratio`` their quotient.
"""

from __future__ import annotations

import time

import numpy as np
import torch

QUESTION = "what colour was the first object to appear?"


def stream_bench(config: str, passes: list[str], frames: int, width: float, repeats: int, frame_size: int = 112) -> dict:
    import vlmopt
    from vlmopt import configs
    from vlmopt.errors import UnsupportedModelError
    from vlmopt.measure import measure, prefill_runner
    from vlmopt.reference.processing import encode

    named = configs.CONFIGS.named(config)
    model = configs.build(named.make(width=width) if "shape" in config else named.make())
    if named.processor is None:
        raise UnsupportedModelError(f"{config} comes with no processor to tokenise a stream's prompts; bench a config that has one")
    processor = named.processor(image_size=frame_size, video_size=frame_size)
    video = np.random.default_rng(0).integers(0, 256, (frames, frame_size, frame_size, 3), dtype=np.uint8)
    plain = vlmopt.compile(model)
    from types import SimpleNamespace

    batch = encode(processor, [SimpleNamespace(question=QUESTION, is_video=True, frames=video)])
    reprefill = measure(prefill_runner(plain, batch), repeats=repeats, warmup=1)
    compiled = vlmopt.compile(model, passes=passes)
    stream = compiled.stream(processor=processor)
    began = time.perf_counter()
    stream.append(video)
    append_seconds = time.perf_counter() - began
    stream.ask(QUESTION, max_new_tokens=1)  # warm-up
    ttfts = [stream.ask(QUESTION, max_new_tokens=1).ttft_ms / 1000 for _ in range(repeats)]
    ttft = float(np.median(ttfts))
    return {
        "config": config, "timed_width": width, "frames": frames, "frame_size": frame_size,
        "passes": " + ".join(passes), "visual_tokens_total": int((batch["input_ids"] == model.config.video_token_id).sum()),
        "visual_tokens_cached": stream.visual_tokens, "cache_tokens": stream.cache_length,
        "ttft_seconds": ttft, "ttft_seconds_all": ttfts, "reprefill_seconds": reprefill.median_s,
        "ttft_ratio": ttft / reprefill.median_s, "append_seconds": append_seconds,
        "kv_bytes_per_chunk": stream.kv_bytes_per_chunk, "memory": stream.memory(),
        "threads": torch.get_num_threads(),
    }


def print_report(report: dict) -> None:
    print(
        f"{report['config']} at width {report['timed_width']}, {report['frames']} frames of {report['frame_size']} px, "
        f"passes: {report['passes'] or '(none)'}"
    )
    print(f"visual tokens cached {report['visual_tokens_cached']} of {report['visual_tokens_total']}")
    print(f"ttft_seconds {report['ttft_seconds']:.4f}  reprefill_seconds {report['reprefill_seconds']:.3f}  "
          f"ttft_ratio {report['ttft_ratio']:.4f}")
    print("kv_bytes_per_chunk " + " ".join(str(b) for b in report["kv_bytes_per_chunk"]))
