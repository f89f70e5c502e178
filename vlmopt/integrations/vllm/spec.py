"""What the vLLM plugin runs: the pass list written in ``hf_overrides``, checked against the model
before the engine starts, and the token counts it keeps (no vLLM import: this module is tested in
vlmopt's own environment too).

A pass list is ``hf_config.vlmopt_passes``: pass specs joined with ``+``, exactly as ``vlmopt eval
--passes`` reads them. The plugin runs vision-stage pruning passes (``random_prune``, ``pool_prune``,
``hiprune``): each is vlmopt's own pass object, checked by its own ``check`` against the facts of the
vLLM tower (:class:`TowerFacts`), and its kept counts come from its own ``output_layout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vlmopt import passes as passes_module
from vlmopt.errors import IncompatiblePassError, PassConfigError, UnsupportedModelError
from vlmopt.graph.layout import VisualLayout
from vlmopt.passes.base import Pass, VisualTokenPrune

OVERRIDE_KEY = "vlmopt_passes"
"""The ``hf_overrides`` key holding the pass list, e.g. ``{"vlmopt_passes": "hiprune:keep_ratio=1/3"}``."""

ONE_D_ROPE = (
    "its language model uses 1-D RoPE, and vLLM numbers a prompt's positions 0, 1, 2, ... over the tokens it "
    "holds: after pruning, the kept visual tokens and the text after them would be renumbered instead of keeping "
    "their original positions (vlmopt's position policy). Run it with vlmopt.compile or vlmopt's lmms-eval model"
)


def refusal(family: Any) -> str:
    """Why the plugin refuses a pass list on an adapter class without vLLM classes."""
    if family.vllm_refusal:
        return family.vllm_refusal
    if tuple(family.position_dims) == (0, 1):
        return ONE_D_ROPE
    return ("its adapter names no vLLM model classes (Adapter.vllm_classes, docs/adding-a-family.md); run it with "
            "vlmopt.compile or vlmopt's lmms-eval model")


def spec_of(hf_config: Any) -> str:
    """The pass list written in ``hf_config`` (``""`` when none); a clear error for a value that is no spec."""
    spec = getattr(hf_config, OVERRIDE_KEY, None)
    if spec is None:
        return ""
    if not isinstance(spec, str):
        raise PassConfigError(
            f"hf_overrides[{OVERRIDE_KEY!r}] must be a pass spec string such as 'hiprune:keep_ratio=1/3' "
            f"(join passes with '+'), got {spec!r}"
        )
    return spec.strip()


@dataclass(frozen=True)
class TowerFacts:
    """What vlmopt's pass checks read of a model (an adapter's facts), for a vLLM model: its vision
    tower's depth, the family's paper settings and the capabilities the plugin provides."""

    model_type: str
    """The HF config's ``model_type``."""
    vision_depth: int
    """Blocks of the vision tower."""
    merge_side: int
    """Tower tokens merged along each side of a visual token (a 2×2 merger: 2)."""
    paper_settings: Any
    """Per pass name, the settings the method's paper gives for the family (vlmopt's adapter's)."""

    capabilities: ClassVar[frozenset[str]] = frozenset({"vision_qk", "grids", "video", "mrope"})
    """What the plugin gives passes in vLLM: the tower's Q/K (read from vLLM's vision attention),
    (t, h, w) grids in raster order, videos, M-RoPE positions."""
    structural_tokens: ClassVar[bool] = False

    @property
    def merge(self) -> int:
        """Tower tokens merged into one visual token."""
        return self.merge_side**2

    @property
    def feature_block(self) -> int:
        """The deepest vision block whose output reaches the LLM."""
        return self.vision_depth - 1

    @property
    def model(self) -> Any:
        """Stands for the model in the passes' error messages (they name its class)."""
        return self

    @classmethod
    def of(cls, hf_config: Any) -> TowerFacts:
        """The facts of a HF config served by the plugin, from its family's adapter (the registry's);
        else :class:`UnsupportedModelError` with the reason."""
        from vlmopt.adapters import adapter_for_config

        model_type = hf_config.model_type
        try:
            family = adapter_for_config(hf_config)
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"vlmopt's vLLM plugin cannot prune this model: {error}; drop hf_overrides[{OVERRIDE_KEY!r}]") from None
        if not any(family.model_classes.get(model_type) == name for name in family.vllm_classes):
            raise UnsupportedModelError(f"vlmopt's vLLM plugin cannot prune {model_type}: {refusal(family)}")
        depth, merge_side = family.vllm_tower(hf_config)
        return cls(model_type, depth, merge_side, family.paper_settings)


