"""models/bench/token_needs.py: its hand-pruned forward is the model's own when every token is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.bench import token_needs
from vlmopt import reference
from vlmopt.reference import processing


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen25vl"])
def test_all_tokens_answer_is_generates_first_token(name):
    """With every visual token kept, ``answer_with`` (features → LM at the original positions; M-RoPE
    for Qwen) gives HF ``generate``'s first token, on random test samples."""
    model, processor = reference.load(name)
    task = reference.task_for(name, "shapes")
    start = int(np.random.default_rng().integers(0, 400))
    for sample in task.samples("test", n=3, start=start):
        batch = processing.encode(processor, [sample])
        n_visual = int((batch["input_ids"] == model.config.image_token_id).sum())
        mine = token_needs.answer_with(model, processor.tokenizer, batch, np.arange(n_visual))
        with torch.inference_mode():
            first = model.generate(**batch, max_new_tokens=1, do_sample=False)[0, -1]
        assert mine == processor.tokenizer.convert_ids_to_tokens(int(first))

