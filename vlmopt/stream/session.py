"""``Stream``: frames arrive over time, the KV cache is the memory, questions come at any moment.

``CompiledVLM.stream(system_prompt, processor)`` makes one. The system prompt is prefilled once and
never evicted; :meth:`Stream.append` encodes frames chunk by chunk through the ``chunk`` stage graph
(a prefill on a filled cache, whose positions continue the video), where a kv-stage pass (HERMES,
the eviction baselines) keeps each layer within its budget; :meth:`Stream.ask` prefills the question
on the cache, decodes greedily (no re-encoding of the past), then removes the question and answer from
the cache and remembers them (they condition the next compression's pseudo-queries).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlmopt.errors import IncompatiblePassError, InputError, PassConfigError
from vlmopt.generation import GenerationSettings, TokenChooser
from vlmopt.stream import functions as sf
from vlmopt.stream.planning import as_frames, planner_for


@dataclass
class Answer:
    """What :meth:`Stream.ask` returns."""

    text: str
    """The decoded answer (special tokens skipped)."""
    token_ids: list[int]
    """The generated token ids (the end token included when generated)."""
    ttft_ms: float
    """Milliseconds from the question's prefill to the first token."""
    visual_tokens: int
    """Visual entries per layer in the cache when the question was asked."""
    cache_tokens: int = 0
    """Cache entries per layer (system prompt included) when the question was asked."""


@dataclass
class _State:
    cache: object
    positions: Tensor
    """[L, P, N] position ids of every layer's cache entries."""
    prefix: int
    frames: int = 0
    history: list[tuple[str, str]] = field(default_factory=list)
    kv_bytes_per_chunk: list[int] = field(default_factory=list)


def ensure_chunk_stage(compiled) -> None:
    """Capture the ``chunk`` stage on first use when ``compile`` had no kv-stage pass to capture it for."""
    if "chunk" in compiled.stages:
        return
    from vlmopt.graph.capture import capture

    module = capture(compiled.adapter.prefill_pipeline(), "chunk")
    compiled.graph.stages["chunk"] = module
    compiled.stages["chunk"] = module


