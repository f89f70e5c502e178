"""The model card (``README.md``) of a reference model, written from the numbers in its ``eval.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from models.card_recipe import _losses_text, _schedule_text
from vlmopt.reference.scenes import ShapesConfig

TASK_TEXT = {
    "shapes": "one {size} px image; {lo}–{hi} small saturated shapes (circle, square, triangle, star, cross, diamond × red, "
    "orange, yellow, green, blue, purple; each inside a disc of radius {r0:.0f}–{r1:.0f} px, at most {share:.1f}% of the "
    "image) on a cluttered low-saturation background",
    "shapes-video": "streaming video (32–64 frames of 112 px): objects appear, move and leave; questions "
    "about the last frames (`now-*`) and about the first object that appeared (`first-*`)",
    "needle": "long video (64–128 frames of 112 px) of distractor objects; exactly one frame holds the object "
    "the question names (the only one of its colour / shape)",
}

ARCH_TEXT = {
    "tiny-llava": "`LlavaForConditionalGeneration`: CLIP vision tower (with CLS; features from layer -2, "
    "`default` strategy drops CLS) → 2-layer MLP projector → Llama decoder",
    "tiny-qwen25vl": "`Qwen2_5_VLForConditionalGeneration`: windowed ViT (full attention in the blocks listed "
    "in `fullatt_block_indexes`), 2×2 patch merger → Qwen2 decoder with M-RoPE",
    "tiny-qwen3vl": "`Qwen3VLForConditionalGeneration`: ViT with a learned absolute position grid (bilinearly "
    "interpolated to each image's) and full attention per image or frame, 2×2 patch merger, DeepStack (the blocks "
    "in `deepstack_visual_indexes` merged and added to the visual tokens after the first LM layers) → 12-layer "
    "Qwen3 decoder (Q/K norms) with interleaved M-RoPE",
}


IMAGE_TARGET = 0.90
"""Least overall accuracy on the ``shapes`` test split (n ≥ 500)."""
CONTROL_MARGIN = 0.10
"""Most points the text-only control may score above the majority-answer rate."""
VIDEO_TARGET = 0.80
"""Least accuracy over the video tasks (``tiny-qwen25vl``)."""
MODEL_TARGETS = {"tiny-qwen3vl": {"video": 0.85, "family": 0.75}}
"""Targets of a model that differ from the defaults: least video accuracy, least accuracy of every image
question family (``tiny-qwen3vl``'s, the deeper model's targets)."""


def targets(results: dict) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, met) for each of the project's targets, from an ``eval.json`` dict."""
    shapes = results["test"]["shapes"]
    full, control = shapes["full"], shapes["text_only"]
    majority = control["majority"]["overall"]
    rows = [
        ("images: overall accuracy (n ≥ 500)", full["accuracy"], f"≥ {_pct(IMAGE_TARGET)}",
         full["n"] >= 500 and full["accuracy"] >= IMAGE_TARGET),
        ("text-only control", control["accuracy"], f"≤ majority {_pct(majority)} + {round(100 * CONTROL_MARGIN)} points",
         control["accuracy"] <= majority + CONTROL_MARGIN),
    ]
    own = MODEL_TARGETS.get(results.get("model"), {})
    if "family" in own:
        family, worst = min(full["per_family"].items(), key=lambda item: item[1])
        rows.append((f"images: every question family (least: {family})", worst, f"≥ {_pct(own['family'])}", worst >= own["family"]))
    videos = [results["test"][t]["full"] for t in ("shapes-video", "needle") if t in results["test"]]
    if videos:
        goal = own.get("video", VIDEO_TARGET)
        accuracy = sum(v["accuracy"] * v["n"] for v in videos) / sum(v["n"] for v in videos)
        rows.append(("videos: accuracy", accuracy, f"≥ {_pct(goal)}", accuracy >= goal))
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(full: dict, control: dict | None) -> list[str]:
    header = "| family | accuracy | majority-answer rate |" + (" text-only control |" if control else "")
    rule = "|---|---|---|" + ("---|" if control else "")
    rows = [header, rule]
    for family, acc in full["per_family"].items():
        row = f"| {family} | {_pct(acc)} | {_pct(full['majority'][family])} |"
        if control:
            row += f" {_pct(control['per_family'][family])} |"
        rows.append(row)
    row = f"| **overall** | **{_pct(full['accuracy'])}** | {_pct(full['majority']['overall'])} |"
    if control:
        row += f" {_pct(control['accuracy'])} |"
    return rows + [row]


