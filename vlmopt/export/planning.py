"""Input planning for the exported graphs, in numpy (the runtime loads no PyTorch module).

These mirror what the adapters compute in eager PyTorch before a graph runs — the same rules, so
the ONNX runtime's greedy tokens equal :meth:`CompiledVLM.generate`'s:

* :func:`generation_positions`: 1-D RoPE ids for ``generate`` (count of real tokens, padding at 0);
* :func:`mrope_positions`: Qwen2.5-VL's 3-D M-RoPE ids (HF ``get_rope_index`` for images);
* :func:`visual_slots`: flat ``b·S + s`` slots of each image's placeholder tokens;
* :func:`sequence_keep_index`: which slots survive pruning (``vlmopt::sequence_keep_index``);
* :data:`SEQUENCE_PLANNERS`: the adapters' extra prefill inputs (``Adapter.export_sequence_inputs``),
  e.g. :func:`image_blocks`, the image blocks of bidirectional attention.

All arrays are int64 numpy arrays; shapes are given per function.
"""

from __future__ import annotations

import numpy as np

from vlmopt.errors import InputError


def generation_positions(attention_mask: np.ndarray) -> np.ndarray:
    """[B, S] position ids as HF ``generate`` makes them: cumsum of the mask − 1, padding at 0."""
    positions = np.cumsum(attention_mask.astype(np.int64), axis=-1) - 1
    return np.where(attention_mask == 0, 0, positions).astype(np.int64)


def visual_slots(input_ids: np.ndarray, token_id: int, tokens_per_image: int) -> list[np.ndarray]:
    """Flat slots [T] of every image's placeholder tokens, one array per image (row-major order)."""
    slots = np.flatnonzero(input_ids.reshape(-1) == token_id).astype(np.int64)
    if slots.size % tokens_per_image:
        raise InputError(
            f"the prompt has {slots.size} image tokens, not a multiple of the {tokens_per_image} this export takes "
            "per image; build the prompt with the export's processor (the image must have the export's size)"
        )
    return [slots[i : i + tokens_per_image] for i in range(0, slots.size, tokens_per_image)]


def mrope_positions(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_types: np.ndarray,
    grids_thw: list[tuple[int, int, int]],
    merge_size: int,
) -> np.ndarray:
    """[3, B, S] M-RoPE ids of Qwen2.5-VL for prompts with images, as HF's ``get_rope_index``.

    Text runs count up on all three axes; an image of patch grid (t, h, w) takes (t, h/m, w/m)
    temporal/height/width ids offset by the position it starts at, and the text after it resumes
    at ``start + max(h, w) / m``. Padding slots get 0.
    """
    batch, seq = input_ids.shape
    out = np.zeros((3, batch, seq), dtype=np.int64)
    grids = iter(grids_thw)
    for row in range(batch):
        keep = attention_mask[row].astype(bool)
        types = token_types[row][keep]
        pieces, position, start = [], 0, 0
        while start < types.size:
            end = start
            while end < types.size and types[end] == types[start]:
                end += 1
            if types[start] == 0:
                pieces.append(np.broadcast_to(np.arange(end - start) + position, (3, end - start)))
                position += end - start
            else:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise InputError("the prompt has more image token runs than images") from None
                gh, gw = h // merge_size, w // merge_size
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                ids = np.stack([tt, hh, ww]).reshape(3, -1) + position
                if ids.shape[1] != end - start:
                    raise InputError(f"an image run of {end - start} tokens does not match its grid {(t, h, w)}")
                pieces.append(ids)
                position += max(h, w) // merge_size
            start = end
        out[:, row, keep] = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
    return out


def sequence_keep_index(all_slots: np.ndarray, kept_slots: np.ndarray, batch: int, seq_len: int) -> np.ndarray:
    """[B, S'] surviving positions of each row, ascending, right-aligned and left-padded with −1.

    ``all_slots`` [T] are the flat slots of every visual token, ``kept_slots`` [T'] those kept;
    text slots always survive. S' is the longest row's surviving length.
    """
    flags = np.ones(batch * seq_len, dtype=bool)
    flags[all_slots] = False
    flags[kept_slots] = True
    flags = flags.reshape(batch, seq_len)
    out_len = int(flags.sum(1).max())
    index = np.full((batch, out_len), -1, dtype=np.int64)
    for row in range(batch):
        kept = np.flatnonzero(flags[row])
        index[row, out_len - kept.size :] = kept
    return index


def image_blocks(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """[B, S] block id of every image token (0, 1, … for each run of image tokens in its row), −1 for
    every other token: the blocks inside which a prefill attends both ways (HF's
    ``get_block_sequence_ids_for_mask`` of the image token types)."""
    is_image = input_ids == image_token_id
    starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    return np.where(is_image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int64)


SEQUENCE_PLANNERS = {"image_blocks": image_blocks}
"""Planner name → ``planner(input_ids [B, S], image_token_id) -> [B, S]`` of an extra prefill input."""


def repetition_penalty(scores: np.ndarray, sequences: np.ndarray, penalty: float) -> np.ndarray:
    """HF's ``RepetitionPenaltyLogitsProcessor``: tokens already present are made less likely."""
    scores = scores.copy()
    for row in range(scores.shape[0]):
        ids = np.unique(sequences[row])
        picked = scores[row, ids]
        scores[row, ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return scores
