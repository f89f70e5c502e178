"""``CompiledVLM``: runs the rewritten pipeline graphs like the HF model they came from."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlmopt.errors import InputError
from vlmopt.generation import GenerationSettings, TokenChooser
from vlmopt.graph.edit import segment_mask_inputs

if TYPE_CHECKING:
    from vlmopt.adapters.base import Adapter, Prompt
    from vlmopt.graph.pipeline import VLMGraph
    from vlmopt.passes.base import Pass

BACKENDS = ("eager", "inductor", "torch_tensorrt")

#: Text inputs every compiled model reads; the adapter adds its family's (``Adapter.batch_keys``).
TEXT_KEYS = ("input_ids", "attention_mask", "position_ids")


class CompiledVLM(nn.Module):
    """A VLM whose prefill and decode run as rewritten FX graphs.

    It shares its weights with the model it was compiled from (no copy; moving one moves both) and
    never changes that model's behaviour. ``forward`` is a prefill returning what HF's forward
    returns; ``generate`` returns token ids like HF's ``generate`` (prompt + new tokens).
    """

    def __init__(
        self, model: nn.Module, adapter: Adapter, graph: VLMGraph, passes: list[Pass], backend: str, training: bool = False
    ) -> None:
        super().__init__()
        self.graph = graph
        self.passes = tuple(passes)
        self.backend = backend
        self.training_graph = training
        self.stages = nn.ModuleDict(graph.stages)
        self.adapter = adapter
        self.config = model.config
        self.generation_config = model.generation_config
        self._runners: dict[str, Any] = {}
        if training:
            from vlmopt.train.step import PassStates

            self.pass_states = PassStates(self.passes)
        if backend == "torch_tensorrt":
            from vlmopt.export.torch_trt import require_torch_tensorrt

            require_torch_tensorrt()

    def pass_state(self, name: str):
        """The training state of the train-stage pass ``name`` (``mode="train"`` only); it is also
        in ``state_dict()`` (``pass_states._extra_state``), so saving and loading it resumes a run."""
        states = getattr(self, "pass_states", None)
        if states is None or name not in states.states:
            raise KeyError(f"no train-stage pass {name!r} with a state in this compiled model")
        return states.states[name]

    @property
    def lossless(self) -> bool:
        """Is every pass bit-exact as configured (so outputs equal the HF model's)? True with no passes."""
        return all(p.is_lossless for p in self.passes)

    @property
    def query_aware(self) -> bool:
        """Does any pass read the question (so a prefix cannot be reused across questions)?"""
        return any(p.query_aware for p in self.passes)

    def describe_passes(self) -> str:
        """The passes as specs, with what they promise: ``random_prune:keep_ratio=0.5 (lossy, query-agnostic)``."""
        specs = ", ".join(p.spec() for p in self.passes) or "no passes"
        kinds = ("lossless" if self.lossless else "lossy", "query-aware" if self.query_aware else "query-agnostic")
        return f"{specs} ({', '.join(kinds)})"

    def __repr__(self) -> str:
        return f"CompiledVLM({type(self.adapter.model).__name__}; {self.describe_passes()}; backend={self.backend})"

    # ----- running the graphs ------------------------------------------------------------------
    def run_stage(self, stage: str, inputs: dict[str, Any], cache, logits_to_keep: int) -> dict[str, Tensor]:
        """Run one stage graph (``prefill``, ``prefill_text`` or ``decode``) on planned inputs."""
        runner = self._runners.get(stage)
        if runner is None:
            runner = self.stages[stage]
            if self.backend == "inductor":
                runner = torch.compile(runner, backend="inductor")
            elif self.backend == "torch_tensorrt":
                from vlmopt.export.torch_trt import compile_stage

                runner = compile_stage(runner)
            self._runners[stage] = runner
        try:
            return runner(**inputs, cache=cache, logits_to_keep=logits_to_keep)
        except Exception as error:
            for item in self.passes:  # a pass running collectives tells the other processes first
                item.stage_failed(error)
            raise

    def new_cache(self):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.config.get_text_config())

    def plan(self, batch: dict[str, Any], for_generation: bool = False) -> Prompt:
        """Plan a batch of processor outputs for the graphs (see the adapter's ``plan``)."""
        known = TEXT_KEYS + self.adapter.batch_keys
        unknown = sorted(k for k, v in batch.items() if v is not None and k not in known)
        if unknown:
            raise InputError(
                f"unsupported inputs {unknown}; a compiled {type(self.adapter.model).__name__} reads {', '.join(known)} "
                "(everything else is refused, never ignored)"
            )
        if batch.get("input_ids") is None or batch["input_ids"].dim() != 2:
            raise InputError("input_ids [batch, sequence] are required (pass the processor's outputs)")
        prompt = self.adapter.plan({k: v for k, v in batch.items() if v is not None}, for_generation)
        for item in self.passes:  # inputs a pass plans in eager Python (APB-V's host split)
            prompt.inputs.update(item.plan_inputs(prompt, self))
        return prompt

    def visual_tokens_kept(self, prompt: Prompt) -> int:
        """Visual tokens that reach the LLM for a planned batch (from the passes' layouts, no run)."""
        layout = prompt.layout
        if layout is None:
            return 0
        for item in self.passes:
            layout = item.output_layout(layout)
        return layout.total

    def stream(self, system_prompt: str = "", processor=None, kv_budget: int | None = None):
        """A :class:`vlmopt.stream.Stream`: append frames as they arrive, ask questions from the cache.
        ``processor`` defaults to the one saved beside the model; ``kv_budget`` overrides the kv pass's."""
        from vlmopt.stream import Stream

        return Stream(self, system_prompt, processor, kv_budget)

    # ----- HF-style API -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        labels: Tensor | None = None,
        **batch: Any,
    ):
        """Prefill: logits [B, S', V] (S' = the pruned length) and the filled KV cache.

        Compiled with ``mode="train"``, a training step instead: ``labels`` [B, S] are required and
        the output carries ``loss``, ``logits``, ``token_losses`` and ``active_tokens``
        (:func:`vlmopt.train.step.training_forward`).
        """
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if self.training_graph:
            from vlmopt.train.step import training_forward

            batch = {"input_ids": input_ids, "attention_mask": attention_mask, **batch}
            return training_forward(self, batch, labels, past_key_values, use_cache, logits_to_keep)
        if labels is not None:
            raise InputError(
                'CompiledVLM.forward computes no loss in inference mode; compile with mode="train" '
                "to pass labels and get the training loss"
            )
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise InputError("CompiledVLM.forward runs a prefill on an empty cache; use generate() to decode")
        prompt = self.plan({"input_ids": input_ids, "attention_mask": attention_mask, **batch})
        use_cache = self.config.get_text_config().use_cache if use_cache is None else use_cache
        cache = (past_key_values if past_key_values is not None else self.new_cache()) if use_cache else None
        out = self.run_stage(prompt.stage, prompt.inputs, cache, logits_to_keep)
        return CausalLMOutputWithPast(logits=out["logits"], past_key_values=cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generation_config=None,
        **batch: Any,
    ) -> Tensor:
        """Generate like HF: returns [B, S + new] ids (prompt, then new tokens; pad after EOS)."""
        settings = GenerationSettings.resolve(
            generation_config or self.generation_config,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        prompt = self.plan({"input_ids": input_ids, "attention_mask": attention_mask, **batch}, for_generation=True)
        cache = self.new_cache()
        out = self.run_stage(prompt.stage, prompt.inputs, cache, logits_to_keep=1)
        chooser = TokenChooser(settings, input_ids.shape[0], input_ids.device)
        mask, position, sequences = out["attention_mask"], prompt.next_position, input_ids
        # A model cut inside the LLM has one 2-D mask per segment of layers (each segment's cache
        # has its own length); a prefill that made no cut (text only) serves them all with one.
        segments = {name: out.get(name, mask) for name in segment_mask_inputs(self.stages["decode"])}
        for step in range(settings.max_new_tokens):
            tokens = chooser(sequences, out["logits"])
            sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
            if chooser.done or step == settings.max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            segments = {name: torch.cat([m, m.new_ones((m.shape[0], 1))], dim=-1) for name, m in segments.items()}
            inputs = {**self.adapter.decode_inputs(tokens[:, None], mask, position), **segments}
            out = self.run_stage("decode", inputs, cache, logits_to_keep=1)
            position = position + 1
        return sequences