def _task_text(task: str, config: dict) -> str:
    """One line on ``task`` as configured for this model (``tasks.json``)."""
    if task != "shapes":
        return TASK_TEXT[task]
    config = config or dataclasses.asdict(ShapesConfig())
    size, (lo, hi), (r0, r1) = config["size"], config["objects"], config["radius"]
    share = 100 * math.pi * (r1 * size) ** 2 / size**2
    return TASK_TEXT[task].format(size=size, lo=lo, hi=hi, r0=r0 * size, r1=r1 * size, share=share)




STAGE_WORDS = {2: "Two", 3: "Three", 4: "Four", 5: "Five"}


def _training_commands(results: dict) -> list[str]:
    """The card's command block: the run's own command, preceded, for a fine-tune (``--init-from``), by the
    commands that trained the weights it started from, stage by stage, so the card gives the whole recipe
    (each stage's ``--init-from`` renamed to the previous stage's ``--out``)."""
    command, earlier = results["train_command"], list(results.get("init_from_commands", []))
    init_from = results["train_config"].get("init_from", "")
    if not init_from:
        return ["```", command, "```"]
    if not earlier:
        return [f"A fine-tune of the weights in `{init_from}`:", "", "```", command, "```"]
    stages = [*earlier, command]
    lines = []
    for i, stage in enumerate(stages):
        stage = re.sub(r"--init-from \S+", f"--init-from stage{i}", stage) if i else stage
        lines.append(stage if i == len(stages) - 1 else f"{stage} --out stage{i + 1}")
    count = STAGE_WORDS.get(len(stages), str(len(stages)))
    return [
        f"{count} stages: each trains the weights the next starts from (this run started from `{init_from}`); "
        "the last is this run, whose schedule and numbers this card gives:",
        "",
        "```",
        *lines,
        "```",
    ]


def write_card(out_dir: Path, results: dict) -> None:
    """Write ``out_dir/README.md`` from ``results`` (the ``eval.json`` dict)."""
    out_dir = Path(out_dir)
    weights = out_dir / "model.safetensors"
    size_mb = weights.stat().st_size / 2**20 if weights.exists() else float("nan")
    configs_file = out_dir / "tasks.json"
    task_configs = json.loads(configs_file.read_text()) if configs_file.exists() else {}
    lines = [
        *_intro_section(results["model"]),
        *_architecture_section(results, size_mb),
        *_prompt_section(results["model"]),
        *_training_section(results, task_configs, (out_dir / "TRAINING.md").exists()),
        *_accuracy_section(results),
        *_targets_section(results),
        *_validation_section(results),
    ]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def _intro_section(name: str) -> list[str]:
    """Title, what the model is, and how to load it."""
    return [
        f"# {name}",
        "",
        f"A small {ARCH_TEXT[name]}, trained from random initialisation by vlmopt on seeded synthetic "
        "tasks whose one-word answers depend on a few visual tokens. It is a reference model for measuring "
        "how much accuracy visual-token pruning loses; it knows nothing outside these tasks.",
        "",
        "```python",
        "from vlmopt import reference",
        f'model, processor = reference.load("{name}")          # from_pretrained, offline',
        f'task = reference.task_for("{name}", "shapes")',
        "inputs = reference.processing.encode(processor, [task.samples('test', n=1)[0]])",
        "```",
        "",
    ]


def _architecture_section(results: dict, size_mb: float) -> list[str]:
    """Parameter count, weight file size and every architecture setting."""
    return [
        "## Architecture",
        "",
        f"{results['parameters'] / 1e6:.2f}M parameters, float32 weights ({size_mb:.1f} MiB `model.safetensors`).",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| `{k}` | {v} |" for k, v in results["arch"].items()],
        "",
    ]


