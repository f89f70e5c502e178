"""StreamingLLM as a stream KV policy: attention sinks plus a recent window (arXiv 2309.17453,
https://arxiv.org/abs/2309.17453).

Every layer keeps the system prompt, the first ``sink_tokens`` visual entries (the attention sinks)
and the most recent entries up to the budget — the eviction baseline HERMES is compared with, on the
same KV-tier machinery (:mod:`vlmopt.passes.kv_stream`): the score is the recency prior with the sinks on
top. Kept entries keep their positions (lazy re-indexing, as the stream's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from torch import Tensor

from vlmopt.passes.base import check_range
from vlmopt.passes.kv_stream import ChunkSite, KVStreamPass
from vlmopt.stream import functions as sf

ops = torch.ops.vlmopt


def with_sinks(scores: Tensor, sinks: int) -> Tensor:
    """``scores`` [L, V] with the first ``sinks`` visual entries above every other (attention sinks)."""
    return torch.cat([torch.full_like(scores[:, :sinks], float("inf")), scores[:, sinks:]], dim=1)


@dataclass(frozen=True)
class StreamingLLM(KVStreamPass):
    """Attention sinks + recent window at ``kv_budget`` (see the module docstring)."""

    paper: ClassVar[str] = "https://arxiv.org/abs/2309.17453"

    sink_tokens: int = 4
    """Oldest visual entries every layer keeps (the attention sinks), ≥ 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("StreamingLLM", "sink_tokens", self.sink_tokens, 0, 10**6, integer=True)

    def scores(self, site: ChunkSite):
        chain, role = site.chain, self.role
        like = chain(sf.visual_span, site.keys, site.prefix, role=role, stage="llm", name="visual_entries")
        recency = chain(ops.recency_scores, like, [1.0] * site.layers, role=role, stage="llm", name="recency")
        return chain(with_sinks, recency, self.sink_tokens, role=role, stage="llm", name="sink_scores")
