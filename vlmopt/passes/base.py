"""The pass machinery: a validated, immutable config per pass, and the shared visual-token pruning.

A pass is a frozen dataclass. ``__post_init__`` validates the config (a :class:`PassConfigError`
naming the field and the accepted range), :meth:`Pass.check` refuses a model or a pass order it
cannot serve before anything is traced, and :meth:`Pass.apply` rewrites a :class:`VLMGraph`.

:class:`VisualTokenPrune` owns everything vision-side pruning methods share — the site where the
visual tokens flow as ``[T, D]``, the fixed per-input budget, the gathers of tokens and of their
sequence slots, and the re-routing of the LLM sequence — so a method only says which tokens to keep.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import fx

from vlmopt.errors import IncompatiblePassError, PassConfigError
from vlmopt.graph import functions as gf
from vlmopt.graph.edit import GraphEditor, Inserter

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vlmopt.adapters.base import Adapter
    from vlmopt.graph.pipeline import VLMGraph

def snake_case(name: str) -> str:
    """``RandomPrune`` → ``random_prune``; ``HiPrune`` → ``hiprune``; ``ReGATE`` → ``regate``."""
    special = {"HiPrune": "hiprune", "HalfV": "halfv", "ReGATE": "regate", "APBV": "apbv", "SnapKV": "snapkv"}
    if name in special:
        return special[name]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


#: Where a pass works, in pipeline order: ``vision`` (before the LLM), ``llm`` (inside it), ``kv``
#: (the KV cache between steps) and ``train`` (the training graph).
PASS_STAGES = ("vision", "llm", "kv", "train")


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses whose fields are their config."""

    stage: ClassVar[str] = "vision"
    """Where the pass works: one of :data:`PASS_STAGES`; ``compile`` checks their order."""
    lossless: ClassVar[bool] = False
    """Does the compiled model still give bit-exact logits, whatever the config?"""
    needs: ClassVar[tuple[str, ...]] = ()
    """Capabilities the model's adapter must have (:data:`vlmopt.adapters.base.CAPABILITIES`)."""
    query_aware: ClassVar[bool] = False
    """Does the pass read the question (so a prefix cannot be reused across questions)?"""
    paper: ClassVar[str] = ""
    """Link to the method's paper."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.stage not in PASS_STAGES:
            raise TypeError(f"{cls.__name__}.stage must be one of {', '.join(PASS_STAGES)}, got {cls.stage!r}")

    @classmethod
    def name(cls) -> str:
        """Registry key: the snake_case of the class name."""
        return snake_case(cls.__name__)

    @classmethod
    def lossless_settings(cls) -> tuple[Pass, ...]:
        """Configs of this pass whose compiled model is bit-exact with the original (tested for every
        registered pass); ``()`` when there are none."""
        return ()

    @property
    def is_lossless(self) -> bool:
        """Is this config bit-exact: the class is lossless, or the config is one of its lossless settings?"""
        return self.lossless or self in type(self).lossless_settings()

    def spec(self) -> str:
        """The CLI spec that rebuilds this pass, e.g. ``random_prune:keep_ratio=0.5,seed=0`` (fields whose
        metadata says ``spec=False``, such as calibration data, are not written)."""
        def text(value) -> str:
            return f"{value:.6g}" if isinstance(value, float) else str(value)

        values = [
            f"{f.name}={text(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if f.metadata.get("spec", True) and getattr(self, f.name) != f.default
        ]
        return self.name() + (":" + ",".join(values) if values else "")

    def check(self, adapter: Adapter, before: Sequence[Pass]) -> None:
        """Raise :class:`IncompatiblePassError` if the pass cannot serve this model after ``before``
        (by default: the adapter lacks a capability the pass needs)."""
        from vlmopt.adapters.base import missing_capability

        missing = [need for need in self.needs if need not in adapter.capabilities]
        if missing:
            what = "; ".join(missing_capability(adapter, need) for need in missing)
            raise IncompatiblePassError(
                f"{type(self).__name__} needs what {type(adapter).__name__} ({type(adapter.model).__name__}) does not "
                f"provide — {what}"
            )

    def paper_setting(self, adapter: Adapter, key: str, default):
        """The setting ``key`` the method's paper gives for the model's family (the adapter's
        ``paper_settings``), else ``default``."""
        return adapter.paper_settings.get(self.name(), {}).get(key, default)

    def specialize(self, adapter: Adapter, before: Sequence[Pass]) -> Pass:
        """This config made concrete for the model (settings chosen by measuring it, such as HalfV's
        ``"auto"`` layers); ``compile`` calls it after :meth:`check` and keeps the result. ``self`` by default."""
        return self

    def output_layout(self, layout):
        """The :class:`VisualLayout` of the tokens reaching the LLM after this pass, for an input
        layout (no graph run); unchanged unless the pass prunes visual tokens."""
        return layout

    def apply(self, graph: VLMGraph) -> None:
        """Rewrite ``graph`` in place."""
        raise NotImplementedError

    def plan_inputs(self, prompt, compiled) -> dict:
        """Inputs of the stage graph for one planned batch (:class:`~vlmopt.adapters.base.Prompt`) of
        ``compiled`` (the :class:`~vlmopt.runtime.CompiledVLM`: its adapter and stage graphs),
        computed in eager Python from real values (they stay real when FLOPs are counted on fake
        tensors): new inputs the pass's graph edits read, or replacements of planned ones (APB-V's
        rank-local frames); ``{}`` by default."""
        return {}

    def export_bindings(self) -> dict:
        """For ``vlmopt export``: the functions this pass inserts into the LLM that read the prompt's
        layout, each with how it binds to one image per row (see :mod:`vlmopt.export.fixed_rows`);
        none by default."""
        return {}

    def stage_failed(self, error: Exception) -> None:
        """Called when a stage graph raises in this process, before the error propagates: a pass
        whose graphs run collectives tells the other processes here (default: nothing)."""

    # ----- train-stage passes: state kept outside the frozen config --------------------------
    def new_state(self):
        """A fresh state object (with ``state_dict()`` / ``load_state_dict()``) the pass keeps
        between training steps, or None (the default: a stateless pass)."""
        return None

    def training_inputs(self, state, step) -> dict:
        """Extra inputs of the training graph for one step (``step`` is a
        :class:`vlmopt.train.step.TrainingStep`); ``{}`` by default."""
        return {}

    def after_training_step(self, state, step, outputs: dict) -> None:
        """Update ``state`` from the training graph's ``outputs`` of one step (default: nothing)."""