def _prompt_section(name: str) -> list[str]:
    """The prompt format the model was trained on (and, for Qwen, how its videos are processed)."""
    lines = ["## Prompt", ""]
    if name == "tiny-llava":
        return lines + [
            "`USER: <image>\\n{question} ASSISTANT:` → ` {answer}</s>` (the tokenizer adds `<s>`; the processor "
            "expands `<image>` to 256 tokens). The processor's chat template produces the same text.",
            "",
        ]
    if name == "tiny-qwen3vl":
        return lines + [
            "`<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n` "
            "→ `{answer}<|im_end|>`. 448 px images give 32×32 patches of 14 px → 256 merged tokens. A video's "
            "`<|vision_start|><|video_pad|><|vision_end|>` becomes, per temporal patch (2 frames at 2 fps), "
            "`<{t:.1f} seconds><|vision_start|>` + 16 `<|video_pad|>` + `<|vision_end|>`, as `Qwen3VLProcessor` writes it "
            "(the word-level tokenizer splits the timestamps into `<`, digits, `.`, `seconds`, `>`).",
            "",
            "Videos: transformers' `Qwen3VLVideoProcessor` needs torchvision. Without it, `vlmopt.reference.load` / "
            "`processing.load_processor` build `Qwen3VLProcessor` without the video processor, and `processing.encode` "
            "makes `pixel_values_videos`, `video_grid_thw` and the timestamped prompt with the HF layout "
            "(checked against the HF source in `tests/reference/test_processing.py`). With torchvision installed, "
            "`AutoProcessor.from_pretrained` loads the full processor from these files (pass the clip's "
            "`video_metadata`: fps 2, every frame).",
            "",
        ]
    return lines + [
        "`<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n` "
        "→ `{answer}<|im_end|>` (`<|video_pad|>` for videos). 448 px images give 32×32 patches → 256 merged "
        "tokens; 112 px video frames give 16 tokens per frame pair.",
        "",
        "Videos: transformers' `Qwen2VLVideoProcessor` needs torchvision. Without it, `AutoProcessor` "
        "cannot build `Qwen2_5_VLProcessor` at all; `vlmopt.reference.load` / `processing.load_processor` then "
        "build it without the video processor, and `processing.encode` makes `pixel_values_videos`, "
        "`video_grid_thw` and `second_per_grid_ts` with the HF layout (`processing.qwen_video_inputs`, "
        "checked against the HF source in `tests/reference/test_processing.py`). With torchvision installed, "
        "`AutoProcessor.from_pretrained` loads the full processor from these files.",
        "",
    ]


def _training_section(results: dict, task_configs: dict, training_notes: bool) -> list[str]:
    """The commands that trained the model, its schedule and losses in prose, wall time and tasks
    (``training_notes``: the directory has a ``TRAINING.md``, which the section points to)."""
    notes = ["`TRAINING.md` says what each training option was measured to do.", ""] if training_notes else []
    return [
        "## Training",
        "",
        *_training_commands(results),
        "",
        _schedule_text(results["train_config"]) + _losses_text(results["train_config"], results["model"]),
        "",
        *notes,
        f"Wall time: {results['train_minutes']:.1f} min of training + {results['eval_minutes']:.1f} min of "
        f"evaluation ({results['machine']}).",
        "",
        "Tasks:",
        "",
        *[f"- `{t}`: {_task_text(t, task_configs.get(t, {}))}." for t in results["test"]],
        "",
    ]










def _accuracy_section(results: dict) -> list[str]:
    """Per task, the accuracy table per question family and the commands that measure it."""
    name = results["model"]
    lines = [
        "## Accuracy (test split)",
        "",
        "Greedy `generate(max_new_tokens=3)`, first word compared with the answer (`tasks.score`). The "
        "text-only control replaces the picture by a uniform grey one of the same size.",
        "",
    ]
    for task, entry in results["test"].items():
        full = entry["full"]
        control = entry.get("text_only")
        lines += [
            f"### `{task}` (n = {full['n']})",
            "",
            *_table(full, control),
            "",
            "```",
            f"python -m vlmopt.reference.evaluate --model {name} --task {task} --n {full['n']}",
        ]
        if control:
            lines.append(f"python -m vlmopt.reference.evaluate --model {name} --task {task} --n {full['n']} --text-only")
        lines += ["```", ""]
    return lines


def _targets_section(results: dict) -> list[str]:
    """The project's targets, measured, and what it means to ship below them."""
    checks = targets(results)
    lines = [
        "### Project targets",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
        *[f"| {what} | {_pct(value)} | {goal} | {'yes' if met else '**no**'} |" for what, value, goal, met in checks],
        "",
    ]
    if not all(met for *_, met in checks):
        lines += [
            "This model does **not** meet every target yet: it is shipped as a preliminary reference (its "
            "answers do depend on the image, see the text-only control), and the numbers measured on it "
            "say so wherever they are reported.",
            "",
        ]
    return lines + [
        "`eval.json` holds these numbers, the validation curve and a fixed small test set "
        "(`fixed`: first test samples, with each prediction) that `tests/reference` re-checks.",
        "",
    ]


def _validation_section(results: dict) -> list[str]:
    """The validation curve recorded during training."""
    lines = [
        "## Validation during training",
        "",
        "| step | minutes | " + " | ".join(results["test"]) + " |",
        "|---|---|" + "---|" * len(results["test"]),
    ]
    for point in results["history"]:
        cells = [_pct(point[t]) if t in point else "–" for t in results["test"]]
        lines.append(f"| {point['step']} | {point['minutes']} | " + " | ".join(cells) + " |")
    return lines
