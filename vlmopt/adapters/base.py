"""What every architecture adapter shares: the registry, the LLM half of the pipeline, the contract.

An adapter turns one family of Hugging Face VLMs into small traceable *pipeline modules* (prefill
with vision, text-only prefill, one decode step) whose forwards call the HF submodules directly, and
plans each batch in eager Python (positions, visual-token slots, vision-tower metadata) so that the
graphs only see tensors and static ints. It also says what the family *has*
(:data:`CAPABILITIES`), which passes compare with what they *need*; the settings the methods' papers
give for the family (:attr:`Adapter.paper_settings`); and how its decoder layer computes
(:class:`~vlmopt.adapters.layer_view.DecoderLayerView`). Nothing outside ``vlmopt/adapters`` names a
family: a new family is one adapter file, registered with :func:`register`.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from vlmopt.adapters.layer_view import DecoderLayerView, layer_mask_kinds
from vlmopt.adapters.text import TextPipeline
from vlmopt.errors import InputError, UnsupportedModelError
from vlmopt.graph import functions as gf

if TYPE_CHECKING:
    from torch import fx

    from vlmopt.adapters.formats import PromptFormat
    from vlmopt.graph.edit import GraphEditor

#: What an adapter can provide, and what each means. A pass lists the ones it needs (``Pass.needs``).
CAPABILITIES: dict[str, str] = {
    "vision_qk": "the queries and keys of the vision tower's blocks (Adapter.insert_vision_qk)",
    "grids": "visual tokens on (t, h, w) grids in raster order",
    "video": "video inputs",
    "mrope": "3-D M-RoPE position ids",
    "stream": "frames streamed into a filled KV cache (Adapter.stream_planner)",
    "frames": "frames encoded apart, for frame-parallel vision (Adapter.frame_tokens / frame_inputs)",
    "export": "ONNX export of the vision, prefill and decode graphs (Adapter.export_image_size, export_leaves)",
    "deepstack": "visual features added to the hidden states of the first decoder layers (DeepStack)",
}

#: HF model class name → adapter class (filled by :func:`register`; ``vlmopt.adapters`` imports every adapter).
REGISTRY: dict[str, type[Adapter]] = {}


def missing_capability(adapter: Adapter | type[Adapter], need: str) -> str:
    """``need: what it means`` and, where the family says why it lacks it, the reason."""
    reason = adapter.lacks.get(need)
    return f"{need}: {CAPABILITIES[need]}" + (f" ({reason})" if reason else "")


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: serve every HF class in ``cls.model_classes`` with the adapter ``cls``."""
    unknown = (set(cls.capabilities) | set(cls.lacks)) - set(CAPABILITIES)
    if unknown:
        raise TypeError(f"{cls.__name__} names unknown capabilities {sorted(unknown)}; known: {sorted(CAPABILITIES)}")
    if set(cls.capabilities) & set(cls.lacks):
        raise TypeError(f"{cls.__name__} both has and lacks {sorted(set(cls.capabilities) & set(cls.lacks))}")
    for name in cls.model_classes.values():
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise TypeError(f"{name} is served by {REGISTRY[name].__name__} already")
        REGISTRY[name] = cls
    return cls


@dataclass(frozen=True)
class NamedConfig:
    """A model config vlmopt builds without downloads (``vlmopt.configs.CONFIGS``)."""

    make: Callable[..., Any]
    """Builds the HF config; a ``*-shape`` config takes ``width`` (1.0 = the real model's widths)."""
    image_grid: tuple[int, int] | None = None
    """Grid of the benchmark image as the family's ``synthetic_visual`` reads it: its patch grid (h, w) for
    native-resolution towers, its tiles (rows, columns) for tiling ones (None: the family's default image)."""
    description: str = ""
    """One line: what the config is."""
    processor: Callable[..., Any] | None = None
    """Builds a processor whose tokenizer fits the config (its special ids), so the CLI can prompt it;
    takes ``image_size`` / ``video_size`` (pixels) where the family's tower takes any size."""
    tasks: Mapping[str, Mapping[str, Any]] | None = None
    """Reference task configs (``vlmopt.reference.tasks.get(name, **config)``) a random model is evaluated on."""