def check_stages(passes: Sequence[Pass], training: bool) -> None:
    """Refuse pass lists whose stages cannot compose (:class:`IncompatiblePassError` naming the fix)."""
    for position, item in enumerate(passes):
        name = type(item).__name__
        if item.stage == "train" and not training:
            raise IncompatiblePassError(
                f"{name} is a train-stage pass: it only runs in a training graph; compile with mode=\"train\" "
                f"or drop {name} for inference"
            )
        if item.stage == "llm" and training:
            raise IncompatiblePassError(
                f"{name} is an llm-stage pass, which training graphs do not support yet; compile it with "
                f"mode=\"infer\", or train without it"
            )
        for earlier in passes[:position]:
            other = type(earlier).__name__
            if item.stage == "vision" and earlier.stage in ("llm", "kv"):
                raise IncompatiblePassError(
                    f"{name} (vision stage) comes after {other} ({earlier.stage} stage): vision-stage passes "
                    f"rewrite the visual tokens before the LLM; list {name} before {other}"
                )
            if item.stage != "train" and earlier.stage == "train":
                raise IncompatiblePassError(
                    f"{name} ({item.stage} stage) comes after {other} (train stage): train-stage passes rewrite "
                    f"the loss of the finished training graph; list {name} before {other}"
                )
            if item.stage == "kv" and earlier.stage == "kv":
                raise IncompatiblePassError(
                    f"{other} and {name} are both kv-stage passes, and a model has one KV-cache manager; "
                    "keep one of them"
                )


def cut_llm(graph: VLMGraph, prefill: GraphEditor, layer: int, index: fx.Node) -> None:
    """Keep the prefill sequence slots ``index`` [B, S'] (a node of ``prefill``, between decoder layers
    ``layer - 1`` and ``layer``) from decoder layer ``layer`` on, and give the decode graph that
    segment's own 2-D mask (see :meth:`GraphEditor.cut_sequence`)."""
    prefill.cut_sequence(layer, index)
    decode = GraphEditor(graph["decode"])
    decode.split_decode_masks(layer)
    decode.finish()


