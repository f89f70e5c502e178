"""Which visual tokens does a reference model (LLaVA or Qwen2.5-VL) need? The ceiling of any token-pruning pass on it.

    python -m models.bench.token_needs [--model tiny-llava] [--n 200] [--keep-ratio 0.333] [--json out.json]

Part 1 drops visual tokens by hand, with the task generator's object masks as an oracle, and answers
with the unmodified Hugging Face modules (vision features → LM with the kept tokens only, original
positions, greedy first answer token): all tokens; the tokens of every object plus a third of the
background; the object tokens only; the evidence objects' tokens only; all but one random token of an
evidence object. If "objects only" keeps the accuracy, a pass loses accuracy only by dropping object
tokens, and its *object-token recall* bounds its retention.

Part 2 measures that recall for HiPrune at ``--keep-ratio`` for each (object layer, deep layer) pair,
and for RandomPrune (PoolPrune averages tokens, so it keeps none as such): the share of object tokens (≥ 10% covered by an object) among the
kept ones, averaged over images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import vlmopt
from models.train import object_cells, token_cell
from vlmopt import reference
from vlmopt.adapters import adapter_for
from vlmopt.reference import processing, tasks
from vlmopt.viz import kept_tokens

MODES = ("all tokens", "objects + 1/3 background", "objects only", "evidence objects only", "all but one evidence token")


def answer_with(model, tokenizer, batch: dict, keep: np.ndarray) -> str:
    """Greedy first answer token when only visual tokens ``keep`` (indices into the image's tokens) reach
    the LM, each at its original position (Qwen2.5-VL: its M-RoPE (t, h, w) position)."""
    ids = batch["input_ids"][0]
    image_id = model.config.image_token_id
    qwen = "image_grid_thw" in batch
    with torch.inference_mode():
        if qwen:
            feats = model.get_image_features(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        else:
            feats = model.get_image_features(pixel_values=batch["pixel_values"])
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        embeds = model.get_input_embeddings()(ids).clone()
        visual = torch.nonzero(ids == image_id).flatten()
        embeds[visual] = feats.to(embeds.dtype)
        keep_mask = torch.ones(len(ids), dtype=torch.bool)
        keep_mask[visual] = False
        keep_mask[visual[torch.as_tensor(np.sort(keep), dtype=torch.long)]] = True
        if qwen:
            positions, _ = model.model.get_rope_index(
                batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"]
            )
            positions = positions[:, :, keep_mask]
        else:
            positions = torch.arange(len(ids))[keep_mask][None]
        hidden = model.model.language_model(inputs_embeds=embeds[keep_mask][None], position_ids=positions).last_hidden_state
        return tokenizer.convert_ids_to_tokens(int(model.lm_head(hidden[:, -1]).argmax()))


def object_tokens(sample: tasks.Sample, cell: int) -> np.ndarray:
    """Sorted indices of the visual tokens any object of the image covers (≥ 10%)."""
    return np.unique(np.concatenate(object_cells(sample, list(range(len(sample.objects[0]))), cell)))


def token_sets(sample: tasks.Sample, objects: np.ndarray, n_tokens: int, cell: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The visual tokens each mode of part 1 lets through; ``objects`` from :func:`object_tokens`."""
    evidence_ids = sorted({k for _, k in sample.evidence})
    evidence = np.unique(np.concatenate(object_cells(sample, evidence_ids, cell))) if evidence_ids else np.zeros(0, int)
    background = np.setdiff1d(np.arange(n_tokens), objects)
    everything = np.arange(n_tokens)
    return {
        "all tokens": everything,
        "objects + 1/3 background": np.union1d(objects, rng.choice(background, len(background) // 3, replace=False)),
        "objects only": objects,
        "evidence objects only": evidence if len(evidence) else objects[:1],
        "all but one evidence token": np.setdiff1d(everything, rng.choice(evidence, 1)) if len(evidence) else everything,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m models.bench.token_needs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llava", help="a reference model's name or directory")
    parser.add_argument("--n", type=int, default=200, help="test samples")
    parser.add_argument("--keep-ratio", type=float, default=1 / 3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = reference.load(args.model)
    task = reference.task_for(args.model, "shapes")
    kind = type(model).__name__
    if kind not in ("LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
        raise SystemExit(f"token_needs.py knows LLaVA and Qwen2.5-VL token grids; {args.model} is a {kind}")
    cell = token_cell(model)  # Qwen: one token per 2×2 merge group of 14 px patches
    side = model.config.vision_config.image_size if kind == "LlavaForConditionalGeneration" else task.config.size
    n_tokens = (side // cell) ** 2
    samples = task.samples("test", n=args.n)
    batches = [processing.encode(processor, [s]) for s in samples]
    objects = [object_tokens(s, cell) for s in samples]
    rng = np.random.default_rng(0)

    correct: dict[str, list[bool]] = {m: [] for m in MODES}
    for s, b, obj in zip(samples, batches, objects):
        for mode, keep in token_sets(s, obj, n_tokens, cell, rng).items():
            correct[mode].append(answer_with(model, processor.tokenizer, b, keep) == s.answer)
    token_share = float(np.mean([len(obj) / n_tokens for obj in objects]))
    part1 = {m: float(np.mean(v)) for m, v in correct.items()}
    print(f"## {args.model}: accuracy with hand-picked visual tokens (n = {args.n}; objects cover {100 * token_share:.1f}% of tokens)\n")
    print("| tokens reaching the LM | accuracy | retention |\n|---|---|---|")
    for m in MODES:
        print(f"| {m} | {100 * part1[m]:.1f}% | {100 * part1[m] / max(part1['all tokens'], 1e-9):.1f}% |")

    feature_block = adapter_for(model).feature_block
    candidates = [("hiprune (defaults)", vlmopt.passes.HiPrune(keep_ratio=args.keep_ratio))]
    for layer in range(feature_block + 1):
        candidates.append((f"hiprune object={layer} deep={layer}", vlmopt.passes.HiPrune(keep_ratio=args.keep_ratio, object_layer=layer, deep_layer=layer)))
    candidates.append(("random_prune", vlmopt.passes.RandomPrune(keep_ratio=args.keep_ratio)))  # pooling keeps no original token
    part2 = {}
    print(f"\n## object-token recall at keep_ratio={args.keep_ratio:.3f} (share of object tokens kept)\n")
    print("| pass | object-token recall |\n|---|---|")
    for label, p in candidates:
        compiled = vlmopt.compile(model, passes=[p])
        recall = []
        for b, obj in zip(batches, objects):
            kept = set(kept_tokens(compiled, dict(b)).kept[0].tolist())
            recall.append(np.mean([t in kept for t in obj]))
        part2[label] = float(np.mean(recall))
        print(f"| {label} | {100 * part2[label]:.1f}% |", flush=True)
    result = {"model": str(args.model), "n": args.n, "keep_ratio": args.keep_ratio, "object_token_share": token_share,
              "accuracy": part1, "object_token_recall": part2}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
