"""The runtime's numpy planning equals what the adapters compute in PyTorch."""

from __future__ import annotations

import numpy as np
import torch

import vlmopt
from vlmopt import configs
from vlmopt.export import planning


def test_mrope_positions_match_hf_get_rope_index(qwen):
    specs = [configs.PromptSpec(text_before=2, text_after=6), configs.PromptSpec(text_before=7, text_after=3), configs.PromptSpec(images=2)]
    batch = configs.synthetic_batch(qwen, specs, image_grids=[(8, 8), (4, 8), (8, 4), (4, 4)], seed=5)
    expected, _ = qwen.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )
    got = planning.mrope_positions(
        batch["input_ids"].numpy(), batch["attention_mask"].numpy(), batch["mm_token_type_ids"].numpy(),
        [tuple(g) for g in batch["image_grid_thw"].tolist()], qwen.config.vision_config.spatial_merge_size,
    )
    np.testing.assert_array_equal(got, expected.numpy())


def test_generation_positions_match_the_adapter(llava_clip):
    batch = configs.synthetic_batch(llava_clip, [configs.PromptSpec(text_before=1), configs.PromptSpec(text_before=9)], seed=6)
    prompt = vlmopt.compile(llava_clip).plan(batch, for_generation=True)
    got = planning.generation_positions(batch["attention_mask"].numpy())
    np.testing.assert_array_equal(got, prompt.inputs["position_ids"].numpy())


def test_sequence_keep_index_matches_the_op():
    generator = torch.Generator().manual_seed(7)
    batch, seq = 3, 20
    visual = torch.cat([torch.arange(3, 11) + row * seq for row in range(batch)])
    kept = torch.cat([torch.sort(torch.randperm(8, generator=generator)[:k]).values + 3 + row * seq for row, k in enumerate((2, 5, 8))])
    got = planning.sequence_keep_index(visual.numpy(), kept.numpy(), batch, seq)
    out_len = got.shape[1]
    expected = torch.ops.vlmopt.sequence_keep_index(visual, kept, batch, seq, out_len)
    np.testing.assert_array_equal(got, expected.numpy())
    assert out_len == seq  # the row that keeps all 8 visual tokens keeps its full length


def test_repetition_penalty_matches_hf():
    from transformers.generation import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(8)
    scores = torch.randn(2, 30, generator=generator)
    sequences = torch.randint(0, 30, (2, 9), generator=generator)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(sequences, scores.clone())
    np.testing.assert_allclose(planning.repetition_penalty(scores.numpy(), sequences.numpy(), 1.3), expected.numpy(), rtol=1e-6)


def test_image_blocks_match_hf_block_ids():
    """Random rows of image and text tokens (several runs a row, left padding): HF's block ids of the image token types."""
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    rng = np.random.default_rng(8)
    ids = rng.integers(0, 4, (5, 40))
    ids[:, :3] = 0  # padding, not an image token
    expected = get_block_sequence_ids_for_mask(torch.from_numpy(ids == 3).long())
    got = planning.image_blocks(ids, 3)
    assert got.max() >= 2  # several blocks in a row
    np.testing.assert_array_equal(got, expected.numpy())