def check_range(
    owner: str, field: str, value, low, high, *, low_open: bool = False, integer: bool = False, odd: str | None = None
) -> None:
    """Raise :class:`PassConfigError` unless ``low (<|<=) value <= high`` (and, given ``odd``, the
    reason an even value fails, the value is odd)."""
    kind = int if integer or odd else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PassConfigError(f"{owner}.{field} must be a {'whole number' if kind is int else 'number'}, got {value!r}")
    below = value <= low if low_open else value < low
    if below or value > high:
        bracket = "(" if low_open else "["
        raise PassConfigError(f"{owner}.{field} must be in {bracket}{low}, {high}], got {value!r}")
    if odd is not None and value % 2 == 0:
        raise PassConfigError(f"{owner}.{field} must be odd, got {value!r} ({odd})")


@dataclass
class VisualSite:
    """Where the visual tokens flow in the prefill graph, as the passes so far left it."""

    editor: GraphEditor
    adapter: Adapter
    """The model's adapter (for methods that read the vision tower, such as HiPrune)."""
    tokens: fx.Node
    """Current visual tokens [T, D]: what the projector (LLaVA) or the merge (Qwen) reads."""
    positions: fx.Node
    """Current flat sequence slots [T] of those tokens (the merge's ``positions``)."""
    layout: fx.Node
    """Current :class:`VisualLayout` (the graph input, or the last pass's pruned layout)."""

    @classmethod
    def find(cls, editor: GraphEditor, adapter: Adapter) -> VisualSite:
        merge = editor.one("merge")
        index = editor.last("sequence_index")
        layout = editor.input_of(index, "kept") if index is not None else editor.placeholder("layout")
        return cls(editor, adapter, editor.last("visual_tokens"), editor.input_of(merge, "positions"), layout)

    def grid_part(self, chain: Inserter) -> tuple[VisualSite, fx.Node]:
        """This site without each input's structural tokens (CLS, newlines), and the index [T_grid] of
        the grid tokens among the current ones."""
        grid_index = chain(
            gf.grid_index, self.tokens, self.layout, role="visual_grid", stage="vision", name="grid_index"
        )
        tokens = chain(
            torch.index_select, self.tokens, 0, grid_index, role="visual_grid", stage="vision", name="grid_tokens"
        )
        positions = chain(
            torch.index_select, self.positions, 0, grid_index, role="visual_grid", stage="vision", name="grid_positions"
        )
        layout = chain(gf.layout_grid, self.layout, role="visual_grid", stage="vision", name="grid_layout")
        return VisualSite(self.editor, self.adapter, tokens, positions, layout), grid_index

    def with_leading(
        self, grid_index: fx.Node, kept: tuple[fx.Node, fx.Node, fx.Node], chain: Inserter
    ) -> tuple[fx.Node, fx.Node, fx.Node]:
        """(tokens, keep, layout) of a method that pruned :meth:`grid_part`, with every input's
        structural tokens put back in front of its kept grid tokens (each keeps its own slot)."""
        tokens, keep, layout = kept
        full_layout = chain(
            gf.layout_with_leading, layout, self.layout, role="prune_layout", stage="vision", name="kept_full_layout"
        )
        keep = chain(
            gf.keep_with_leading, keep, grid_index, self.layout, layout,
            role="prune_select", stage="vision", name="keep_with_leading",
        )
        tokens = chain(
            gf.tokens_with_leading, self.tokens, tokens, self.layout, layout,
            role="visual_tokens", stage="vision", name="tokens_with_leading",
        )
        return tokens, keep, full_layout

    def update(self, tokens: fx.Node, keep: fx.Node, layout: fx.Node, chain: Inserter) -> None:
        """Route the kept ``tokens`` on; ``keep`` [T'] indexes the current tokens whose slots they take."""
        editor = self.editor
        positions = chain(
            torch.index_select, self.positions, 0, keep, role="visual_positions", stage="vision", name="kept_positions"
        )
        editor.replace_uses(self.tokens, tokens, after=positions)
        merge = editor.one("merge")
        editor.set_input(merge, "positions", positions)
        for reader in editor.nodes("deepstack_scatter"):  # visual features injected into decoder layers follow the tokens
            editor.set_input(reader, "positions", positions)
        index = editor.last("sequence_index")
        if index is None:
            visual_positions = editor.placeholder("visual_positions")
            source_layout = editor.placeholder("layout")
            index = editor.insert(
                merge,
                gf.sequence_keep_index,
                (visual_positions, positions, source_layout, layout),
                role="sequence_index",
                stage="llm",
                name="sequence_index",
            )
            editor.reroute_sequence(merge, index)
        else:
            editor.set_input(index, "kept_positions", positions)
            editor.set_input(index, "kept", layout)


