"""``--model vlmopt``: an lmms-eval model that runs a HF VLM compiled with a vlmopt pass list.

    python -m lmms_eval --model vlmopt \\
        --model_args pretrained=tiny-llava,passes=hiprune:keep_ratio=1/3 --tasks vlmopt_shapes

``model_args``: ``pretrained`` (a local HF model directory, a Hub id, or a reference model name:
``tiny-llava``, ``tiny-qwen25vl``), ``passes`` (pass specs joined with ``+``; quote a spec whose
options hold commas: ``passes='hiprune:keep_ratio=1/3,alpha=0.1'``), ``backend`` (``eager``,
``inductor``, ``torch_tensorrt``), ``max_new_tokens`` (overrides the task's), ``dtype``
(``float32``, ``bfloat16``, ``float16``, ``auto``), ``device`` (default: ``cuda`` where available),
``batch_size`` (also ``--batch_size``), ``max_frames`` (frames read from a video file), ``flops``
(``false`` skips the per-prompt FLOP count).

Each generated answer carries its pass statistics into lmms-eval's logged samples (``--log_samples``)
under ``token_counts``: ``visual_tokens`` (in the prompt), ``visual_tokens_kept`` (reaching the
LLM), ``input_tokens`` (prompt tokens reaching the LLM), ``output_tokens``, ``prefill_flops`` and
``llm_prefill_flops`` (one prefill of that prompt alone, :func:`vlmopt.flops`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

import vlmopt
from vlmopt.errors import InputError
from vlmopt.integrations.lmms_eval import inputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class PassStatistics(TokenCounts):
    """lmms-eval's per-sample token counts plus what the passes did to this prompt."""

    visual_tokens: int | None = None
    """Visual tokens in the prompt (before the passes)."""
    visual_tokens_kept: int | None = None
    """Visual tokens that reach the LLM."""
    prefill_flops: int | None = None
    """FLOPs of a prefill of this prompt alone (vision, projector, LLM, LM head)."""
    llm_prefill_flops: int | None = None
    """The LLM's share of ``prefill_flops``."""

    def to_dict(self) -> dict[str, int]:
        out = super().to_dict()
        for key in ("visual_tokens", "visual_tokens_kept", "prefill_flops", "llm_prefill_flops"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def load_pretrained(pretrained: str, dtype) -> tuple[Any, Any]:
    """(model, processor) of a reference model name, a local directory, or a Hub id."""
    from pathlib import Path

    from vlmopt import reference

    name = str(pretrained)
    if not Path(name).exists() and name not in reference.MODEL_NAMES and name.count("/") == 1:
        from huggingface_hub import snapshot_download

        name = snapshot_download(name)
    return reference.load(name, dtype=dtype)


class VlmoptLMM(lmms):
    """A HF LLaVA / Qwen2.5-VL model compiled with vlmopt passes, as an lmms-eval simple model."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "tiny-llava",
        passes: str = "",
        backend: str = "eager",
        max_new_tokens: int | None = None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 16,
        max_frames: int = 32,
        flops: bool = True,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            hint = ""
            if passes and ":" in str(passes):
                hint = (f" (a pass option after a comma is read as a model argument: quote the passes, "
                        f"passes='{passes},{','.join(f'{k}={v}' for k, v in unknown.items())}')")
            raise InputError(f"vlmopt model: unknown model_args {sorted(unknown)}; known: pretrained, passes, backend, "
                             f"max_new_tokens, dtype, device, batch_size, max_frames, flops{hint}")
        if str(dtype) not in DTYPES:
            raise InputError(f"vlmopt model: dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
        if str(batch_size) == "auto" or not str(batch_size).isdigit() or int(batch_size) < 1:
            raise InputError(f"vlmopt model: batch_size must be a whole number ≥ 1, got {batch_size!r}")
        if max_new_tokens is not None and (not str(max_new_tokens).isdigit() or int(max_new_tokens) < 1):
            raise InputError(f"vlmopt model: max_new_tokens must be a whole number ≥ 1, got {max_new_tokens!r}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("vlmopt's lmms-eval model runs in one process; start lmms-eval with python -m lmms_eval, "
                             "not accelerate launch / torchrun with several processes")
        from vlmopt.reference import processing

        self.specs = [part.strip() for part in _unquote(str(passes or "")).split("+") if part.strip()]
        self.device_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = load_pretrained(pretrained, DTYPES[str(dtype)])
        self.model.to(self.device_name)
        if self.processor is None:
            raise InputError(f"vlmopt model: {pretrained} has no processor")
        self.arch = processing.arch_of(self.model)
        self.compiled = vlmopt.compile(self.model, passes=self.specs, backend=backend)
        self.batch_size_per_call = int(batch_size)
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        self.max_frames = int(max_frames)
        self.count_flops = bool(flops)
        self._flops_cache: dict[tuple, tuple[int, int]] = {}

    # ----- lmms-eval's interface ---------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_name)

    def generate_until(self, requests) -> list[GenerationResult]:
        """Greedy (or sampled, if the task asks) answers with each prompt's pass statistics."""
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=f"vlmopt {' + '.join(self.specs) or '(no passes)'}")
        for chunk, gen_kwargs in self._batches(requests, lambda args: args[1]):
            prompts = [self._prompt(requests[i].args) for i in chunk]
            texts, stats = self._generate(prompts, dict(gen_kwargs))
            for i, text, stat in zip(chunk, texts, stats):
                results[i] = GenerationResult(text=text, token_counts=stat)
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood(self, requests) -> list[GenerationResult]:
        """(−log P(continuation | context), whether greedy decoding gives the continuation) per request.

        The first item is a loss (summed over the continuation's tokens), as lmms-eval's models return
        and its ``multiple_choice`` scoring expects (it takes the argmin). The pairs come wrapped in
        ``GenerationResult`` (text = the pair): lmms-eval 0.7.3's evaluator turns any bare tuple a model
        returns into its string, which its scoring cannot read.
        """
        results: list[GenerationResult | None] = [None] * len(requests)
        for chunk, _ in self._batches(requests, lambda args: None):
            prompts, continuations = [], []
            for i in chunk:
                context, target, doc_to_visual, doc_id, task, split = requests[i].args
                prompts.append(self._prompt((context, None, doc_to_visual, doc_id, task, split)))
                continuations.append(target if isinstance(target, str) else target(self.task_dict[task][split][doc_id]))
            for i, pair in zip(chunk, self._score(prompts, continuations)):
                results[i] = GenerationResult(text=pair)
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vlmopt's lmms-eval model does not run multi-round tasks "
                                  "(generate_until_multi_round); use single-turn generate_until tasks")

    # ----- helpers -----------------------------------------------------------------------------
    def _prompt(self, args) -> inputs.Prompt:
        context, _, doc_to_visual, doc_id, task, split = args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        return inputs.prompt_of(context, visuals, self.max_frames)

    def _batches(self, requests, key_of):
        """Chunks of request indices, in request order, each of one visual kind and one key."""
        groups: dict[str, tuple[list[int], Any]] = {}
        for i, request in enumerate(requests):
            args = request.args
            visuals = args[2](self.task_dict[args[4]][args[5]][args[3]]) if args[2] is not None else None
            kind = inputs.kind_of(visuals)
            key = key_of(args)
            label = kind + json.dumps(key, sort_keys=True, default=str)
            groups.setdefault(label, ([], key))[0].append(i)
        for indices, key in groups.values():
            for start in range(0, len(indices), self.batch_size_per_call):
                yield indices[start : start + self.batch_size_per_call], key

    def _generate(self, prompts: list[inputs.Prompt], gen_kwargs: dict) -> tuple[list[str], list[PassStatistics]]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
            raise InputError("vlmopt's lmms-eval model does not run beam search (num_beams > 1)")
        max_new = self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        temperature = float(gen_kwargs.get("temperature") or 0)
        sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        settings = {"max_new_tokens": max_new, "do_sample": sample}
        if sample:
            settings.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
        batch = self._to_device(inputs.encode(self.processor, self.arch, prompts))
        with torch.inference_mode():
            ids = self.compiled.generate(**batch, **settings)
        new = ids[:, batch["input_ids"].shape[1] :].cpu()
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        for stop in filter(None, until):
            texts = [t.split(stop, 1)[0] for t in texts]
        return texts, self._statistics(prompts, batch, new)

    def _statistics(self, prompts, batch, new_tokens) -> list[PassStatistics]:
        planned = self.compiled.plan(batch, for_generation=True)
        rows = batch["input_ids"].shape[0]
        before, after = [0] * rows, [0] * rows
        if planned.layout is not None:
            before = planned.layout.tokens_per_row()
            layout = planned.layout
            for item in self.compiled.passes:
                if hasattr(item, "output_layout"):
                    layout = item.output_layout(layout)
            after = layout.tokens_per_row()
        eos = self.compiled.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else eos or [])
        stats = []
        for row in range(rows):
            length = int(batch["attention_mask"][row].sum())
            generated = new_tokens[row].tolist()
            ends = [k for k, token in enumerate(generated) if token in eos]
            flops = self._prefill_flops(prompts[row], length) if self.count_flops else (None, None)
            stats.append(PassStatistics(
                input_tokens=length - before[row] + after[row],
                output_tokens=ends[0] + 1 if ends else len(generated),
                visual_tokens=before[row], visual_tokens_kept=after[row],
                prefill_flops=flops[0], llm_prefill_flops=flops[1],
            ))
        return stats

    def _prefill_flops(self, prompt: inputs.Prompt, length: int) -> tuple[int, int]:
        """FLOPs of one prefill of ``prompt`` alone (cached by prompt length and visual sizes)."""
        sizes = tuple(image.size for image in prompt.images) + tuple(video.shape for video in prompt.videos)
        key = (length, sizes)
        if key not in self._flops_cache:
            single = self._to_device(inputs.encode(self.processor, self.arch, [prompt]))
            report = vlmopt.flops(self.compiled, single)
            self._flops_cache[key] = (report.total, report.llm)
        return self._flops_cache[key]

    def _score(self, prompts: list[inputs.Prompt], continuations: list[str]) -> list[tuple[float, bool]]:
        tok = self.processor.tokenizer
        heads = [inputs.chat_text(self.processor, p) for p in prompts]
        counts = [len(tok(h + c, add_special_tokens=False)["input_ids"]) - len(tok(h, add_special_tokens=False)["input_ids"])
                  for h, c in zip(heads, continuations)]
        if min(counts) < 1:
            raise InputError("loglikelihood: a continuation adds no token to its context; nothing to score")
        batch = self._to_device(inputs.encode(self.processor, self.arch, prompts, suffixes=continuations))
        keep = max(counts) + 1
        with torch.inference_mode():
            logits = self.compiled(**batch, logits_to_keep=keep, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out = []
        for row, n in enumerate(counts):
            target = batch["input_ids"][row, -n:]
            scores = logprobs[row, keep - n - 1 : keep - 1]
            total = float(scores.gather(-1, target[:, None]).sum())
            out.append((-total, bool((scores.argmax(-1) == target).all())))
        return out

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        dtype = next(self.model.parameters()).dtype
        moved = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device_name)
                if value.is_floating_point() and key.startswith("pixel_values"):
                    value = value.to(dtype)
            moved[key] = value
        return moved


__all__ = ["PassStatistics", "VlmoptLMM", "load_pretrained"]
