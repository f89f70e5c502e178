"""HalfV — prune inside the LLM where visual redundancy is inherited, and again where it saturates.

Paper: "From Inheritance to Saturation" (HalfV), https://arxiv.org/abs/2604.16462 (official code,
Qwen2.5-VL only: github.com/civilizwa/HalfV). Training-free, query-aware, prefill only; decoding
continues on the pruned KV cache at the unpruned positions.

Two stages inside the language model:

* **Inherited redundancy** at decoder layer ``ivr_layer``: a relevance probe at the layer before
  scores the visual tokens by the last token's attention (that layer's own Q/K, RoPE off, no
  scaling, softmax over the visual keys only, mean over heads; ``vlmopt::last_token_attention``).
  Each row keeps ``ivr_keep`` of its visual tokens: the top ``anchor_frac`` of that budget by
  relevance ("semantic anchoring"), the rest by k-center greedy coverage of the L2-normalised,
  final-norm'd input states of ``ivr_layer`` (``vlmopt::kcenter_select``). Text never moves; kept
  tokens keep their position ids (1-D RoPE or M-RoPE).
* **Saturation** at decoder layer ``ssr_layer``, as the paper found it for the LM family (the
  adapter's ``paper_settings["halfv"]["saturation"]``):

  - ``"sparse_tokens"`` (Qwen LMs), *token sparsity*: keep the top ``ssr_keep`` of the original
    visual count by the last token's attention at the layer before (RoPE on, the layer's own
    softmax scale), restricted to the visual span as it stands after the first cut (the official
    code's probe can pick text tokens; this one cannot).
  - ``"inactive_rows"`` (Vicuna / Mistral LMs, LLaVA), *layer inactivity*: from ``ssr_layer`` on, the
    visual rows issue no query and get no attention output or MLP update, while their keys and
    values still serve the text. The LLaVA code is unreleased; this implements the paper's
    description with a decoder-layer stand-in (:class:`~vlmopt.layers.inactive_rows.InactiveRowsLayer`)
    that computes only the active rows' queries, attention and MLP (the frozen rows cost only their
    K/V projections), so the saving is real in FLOPs and time. ``ssr_keep`` does not apply.

Defaults: the paper's schedule for the family (``(layer, out of a depth)``, from its scripts), scaled
to the model's depth by the same fraction (at least layer 1 for ``ivr_layer``, which needs a layer
before it for the probe, and at least one layer after it for ``ssr_layer``):

* Qwen2.5-VL-7B: ``ivr_layer`` 2/28, ``ivr_keep`` 0.25, ``anchor_frac`` 0.2 (the CLI default; the
  README example uses 0.1), ``ssr_layer`` 21/28, ``ssr_keep`` 0.05, token sparsity. A family the
  paper did not cover takes this schedule (token sparsity works on every layer kind).
* LLaVA-1.5-7B: ``ivr_layer`` 3/32, ``ivr_keep`` 0.5, ``anchor_frac`` 0.2, ``ssr_layer`` 15/32, layer inactivity.

Structural tokens (a CLS token fed to the LLM, row newlines) stay outside the visual span: never
scored, never cut, never frozen. DeepStack features injected after a cut's layer follow the kept
slots (they are sequence values like the hidden states). Tiled images (LLaVA-NeXT / OneVision): the
base image and every tile count ``ivr_keep`` of their own tokens into the row's budget, and the row's
visual span (base image and tiles together) is chosen from jointly; from ``ssr_layer`` on all of them
are inactive rows (LLaVA-NeXT-Mistral-7B's schedule 2/32, 16/32 from the paper's scripts; OneVision,
which the paper did not cover, takes it too).

``ivr_layer="auto"`` (and/or ``ssr_layer="auto"``) chooses the layers by the stage analysis
(:func:`vlmopt.analysis.stages.analyze_calibration`) on the processor outputs given as
``calibration``, when the model is compiled; ``CompiledVLM.passes`` then shows the chosen layers.

Budgets are per visual input (rounded half up, at least one token), summed per row, so every shape
is static for a batch layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vlmopt.errors import IncompatiblePassError, PassConfigError
from vlmopt.graph.edit import GraphEditor
from vlmopt.passes.base import Pass, VisualSite, check_range, cut_llm
from vlmopt.passes.halfv_cut import EXPORT_BINDINGS, halfv_active_rows, halfv_keep, last_token_relevance

#: The schedule of a family the paper did not cover (Qwen2.5-VL-7B's; layers as (layer, out of a depth)).
DEFAULT_SETTINGS = {
    "ivr_layer": (2, 28), "ssr_layer": (21, 28), "ivr_keep": 0.25, "anchor_frac": 0.2, "ssr_keep": 0.05,
    "saturation": "sparse_tokens",
}


@dataclass(frozen=True)
class HalfV(Pass):
    """Inherited-redundancy pruning at ``ivr_layer``, then token-sparsity pruning or frozen visual rows
    from ``ssr_layer`` (see the module docstring). Every field left None takes the family's paper default."""

    stage: ClassVar[str] = "llm"
    query_aware: ClassVar[bool] = True
    paper: ClassVar[str] = "https://arxiv.org/abs/2604.16462"

    ivr_layer: int | str | None = None
    """0-based decoder layer from which only ``ivr_keep`` of the visual tokens remain (≥ 1), or ``"auto"``."""
    ivr_keep: float | None = None
    """Fraction of each visual input's tokens kept at ``ivr_layer``, in (0, 1]."""
    anchor_frac: float | None = None
    """Share of the ``ivr_layer`` budget chosen by relevance (the rest by k-center coverage), in [0, 1]."""
    ssr_layer: int | str | None = None
    """0-based decoder layer where saturation starts (after ``ivr_layer``), or ``"auto"``."""
    ssr_keep: float | None = None
    """Qwen only: fraction of each input's original visual tokens kept from ``ssr_layer``, in (0, 1]."""
    calibration: tuple[Mapping[str, Any], ...] = field(default=(), compare=False, repr=False, metadata={"spec": False})
    """Processor outputs (dicts with ``input_ids`` and images or video) the ``"auto"`` layers are chosen on."""

    def __post_init__(self) -> None:
        for name in ("ivr_layer", "ssr_layer"):
            value = getattr(self, name)
            if isinstance(value, str):
                if value != "auto":
                    raise PassConfigError(f"HalfV.{name} must be a decoder layer (a whole number) or 'auto', got {value!r}")
            elif value is not None:
                check_range("HalfV", name, value, 1, 10**4, integer=True)
        for name in ("ivr_keep", "ssr_keep"):
            value = getattr(self, name)
            if value is not None:
                check_range("HalfV", name, value, 0, 1, low_open=True)
        if self.anchor_frac is not None:
            check_range("HalfV", "anchor_frac", self.anchor_frac, 0, 1)
        calibration = tuple(self.calibration)
        if not all(isinstance(batch, Mapping) and "input_ids" in batch for batch in calibration):
            raise PassConfigError(
                "HalfV.calibration takes processor outputs: dicts with input_ids (and pixel_values or video "
                "inputs), e.g. [processor(text=..., images=..., return_tensors='pt')]"
            )
        object.__setattr__(self, "calibration", calibration)  # a list given is kept as a tuple: the config stays immutable
        if self.auto and not calibration:
            raise PassConfigError(
                "HalfV's 'auto' layers are chosen by the stage analysis on samples you give: pass calibration=[processor "
                "outputs, ...] (a few prompts with images), or run `vlmopt analyze stages` and pass the layers it suggests"
            )
        if isinstance(self.ivr_layer, int) and isinstance(self.ssr_layer, int) and self.ssr_layer <= self.ivr_layer:
            raise PassConfigError(
                f"HalfV.ssr_layer={self.ssr_layer} must come after ivr_layer={self.ivr_layer} (saturation follows "
                "the inherited-redundancy cut); raise ssr_layer or lower ivr_layer"
            )

    @property
    def auto(self) -> bool:
        """Is a layer left to the stage analysis (``"auto"``)?"""
        return "auto" in (self.ivr_layer, self.ssr_layer)

    def specialize(self, adapter, before) -> HalfV:
        """Resolve ``"auto"`` layers by the stage analysis on ``calibration`` (after the passes ``before``)."""
        if not self.auto:
            return self
        from vlmopt.analysis.stages import analyze_calibration

        ivr_keep = self.default(adapter, "ivr_keep")
        fixed_ivr = None if self.ivr_layer == "auto" else self.settings(adapter)[0]
        report = analyze_calibration(
            adapter.model, self.calibration, keep=self.ivr_keep or ivr_keep, before=before, ivr_layer=fixed_ivr
        )
        return dataclasses.replace(
            self, calibration=(),
            ivr_layer=report.ivr_layer if self.ivr_layer == "auto" else self.ivr_layer,
            ssr_layer=report.ssr_layer if self.ssr_layer == "auto" else self.ssr_layer,
        )

    def default(self, adapter, key: str):
        """The paper's setting ``key`` for the model's family (or :data:`DEFAULT_SETTINGS`')."""
        return (adapter.paper_settings.get(self.name()) or DEFAULT_SETTINGS).get(key)

    def saturation(self, adapter) -> str:
        """How saturation is pruned on this model: ``"sparse_tokens"`` or ``"inactive_rows"``."""
        return self.default(adapter, "saturation")

    def settings(self, adapter) -> tuple[int, float, float, int, float | None]:
        """(ivr_layer, ivr_keep, anchor_frac, ssr_layer, ssr_keep) for this model, defaults filled in."""
        (ivr, depth), (ssr, _) = self.default(adapter, "ivr_layer"), self.default(adapter, "ssr_layer")
        layers = adapter.text_config.num_hidden_layers
        default_ivr = max(1, math.floor(ivr / depth * layers + 0.5))
        ivr_layer = default_ivr if self.ivr_layer is None else self.ivr_layer
        default_ssr = min(layers - 1, max(ivr_layer + 1, math.floor(ssr / depth * layers + 0.5)))
        return (
            ivr_layer,
            self.default(adapter, "ivr_keep") if self.ivr_keep is None else self.ivr_keep,
            self.default(adapter, "anchor_frac") if self.anchor_frac is None else self.anchor_frac,
            default_ssr if self.ssr_layer is None else self.ssr_layer,
            self.default(adapter, "ssr_keep") if self.ssr_keep is None else self.ssr_keep,
        )

    def export_bindings(self) -> dict:
        return dict(EXPORT_BINDINGS)

    def check(self, adapter, before) -> None:
        super().check(adapter, before)
        layers = adapter.text_config.num_hidden_layers
        if layers < 3:
            raise IncompatiblePassError(f"HalfV needs at least 3 decoder layers (a probe, a cut, a later stage); this model has {layers}")
        if self.auto:
            return  # checked again once specialize has chosen the layers
        ivr_layer, ivr_keep, _, ssr_layer, ssr_keep = self.settings(adapter)
        for name, value in (("ivr_layer", ivr_layer), ("ssr_layer", ssr_layer)):
            if not 1 <= value < layers:
                raise IncompatiblePassError(
                    f"HalfV.{name}={value}, but this model's language model has decoder layers 0..{layers - 1} "
                    f"(and {name} needs a layer before it); pick 1..{layers - 1}"
                )
        if ssr_layer <= ivr_layer:
            raise IncompatiblePassError(
                f"HalfV.ssr_layer={ssr_layer} must come after ivr_layer={ivr_layer}; raise ssr_layer or lower ivr_layer"
            )
        if self.saturation(adapter) == "inactive_rows":
            if self.ssr_keep is not None:
                raise IncompatiblePassError(
                    f"HalfV.ssr_keep applies where saturation is token sparsity; on {type(adapter.model).__name__} the "
                    "saturation stage freezes the visual rows (layer inactivity) instead of dropping tokens; leave ssr_keep unset"
                )
            if "sliding" in adapter.mask_kinds:
                raise IncompatiblePassError("HalfV's layer inactivity does not support sliding-window attention layers")
        elif ssr_keep > ivr_keep:
            raise IncompatiblePassError(
                f"HalfV.ssr_keep={ssr_keep} keeps more than ivr_keep={ivr_keep} already left; lower ssr_keep"
            )

    def apply(self, graph) -> None:
        adapter = graph.adapter
        ivr_layer, ivr_keep, anchor_frac, ssr_layer, ssr_keep = self.settings(adapter)
        module = graph["prefill"]
        editor = GraphEditor(module)
        layout = VisualSite.find(editor, adapter).layout
        self.cut(graph, editor, ivr_layer, layout, 1.0, ivr_keep, anchor_frac, rope=False)
        if self.saturation(adapter) == "inactive_rows":
            self.freeze_visual_rows(graph, editor, ssr_layer, layout, ivr_keep)
        else:
            self.cut(graph, editor, ssr_layer, layout, ivr_keep, ssr_keep, 1.0, rope=True)
        editor.finish()

    def cut(self, graph, editor: GraphEditor, layer: int, layout, current: float, keep: float, anchor_frac: float, *, rope: bool) -> None:
        """Probe at ``layer - 1``, choose the kept slots after it, and cut the sequence before ``layer``."""
        adapter, stage = graph.adapter, f"halfv_{layer}"
        span = editor.visual_span(layout if adapter.structural_tokens else None)
        qk = adapter.insert_decoder_qk(editor, layer - 1, rope=rope, role="prune_score")
        order = editor.order()
        chain = editor.chain(max((qk.q, qk.k, span), key=order.__getitem__))
        relevance = chain(
            last_token_relevance, qk.q, qk.k, span, qk.scale if rope else 1.0,
            role="prune_score", stage="llm", name=f"{stage}_relevance",
        )
        # the cut sits where layer K's input is made: after layer K-1 (and what is added to its output)
        hidden = editor.input_of(adapter.decoder_layer_nodes(editor.module)[layer], "hidden_states")
        chain = editor.chain(hidden)
        states = None
        if anchor_frac < 1.0:
            states = chain.module("norm", hidden, role="prune_score", stage="llm", name=f"{stage}_states")
        index = chain(
            halfv_keep, relevance, states, span, layout, current, keep, anchor_frac,
            role="sequence_cut", stage="llm", name=f"{stage}_keep",
        )
        cut_llm(graph, editor, layer, index)

    def freeze_visual_rows(self, graph, editor: GraphEditor, layer: int, layout, current: float) -> None:
        """Replace decoder layers ``layer``.. of the prefill with stand-ins that update text rows only."""
        from vlmopt.layers.inactive_rows import InactiveRowsLayer

        module, view = editor.module, graph.adapter.decoder_view
        nodes = [n for n in editor.nodes("decoder_layer") if n.meta["index"] >= layer]
        span = editor.visual_span()
        first = min(nodes, key=lambda n: n.meta["index"])
        active = editor.insert(
            first.prev, halfv_active_rows, (span, layout, current), role="prune_select", stage="llm",
            name="halfv_active_rows",
        )
        for node in sorted(nodes, key=lambda n: n.meta["index"]):
            index = node.meta["index"]
            target = f"halfv_inactive.{index}"
            module.add_submodule(target, InactiveRowsLayer(module.get_submodule(node.target), view))
            mask = editor.input_of(node, "attention_mask")
            cos, sin = editor.input_of(node, "position_embeddings")
            args = (editor.input_of(node, "hidden_states"), active, editor.input_of(mask, "attention_mask"), cos, sin,
                    editor.input_of(node, "cache"))
            stand_in = editor.insert_module(node, target, args, role="decoder_layer", stage="llm", name=f"inactive_layer_{index}")
            stand_in.meta.update(index=index, seq_dim=node.meta.get("seq_dim"))
            node.replace_all_uses_with(stand_in)
            editor.graph.erase_node(node)
            if not mask.users:
                editor.graph.erase_node(mask)