class Stream:
    """A video stream answered from the KV cache (see the module docstring)."""

    def __init__(self, compiled, system_prompt: str = "", processor=None, kv_budget: int | None = None) -> None:
        others = [p for p in compiled.passes if p.stage != "kv"]
        if others:
            raise IncompatiblePassError(
                f"stream() runs kv-stage passes only; {', '.join(type(p).__name__ for p in others)} rewrite the "
                "one-shot prefill; compile the streaming model without them"
            )
        if processor is None:
            processor = _processor_of(compiled)
        self.compiled = compiled
        self.processor = processor
        self.kv_pass = next((p for p in compiled.passes if p.stage == "kv"), None)
        self.kv_budget = kv_budget if kv_budget is not None else getattr(self.kv_pass, "kv_budget", None)
        self.system_prompt = system_prompt
        self.planner = planner_for(compiled, processor)
        # planners build on the CPU (tokenizer, image processor); the graphs read on the model's device
        self.device = next(compiled.parameters()).device
        ensure_chunk_stage(compiled)
        self.layers = compiled.config.get_text_config().num_hidden_layers
        self.reset()

    # ----- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every frame and question: the cache holds the system prompt again."""
        ids = self.planner.prefix_ids(self.system_prompt).to(self.device)
        prefix = ids.shape[1]
        if self.kv_pass is not None and self.kv_budget <= prefix:
            raise PassConfigError(
                f"kv_budget={self.kv_budget} does not exceed the system prompt's {prefix} tokens, which are never "
                f"evicted; raise kv_budget above {prefix} or shorten the system prompt"
            )
        self.planner.reset(prefix)
        cache = self.compiled.new_cache()
        positions = self.planner.text_positions(0, prefix).to(self.device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": self._graph_positions(positions)}
        with torch.no_grad():
            self.compiled.run_stage("prefill_text", inputs, cache, logits_to_keep=1)
        layer_positions = positions.reshape(positions.shape[0], -1)[None].expand(self.layers, -1, -1).contiguous()
        self.state = _State(cache, layer_positions, prefix)

    def _graph_positions(self, positions: Tensor) -> Tensor:
        """[3, 1, n] (M-RoPE) or [1, n] position ids for the graphs, on the model's device."""
        positions = positions.to(self.device)
        return positions if self.planner.position_axes == 3 else positions.reshape(1, -1)

    @property
    def cache_length(self) -> int:
        return int(self.state.positions.shape[2])

    @property
    def visual_tokens(self) -> int:
        """Visual entries per layer in the cache now."""
        return self.cache_length - self.state.prefix

    @property
    def kv_bytes_per_chunk(self) -> list[int]:
        """KV-cache bytes after each chunk appended so far."""
        return list(self.state.kv_bytes_per_chunk)

    def memory(self) -> dict:
        """``{"total": bytes, "tiers": {tier: bytes}, "layers": [bytes per layer]}`` of the KV cache."""
        per_layer = [int(layer.keys.nbytes + layer.values.nbytes) for layer in self.state.cache.layers]
        names = self.kv_pass.tiers(self.layers) if self.kv_pass is not None else ["full"] * self.layers
        tiers: dict[str, int] = {}
        for name, size in zip(names, per_layer):
            tiers[name] = tiers.get(name, 0) + size
        return {"total": sum(per_layer), "tiers": tiers, "layers": per_layer}

    # ----- frames -----------------------------------------------------------------------------
    @torch.no_grad()
    def append(self, frames, timestamps=None) -> None:
        """Encode ``frames`` (list of PIL images or uint8 [T, H, W, 3]) into the cache, chunk by chunk;
        ``timestamps`` (seconds, one per frame, non-decreasing) place them in time (default: the video's fps)."""
        frames = as_frames(frames)
        self.planner.check(frames)
        if timestamps is not None:
            timestamps = [float(t) for t in timestamps]
            if len(timestamps) != frames.shape[0] or any(b < a for a, b in zip(timestamps, timestamps[1:])):
                raise InputError(
                    f"timestamps must give one non-decreasing time (seconds) per frame: {len(timestamps)} for "
                    f"{frames.shape[0]} frames"
                )
        unit, first_patch, count = self.planner.frame_multiple, self.planner.patches, frames.shape[0]
        patches = [first_patch + i for i in range(count // unit)]
        if self.kv_pass is not None:  # a pass may drop whole patches before encoding (uniform frame sampling)
            patches = [p for p in patches if self.kv_pass.keeps_patch(p)]
            rows = [(p - first_patch) * unit + i for p in patches for i in range(unit)]
            frames = frames[rows]
            timestamps = None if timestamps is None else [timestamps[r] for r in rows]
        step = self.kv_pass.chunk_frames if self.kv_pass is not None else max(frames.shape[0], 1)
        for first in range(0, frames.shape[0], step):
            times = None if timestamps is None else timestamps[first : first + step]
            self._append_chunk(frames[first : first + step], times, patches[first // unit : (first + step) // unit])
        self.planner.patches = first_patch + count // unit
        self.state.frames += count

    def _append_chunk(self, frames, timestamps, patches) -> None:
        state = self.state
        inputs, positions = self.planner.chunk(frames, self.cache_length, timestamps, patches)
        inputs = {name: value.to(self.device) if isinstance(value, Tensor) else value for name, value in inputs.items()}
        positions = positions.to(self.device)
        all_positions = torch.cat([state.positions, positions[None].expand(self.layers, -1, -1)], dim=2)
        if self.kv_pass is not None:
            inputs.update(self.kv_pass.chunk_inputs(self, all_positions))
        out = self.compiled.run_stage("chunk", inputs, state.cache, logits_to_keep=1)
        state.positions = out.get("cache_positions", all_positions)
        if "kept_positions" in out and not torch.equal(out["kept_positions"], state.positions):
            self.planner.after_reindex(state.positions)
        state.kv_bytes_per_chunk.append(self.memory()["total"])

    # ----- what a kv pass reads (KVStreamPass.query_inputs) ----------------------------------
    @property
    def history(self) -> list[tuple[str, str]]:
        """The (question, answer) pairs asked so far, oldest first."""
        return list(self.state.history)

    def text_ids(self, text: str) -> Tensor:
        """[1, n] token ids of ``text`` (no special tokens added), as the stream's prompts tokenise."""
        return self.planner.text(text).to(self.device)

    def text_positions(self, count: int) -> Tensor:
        """Graph position ids of ``count`` text tokens written after the frames so far."""
        planner = self.planner
        return self._graph_positions(planner.text_positions(planner.text_start(), count))

    # ----- questions --------------------------------------------------------------------------
    @torch.no_grad()
    def ask(self, question: str, max_new_tokens: int = 16) -> Answer:
        """Answer ``question`` from the cache (greedy), then drop it and its answer from the cache."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("ask() needs a non-empty question string")
        if self.state.frames == 0:
            raise InputError("ask() before any frame: append() frames to the stream first")
        settings = GenerationSettings.resolve(self.compiled.generation_config, max_new_tokens=max_new_tokens, do_sample=False)
        compiled, state, planner = self.compiled, self.state, self.planner
        length = self.cache_length
        ids = planner.question_ids(question).to(self.device)
        chooser = TokenChooser(settings, 1, ids.device)
        sequences, generated = ids, []
        try:
            began = time.perf_counter()
            # visual features the one-shot prompt holds between the frames and the question (a video's
            # closing newline): written now, so no kv-stage pass ever scores them, and removed with the question
            prelude = planner.prelude(state.cache, length)
            start = planner.text_start() + prelude
            mask = torch.ones(1, length + prelude + ids.shape[1], dtype=torch.long, device=self.device)
            inputs = {"input_ids": ids, "attention_mask": mask,
                      "position_ids": self._graph_positions(planner.text_positions(start, ids.shape[1]))}
            out = compiled.run_stage("prefill_text", inputs, state.cache, logits_to_keep=1)
            position = start + ids.shape[1]
            for step in range(settings.max_new_tokens):
                token = chooser(sequences, out["logits"])
                if step == 0:
                    ttft = (time.perf_counter() - began) * 1000
                generated.append(int(token))
                sequences = torch.cat([sequences, token[:, None]], dim=-1)
                if chooser.done or step == settings.max_new_tokens - 1:
                    break
                mask = torch.cat([mask, mask.new_ones((1, 1))], dim=-1)
                step_inputs = compiled.adapter.decode_inputs(
                    token[:, None], mask, self._graph_positions(planner.text_positions(position, 1))
                )
                out = compiled.run_stage("decode", step_inputs, state.cache, logits_to_keep=1)
                position += 1
        finally:
            sf.truncate_cache(state.cache, length)
        text = self.processor.tokenizer.decode(generated, skip_special_tokens=True).strip()
        state.history.append((question, text))
        return Answer(text, generated, ttft, self.visual_tokens, length)


def _processor_of(compiled):
    from vlmopt.reference.processing import load_processor

    path = getattr(compiled.adapter.model.config, "_name_or_path", "") or ""
    try:
        return load_processor(path)
    except Exception as error:  # noqa: BLE001 - any failure means: no processor beside the weights
        raise InputError(
            f"stream() needs the model's processor: none loads from {path!r}; pass processor=..."
        ) from error
