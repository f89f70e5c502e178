"""Can a reference model's vision tower learn to count, given the answer on every object token?

    python -m models.bench.tower_count --model tiny-qwen25vl [--scene tiny-llava] [--full-attention 0,1,2,3,4,5,6,7]
        [--steps 1500] [--json out.json]

Trains a freshly initialised vision tower (LLaVA: CLIP, read at the layer the projector reads; Qwen:
windowed ViT + 2×2 merger) alone, no LM, with the training recipe's probes on its visual tokens:
colour, shape, centre and, per object token, how many objects of the picture share its colour and
its shape (:func:`models.train.cell_targets`; classes 1, 2, 3, 4+). Every ``--every`` steps it
reports the held-out accuracy of the colour and the two count probes on the object tokens of 48
``validation`` pictures, against the majority count.

Colour is one patch's business; a count needs each object token to compare itself with every other
object in the picture, so it shows whether the tower's attention can aggregate over the whole image.
``--scene tiny-llava`` renders ``tiny-llava``'s 224 px scenes for either tower, so the two towers are
compared on the same pictures; ``--full-attention`` lists the Qwen blocks that attend over the whole
image instead of windows (shipped: 3 and 7).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models import train
from vlmopt.reference import processing, tasks


def tower_tokens(model, tap: train.VisionTap, qwen: bool, inputs: dict) -> torch.Tensor:
    """[N, D] the visual tokens the recipe's probes read (``tap`` on the tower picks them), in
    :func:`train.aux_targets` order."""
    if qwen:
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    else:
        model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    return tap.visual_tokens(model, qwen)


def count_curve(
    model_name: str, scene_of: str, full_attention: list[int] | None, steps: int, every: int = 100,
    batch_size: int = 8, lr: float = 1e-3, log=print,
) -> list[dict]:
    """Train the tower of ``model_name`` (seed 0) on ``scene_of``'s ``shapes`` pictures; one dict per
    evaluation: step, colour, same-colour and same-shape count accuracy, majority count rate."""
    model, processor, _ = train.build_model(model_name, seed=0)
    qwen = model_name == "tiny-qwen25vl"
    if full_attention is not None:
        if not qwen:
            raise ValueError("--full-attention lists Qwen tower blocks; the CLIP tower attends over the whole image everywhere")
        depth = model.config.vision_config.depth
        if any(not 0 <= b < depth for b in full_attention):
            raise ValueError(f"--full-attention {full_attention}: blocks are 0..{depth - 1}")
        model.model.visual.fullatt_block_indexes = full_attention
    tower = model.model.visual if qwen else model.model.vision_tower
    tap = train.VisionTap(tower)
    task = tasks.TASKS["shapes"](train.TASK_CONFIGS[scene_of]["shapes"])
    cell = train.token_cell(model)
    width = model.config.text_config.hidden_size if qwen else model.config.vision_config.hidden_size
    heads = train.AuxHeads(width, None, counts=True)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=0.05)

    def pictures(split: str, start: int, n: int):
        samples = [task.sample(split, start + i) for i in range(n)]
        return processing.encode(processor, samples), train.aux_targets(samples, cell)

    held_inputs, held_targets = pictures("validation", 0, 48)
    objects = held_targets[:, 0] > 0
    majority = torch.bincount(held_targets[objects, 5]).max().item() / int(objects.sum())
    curve, began = [], time.time()
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            tower.eval()
            with torch.no_grad():
                tokens = tower_tokens(model, tap, qwen, held_inputs)
                same_colour, same_shape = heads.counts(tokens).split(train.COUNT_CLASSES, -1)
                point = {
                    "step": step,
                    "colour": (heads.colour(tokens).argmax(-1)[objects] == held_targets[objects, 0]).float().mean().item(),
                    "same_colour_count": (same_colour.argmax(-1)[objects] == held_targets[objects, 5]).float().mean().item(),
                    "same_shape_count": (same_shape.argmax(-1)[objects] == held_targets[objects, 6]).float().mean().item(),
                    "majority_count": majority,
                }
            curve.append(point)
            log(
                f"step {step}: colour {point['colour']:.3f}, same-colour count {point['same_colour_count']:.3f} "
                f"(majority {majority:.3f}), same-shape count {point['same_shape_count']:.3f} ({time.time() - began:.0f} s)"
            )
            tower.train()
        if step == steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        inputs, targets = pictures("train", step * batch_size, batch_size)
        loss = sum(heads.terms(tower_tokens(model, tap, qwen, inputs), targets, None, None).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tap.remove()
    return curve


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.bench.tower_count", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(train.PRESETS))
    parser.add_argument("--scene", choices=sorted(train.TASK_CONFIGS), default=None, help="whose shapes pictures (default: the model's)")
    parser.add_argument("--full-attention", default=None, help="Qwen blocks with full attention, e.g. 0,1,2,3,4,5,6,7")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        parser.error("--steps and --every must be positive")
    torch.set_num_threads(args.threads)
    full = [int(b) for b in args.full_attention.split(",")] if args.full_attention else None
    curve = count_curve(args.model, args.scene or args.model, full, args.steps, args.every)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": args.model, "scene": args.scene or args.model, "full_attention": full, "threads": args.threads, "curve": curve}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
