"""vlmopt's side of the vLLM engine tests, run in vlmopt's own environment (transformers >= 5.24,
which vLLM's environment cannot hold): ``python tests/integrations/vllm_reference.py COMMAND JSON``.

* ``make {"directory", "config", "seed", "options"}``: a random-weight reference config (built with
  ``options``) saved as a model directory (weights, processor, tasks.json) that both environments load;
* ``logprobs {"model", "passes", "samples": [{"task", "index", "size"}]}``: per sample, the five
  most likely first answer tokens and their log-probabilities from ``vlmopt.compile(model, passes)``
  (a sample is test sample ``index`` of ``task``; an image resized to ``size`` px when given). After a
  Qwen2.5-VL video the text takes vLLM's positions, one past the video's largest id (HF's go on at
  ``max(h, w)``; :mod:`vlmopt.integrations.vllm.positions`), so both sides see the same prompt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def sample_of(model: str, spec: dict):
    """Test sample ``spec["index"]`` of ``spec["task"]``, its image resized to ``spec["size"]`` px when given."""
    from dataclasses import replace

    import numpy as np
    from PIL import Image

    from vlmopt import reference

    sample = reference.task_for(model, spec["task"]).sample("test", spec["index"])
    if spec.get("size") and not sample.is_video:
        image = Image.fromarray(sample.image).resize((spec["size"], spec["size"]), Image.BICUBIC)
        sample = replace(sample, image=np.asarray(image))
    return sample


def vllm_video_positions(compiled, batch):
    """[3, 1, S] M-RoPE positions of a one-video Qwen2.5-VL prompt with vLLM's rule after the video."""
    from vlmopt.integrations.vllm.positions import grid_extent

    ids = batch["input_ids"]
    positions = compiled.adapter.positions(batch, ids, batch["attention_mask"], True, True).clone()
    t, h, w = (v // m for v, m in zip(batch["video_grid_thw"][0].tolist(), (1, 2, 2)))
    step = float(batch["second_per_grid_ts"][0]) * compiled.config.vision_config.tokens_per_second
    after = int((ids[0] == compiled.config.video_token_id).nonzero().max()) + 1
    positions[:, :, after:] += grid_extent((t, h, w), step) - max(h, w)
    return positions


def make(request: dict) -> dict:
    import torch

    from vlmopt import configs
    from vlmopt.reference.processing import save_processor

    named = configs.CONFIGS.named(request["config"])
    torch.manual_seed(request["seed"])
    model = configs.build(named.make(**request.get("options", {})), seed=request["seed"])
    directory = Path(request["directory"])
    model.save_pretrained(directory)
    save_processor(named.processor(), directory)
    (directory / "tasks.json").write_text(json.dumps({k: dict(v) for k, v in (named.tasks or {}).items()}))
    return {"directory": str(directory)}


def logprobs(request: dict) -> list[dict]:
    import torch

    import vlmopt
    from vlmopt import reference
    from vlmopt.reference import processing

    model, processor = reference.load(request["model"])
    compiled = vlmopt.compile(model, passes=[p for p in request["passes"].split("+") if p])
    out = []
    for spec in request["samples"]:
        batch = processing.encode(processor, [sample_of(request["model"], spec)])
        if "second_per_grid_ts" in batch:
            batch["position_ids"] = vllm_video_positions(compiled, batch)
        with torch.inference_mode():
            logits = compiled(**batch).logits[0, -1].float()
        top = torch.log_softmax(logits, -1).topk(5)
        out.append({"ids": top.indices.tolist(), "logprobs": top.values.tolist(), "prompt_tokens": int(batch["input_ids"].shape[1])})
    return out


if __name__ == "__main__":
    command, payload = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"make": make, "logprobs": logprobs}[command](payload)))
