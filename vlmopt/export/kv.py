"""Run an LLM stage graph with the KV cache as explicit tensors (for export).

The pipeline graphs read and fill a HF ``DynamicCache``. :class:`ExplicitKVStep` builds that cache
inside ``forward`` from ``past`` tensors (none for a prefill), runs the graph, and returns the
cache's tensors, so the exported graph has ``past.{i}.key`` / ``past.{i}.value`` inputs and
``present.{i}.key`` / ``present.{i}.value`` outputs, each [B, Hkv, P, Dh].

Sliding-window layers keep every past token in the export too: their window is the attention
mask's (HF's ``sliding_window_overlay``, which the graphs build from the 2-D mask), not the cache's
length, so each layer's ``past`` has the one dynamic length that ``attention_mask`` gives and no
graph branches on whether the window is full. The keys each query
attends to are HF's (its sliding cache keeps the last ``window − 1``; the mask here hides the
older ones); the cost is a past as long as a global layer's.
"""

from __future__ import annotations

from torch import Tensor, fx, nn

from vlmopt.export.errors import ExportError


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """``[prefix.0.key, prefix.0.value, prefix.1.key, ...]``."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def explicit_cache(config, past: list[Tensor]):
    """A ``DynamicCache`` for ``config`` holding ``past`` ([k0, v0, k1, v1, ...]; empty for a prefill),
    every layer a full-length ``DynamicLayer`` (sliding-window layers too: see the module's docstring)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicSlidingWindowLayer:
            layer = cache.layers[index] = DynamicLayer()
        if type(layer) is not DynamicLayer:
            raise ExportError(
                f"decoder layer {index} uses a {type(layer).__name__} cache; the export supports full-attention and "
                "sliding-window layers (DynamicLayer, DynamicSlidingWindowLayer) only"
            )
        if past:
            key, value = past[2 * index], past[2 * index + 1]
            layer.lazy_initialization(key, value)
            layer.keys, layer.values = key, value
    return cache


class ExplicitKVStep(nn.Module):
    """One LLM stage (prefill or decode) with explicit KV tensors.

    ``forward(inputs, past)``: ``inputs`` maps the graph's tensor inputs by name (input_ids [B, S],
    attention_mask [B, P + S], position_ids [B, S] or [3, B, S], and for the prefill
    visual_embeds [T', D], visual_slots [T'], planned inputs); ``past`` is a list of 2·L tensors
    [B, Hkv, P, Dh] (empty for the prefill). Returns ``(logits [B, 1, V], attention_mask [B, P + S'],
    *segment masks, *present)`` with present [B, Hkv, P + S', Dh].

    A model cut inside the LLM (HalfV) caches different lengths in different layers: each layer's
    ``past`` / ``present`` has its own length, and the prefill also returns ``segment_outputs``, the
    2-D masks ``attention_mask_from_<K>`` [B, P_K + S'_K] of the layers from each cut on.
    """

    def __init__(self, module: fx.GraphModule, text_config, segment_outputs: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.graph_module = module
        self.text_config = text_config
        self.num_layers = text_config.num_hidden_layers
        self.segment_outputs = tuple(segment_outputs)

    def forward(self, inputs: dict[str, Tensor], past: list[Tensor]):
        cache = explicit_cache(self.text_config, list(past))
        out = self.graph_module(**inputs, cache=cache, logits_to_keep=1)
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out["logits"], out["attention_mask"], *(out[name] for name in self.segment_outputs), *present)
