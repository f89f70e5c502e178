"""Architectures of the reference models: small HF configs, real HF classes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlavaArch:
    """``tiny-llava``: CLIP vision tower (with CLS) → 2-layer MLP projector → Llama LM."""

    image_size: int = 224
    """Input side (pixels)."""
    patch_size: int = 14
    """Vision patch side: 224 / 14 = 16×16 = 256 visual tokens (+ CLS, dropped by "default")."""
    vision_hidden: int = 128
    """CLIP hidden size."""
    vision_layers: int = 6
    """CLIP layers (features come from layer -2, i.e. the output of layer 5)."""
    vision_heads: int = 4
    """CLIP attention heads."""
    vision_intermediate: int = 512
    """CLIP MLP width."""
    text_hidden: int = 192
    """Llama hidden size."""
    text_layers: int = 4
    """Llama decoder layers."""
    text_heads: int = 6
    """Llama attention heads (head dim 32)."""
    text_kv_heads: int = 2
    """Llama key/value heads (grouped-query attention)."""
    text_intermediate: int = 512
    """Llama MLP width."""


@dataclass(frozen=True)
class QwenArch:
    """``tiny-qwen25vl``: windowed Qwen2.5-VL ViT (2×2 merger) → Qwen2 LM with M-RoPE."""

    image_size: int = 448
    """Largest image side the processor keeps: 448 / 14 = 32×32 patches → 256 merged tokens."""
    video_size: int = 112
    """Video frame side: 8×8 patches → 16 merged tokens per frame pair."""
    vision_hidden: int = 96
    """ViT hidden size."""
    vision_depth: int = 8
    """ViT blocks."""
    vision_heads: int = 4
    """ViT heads (head dim 24)."""
    vision_intermediate: int = 256
    """ViT gated-MLP width."""
    fullatt_block_indexes: tuple[int, ...] = (3, 7)
    """Blocks with full attention (the others attend within 112 px windows)."""
    window_size: int = 112
    """Window side for windowed attention (pixels)."""
    text_hidden: int = 192
    """LM hidden size."""
    text_layers: int = 4
    """LM decoder layers."""
    text_heads: int = 6
    """LM heads (head dim 32; M-RoPE sections 4/6/6 of its 16 rotary pairs)."""
    text_kv_heads: int = 2
    """LM key/value heads."""
    text_intermediate: int = 512
    """LM MLP width."""
    tokens_per_second: int = 2
    """M-RoPE temporal ids per second of video (with 2 fps, +2 per temporal patch)."""
    text_rope_theta: float = 10000.0
    """LM rotary base. M-RoPE gives the width section the lowest frequencies: at head dim 32 and base
    10,000 one merged column turns a query by at most 0.0032 rad, so the LM cannot tell left from right."""
    text_mrope_interleaved: bool = False
    """Deal the LM's rotary pairs to (temporal, height, width) in turn, one pair each, instead of in
    three contiguous sections: every axis then gets fast and slow frequencies (at base 10,000 a column
    turns the fastest width pair by 0.32 rad, not 0.0032). Qwen3-VL's interleaved M-RoPE; the stock
    Qwen2.5-VL code reads it from an ``mrope_section`` of ones. Text tokens (equal ids on the three
    axes) turn the same either way."""

    def __post_init__(self) -> None:
        if self.text_rope_theta <= 1:
            raise ValueError(f"QwenArch.text_rope_theta={self.text_rope_theta} must be > 1 (a rotary base)")


@dataclass(frozen=True)
class Qwen3Arch:
    """``tiny-qwen3vl``: Qwen3-VL ViT (absolute position embedding, full attention, DeepStack) → 12-layer Qwen3 LM."""

    image_size: int = 448
    """Largest image side the processor keeps: 448 / 14 = 32×32 patches → 256 merged tokens (as ``tiny-qwen25vl``)."""
    video_size: int = 112
    """Video frame side: 8×8 patches → 16 merged tokens per frame pair."""
    patch_size: int = 14
    """Vision patch side (Qwen3-VL checkpoints use 16; 14 keeps ``tiny-qwen25vl``'s token counts and 28 px cells)."""
    num_position_embeddings: int = 1024
    """Learned absolute positions of the tower: a 32×32 grid, one per patch of a 448 px image, bilinearly
    interpolated to other grids (a 112 px frame's 8×8)."""
    vision_hidden: int = 96
    """ViT hidden size."""
    vision_depth: int = 8
    """ViT blocks (each attends over the whole image or frame: Qwen3-VL's tower has no windows)."""
    vision_heads: int = 4
    """ViT heads (head dim 24)."""
    vision_intermediate: int = 256
    """ViT MLP width."""
    deepstack_visual_indexes: tuple[int, ...] = (2, 4, 6)
    """Blocks whose merged outputs are added to the LM's hidden states after LM layers 0, 1, 2 (DeepStack).
    Qwen3-VL-8B takes blocks 8, 16, 24 of 27: one every ~quarter of the tower, the last below the final
    block that feeds the main merger; on 8 blocks that is every second block, 2, 4, 6 (7 feeds the merger)."""
    text_hidden: int = 192
    """LM hidden size."""
    text_layers: int = 12
    """LM decoder layers (the depth-dependent methods need more than the other models' 4)."""
    text_heads: int = 6
    """LM heads (head dim 32: 16 rotary pairs, interleaved over (temporal, height, width) as 6/5/5)."""
    text_kv_heads: int = 2
    """LM key/value heads."""
    text_intermediate: int = 512
    """LM MLP width."""
    text_rope_theta: float = 10000.0
    """LM rotary base. Qwen3-VL's M-RoPE is interleaved, so the width axis gets fast pairs too (its fastest
    turns 0.32 rad per merged column at 10,000); the base ``tiny-qwen25vl`` trained well with (a new base
    cost its fine-tunes up to 47 points; Qwen3-VL's own 5,000,000 is for 256k-token contexts)."""

    def __post_init__(self) -> None:
        if self.text_rope_theta <= 1:
            raise ValueError(f"Qwen3Arch.text_rope_theta={self.text_rope_theta} must be > 1 (a rotary base)")
        side = self.image_size // self.patch_size
        if self.num_position_embeddings != side * side:
            raise ValueError(
                f"Qwen3Arch.num_position_embeddings={self.num_position_embeddings} must be {side * side}: "
                f"the {side}×{side} patch grid of a {self.image_size} px image"
            )
        if not all(0 <= i < self.vision_depth - 1 for i in self.deepstack_visual_indexes):
            raise ValueError(
                f"Qwen3Arch.deepstack_visual_indexes={self.deepstack_visual_indexes} must be blocks below the last "
                f"({self.vision_depth - 1}), which feeds the main merger"
            )
        if len(self.deepstack_visual_indexes) >= self.text_layers:
            raise ValueError("Qwen3Arch: DeepStack needs an LM layer per deepstack block")


def llava_config(arch: LlavaArch, tokenizer):
    """``LlavaConfig`` for ``arch`` with token ids from ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
        image_size=arch.image_size, patch_size=arch.patch_size, projection_dim=arch.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=arch.text_hidden, intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_kv_heads, vocab_size=len(tokenizer), max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(arch.image_size // arch.patch_size) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )


def mrope_section(head_dim: int, interleaved: bool = False) -> list[int]:
    """M-RoPE split of ``head_dim / 2`` rotary pairs: (temporal, height, width) sections in Qwen's
    1:1.5:1.5 ratio, or ``interleaved``: one pair per chunk, which Qwen2.5-VL's rotary assigns to the
    axes in turn (chunk i goes to axis i mod 3)."""
    half = head_dim // 2
    if interleaved:
        return [1] * half
    section = [half // 4, (half - half // 4) // 2]
    return section + [half - sum(section)]


def qwen_config(arch: QwenArch, tokenizer):
    """``Qwen2_5_VLConfig`` for ``arch`` with token ids from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    head_dim = arch.text_hidden // arch.text_heads
    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=arch.vision_depth, hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
            num_heads=arch.vision_heads, out_hidden_size=arch.text_hidden,
            fullatt_block_indexes=list(arch.fullatt_block_indexes), window_size=arch.window_size,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=arch.tokens_per_second,
        ),
        text_config=dict(
            hidden_size=arch.text_hidden, intermediate_size=arch.text_intermediate,
            num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
            num_key_value_heads=arch.text_kv_heads, vocab_size=len(tokenizer), max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": mrope_section(head_dim, arch.text_mrope_interleaved), "rope_theta": float(arch.text_rope_theta)},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=False,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False,
    )


