"""What the device and dtype audits run: every registered family, every registered pass, every stage.

A *flow* is how a user reaches a stage graph, through the public API: ``generate`` on a batch with
images (``prefill``, ``decode``) or text only (``prefill_text``, ``decode``), a stream (``prefill_text``,
``chunk``, then a question), a training step with its backward pass (``train_prefill``, ``train_text``).
Every family is audited on its first ``*-random`` config (``Adapter.configs``), every pass on
:func:`audit_configs`, so a new family or pass is audited without being listed here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import vlmopt
from vlmopt import configs
from vlmopt.adapters import families
from vlmopt.errors import IncompatiblePassError
from vlmopt.passes import REGISTRY, Pass, VisualTokenPrune
from vlmopt.passes.kv_stream import KVStreamPass

#: Passes whose defaults cannot run on a tiny model, or leave their method idle: the configs audited.
OVERRIDES: dict[str, Callable[[], tuple[Pass, ...]]] = {
    "apbv": lambda: (REGISTRY["apbv"](hosts=2, anchor_len=4, passing_len=4),),
    # gated from the first step (the defaults run 100 dense warm-up steps), with and without elision
    "regate": lambda: (REGISTRY["regate"](warmup_steps=0, dense_steps=0),
                       REGISTRY["regate"](warmup_steps=0, dense_steps=0, elide=True)),
}

#: The flows that reach each pass stage's graphs (no pass at all: every flow).
FLOWS = {"vision": ("generate", "text", "train"), "llm": ("generate", "text"), "kv": ("stream",), "train": ("train",)}
ALL_FLOWS = ("generate", "text", "train", "stream")
#: The stage graphs each flow runs.
STAGES = {
    "generate": {"prefill", "decode"},
    "text": {"prefill_text", "decode"},
    "train": {"train_prefill", "train_text"},
    "stream": {"prefill_text", "chunk", "decode"},
}
FRAMES, CHUNK_FRAMES, FRAME_SIZE = 8, 4, 56


def audit_configs(cls: type[Pass]) -> tuple[Pass, ...]:
    """The configs of a registered pass that the audits run: lossy, so its selection code runs."""
    if cls.name() in OVERRIDES:
        return OVERRIDES[cls.name()]()
    if issubclass(cls, VisualTokenPrune):
        return (cls(keep_ratio=0.5),)
    try:
        config = cls()
    except Exception as error:  # noqa: BLE001 - any refusal of the defaults
        raise AssertionError(
            f"{cls.__name__} has no default config ({error}); give the audits one in tests/device/flows.py OVERRIDES"
        ) from error
    if isinstance(config, KVStreamPass):  # the stream's budget is set per family (see run_stream)
        config = dataclasses.replace(config, chunk_frames=CHUNK_FRAMES)
    return (config,)


def family_configs() -> dict[str, str]:
    """Family name → its first random-weight config."""
    found = {}
    for cls in families():
        names = [name for name in cls.configs if name.endswith("-random")]
        assert names, f"{cls.__name__} has no *-random config in Adapter.configs: the audits need a tiny model of it"
        found[cls.family] = names[0]
    return found


def unsupported(family: str, passes: tuple[Pass, ...], flow: str) -> str | None:
    """Why ``compile`` refuses this case by design, or None: the family lacks a capability, or a pass's
    ``check`` refuses the model (an :class:`IncompatiblePassError`, as the README's support table reads
    it: APB-V on a family with sliding-window layers)."""
    cls = next(c for c in families() if c.family == family)
    needs = {need for p in passes for need in p.needs} | ({"stream"} if flow == "stream" else set())
    missing = sorted(needs - cls.capabilities)
    if missing:
        return f"{cls.__name__} has no {', '.join(missing)}: compile refuses this case"
    if passes:
        adapter = cls(configs.build(configs.CONFIGS[family_configs()[family]](), device="meta"))
        for i, config in enumerate(passes):
            try:
                config.check(adapter, passes[:i])
            except IncompatiblePassError as error:
                return f"{type(config).__name__} refuses {cls.__name__} by design: {error}"
    return None


FULL = os.environ.get("VLMOPT_FULL_AUDIT", "") not in ("", "0")
"""``VLMOPT_FULL_AUDIT=1``: every family × every pass config × each of its flows (what
``benchmarks/gpu_check.py`` runs); otherwise the quick audit of :func:`cases`."""
#: The family the quick audit runs with every pass config in every flow (a new pass is audited there).
EVERY_PASS_FAMILY = "llava"
#: What the quick audit runs on every other family: the flows without a pass, and HiPrune's and
#: HalfV's family-specific graph edits (the tower's Q/K, the LLM cut with the family's masks).
EVERY_FAMILY_FLOWS = ("generate", "train", "stream")
EVERY_FAMILY_PASSES = {"hiprune": "generate", "halfv": "generate"}


def cases(families_: tuple[str, ...] | None = None) -> Iterator[tuple[str, tuple[Pass, ...], str]]:
    """(family, pass list, flow). The quick audit (the test suite's): every pass config in each of its
    flows on :data:`EVERY_PASS_FAMILY`; on every other family the flows of :data:`EVERY_FAMILY_FLOWS`
    without a pass and the passes of :data:`EVERY_FAMILY_PASSES`, so its cost grows with families plus
    passes, not their product. With :data:`FULL`, the product. ``families_`` narrows the families."""
    for family in family_configs():
        if families_ is not None and family not in families_:
            continue
        every_pass = FULL or family == EVERY_PASS_FAMILY
        for flow in ALL_FLOWS if every_pass else EVERY_FAMILY_FLOWS:
            yield family, (), flow
        for cls in REGISTRY.values():
            if every_pass:
                for config in audit_configs(cls):
                    for flow in FLOWS[config.stage]:
                        yield family, (config,), flow
            elif cls.name() in EVERY_FAMILY_PASSES:
                yield family, audit_configs(cls)[-1:], EVERY_FAMILY_PASSES[cls.name()]


def case_id(case: tuple[str, tuple[Pass, ...], str]) -> str:
    family, passes, flow = case
    return f"{family}-{'+'.join(p.spec() for p in passes) or 'none'}-{flow}"


def build(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return configs.build(configs.CONFIGS[family_configs()[family]](), seed=0, dtype=dtype)


def batches(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(a left-padded batch of two prompts with an image each, a left-padded text-only batch of two)."""
    specs = [configs.PromptSpec(text_before=3, text_after=4), configs.PromptSpec(text_before=5, text_after=6)]
    images = configs.synthetic_batch(model, specs, seed=0)
    words = configs.random_text_ids(model.config, 7, torch.Generator().manual_seed(0))
    ids = torch.tensor([[configs.PAD_TOKEN] + words[:3], words[3:]])
    return images, {"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}


def labels_of(batch: dict[str, Tensor]) -> Tensor:
    """Labels [B, S]: the text tokens of the second half of every row (-100 elsewhere)."""
    ids = batch["input_ids"]
    text = batch["attention_mask"].bool() & (ids >= configs.FIRST_TEXT_TOKEN)
    if "mm_token_type_ids" in batch:
        text &= batch["mm_token_type_ids"] == 0
    late = torch.arange(ids.shape[1]) >= ids.shape[1] // 2
    return ids.masked_fill(~(text & late), -100)


def watch_stages(compiled, check: Callable[[str, dict[str, Any], Any], None]) -> list[str]:
    """Call ``check(stage, outputs, cache)`` after every stage graph ``compiled`` runs; returns the
    list the stages run are appended to."""
    seen: list[str] = []
    run_stage = compiled.run_stage

    def watched(stage, inputs, cache, logits_to_keep):
        out = run_stage(stage, inputs, cache, logits_to_keep)
        seen.append(stage)
        check(stage, out, cache)
        return out

    compiled.run_stage = watched
    return seen


def run_flow(
    family: str, model: nn.Module, passes: tuple[Pass, ...], flow: str, move: Callable[[Any], Any],
    check: Callable[[str, dict[str, Any], Any], None],
) -> dict[str, Any]:
    """Run ``flow`` on ``model`` compiled with ``passes``; ``move`` puts batches where the model is.
    Returns what the flow produced (token ids, losses, gradients) and ``stages``: the graphs it ran."""
    mode = "train" if flow == "train" else "infer"
    compiled = vlmopt.compile(model, passes=list(passes), mode=mode)
    seen = watch_stages(compiled, check)
    images, text = batches(model)
    if flow in ("generate", "text"):
        batch = move(images if flow == "generate" else text)
        result = {"ids": compiled.generate(**batch, max_new_tokens=2)}
    elif flow == "train":
        result = run_training(compiled, model, move, images, text)
    else:
        result = {"ids": run_stream(family, compiled, model)}
    result["stages"] = set(seen)
    return result


def run_training(compiled, model: nn.Module, move, images: dict, text: dict) -> dict[str, Any]:
    """A step on the image batch (twice with a train-stage pass: the second reads its state) and one
    on the text batch, each with its backward pass."""
    result: dict[str, Any] = {}
    again = (("image_again", images, [0, 1]),) if compiled.pass_states.states else ()
    for name, batch, samples in (("image", images, [0, 1]), *again, ("text", text, [2, 3])):
        labels = labels_of(batch)
        teacher = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))  # read by ReGATE
        out = compiled(**move(batch), labels=move(labels), sample_ids=samples, teacher_losses=move(teacher))
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        result[f"{name}_loss"] = out.loss.detach()
        result[f"{name}_logits_dtype"] = out.logits.dtype
        result[f"{name}_grads"] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return result


def run_stream(family: str, compiled, model: nn.Module) -> Tensor:
    """Frames appended chunk by chunk into a cache a few entries above the system prompt (so a kv pass
    evicts), then one question: the answer's token ids."""
    from vlmopt.stream.planning import planner_for

    named = configs.CONFIGS.named(family_configs()[family])
    processor = named.processor()
    prefix = planner_for(compiled, processor).prefix_ids("").shape[1]
    stream = compiled.stream(processor=processor, kv_budget=prefix + 8)
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    for first in range(0, FRAMES, CHUNK_FRAMES):
        stream.append(frames[first : first + CHUNK_FRAMES])
    return torch.tensor(stream.ask("what is there?", max_new_tokens=2).token_ids)