def plugin_passes(hf_config: Any) -> tuple[VisualTokenPrune, ...]:
    """The checked pass list of ``hf_config`` (empty: run the model unpruned).

    Refused, with the reason and the fix: a spec vlmopt does not know, a pass that works anywhere but
    before the LLM (HalfV, HERMES, ReGATE, ...: vLLM's LLM, KV cache and scheduler stay vLLM's), a
    pass that reads the question (vLLM's prefix cache shares an image's tokens across questions), a
    model the plugin does not serve, and whatever the pass's own ``check`` refuses (HiPrune's layers
    beyond the tower, a grid-reading pass after another pruning pass).
    """
    spec = spec_of(hf_config)
    if not spec:
        return ()
    facts = TowerFacts.of(hf_config)
    items: list[Pass] = [passes_module.parse(part) for part in spec.split("+") if part.strip()]
    for item in items:
        name = type(item).__name__
        if item.stage != "vision" or not isinstance(item, VisualTokenPrune):
            raise IncompatiblePassError(
                f"{name} works at the {item.stage} stage, but vlmopt's vLLM plugin runs visual-token pruning "
                f"before the LLM only (random_prune, pool_prune, hiprune); vLLM's LLM, KV cache and scheduler "
                f"stay vLLM's. Run {name} with vlmopt.compile, or drop it from {OVERRIDE_KEY}"
            )
        if item.query_aware:
            raise IncompatiblePassError(
                f"{name} reads the question, and vLLM's prefix cache shares an image's tokens across questions; "
                "the plugin runs query-agnostic pruning only"
            )
    checked: list[VisualTokenPrune] = []
    for position, item in enumerate(items):
        item.check(facts, checked)
        checked.append(item.specialize(facts, checked))
    return tuple(checked)


def three_sections(rope: dict) -> dict | None:
    """The three-section form vLLM reads of an M-RoPE written one rotary pair per section, else None.

    HF takes section i from axis ``i % 3``, so ``mrope_section = [1] * n`` is interleaved M-RoPE (axes
    t, h, w, t, h, w, ...; vlmopt's reference models write it so). vLLM sizes its position buffer by
    the section count and reads three sections; its interleaved form with the same per-axis counts
    computes the same rotary."""
    section = (rope or {}).get("mrope_section")
    if not section or len(section) <= 3 or any(part != 1 for part in section):
        return None
    return dict(rope, mrope_section=[len(range(axis, len(section), 3)) for axis in range(3)], mrope_interleaved=True)


def check_mrope(hf_config: Any) -> None:
    """Refuse a config whose M-RoPE vLLM cannot read as written, naming the override that fixes it."""
    fixed = three_sections(getattr(hf_config.get_text_config(), "rope_parameters", None))
    if fixed is not None:
        raise UnsupportedModelError(
            "this checkpoint writes interleaved M-RoPE as one rotary pair per section, and vLLM reads three sections: "
            f"add hf_overrides={{'text_config': {{'rope_parameters': {fixed}}}}} (the same rotary), or build the "
            "overrides with vlmopt.integrations.vllm.engine_overrides(model, passes)"
        )


def engine_overrides(model: str | Path, passes: str = "") -> dict[str, Any]:
    """The ``hf_overrides`` that serve ``model`` (a model directory or a vlmopt reference model name) in
    vLLM with ``passes``: the pass list, and the three-section M-RoPE where the checkpoint writes one-pair
    sections (:func:`three_sections`)."""
    import json

    from vlmopt import reference

    config = json.loads((reference.path(model) / "config.json").read_text())
    overrides: dict[str, Any] = {OVERRIDE_KEY: passes} if passes else {}
    fixed = three_sections(config.get("text_config", {}).get("rope_parameters"))
    if fixed is not None:
        overrides["text_config"] = {"rope_parameters": fixed}
    return overrides


def merged_grid(grid_thw: Any, merge_size: int) -> tuple[int, int, int]:
    """(t, h, w) of an item's merged visual tokens from its patch grid ``grid_thw`` (t, H, W)."""
    t, h, w = (int(v) for v in grid_thw)
    return t, h // merge_size, w // merge_size


def kept_layout(pass_list: tuple[VisualTokenPrune, ...], grids: list[tuple[int, int, int]]) -> VisualLayout:
    """The layout reaching the LLM after the passes, for items of merged ``grids``: each pass's own
    ``output_layout`` (no tower run), so counts are known before the tower runs."""
    layout = VisualLayout.from_grids(len(grids), 0, tuple(range(len(grids))), tuple(grids))
    for item in pass_list:
        layout = item.output_layout(layout)
    return layout


def kept_count(pass_list: tuple[VisualTokenPrune, ...], grid: tuple[int, int, int]) -> int:
    """Visual tokens one item of merged ``grid`` keeps (its placeholder count in the prompt)."""
    return kept_layout(pass_list, [grid]).counts[0]
