"""The three graphs an export writes, as ``nn.Module`` wrappers with example inputs and dynamic axes.

* ``vision``: pixels of **one** image at the export's fixed size → ``visual_embeds`` [T', D] (the
  tokens that reach the LLM, pruning included) and, after pruning, ``visual_index`` [T'] (each kept
  token's index among the image's T tokens, ascending). Static shapes: the layout is fixed.
* ``prefill``: ``input_ids`` [B, S], ``attention_mask`` [B, S], ``position_ids`` [B, S] (LLaVA) or
  [3, B, S] (M-RoPE), the adapter's ``export_sequence_inputs`` [B, S] (e.g. bidirectional image
  blocks), ``visual_embeds`` [T', D], ``visual_slots`` [T'] (flat ``b·S + s`` slot of each visual
  token), and after pruning ``sequence_index`` [B, S'] (planned in numpy) → ``logits``
  [B, 1, V] of the last position, ``kept_attention_mask`` [B, S'], ``present.{i}.key|value``
  [B, Hkv, S', Dh]. Dynamic B, S, S', T'.
* ``decode``: ``input_ids`` [B, 1], ``attention_mask`` [B, P + 1], ``position_ids`` [B, 1] or
  [3, B, 1], ``past.{i}.key|value`` [B, Hkv, P, Dh] → ``logits`` [B, 1, V],
  ``present.{i}.key|value`` [B, Hkv, P + 1, Dh]. Dynamic B, P.

A model cut inside the LLM (HalfV) caches a shorter sequence from each cut's layer K on: the prefill
also returns ``attention_mask_from_K`` [B, S'_K] (the 2-D mask of those layers) and their
``present`` are [B, Hkv, S'_K, Dh]; the decode graph takes ``attention_mask_from_K`` [B, P_K + 1],
and the ``past`` of those layers carry their own dynamic axis ``past_sequence_from_K`` (the first
segment's stays ``past_sequence``). The cut's layout-reading nodes are bound to one image per row
(:mod:`vlmopt.export.fixed_rows`).

The planned non-tensor inputs of the vision graph (the :class:`VisualLayout`, Qwen's window index,
``cu_seqlens``, rotary ids) are bound to constants of a one-image layout, so ``torch.export`` sees
static ints; leaves ``torch.export`` cannot trace are swapped for the adapter's export stand-ins
(:mod:`vlmopt.export.leaves`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from vlmopt import configs
from vlmopt.export.config import ExportConfig
from vlmopt.export.errors import ExportError, VerificationError
from vlmopt.export.fixed_rows import CORE_BINDINGS, bind_visual_rows
from vlmopt.export.kv import ExplicitKVStep, kv_names
from vlmopt.export.leaves import make_exportable
from vlmopt.export.split import (
    VISUAL_EMBEDS,
    VISUAL_INDEX,
    VISUAL_SLOTS,
    PrefillSplit,
    split_prefill,
)
from vlmopt.graph.edit import SEGMENT_MASK_PREFIX, segment_mask_inputs, segment_mask_name
from vlmopt.graph.probe import run_with_probes
from vlmopt.runtime import CompiledVLM

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class GraphSpec:
    """One graph to export."""

    name: str
    """``vision``, ``prefill`` or ``decode`` (the ONNX file is ``NAME.onnx``)."""
    module: nn.Module
    """Eval-mode wrapper whose ``forward(*inputs)`` takes the tensors of ``input_names`` in order."""
    input_names: list[str]
    output_names: list[str]
    example: tuple[Tensor, ...]
    """Example inputs (fresh random values) for tracing and for the onnxruntime check."""
    dynamic_shapes: tuple | None = None
    """``torch.export`` dynamic shapes, one entry per input (None: all static)."""
    reference: nn.Module | None = None
    """What onnxruntime must match (default: ``module``). The vision graph is checked against the
    graph with the HF modules, so the export stand-ins are checked too."""
    padding_masks: dict[str, str] = field(default_factory=dict)
    """Output → the output/input holding its [B, S] attention mask: slots of padding tokens are
    excluded from the check (their cache rows are never read, and differ between backends)."""


@dataclass
class FixedLayout:
    """The one-image layout an export is fixed to (written to the manifest)."""

    image_size: tuple[int, int]
    """(height, width) of the image in pixels."""
    tokens_per_image: int
    """Visual tokens of one image before pruning (T)."""
    kept_per_image: int
    """Visual tokens of one image that reach the LLM (T')."""
    pixel_shape: tuple[int, ...]
    """Shape of one image's ``pixel_values``."""
    grid_thw: tuple[int, int, int] | None = None
    """Native-resolution towers: the image's (t, h, w) patch grid (``image_grid_thw``)."""
    vision_constants: dict[str, Any] = field(default_factory=dict)
    """Values the vision graph's planned inputs are bound to."""
    row_layout: Any = None
    """The :class:`~vlmopt.graph.layout.VisualLayout` of one image's inputs as they reach the LLM (after
    the vision-stage passes): what an in-LLM cut bound to one image per row counts on."""


class VisionForExport(nn.Module):
    """The vision graph with its planned inputs bound to constants: ``forward(pixel_values)``."""

    def __init__(self, module: fx.GraphModule, constants: dict[str, Any]) -> None:
        super().__init__()
        self.graph_module = module
        self.python_constants = {k: v for k, v in constants.items() if not isinstance(v, Tensor)}
        self.tensor_names = [k for k, v in constants.items() if isinstance(v, Tensor)]
        for name in self.tensor_names:
            self.register_buffer(f"planned_{name}", constants[name], persistent=False)

    def forward(self, pixel_values: Tensor):
        bound = {name: getattr(self, f"planned_{name}") for name in self.tensor_names}
        return self.graph_module(pixel_values=pixel_values, **bound, **self.python_constants)


class StepForExport(nn.Module):
    """An :class:`ExplicitKVStep` taking its tensors positionally (the ONNX input order)."""

    def __init__(self, step: ExplicitKVStep, input_names: list[str], with_mask: bool) -> None:
        super().__init__()
        self.step = step
        self.input_names = list(input_names)
        self.with_mask = with_mask

    def forward(self, *tensors: Tensor):
        count = len(self.input_names)
        logits, mask, *rest = self.step(dict(zip(self.input_names, tensors[:count])), list(tensors[count:]))
        return (logits, mask, *rest) if self.with_mask else (logits, *rest)


def segment_first_layers(segments: list[str]) -> list[int]:
    """First decoder layer of each ``attention_mask_from_<K>`` segment, ascending."""
    return sorted(int(name.removeprefix(SEGMENT_MASK_PREFIX)) for name in segments)


def layer_masks(num_layers: int, first_layers: list[int], base: str) -> list[str]:
    """The 2-D mask each decoder layer's cache follows: ``base`` before the first cut, else
    ``attention_mask_from_<K>`` of the last cut K at or before it."""
    return [segment_mask_name(max(k for k in first_layers if k <= i)) if any(k <= i for k in first_layers) else base
            for i in range(num_layers)]


def export_bindings(compiled: CompiledVLM) -> dict:
    """The core's export bindings and every pass's (:meth:`~vlmopt.passes.base.Pass.export_bindings`), merged."""
    return {**CORE_BINDINGS, **{fn: bind for item in compiled.passes for fn, bind in item.export_bindings().items()}}


def one_image_batch(model: nn.Module, image_size: int, prompts: list[configs.PromptSpec], seed: int) -> dict:
    """Processor-like inputs with one image of ``image_size`` px per prompt (fresh random pixels and
    text), using the model's own special token ids."""
    from vlmopt.adapters import adapter_for

    grid = adapter_for(model).export_image_grid(image_size)
    return configs.synthetic_batch(model, prompts, image_grids=[grid] * len(prompts) if grid else None, seed=seed)


def fixed_layout(compiled: CompiledVLM, split: PrefillSplit, image_size: int, seed: int) -> tuple[FixedLayout, VisionForExport, Tensor]:
    """The one-image layout, the vision graph bound to it, and an example image's pixel values."""
    batch = one_image_batch(compiled.adapter.model, image_size, [configs.PromptSpec()], seed)
    prompt = compiled.plan(batch, for_generation=True)
    layout = prompt.layout
    constants = {name: prompt.inputs[name] for name in split.vision_inputs if name != "pixel_values"}
    if "visual_positions" in constants:  # slots = arange(T): the vision graph returns indices into the image
        constants["visual_positions"] = torch.arange(layout.total)
    pixels = prompt.inputs["pixel_values"]
    vision = VisionForExport(_vision_module(split, constants, compiled.adapter.export_leaves()), constants).eval()
    with torch.no_grad():
        outputs = vision(pixels)
    grid = tuple(int(v) for v in batch["image_grid_thw"][0]) if "image_grid_thw" in batch else None
    row_layout = layout
    for item in compiled.passes:
        row_layout = item.output_layout(row_layout)
    fixed = FixedLayout(
        image_size=(image_size, image_size),
        tokens_per_image=layout.total,
        kept_per_image=int(outputs[0].shape[0]),
        row_layout=row_layout,
        pixel_shape=tuple(pixels.shape),
        grid_thw=grid,
        vision_constants=constants,
    )
    return fixed, vision, pixels


def _vision_module(split: PrefillSplit, constants: dict[str, Any], stand_ins) -> fx.GraphModule:
    """A copy of the vision graph with export stand-ins swapped in (the split keeps the original)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(split.vision.graph, {}))
    module = fx.GraphModule(split.vision, graph, "vision")
    make_exportable(module, constants, stand_ins)
    return module


def build_graphs(compiled: CompiledVLM, processor: Any, config: ExportConfig) -> tuple[list[GraphSpec], FixedLayout, PrefillSplit]:
    """The vision, prefill and decode graphs of ``compiled``, with example inputs."""
    from torch.export import Dim

    bindings = export_bindings(compiled)
    split = split_prefill(compiled.graph["prefill"], bindings)
    image_size = compiled.adapter.export_image_size(processor, config.image_size)
    layout, vision_module, pixels = fixed_layout(compiled, split, image_size, config.seed)
    if split.row_bound:
        bind_visual_rows(split.llm, layout.row_layout, bindings)
    generator = torch.Generator().manual_seed(config.seed + 1)
    pixels = torch.randn(pixels.shape, generator=generator).to(pixels.dtype)

    vision_names = [VISUAL_EMBEDS] + ([VISUAL_INDEX] if split.pruned else [])
    vision = GraphSpec(
        "vision",
        vision_module,
        ["pixel_values"],
        vision_names,
        (pixels,),
        reference=VisionForExport(split.vision, layout.vision_constants).eval(),
    )

    text_config = compiled.config.get_text_config()
    num_layers = text_config.num_hidden_layers
    batch_dim = Dim("batch", min=1, max=config.max_batch)
    seq = Dim("sequence", min=1, max=config.max_sequence)
    kept = Dim("kept_sequence", min=1, max=config.max_sequence)
    visual = Dim("visual_tokens", min=1, max=config.max_batch * layout.kept_per_image)
    segments = segment_mask_names(compiled)
    first_layers = segment_first_layers(segments)
    pasts = {"attention_mask": Dim("past_sequence", min=1, max=config.max_sequence)}
    pasts.update({segment_mask_name(k): Dim(f"past_sequence_from_{k}", min=1, max=config.max_sequence) for k in first_layers})
    mrope = compiled.adapter.position_dims == (1, 2)
    positions = {1: batch_dim, 2: seq} if mrope else {0: batch_dim, 1: seq}

    prefill_inputs, example, pipeline_logits = _prefill_example(compiled, split, image_size, config.seed)
    prefill_shapes = {
        "input_ids": {0: batch_dim, 1: seq},
        "attention_mask": {0: batch_dim, 1: seq},
        "position_ids": positions,
        **{name: {0: batch_dim, 1: seq} for name in compiled.adapter.export_sequence_inputs},
        VISUAL_EMBEDS: {0: visual},
        VISUAL_SLOTS: {0: visual},
        **{p.name: {0: batch_dim, 1: kept} for p in split.planned},
    }
    present = kv_names("present", num_layers)
    step = ExplicitKVStep(split.llm, text_config, tuple(segments)).eval()
    prefill_masks = layer_masks(num_layers, first_layers, "kept_attention_mask")
    prefill = GraphSpec(
        "prefill",
        StepForExport(step, prefill_inputs, with_mask=True).eval(),
        prefill_inputs,
        ["logits", "kept_attention_mask", *segments, *present],
        tuple(example[name] for name in prefill_inputs),
        (tuple(prefill_shapes[name] for name in prefill_inputs),),
        padding_masks={name: prefill_masks[i // 2] for i, name in enumerate(present)},
    )

    with torch.no_grad():
        prefill_out = prefill.module(*prefill.example)
    if split.row_bound:
        _check_bound(split, prefill_out[0], pipeline_logits, config)
    decode_example = _decode_example(compiled, prefill_out, example, segments, config.seed)
    past_names = kv_names("past", num_layers)
    decode_masks = layer_masks(num_layers, first_layers, "attention_mask")
    decode_shapes = {
        "input_ids": {0: batch_dim},
        "position_ids": {1: batch_dim} if mrope else {0: batch_dim},
        **{name: {0: batch_dim, 1: past + 1} for name, past in pasts.items()},
        **{name: {0: batch_dim, 2: pasts[decode_masks[i // 2]]} for i, name in enumerate(past_names)},
    }
    decode_inputs = [*TEXT_INPUTS, *segments, *past_names]
    decode = GraphSpec(
        "decode",
        StepForExport(
            ExplicitKVStep(compiled.graph["decode"], text_config).eval(), [*TEXT_INPUTS, *segments], with_mask=False
        ).eval(),
        decode_inputs,
        ["logits", *present],
        tuple(decode_example[name] for name in decode_inputs),
        (tuple(decode_shapes[name] for name in decode_inputs),),
        padding_masks={name: decode_masks[i // 2] for i, name in enumerate(present)},
    )
    return [vision, prefill, decode], layout, split


def _prefill_example(compiled: CompiledVLM, split: PrefillSplit, image_size: int, seed: int):
    """LLM-graph inputs of a two-prompt, left-padded batch, cut from a run of the whole prefill graph."""
    specs = [configs.PromptSpec(text_before=3, text_after=5), configs.PromptSpec(text_before=6, text_after=11)]
    batch = one_image_batch(compiled.adapter.model, image_size, specs, seed + 2)
    prompt = compiled.plan(batch, for_generation=True)
    module = compiled.graph["prefill"]
    merge = next(n for n in module.graph.nodes if n.meta.get("role") == "merge")
    tokens, slots = merge.args[1], merge.args[2]
    wanted = {tokens.name, slots.name, *(p.name for p in split.planned)}
    with torch.no_grad():
        output, values = run_with_probes(
            module,
            {**prompt.inputs, "cache": compiled.new_cache(), "logits_to_keep": 1},
            lambda node: node.name in wanted,
        )
    extras = [name for name in split.llm_inputs if name in compiled.adapter.export_sequence_inputs]
    example = {name: prompt.inputs[name] for name in (*TEXT_INPUTS, *extras)}
    example[VISUAL_EMBEDS] = values[tokens.name]
    example[VISUAL_SLOTS] = values[slots.name] if slots.op != "placeholder" else prompt.inputs["visual_positions"]
    for planned in split.planned:
        example[planned.name] = values[planned.name]
    names = [*TEXT_INPUTS, *extras, VISUAL_EMBEDS, VISUAL_SLOTS, *(p.name for p in split.planned)]
    if [n for n in split.llm_inputs if n not in ("cache", "logits_to_keep")] != names:
        raise ExportError(f"unexpected LLM-graph inputs {split.llm_inputs}; expected {names}")
    return names, {name: value.contiguous() for name, value in example.items()}, output["logits"]


def segment_mask_names(compiled: CompiledVLM) -> list[str]:
    """``attention_mask_from_<K>`` of every cut inside the LLM, in layer order (none without a cut)."""
    names = segment_mask_inputs(compiled.graph["decode"])
    return [segment_mask_name(k) for k in segment_first_layers(names)]


def _check_bound(split: PrefillSplit, logits: Tensor, pipeline_logits: Tensor, config: ExportConfig) -> None:
    """The LLM graph with its layout nodes bound to one image per row must give the pipeline's logits."""
    error = float((logits.float() - pipeline_logits.float()).abs().max())
    if not error <= config.atol:
        raise VerificationError(
            f"the prefill graph with {', '.join(split.row_bound)} bound to one image per row differs from the pipeline "
            f"graph by {error:.3g} on the example prompt (atol={config.atol}); this is an exporter bug, please report it"
        )


def _decode_example(compiled: CompiledVLM, prefill_out, example: dict, segments: list[str], seed: int) -> dict:
    """Decode-step inputs continuing the example prefill (its cache as ``past``; fresh random tokens)."""
    _, mask, *rest = prefill_out
    segment_values, present = rest[: len(segments)], rest[len(segments) :]
    batch = mask.shape[0]
    generator = torch.Generator().manual_seed(seed + 3)
    vocab = compiled.config.get_text_config().vocab_size
    positions = example["position_ids"][..., -1:] + 1
    inputs = {
        "input_ids": torch.randint(0, vocab, (batch, 1), generator=generator),
        "attention_mask": torch.cat([mask, mask.new_ones((batch, 1))], dim=-1),
        "position_ids": positions.contiguous(),
    }
    for name, value in zip(segments, segment_values):
        inputs[name] = torch.cat([value, value.new_ones((batch, 1))], dim=-1)
    for index, name in enumerate(kv_names("past", len(present) // 2)):
        inputs[name] = present[index].contiguous()
    return inputs
