"""The LM attention guide: question words and answer positions look at the visual tokens of the
objects concerned, with attention weights recomputed from the tapped layers' own Q/K projections
(the model itself runs SDPA)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from models.train.hooks import AttentionTap
from models.train.targets import answer_starts, object_cells
from vlmopt.reference.render import COLOURS, SHAPES


def guided_middle_layers(num_layers: int) -> list[int]:
    """The LM layers whose answer positions the attention guide points at the evidence: all but the
    first (it reads the question words) and the last, at least layer 1."""
    return list(range(1, max(2, num_layers - 1)))


def attribute_words(tokenizer) -> dict[int, tuple[str, str]]:
    """Token id → (attribute, value) for every colour and shape word (plurals included)."""
    words = {c: ("colour", c) for c in COLOURS}
    for shape in SHAPES:
        words[shape] = words[shape + ("es" if shape.endswith("s") else "s")] = ("shape", shape)
    vocab = tokenizer.get_vocab()
    return {vocab[w]: attr for w, attr in words.items() if w in vocab}


def lm_attention_rows(tap: AttentionTap, layer: int, key_mask: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R, H, L] causal attention weights (per head) of query ``positions`` of batch ``rows`` in LM
    decoder layer ``layer``, recomputed from its Q/K projections and rotary embedding exactly as the
    layer computes them (Llama, Qwen2 and Qwen3 layouts: Qwen3's per-head RMS norms of Q and K come
    before the rotary; grouped-query heads). ``key_mask`` [B, L] is the batch's attention mask (1 = real token)."""
    from transformers.models.llama.modeling_llama import rotate_half  # Qwen2's and Qwen3-VL's are the same function

    attn = tap.modules[layer]
    hidden, (cos, sin) = tap.inputs[layer]
    B, L, _ = hidden.shape
    d = attn.head_dim
    q_norm, k_norm = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else (torch.nn.Identity(), torch.nn.Identity())
    cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)  # [1, L, d] when positions are shared
    k = k_norm(attn.k_proj(hidden).view(B, L, -1, d)).transpose(1, 2)  # [B, KV, L, d]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    q = q_norm(attn.q_proj(hidden[rows, positions]).view(len(rows), -1, d))  # [R, H, d]
    q = q * cos[rows, positions][:, None] + rotate_half(q) * sin[rows, positions][:, None]
    kv, groups = k.shape[1], attn.num_key_value_groups
    q = q.view(len(rows), kv, groups, d)  # head h reads key head h // groups
    logits = q.new_empty(len(rows), kv, groups, L)
    for b in rows.unique().tolist():  # one product per sequence: no per-row copy of its keys
        sel = (rows == b).nonzero().squeeze(1)
        logits[sel] = torch.einsum("rkgd,kld->rkgl", q[sel], k[b])
    logits = logits.flatten(1, 2) * attn.scaling  # [R, H, L]
    allowed = key_mask[rows].bool() & (torch.arange(L)[None] <= positions[:, None])
    return torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)


