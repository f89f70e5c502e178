"""Decoder-layer stand-ins that passes put in place of a model's layers in the compiled graphs.

Each wraps one HF decoder layer (sharing its weights, never copying or patching it) and computes
through the family's :class:`~vlmopt.adapters.layer_view.DecoderLayerView`, so a new layer shape is
taught once, in the adapter: :class:`~vlmopt.layers.attention_standin.AttentionStandIn` (attention
computed by a pass: APB-V) and :class:`~vlmopt.layers.inactive_rows.InactiveRowsLayer` (HalfV's
frozen visual rows).
"""
