"""Token selection for :meth:`CompiledVLM.generate`, with HF ``generate`` semantics.

Greedy by default; with ``do_sample`` the scores pass through the same HF logits processors, in the
same order, that ``GenerationMixin.generate`` builds (repetition penalty, temperature, top-k,
top-p), then ``torch.multinomial`` — so a seeded run samples the same tokens as HF would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from vlmopt.errors import InputError

#: HF ``generate``'s global defaults for settings a model's generation config leaves unset.
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


@dataclass
class GenerationSettings:
    """What ``generate`` was asked for, merged over the model's ``generation_config``."""

    max_new_tokens: int
    """Tokens to generate at most."""
    do_sample: bool
    """Sample instead of taking the argmax."""
    temperature: float
    """Softmax temperature (sampling only)."""
    top_k: int | None
    """Keep the k most likely tokens (sampling only; 0 or None disables)."""
    top_p: float
    """Nucleus sampling mass (sampling only; 1.0 disables)."""
    repetition_penalty: float
    """Penalty > 1 for tokens already in the sequence (also in greedy mode)."""
    eos_token_ids: tuple[int, ...]
    """Tokens that end a sequence."""
    pad_token_id: int | None
    """Token written after a sequence has ended."""

    @classmethod
    def resolve(cls, generation_config, **overrides) -> GenerationSettings:
        config = copy.deepcopy(generation_config)
        unknown = [k for k, v in overrides.items() if v is not None and not hasattr(config, k)]
        if unknown:
            raise InputError(f"generate() got unsupported arguments {unknown}")
        for key, value in HF_DEFAULTS.items():
            if getattr(config, key, None) is None:
                setattr(config, key, value)
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        max_new = config.max_new_tokens if config.max_new_tokens is not None else 20
        if not isinstance(max_new, int) or max_new < 1:
            raise InputError(f"max_new_tokens must be a whole number ≥ 1, got {max_new!r}")
        eos = config.eos_token_id
        eos = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
        settings = cls(
            max_new_tokens=max_new,
            do_sample=bool(config.do_sample),
            temperature=1.0 if config.temperature is None else float(config.temperature),
            top_k=config.top_k,
            top_p=1.0 if config.top_p is None else float(config.top_p),
            repetition_penalty=1.0 if config.repetition_penalty is None else float(config.repetition_penalty),
            eos_token_ids=eos,
            pad_token_id=pad,
        )
        if settings.do_sample and settings.temperature <= 0:
            raise InputError(f"temperature must be > 0 when sampling, got {settings.temperature}")
        if not 0 < settings.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {settings.top_p}")
        return settings

    def processors(self):
        from transformers.generation import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors


class TokenChooser:
    """Picks the next token of every row and tracks which rows have finished."""

    def __init__(self, settings: GenerationSettings, batch: int, device) -> None:
        self.settings = settings
        self.processors = settings.processors()
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=device)

    def __call__(self, sequences: Tensor, logits: Tensor) -> Tensor:
        scores = self.processors(sequences, logits[:, -1, :].to(dtype=torch.float32, copy=True))
        if self.settings.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if self.eos.numel():
            pad = self.settings.pad_token_id
            tokens = torch.where(self.unfinished, tokens, torch.full_like(tokens, pad))
            self.unfinished &= ~torch.isin(tokens, self.eos)
        return tokens

    @property
    def done(self) -> bool:
        return not bool(self.unfinished.any())
