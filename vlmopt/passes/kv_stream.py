"""The KV-tier machinery of streaming passes: score the cached visual entries after each chunk, keep
a fixed budget per layer, fold what long-term layers evict into a summary token, re-index positions.

A :class:`KVStreamPass` rewrites the ``chunk`` stage graph (a chunk of frames appended to a filled
cache). After the last decoder layer has written the chunk's keys and values, it inserts:

* ``cache_tensors`` — every layer's keys and values, stacked [L, Hkv, N, D];
* the method's scores [L, V] of the V visual entries (:meth:`KVStreamPass.scores`);
* ``vlmopt::tier_keep_index`` — the prefix (system prompt, never evicted) and the top ``budget``;
* the summary token of long-term layers: keys moved to the summary's position
  (``vlmopt::rerotate_keys`` with the model's own rotary embedding of the deltas), then
  ``vlmopt::evicted_mean``;
* ``vlmopt::compact_positions`` (lazy or eager re-indexing) and one more ``vlmopt::rerotate_keys``
  moving the kept keys to their new positions (a rotation by 0 where nothing moved);
* ``write_cache`` — the kept entries back into the ``DynamicCache``.

The graph gains the inputs ``cache_positions`` [L, P, N] (every layer's position ids, chunk
included), ``stream_prefix`` and ``visual_budget`` (ints), and the outputs ``cache_positions``,
``kept_positions`` (before re-indexing) and ``cache_lengths``; the stream (:mod:`vlmopt.stream.session`)
owns them between chunks and asks the pass for each chunk's inputs (:meth:`KVStreamPass.chunk_inputs`),
so the stream runtime knows no method by name. Position
policy: kept entries keep their ids until re-indexed (eager: every chunk; lazy: once a layer's
largest id passes ``max_position_embeddings - reindex_margin``); the stream's next chunk and
questions continue after the largest id in the cache.

Structural visual features of a stream (LLaVA-OneVision's newline after a video) are never in the
cache when a chunk is compressed: the stream writes them with each question (the planner's
``prelude``) and removes them with it, so no method scores them and ``kv_budget`` counts frames only
(a OneVision frame is its 196-token pooled block at 384 px).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, fx

from vlmopt.errors import IncompatiblePassError
from vlmopt.graph.edit import GraphEditor, Inserter
from vlmopt.passes.base import Pass, check_range
from vlmopt.stream import functions as sf

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vlmopt.adapters.base import Adapter
    from vlmopt.graph.pipeline import VLMGraph

ops = torch.ops.vlmopt
POSITION_POLICIES = ("lazy", "eager")


@dataclass
class ChunkSite:
    """Where a KV-tier pass works in the chunk graph (nodes the scoring methods read)."""

    editor: GraphEditor
    adapter: Adapter
    chain: Inserter
    keys: fx.Node
    """[L, Hkv, N, D] cached keys, chunk included."""
    values: fx.Node
    positions: fx.Node
    """[L, P, N] int64 position ids of the cached entries."""
    prefix: fx.Node
    """int input: cache entries before the visual span (never evicted)."""
    layers: int


@dataclass(frozen=True)
class KVStreamPass(Pass):
    """Base of the streaming KV-cache passes (kv stage; they rewrite the ``chunk`` graph only, so
    ``generate`` and ``forward`` are unchanged and the pass matters for :meth:`CompiledVLM.stream`)."""

    stage: ClassVar[str] = "kv"
    needs: ClassVar[tuple[str, ...]] = ("stream",)
    role: ClassVar[str] = "kv_tier"

    kv_budget: int = 2048
    """Cache entries each layer holds after a chunk, system prompt included (≥ 1 more than the prompt)."""
    chunk_frames: int = 16
    """Frames encoded per chunk (the stream splits longer appends; even for Qwen2.5-VL)."""
    position_policy: str = "lazy"
    """``lazy`` (re-index positions only near the model's position range) or ``eager`` (every chunk)."""
    reindex_margin: int = 1024
    """Lazy policy: re-index once a position passes ``max_position_embeddings - reindex_margin``."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_range(owner, "kv_budget", self.kv_budget, 1, 10**9, integer=True)
        check_range(owner, "chunk_frames", self.chunk_frames, 1, 10**6, integer=True)
        check_range(owner, "reindex_margin", self.reindex_margin, 0, 10**9, integer=True)
        if self.position_policy not in POSITION_POLICIES:
            from vlmopt.errors import PassConfigError

            raise PassConfigError(
                f"{owner}.position_policy must be one of {', '.join(POSITION_POLICIES)}, got {self.position_policy!r}"
            )

    def check(self, adapter: Adapter, before: Sequence[Pass]) -> None:
        super().check(adapter, before)
        unit = adapter.frames_per_patch
        if self.chunk_frames % unit:
            raise IncompatiblePassError(
                f"{type(self).__name__}.chunk_frames={self.chunk_frames}: {type(adapter.model).__name__} encodes frames "
                f"in groups of {unit} (temporal patches); use a multiple of {unit}"
            )

    # ----- what a method says -------------------------------------------------------------------
    def tiers(self, layers: int) -> list[str]:
        """The memory tier of every layer (for ``Stream.memory()``); one tier by default."""
        return ["kv"] * layers

    def summary_layers(self, layers: int) -> list[bool]:
        """Layers that fold what they evict into a summary token (none by default)."""
        return [False] * layers

    def scores(self, site: ChunkSite) -> fx.Node:
        """Insert nodes computing [L, V] scores of the visual entries (higher = keep)."""
        raise NotImplementedError

    def keeps_patch(self, index: int) -> bool:
        """Is temporal patch ``index`` (counted from the stream's first frame) encoded at all? (Yes by
        default; uniform frame sampling drops whole patches before encoding.)"""
        return True

    def query_inputs(self, stream) -> dict:
        """Values of the method's own graph inputs (:meth:`add_inputs`) for the next chunk of ``stream``
        (a :class:`vlmopt.stream.Stream`); none by default."""
        return {}

    def chunk_inputs(self, stream, cache_positions: Tensor) -> dict:
        """The chunk graph's inputs this pass added, for the next chunk of ``stream``: the machinery's
        (``cache_positions`` [L, P, N] with the chunk's, the prefix length, the visual budget) and the
        method's own (:meth:`query_inputs`)."""
        if not any(n.op == "placeholder" and n.target == "cache_positions" for n in stream.compiled.stages["chunk"].graph.nodes):
            return {}  # a pass that leaves the chunk graph alone (frame sampling)
        prefix = stream.state.prefix
        return {"cache_positions": cache_positions, "stream_prefix": prefix, "visual_budget": stream.kv_budget - prefix,
                **self.query_inputs(stream)}

    def position_limit(self, adapter: Adapter) -> int:
        if self.position_policy == "eager":
            return -1
        return max(0, adapter.text_config.max_position_embeddings - self.reindex_margin)

    # ----- the machinery -------------------------------------------------------------------------
    def apply(self, graph: VLMGraph) -> None:
        module = graph["chunk"]
        editor = GraphEditor(module)
        adapter = graph.adapter
        layers = len(adapter.decoder_layer_nodes(module))
        cache = adapter.cache_input(module)
        positions = editor.add_input("cache_positions", role="input", stage="llm")
        prefix = editor.add_input("stream_prefix", role="input", stage="llm")
        budget = editor.add_input("visual_budget", role="input", stage="llm")
        self.add_inputs(editor)
        chain = editor.chain(adapter.decoder_layer_nodes(module)[-1])
        role = self.role

        def call(target, *args, name):
            return chain(target, *args, role=role, stage="llm", name=name)

        both = call(sf.cache_tensors, cache, name="cached_kv")
        keys = call(operator.getitem, both, 0, name="cached_keys")
        values = call(operator.getitem, both, 1, name="cached_values")
        site = ChunkSite(editor, adapter, chain, keys, values, positions, prefix, layers)
        scores = self.scores(site)
        keep = call(ops.tier_keep_index, scores, prefix, budget, self.summary_layers(layers), name="tier_keep")
        mrope = adapter.position_dims == (1, 2)
        target = call(sf.summary_positions, positions, keep, name="summary_position")
        delta = call(operator.sub, target, positions, name="summary_delta")
        if any(self.summary_layers(layers)):
            moved = self.rerotate(chain, keys, values, delta, mrope, "summary")
            means = call(ops.evicted_mean, moved, values, keep, name="summary_kv")
            summary_k = call(operator.getitem, means, 0, name="summary_key")
            summary_v = call(operator.getitem, means, 1, name="summary_value")
        else:
            # a placeholder slot, never gathered: no layer's keep index points at N
            summary_k = call(torch.narrow, keys, 2, 0, 1, name="no_summary_key_slot")
            summary_v = call(torch.narrow, values, 2, 0, 1, name="no_summary_value_slot")
        kept = call(sf.gather_kept, keys, values, positions, keep, summary_k, summary_v, target, name="kept_kv")
        kept_keys = call(operator.getitem, kept, 0, name="kept_keys")
        kept_values = call(operator.getitem, kept, 1, name="kept_values")
        kept_positions = call(operator.getitem, kept, 2, name="kept_positions")
        limit = self.position_limit(adapter)
        new_positions = call(ops.compact_positions, kept_positions, prefix, limit, name="reindexed_positions")
        shift = call(operator.sub, new_positions, kept_positions, name="reindex_delta")
        final_keys = self.rerotate(chain, kept_keys, kept_values, shift, mrope, "reindex")
        lengths = call(sf.write_cache, cache, final_keys, kept_values, name="cache_lengths")
        output = editor.output()
        returned = dict(output.args[0])
        returned.update(cache_positions=new_positions, kept_positions=kept_positions, cache_lengths=lengths)
        output.args = (returned,)
        editor.finish()

    def rerotate(self, chain: Inserter, keys: fx.Node, like: fx.Node, delta: fx.Node, mrope: bool, name: str) -> fx.Node:
        ids = chain(sf.rotary_position_ids, delta, mrope, role=self.role, stage="llm", name=f"{name}_rotary_ids")
        rope = chain.module("rotary_emb", like, ids, role=self.role, stage="llm", name=f"{name}_rotary")
        cos = chain(operator.getitem, rope, 0, role=self.role, stage="llm", name=f"{name}_cos")
        sin = chain(operator.getitem, rope, 1, role=self.role, stage="llm", name=f"{name}_sin")
        return chain(ops.rerotate_keys, keys, cos, sin, role=self.role, stage="llm", name=f"{name}_keys")

    def add_inputs(self, editor: GraphEditor) -> None:
        """Add the method's own graph inputs (HERMES: its pseudo-queries); none by default."""