@dataclass(frozen=True)
class VisionQK:
    """Queries and keys of one vision block, as the block computes them (rotary applied, if any).

    ``q`` and ``k`` hold P × (heads·head_dim) values in the tower's token order, every visual input's
    frames one after the other (LLaVA: [N, S, H·D]; Qwen: [P, H, D], Qwen2.5-VL in window order); a
    frame is ``leading`` tokens then its grid, ``merge`` tower tokens per visual token.
    """

    q: fx.Node
    k: fx.Node
    heads: int
    """Attention heads of the block."""
    scale: float
    """Softmax scale the block uses (1/√head_dim)."""
    leading: int
    """Tower tokens before each frame's grid (CLIP's CLS: 1), which no visual grid token matches."""
    merge: int
    """Tower tokens merged into one visual token (Qwen's 2×2 merger: 4; LLaVA: 1)."""
    frames: fx.Node
    """The graph's input :class:`~vlmopt.graph.layout.VisualLayout`, whose grids are the tower's frames."""
    order: fx.Node | None
    """[T] index taking per-visual-token values from the tower's order to the visual tokens' order
    (Qwen2.5-VL's reverse window index); None when the orders agree."""


@dataclass(frozen=True)
class DecoderQK:
    """Queries and keys of one decoder layer, from its input hidden states."""

    q: fx.Node
    """[B, heads, S, head_dim]."""
    k: fx.Node
    """[B, kv_heads, S, head_dim] (grouped-query attention: each serves heads // kv_heads query heads)."""
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    """Softmax scale the layer uses."""
    rope: bool
    """Are the layer's rotary embeddings (1-D RoPE or M-RoPE, as the rotary node made them) applied?"""


@dataclass
class Prompt:
    """A batch of prompts planned for the graphs."""

    stage: str
    """Graph that runs the prefill: ``"prefill"`` (with visual inputs) or ``"prefill_text"``."""
    inputs: dict[str, Any]
    """Graph inputs, except ``cache`` and ``logits_to_keep``."""
    next_position: Tensor
    """Position ids of the first generated token: [B, 1], or [3, B, 1] for M-RoPE."""
    layout: Any = None
    """The :class:`~vlmopt.graph.layout.VisualLayout` of the batch (None without visual inputs)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Adapter-specific facts (e.g. the image grids), for tools such as ``vlmopt viz``."""


