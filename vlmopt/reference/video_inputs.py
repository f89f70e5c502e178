"""Qwen video inputs built by hand, with exactly the HF video processors' resize rule,
normalisation, patch layout and prompt text (their torchvision dependency is not installed here;
``tests/reference`` checks the layout against the HF source).

Qwen2.5-VL writes a video as ``<|vision_start|><|video_pad|>*n<|vision_end|>`` and passes
``second_per_grid_ts``; Qwen3-VL writes, per temporal patch, ``<{t:.1f} seconds><|vision_start|>…<|vision_end|>``
(the patch's mean frame time, as ``Qwen3VLProcessor`` writes it) and passes no time.
"""

from __future__ import annotations

import numpy as np
import torch

QWEN_VIDEO_FPS = 2.0
"""Frames per second the Qwen video inputs declare: one temporal patch (2 frames) = 1 s."""


QWEN3_PATCH = 14
"""Patch side of the Qwen3-VL reference model: 448 px images give 32×32 patches → 256 merged tokens,
as many as Qwen2.5-VL's (Qwen3-VL checkpoints use 16)."""
QWEN3_MAX_FRAMES = 768
"""Most frames a Qwen3-VL reference clip keeps at full frame size (``Qwen3VLVideoProcessor.max_frames``):
its size bounds count the pixels of all frames together."""
QWEN3_MEAN = QWEN3_STD = (0.5, 0.5, 0.5)
"""Qwen3-VL's image and video normalisation (``IMAGENET_STANDARD_MEAN`` / ``_STD``)."""