def _head_weights(which: str, heads: int) -> torch.Tensor:
    """[heads] averaging weights over all heads, or over the first or the second half of them."""
    w = torch.zeros(heads)
    if which == "all":
        w[:] = 1.0
    elif which == "first":
        w[: heads // 2] = 1.0
    else:
        w[heads // 2 :] = 1.0
    return w / w.sum()


@dataclass(frozen=True)
class GuideRules:
    """How :func:`guide_loss` turns evidence into target attention (the ``guide_*`` fields of ``TrainConfig``)."""

    sink_families: tuple[str, ...] = ()
    """Families whose objects share the attention with a sink (``TrainConfig.guide_sink_families``)."""
    split_families: tuple[str, ...] = ()
    """Families whose two objects each get half of the heads (``TrainConfig.guide_split_families``)."""
    read_question: bool = False
    """Answer positions read their question's words in the first layer (``TrainConfig.guide_read_question``)."""
    sink_ratio: float = 1.0
    """Object attention per unit of the sink's (``TrainConfig.guide_sink_ratio``)."""
    split_question: bool = False
    """Split answers read their question split too (``TrainConfig.guide_split_question``)."""
    words_twice: bool = False
    """Question words are guided in the second layer too (``TrainConfig.guide_words_twice``)."""


GUIDE_KINDS = ("words", "first", "middle")
"""Kinds of guided positions: question words (first layer, or first two), answers reading their
question (first layer), answers looking at their evidence (middle layers)."""


@dataclass
class GuideTargets:
    """The guided (row, query position) pairs of one batch, per kind: for each, a [L] mask of the key
    positions of one region, the region's target attention mass and the heads it is asked of."""

    length: int
    """Sequence length L of the batch."""
    parts: dict = field(default_factory=lambda: {kind: [] for kind in GUIDE_KINDS})
    """Kind → list of (row, position, [L] mask, target, head set)."""
    positions: dict = field(default_factory=lambda: {kind: 0 for kind in GUIDE_KINDS})
    """Kind → how many query positions are guided (a position may have several regions)."""

    def add(self, kind: str, row: int, pos: int, regions: list[tuple[np.ndarray, float, str]]) -> None:
        """Guide query ``pos`` of ``row``: each region is (key positions, target mass, head set); no
        region: the position is not guided."""
        if not regions:
            return
        for keys, target, heads in regions:
            mask = np.zeros(self.length, np.float32)
            mask[keys] = 1.0
            self.parts[kind].append((row, pos, mask, target, heads))
        self.positions[kind] += 1


def evidence_regions(
    groups: list[np.ndarray], visual_pos: np.ndarray, sink_pos: int, family: str | None, rules: GuideRules
) -> list[tuple[np.ndarray, float, str]]:
    """The regions a position looking at the objects ``groups`` (visual-token indices per object) is
    guided to: with a sink (``rules.sink_families``), split between heads (``rules.split_families``,
    two objects), or the objects' union; [] when no object is on screen (unguided)."""
    cells = [c for c in groups if len(c)]
    if family in rules.sink_families:
        share = 1.0 / (1.0 + len(cells) * rules.sink_ratio)
        return [(visual_pos[c], rules.sink_ratio * share, "all") for c in cells] + [(np.array([sink_pos]), share, "all")]
    if family in rules.split_families and len(groups) == 2 and len(cells) == 2:
        return [(visual_pos[cells[0]], 1.0, "first"), (visual_pos[cells[1]], 1.0, "second")]
    if cells:
        return [(visual_pos[np.concatenate(cells)], 1.0, "all")]
    return []


def question_regions(asked: np.ndarray, family: str, rules: GuideRules) -> list[tuple[np.ndarray, float, str]]:
    """The regions an answer position reads its own question's words ``asked`` (positions) through, in
    the first layer; [] when ``rules.read_question`` is off or the question names nothing."""
    if not rules.read_question or not len(asked):
        return []
    if rules.split_question and family in rules.split_families and len(asked) >= 2:
        half = len(asked) // 2  # the first-named object's words come first in the question
        return [(asked[:half], 1.0, "first"), (asked[half:], 1.0, "second")]
    return [(asked, 1.0, "all")]


def collect_guide_targets(batch: dict, evidence, samples, visual_token_id: int, cell: int, words: dict, rules: GuideRules) -> GuideTargets:
    """Every guided position of a batch (see :func:`guide_loss`) with its regions."""
    labels, ids, attention_mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    targets = GuideTargets(ids.shape[1])
    for row, sample in enumerate(samples):
        row_ids = ids[row].numpy()
        visual_pos = np.flatnonzero(row_ids == visual_token_id)
        sink_pos = int(np.flatnonzero(attention_mask[row].numpy())[0])
        word_pos = np.flatnonzero(np.isin(row_ids, list(words)))
        if not sample.is_video:  # a word of a video question names objects in many frames: not guided
            objects = sample.objects[0]
            for pos in word_pos:
                kind, value = words[int(row_ids[pos])]
                named = object_cells(sample, [k for k, o in enumerate(objects) if getattr(o, kind) == value], cell)
                targets.add("words", row, pos, evidence_regions(named, visual_pos, sink_pos, None, rules))
        previous = 0
        for start, (family, groups) in zip(answer_starts(labels[row]), evidence[row]):
            targets.add("middle", row, start - 1, evidence_regions(groups, visual_pos, sink_pos, family, rules))
            asked = word_pos[(word_pos > previous) & (word_pos < start)]
            targets.add("first", row, start - 1, question_regions(asked, family, rules))
            previous = start
    return targets


def guide_cross_entropy(targets: GuideTargets, attention_rows, layers: dict[str, list[int]]) -> torch.Tensor:
    """Sum over regions of ``-target * log(attention mass on the region)`` (attention averaged over
    ``layers[kind]`` and over the region's heads), divided by the number of guided positions."""
    total, count = torch.zeros(()), 0
    for kind, parts in targets.parts.items():
        if not parts:
            continue
        rows, positions, masks, goals, heads = zip(*parts)
        r, p = torch.tensor(rows), torch.tensor(positions)
        attn = torch.stack([attention_rows(layer, r, p) for layer in layers[kind]]).mean(dim=0)  # [R, H, L]
        weights = torch.stack([_head_weights(which, attn.shape[1]) for which in heads])  # [R, H]
        mass = ((attn * torch.from_numpy(np.stack(masks))[:, None]).sum(-1) * weights).sum(-1)
        total = total - (torch.tensor(goals) * torch.log(mass + 1e-6)).sum()
        count += targets.positions[kind]
    return total / max(count, 1)


def guide_loss(
    attention_rows, num_layers: int, batch: dict, evidence, samples, visual_token_id: int, cell: int, words: dict,
    sink_families, split_families=(), read_question: bool = False, sink_ratio: float = 1.0,
    split_question: bool = False, words_twice: bool = False,
) -> torch.Tensor:
    """Attention guide: cross-entropy between a target attention distribution over regions and the
    attention mass on them (attention averaged over heads), averaged over guided positions.

    Two kinds of positions are guided. Every colour or shape word of a question, in the first layer
    (and the second with ``words_twice``), looks at the objects with that attribute (one hop: the
    query is the word itself). The position that predicts each answer, in the middle layers, looks at
    the answer's evidence objects. For a family in ``sink_families`` each of the k objects is a region
    with target r/(1 + k r) and the first real token (an attention sink) takes the rest (r =
    ``sink_ratio``; 1: 1/(k+1) each). For a family in ``split_families`` with two evidence objects
    (relative position: the first-named object, then the other) the first half of the heads put all
    their attention on the first object and the second half on the second, so the two objects'
    features (where each is) reach the answer apart instead of averaged. Otherwise the objects' union
    is one region with target 1 and a position with no object on screen is skipped. With
    ``read_question`` the position that predicts each answer also looks, in the first layer, at the
    colour and shape words of its own question (text tokens, not visual ones); with
    ``split_question`` too, an answer of a family in ``split_families`` reads them split like its
    objects: the first half of the heads the first-named object's words, the second half the other's.
    ``attention_rows(layer, rows, positions)`` gives [R, H, L] attention weights of those query
    positions; ``evidence[row]`` lists (family, visual-token indices of each evidence object) per
    answered turn (:func:`training_turns`).
    """
    rules = GuideRules(tuple(sink_families), tuple(split_families), read_question, sink_ratio, split_question, words_twice)
    targets = collect_guide_targets(batch, evidence, samples, visual_token_id, cell, words, rules)
    layers = {"words": [0, 1] if words_twice else [0], "first": [0], "middle": guided_middle_layers(num_layers)}
    return guide_cross_entropy(targets, attention_rows, layers)