class Adapter(ABC):
    """Turns one family of HF VLMs into pipeline modules and plans batches for them."""

    family: ClassVar[str]
    """Short family name (the ``model_type`` of the family's main config: ``"llava"``, ``"qwen2_5_vl"``)."""
    model_classes: ClassVar[Mapping[str, str]]
    """The HF classes this adapter serves, by their config's ``model_type``."""
    capabilities: ClassVar[frozenset[str]] = frozenset()
    """What the family has, of :data:`CAPABILITIES`; passes refuse a model that lacks what they need."""
    lacks: ClassVar[Mapping[str, str]] = {}
    """Capability → why the family does not have it (a refusal quotes it)."""
    paper_settings: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """Per pass name, the settings its paper or official code gives for this family (a pass falls
    back to its own depth-scaled default where there is no entry)."""
    decoder_view: ClassVar[DecoderLayerView] = DecoderLayerView()
    """How the family's decoder layer computes, by role (the Llama layout by default)."""
    configs: ClassVar[Mapping[str, NamedConfig]] = {}
    """Random-weight configs of the family (``vlmopt.configs.CONFIGS``)."""
    position_dims: ClassVar[tuple[int, int]] = (0, 1)
    """(batch, sequence) dims of the position ids: (0, 1) for 1-D RoPE [B, S], (1, 2) for M-RoPE [3, B, S]."""
    batch_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    """Processor outputs besides ``input_ids`` / ``attention_mask`` / ``position_ids`` the family reads."""
    export_sequence_inputs: ClassVar[Mapping[str, str]] = {}
    """Prefill inputs [B, S] besides the text's that an export's runtime plans from the prompt's token ids:
    input name → planner in :data:`vlmopt.export.planning.SEQUENCE_PLANNERS`."""
    host_inputs: ClassVar[tuple[str, ...]] = ()
    """Planned inputs the HF modules read back as Python numbers (they stay real under fake tensors)."""
    prompt_format: ClassVar[PromptFormat | None] = None
    """How the reference tasks prompt the family, where :mod:`vlmopt.reference.processing` has no built-in
    format for it (:mod:`vlmopt.adapters.formats`)."""
    vllm_classes: ClassVar[Mapping[str, str]] = {}
    """vLLM plugin (:mod:`vlmopt.integrations.vllm`): per HF class served, the ``module:Class`` of vLLM's
    model with vlmopt's pruning, imported by vLLM only when it serves such a model (none: refused)."""
    vllm_refusal: ClassVar[str] = ""
    """Why the vLLM plugin refuses a pass list on this family, where its own reasons (1-D RoPE, no
    :attr:`vllm_classes`: :func:`vlmopt.integrations.vllm.spec.refusal`) do not say it."""

    @classmethod
    def vllm_tower(cls, config: Any) -> tuple[int, int]:
        """(vision blocks, tower tokens merged along each side of a visual token) of a HF config, for
        the vLLM plugin's pass checks and kept counts (only families with :attr:`vllm_classes`)."""
        raise UnsupportedModelError(f"vlmopt's vLLM plugin has no model classes for the {cls.family} adapter")

    @classmethod
    def vllm_prompt(cls, text: str, video: bool) -> str:
        """A reference prompt (``vlmopt.reference.processing.prompt``) as vLLM's processor for the
        family expects it, so its tokens are vlmopt's processor's (the same by default)."""
        return text

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.text_config = model.config.get_text_config()

    # ----- graphs -------------------------------------------------------------------------
    @abstractmethod
    def prefill_pipeline(self) -> nn.Module:
        """The prefill step with visual inputs, as a traceable module."""

    def text_pipeline(self) -> nn.Module:
        """The prefill step of a text-only prompt, and the decode step (same computation)."""
        return TextPipeline(self.text_model, self.model.lm_head, self.position_dims, self.decoder_view)

    @property
    @abstractmethod
    def text_model(self) -> nn.Module: ...

    @property
    def mask_kinds(self) -> list[str]:
        """``"full"`` or ``"sliding"`` attention, per decoder layer."""
        return layer_mask_kinds(self.text_config)

    def decoder_layer(self, index: int) -> nn.Module:
        """The HF decoder layer ``index`` of the language model."""
        return self.text_model.layers[index]

    # ----- vision-tower facts passes use ---------------------------------------------------
    @property
    @abstractmethod
    def vision_depth(self) -> int:
        """Blocks of the HF vision tower (the paper-default layer of a method scales with it)."""

    @property
    @abstractmethod
    def feature_block(self) -> int:
        """Index of the deepest vision block whose output reaches the LLM."""

    leading_tokens: int = 0
    """Tokens each visual input feeds the LLM before its grid (a CLS token); pruning always keeps them."""

    @property
    def structural_tokens(self) -> bool:
        """Can a visual input's features hold structural tokens (CLS, row newlines), which a pruning pass
        keeps outside its budget and never scores (:class:`~vlmopt.graph.layout.VisualLayout`)?"""
        return bool(self.leading_tokens)
    frames_per_patch: int = 1
    """Video frames the tower encodes together (a temporal patch): a stream appends frames in multiples of it."""

    def insert_vision_qk(self, editor: GraphEditor, block: int, role: str = "attention_score") -> VisionQK:
        """Insert nodes computing vision block ``block``'s queries and keys from its input, as the block
        computes them (its rotary embedding applied, where the tower has one). Capability ``vision_qk``."""
        raise UnsupportedModelError(f"the {self.family} adapter cannot read its vision tower's queries and keys")

    # ----- frames, for encoding them apart (frame-parallel vision) -------------------------
    def frame_tokens(self, prompt: Prompt) -> list[int]:
        """Visual tokens of each frame of a planned prefill, in token order. A frame is what the
        tower encodes independently of the others (an image; a temporal patch of a video)."""
        raise UnsupportedModelError(f"the {self.family} adapter cannot encode frames apart")

    def frame_inputs(self, prompt: Prompt, first: int, stop: int) -> dict[str, Any]:
        """The vision-tower inputs of frames ``[first, stop)`` of a planned prefill, planned as for a
        prompt holding only those frames: the tower then gives exactly their visual tokens."""
        raise UnsupportedModelError(f"the {self.family} adapter cannot encode frames apart")

    # ----- streams ------------------------------------------------------------------------
    def stream_planner(self, compiled, processor):
        """The planner of a :class:`vlmopt.stream.Stream` on this family (capability ``stream``): the
        prompt around the frames, each chunk's graph inputs and positions (see :mod:`vlmopt.stream.planning`)."""
        raise UnsupportedModelError(f"the {self.family} adapter does not stream frames (vlmopt.stream)")

    # ----- export -------------------------------------------------------------------------
    def export_image_size(self, processor: Any, requested: int | None) -> int:
        """The square image side (pixels) an ONNX export is fixed to (``requested`` where the tower takes it)."""
        raise UnsupportedModelError(f"the {self.family} adapter does not export to ONNX")

    def export_processor(self, processor: Any) -> Any:
        """The processor an ONNX export saves and writes its prompts with: one that gives one image the
        export's fixed layout (``processor`` itself by default)."""
        return processor

    def export_image_grid(self, image_size: int) -> tuple[int, int] | None:
        """The patch grid (h, w) of one ``image_size`` px image for :func:`vlmopt.configs.synthetic_batch`
        (None: the tower's fixed size)."""
        return None

    def export_leaves(self) -> Mapping[str, Callable[[nn.Module, fx.Node, dict[str, Any]], nn.Module]]:
        """HF leaf class name → factory(module, node, constants) of an export-friendly stand-in, for leaves
        ``torch.export`` cannot trace as they are (data-dependent splits); none by default."""
        return {}

    def pixel_frames(self, batch: dict[str, Any]) -> list:
        """The normalised images [H, W, 3] (numpy) of a batch's ``pixel_values``, one per image (``vlmopt viz``)."""
        raise UnsupportedModelError(f"the {self.family} adapter cannot rebuild images from pixel_values")

    def prompt_text(self, question: str) -> str:
        """The prompt of one image and ``question`` for a processor without a chat template."""
        raise UnsupportedModelError(f"the {self.family} adapter has no default prompt format; use a processor with a chat template")

    # ----- LLM facts passes use ------------------------------------------------------------
    def decoder_layer_nodes(self, graph: fx.GraphModule) -> list[fx.Node]:
        """The decoder-layer nodes of a stage graph, by layer index."""
        nodes = [n for n in graph.graph.nodes if n.meta.get("role") == "decoder_layer"]
        return sorted(nodes, key=lambda n: n.meta["index"])

    def cache_input(self, graph: fx.GraphModule) -> fx.Node:
        """The stage graph's KV-cache input (a ``DynamicCache`` the decoder layers fill)."""
        return next(n for n in graph.graph.nodes if n.op == "placeholder" and n.target == "cache")

    def insert_decoder_qk(
        self, editor: GraphEditor, layer: int, rope: bool = True, role: str = "attention_score"
    ) -> DecoderQK:
        """Insert nodes computing decoder layer ``layer``'s queries and keys from its input hidden
        states (through the family's decoder-layer view: per-head norms included), with the layer's
        rotary embedding (``rope``) or without."""
        nodes = self.decoder_layer_nodes(editor.module)
        if not 0 <= layer < len(nodes):
            raise ValueError(f"the language model has decoder layers 0..{len(nodes) - 1}, not {layer}")
        node = nodes[layer]
        hidden = editor.input_of(node, "hidden_states")
        cos, sin = editor.input_of(node, "position_embeddings")
        order = editor.order()
        chain = editor.chain(max((hidden, cos, sin), key=order.__getitem__))
        view, module = self.decoder_view, self.decoder_layer(layer)
        head_dim = view.head_dim(module)
        prefix, name = f"layers.{layer}", f"layer_{layer}"
        normed = view.insert_input_norm(chain, prefix, hidden, node_role=role, name=f"{name}_norm")
        q = view.insert_heads(chain, prefix, "q_proj", normed, head_dim, node_role=role, name=f"{name}_q_proj")
        k = view.insert_heads(chain, prefix, "k_proj", normed, head_dim, node_role=role, name=f"{name}_k_proj")
        qk = chain(
            gf.decoder_qk, q, k, cos if rope else None, sin if rope else None, head_dim,
            role=role, stage="llm", name=f"{name}_qk",
        )
        q = chain(operator.getitem, qk, 0, role=role, stage="llm", name=f"{name}_q")
        k = chain(operator.getitem, qk, 1, role=role, stage="llm", name=f"{name}_k")
        config = self.text_config
        return DecoderQK(q, k, config.num_attention_heads, config.num_key_value_heads, head_dim, view.scale(module), rope)

    # ----- planning -----------------------------------------------------------------------
    @abstractmethod
    def plan(self, batch: dict[str, Any], for_generation: bool) -> Prompt:
        """Plan one prefill batch (HF processor outputs) for the graphs."""

    def decode_inputs(self, tokens: Tensor, attention_mask: Tensor, position: Tensor) -> dict[str, Any]:
        """Graph inputs of one decode step: tokens [B, 1], the 2-D mask over cache + new token."""
        return {"input_ids": tokens, "attention_mask": attention_mask, "position_ids": position}

    # ----- random inputs (vlmopt.configs.synthetic_batch) ----------------------------------
    @classmethod
    def synthetic_visual(cls, config, kind: str, grid: tuple[int, ...] | None, generator: torch.Generator) -> tuple[list[int], dict[str, Tensor]]:
        """One random image (``kind="image"``, patch grid (h, w) or None for the default) or video
        (``"video"``, grid (t, h, w) in frames): its prompt ids with the model's placeholder tokens, and
        its processor outputs, concatenated along dim 0 across a batch's items: tensors, or a
        ``torch.Size`` for random pixels of that shape (drawn once all text ids are)."""
        raise UnsupportedModelError(f"the {cls.family} adapter makes no synthetic {kind} inputs")

    @classmethod
    def synthetic_extras(cls, config, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Processor outputs derived from a synthetic batch's ids (Qwen's ``mm_token_type_ids``); none by default."""
        return {}

    # ----- shared helpers -----------------------------------------------------------------
    @staticmethod
    def attention_mask_of(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; pass the 2-D mask the processor returned"
            )
        return attention_mask

    @staticmethod
    def generation_positions(attention_mask: Tensor) -> Tensor:
        """1-D positions as HF ``generate`` makes them: count real tokens, padding at 0."""
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(attention_mask == 0, 0)

    @staticmethod
    def slots_of(token_mask: Tensor) -> Tensor:
        """Flat ``b * S + s`` slots of the True entries of a [B, S] mask, row-major (HF's merge order)."""
        return token_mask.reshape(-1).nonzero().squeeze(1)