def video_config(video_size: int, arch: str = "qwen2_5_vl") -> dict:
    """``video_preprocessor_config.json`` of a Qwen reference model (frames of ``video_size`` px;
    ``arch`` "qwen2_5_vl" or "qwen3_vl")."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if arch == "qwen3_vl":
        return {
            "video_processor_type": "Qwen3VLVideoProcessor",
            "processor_class": "Qwen3VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(QWEN3_MEAN), "image_std": list(QWEN3_STD), "do_convert_rgb": True,
            # Qwen3VLVideoProcessor bounds t·h·w over the whole clip (Qwen2-VL's bound one frame)
            "size": {"shortest_edge": 2 * 56 * 56, "longest_edge": QWEN3_MAX_FRAMES * video_size * video_size},
            "patch_size": QWEN3_PATCH, "temporal_patch_size": 2, "merge_size": 2,
            "do_sample_frames": False, "fps": QWEN_VIDEO_FPS, "cap_pixels_per_frame": False,
            "max_frames": QWEN3_MAX_FRAMES, "resample": 3, "return_metadata": True,
        }
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True,
        "size": {"shortest_edge": 56 * 56, "longest_edge": video_size * video_size},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "do_sample_frames": False, "fps": QWEN_VIDEO_FPS, "cap_pixels_per_frame": False,
        "resample": 3,
    }


def _is_qwen3(video_cfg: dict) -> bool:
    return video_cfg.get("video_processor_type") == "Qwen3VLVideoProcessor"


def video_grid(num_frames: int, height: int, width: int, video_cfg: dict) -> tuple[int, int, int, int, int]:
    """(grid_t, grid_h, grid_w, resized_h, resized_w) the Qwen2-VL or Qwen3-VL video processor
    (``video_cfg["video_processor_type"]``) gives a clip."""
    factor = video_cfg["patch_size"] * video_cfg["merge_size"]
    bounds = {"min_pixels": video_cfg["size"]["shortest_edge"], "max_pixels": video_cfg["size"]["longest_edge"]}
    if _is_qwen3(video_cfg):
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_resize

        h, w = qwen3_resize(num_frames, height, width, temporal_factor=video_cfg["temporal_patch_size"], factor=factor, **bounds)
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=factor, **bounds)
    t = -(-num_frames // video_cfg["temporal_patch_size"])
    return t, h // video_cfg["patch_size"], w // video_cfg["patch_size"], h, w


def qwen_video_inputs(frames: np.ndarray, video_cfg: dict) -> dict[str, torch.Tensor]:
    """Qwen video inputs for one clip, as ``Qwen2VLVideoProcessor`` + ``Qwen2_5_VLProcessor`` make them
    (or ``Qwen3VLVideoProcessor`` + ``Qwen3VLProcessor`` for a Qwen3-VL ``video_cfg``: the same layout).

    ``frames``: uint8 [T, H, W, 3]. Returns ``pixel_values_videos`` [t·h·w, 3·2·p·p] (float32, p the
    patch side), ``video_grid_thw`` [1, 3] = (t, h, w) with t = ceil(T / 2) (an odd clip repeats its
    last frame), and for Qwen2.5-VL ``second_per_grid_ts`` [1] = temporal_patch_size / fps (Qwen3-VL
    writes :func:`video_timestamps` into the prompt instead). Frames whose size is not already a
    multiple of 2p within the pixel bounds are resized with PIL bicubic (HF uses torchvision bicubic).
    """
    T, H, W, _ = frames.shape
    _, grid_h, grid_w, h, w = video_grid(T, H, W, video_cfg)
    if (h, w) != (H, W):
        from PIL import Image

        frames = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in frames])
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() * video_cfg["rescale_factor"]
    mean = torch.tensor(video_cfg["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(video_cfg["image_std"]).view(1, 3, 1, 1)
    x = ((x - mean) / std)[None]  # [1, T, C, H, W]
    tp, ps, ms = video_cfg["temporal_patch_size"], video_cfg["patch_size"], video_cfg["merge_size"]
    if pad := -T % tp:
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    grid_t = x.shape[1] // tp
    # the layout of Qwen2VLVideoProcessor.patchify (transformers 5.x)
    patches = x.view(1, grid_t, tp, 3, grid_h // ms, ms, ps, grid_w // ms, ms, ps)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(grid_t * grid_h * grid_w, 3 * tp * ps * ps)
    out = {"pixel_values_videos": flat, "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]])}
    if not _is_qwen3(video_cfg):
        out["second_per_grid_ts"] = torch.tensor([tp / video_cfg["fps"]])
    return out


def video_timestamps(num_frames: int, video_cfg: dict) -> list[float]:
    """Seconds of each temporal patch of a clip of ``num_frames`` consecutive frames at
    ``video_cfg["fps"]``: the mean time of its first and last frame (an odd clip repeats its last
    frame), as ``Qwen3VLProcessor._calculate_timestamps`` computes them."""
    tp, fps = video_cfg["temporal_patch_size"], video_cfg["fps"]
    indices = list(range(num_frames)) + [num_frames - 1] * (-num_frames % tp)
    return [(indices[i] / fps + indices[i + tp - 1] / fps) / 2 for i in range(0, len(indices), tp)]


def qwen3_video_placeholder(num_frames: int, grid_thw: torch.Tensor, video_cfg: dict) -> str:
    """The prompt text of one Qwen3-VL clip: per temporal patch ``<{t:.1f} seconds>`` then its
    ``<|vision_start|><|video_pad|>…<|vision_end|>`` (one ``<|video_pad|>`` per merged token)."""
    per_patch = int(grid_thw[1] * grid_thw[2]) // video_cfg["merge_size"] ** 2
    frame = "<|vision_start|>" + "<|video_pad|>" * per_patch + "<|vision_end|>"
    return "".join(f"<{t:.1f} seconds>{frame}" for t in video_timestamps(num_frames, video_cfg))


def _video_config_of(processor) -> dict:
    """The video settings :func:`load_processor` / :func:`build_processor` attached (else 112 px defaults)."""
    from vlmopt.reference.processing import arch_of

    return getattr(processor, "_vlmopt_video_cfg", None) or video_config(112, arch_of(processor))


def video_batch(processor, texts: list[str], videos: list[list[np.ndarray]]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``texts`` with their video placeholders expanded (``videos[i]``: the clips of text ``i``, uint8
    [T, H, W, 3] each, in the order of their placeholders) and the processor outputs of every clip."""
    cfg = _video_config_of(processor)
    placeholder = "<|vision_start|><|video_pad|><|vision_end|>" if _is_qwen3(cfg) else "<|video_pad|>"
    expanded, clips = [], []
    for text, frames_list in zip(texts, videos):
        parts = text.split(placeholder)
        if len(parts) - 1 != len(frames_list):
            raise ValueError(f"a prompt has {len(parts) - 1} video placeholders ({placeholder}) for {len(frames_list)} videos")
        pieces = [parts[0]]
        for frames, after in zip(frames_list, parts[1:]):
            clip = qwen_video_inputs(frames, cfg)
            grid = clip["video_grid_thw"][0]
            if _is_qwen3(cfg):
                pieces.append(qwen3_video_placeholder(len(frames), grid, cfg))
            else:
                pieces.append(placeholder * (int(grid.prod()) // cfg["merge_size"] ** 2))
            pieces.append(after)
            clips.append(clip)
        expanded.append("".join(pieces))
    inputs = {key: torch.cat([c[key] for c in clips]) for key in clips[0]} if clips else {}
    return expanded, inputs