@dataclass(frozen=True)
class VisualTokenPrune(Pass):
    """Keep a fixed number of each visual input's tokens before the LLM (prefill only).

    Position policy: kept tokens keep their original position ids (1-D or M-RoPE); text tokens
    never move; decoding continues at the unpruned length. Causal attention over the kept tokens is
    unchanged because they stay in their original order.

    Structural tokens (the CLS token a LLaVA with ``vision_feature_select_strategy='full'`` feeds its
    LLM; the newline after each grid row of an any-resolution image) are always kept, on top of the
    budget: ``keep_ratio`` and ``num_tokens`` count grid tokens only, and a method sees (and scores)
    the grid tokens only.

    The budget is per visual input of the layout: an image, a video, and for tiled images
    (LLaVA-NeXT / OneVision) the base image and each tile (the part of it the unpadding keeps) on
    their own, so every tile keeps ``keep_ratio`` of its tokens (``num_tokens`` each); a grid that
    OneVision resamples (``anyres_max``) is one input.
    """

    stage: ClassVar[str] = "vision"
    lossless: ClassVar[bool] = False
    needs_grid: ClassVar[bool] = False
    """Does the method read the tokens' spatial grid (so it must see the tower's own tokens)?"""

    keep_ratio: float | None = None
    """Fraction of each visual input's grid tokens to keep, in (0, 1]."""
    num_tokens: int | None = None
    """Absolute number of grid tokens to keep per visual input (instead of ``keep_ratio``), ≥ 1."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if (self.keep_ratio is None) == (self.num_tokens is None):
            raise PassConfigError(f"{owner} needs exactly one of keep_ratio (a fraction in (0, 1]) or num_tokens")
        if self.keep_ratio is not None:
            check_range(owner, "keep_ratio", self.keep_ratio, 0, 1, low_open=True)
        if self.num_tokens is not None:
            check_range(owner, "num_tokens", self.num_tokens, 1, 10**9, integer=True)

    @classmethod
    def lossless_settings(cls) -> tuple[Pass, ...]:
        return (cls(keep_ratio=1.0),)

    def check(self, adapter: Adapter, before: Sequence[Pass]) -> None:
        super().check(adapter, before)
        earlier = [p for p in before if isinstance(p, VisualTokenPrune)]
        if self.needs_grid and earlier:
            raise IncompatiblePassError(
                f"{type(self).__name__} reads the tokens' grid, so it must come before "
                f"{type(earlier[0]).__name__}, which removes tokens from it"
            )

    def output_layout(self, layout):
        return gf.layout_keep(layout, self.keep_ratio, self.num_tokens)

    def apply(self, graph: VLMGraph) -> None:
        editor = GraphEditor(graph["prefill"])
        site = VisualSite.find(editor, graph.adapter)
        order = editor.order()
        chain = editor.chain(max((site.tokens, site.positions, site.layout), key=order.__getitem__))
        if graph.adapter.structural_tokens:
            grid, grid_index = site.grid_part(chain)
            tokens, keep, layout = site.with_leading(grid_index, self.prune(grid, chain), chain)
        else:
            tokens, keep, layout = self.prune(site, chain)
        site.update(tokens, keep, layout, chain)
        editor.finish()

    def prune(self, site: VisualSite, chain: Inserter) -> tuple[fx.Node, fx.Node, fx.Node]:
        """Insert the method on grid tokens; return (kept tokens [T', D], their indices into the site's
        tokens [T'], the new layout). The default keeps the top-scoring tokens of :meth:`score`."""
        layout = chain(
            gf.layout_keep, site.layout, self.keep_ratio, self.num_tokens, role="prune_layout", stage="vision",
            name="kept_layout",
        )
        scores = self.score(site, chain)
        keep = chain(gf.select_topk, scores, site.layout, layout, role="prune_select", stage="vision", name="keep")
        tokens = chain(torch.index_select, site.tokens, 0, keep, role="visual_tokens", stage="vision", name="kept_tokens")
        return tokens, keep, layout

    def score(self, site: VisualSite, chain: Inserter) -> fx.Node:
        """Insert nodes computing a [T] score per current visual token (higher = keep)."""
        raise NotImplementedError