def qwen3_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's interleaved M-RoPE split of ``head_dim / 2`` rotary pairs over (temporal, height,
    width), scaled from Qwen3-VL-8B's [24, 20, 20] of 64: [6, 5, 5] at head dim 32. The rotary deals
    pair i to height for i ≡ 1, width for i ≡ 2 (mod 3) while those sections last, temporal otherwise."""
    half = head_dim // 2
    spatial = round(half * 20 / 64)
    return [half - 2 * spatial, spatial, spatial]


def qwen3_config(arch: Qwen3Arch, tokenizer):
    """``Qwen3VLConfig`` for ``arch`` with token ids from ``tokenizer``."""
    from transformers import Qwen3VLConfig

    ids = tokenizer.convert_tokens_to_ids
    head_dim = arch.text_hidden // arch.text_heads
    return Qwen3VLConfig(
        vision_config=dict(
            depth=arch.vision_depth, hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
            num_heads=arch.vision_heads, out_hidden_size=arch.text_hidden, patch_size=arch.patch_size,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=arch.num_position_embeddings,
            deepstack_visual_indexes=list(arch.deepstack_visual_indexes),
        ),
        text_config=dict(
            hidden_size=arch.text_hidden, intermediate_size=arch.text_intermediate, head_dim=head_dim,
            num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
            num_key_value_heads=arch.text_kv_heads, vocab_size=len(tokenizer), max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default", "mrope_section": qwen3_mrope_section(head_dim), "mrope_interleaved": True,
                "rope_theta": float(arch.text_rope_theta),
            },
            pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
