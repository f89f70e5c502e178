"""Model configs vlmopt builds without downloads, and processor-like inputs for them.

Every family's adapter contributes its configs (``Adapter.configs``), so :data:`CONFIGS` lists them all:

* ``tiny-*-random``: a few layers, tiny widths — tests and the demo (random weights, < 0.1 s to build).
* ``*-shape``: the depth, heads and token counts of a published checkpoint (LLaVA-1.5-7B,
  Qwen2.5-VL-7B, ...); ``width`` scales the hidden sizes down so the model runs on a CPU
  (``width=1.0`` is the real model, used for FLOPs on fake tensors).

:func:`synthetic_batch` makes what a processor would return for such a model (token ids with the
visual placeholders expanded, pixels, masks with left padding), from a seed; the adapter makes each
image's or video's part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vlmopt.errors import InputError

if TYPE_CHECKING:
    from vlmopt.adapters.base import NamedConfig

PAD_TOKEN = 0
FIRST_TEXT_TOKEN = 10
"""Random text ids start here (the random-weight configs' special ids lie below)."""


def scaled(size: int, width: float, multiple: int) -> int:
    """``size · width`` rounded to a multiple of ``multiple`` (at least ``multiple``): a ``*-shape`` config's width."""
    return max(multiple, int(round(size * width / multiple)) * multiple)


class _Configs(Mapping):
    """Name → config builder, gathered from every registered adapter (read on first use)."""

    def _all(self) -> dict[str, NamedConfig]:
        from vlmopt.adapters import families

        return {name: named for cls in families() for name, named in cls.configs.items()}

    def __getitem__(self, name: str):
        return self._all()[name].make

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def named(self, name: str) -> NamedConfig:
        """The :class:`~vlmopt.adapters.base.NamedConfig` of ``name`` (its benchmark image grid, description)."""
        return self._all()[name]


CONFIGS = _Configs()
"""Configs by name (random weights): ``CONFIGS[name]()`` (``*-shape``: ``CONFIGS[name](width)``)."""


def build(config, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """A model of ``config`` with seeded random weights, in eval mode (``device="meta"``: no memory)."""
    import transformers

    from vlmopt.adapters import adapter_for_config

    cls = getattr(transformers, adapter_for_config(config).model_classes[config.model_type])
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).eval()


@dataclass
class PromptSpec:
    """One synthetic prompt: text lengths around the visual inputs."""

    images: int = 1
    """Images in this prompt."""
    text_before: int = 4
    """Text tokens before the first image."""
    text_after: int = 8
    """Text tokens after the last image (the "question")."""


def synthetic_batch(
    model: nn.Module,
    prompts: list[PromptSpec] | None = None,
    image_grids: list[tuple[int, int]] | None = None,
    video_grids: list[tuple[int, int, int]] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Processor-like inputs for ``model``: left-padded ids with expanded placeholders, pixels, masks.

    ``image_grids`` are the (h, w) patch grids of the images in order, for towers that take any size
    (default: the adapter's, 8×8 for Qwen); ``video_grids`` (t, h, w) grids in frames, one video
    appended to the last prompt each.
    """
    from vlmopt.adapters import adapter_for_config

    adapter = adapter_for_config(model.config)
    generator = torch.Generator().manual_seed(seed)
    prompts = prompts or [PromptSpec()]
    config = model.config
    total_images = sum(p.images for p in prompts)
    if image_grids is not None and len(image_grids) != total_images:
        raise InputError(f"{len(image_grids)} image grids for {total_images} images")
    image_grids = list(image_grids) if image_grids is not None else [None] * total_images
    video_grids = video_grids or []

    def text(n: int) -> list[int]:
        return random_text_ids(config, n, generator)

    rows, parts, grid_iter = [], [], iter(image_grids)
    for index, spec in enumerate(prompts):
        ids = text(spec.text_before)
        for _ in range(spec.images):
            visual, inputs = adapter.synthetic_visual(config, "image", next(grid_iter), generator)
            ids += visual + text(2)
            parts.append(inputs)
        if index == len(prompts) - 1:
            for grid in video_grids:
                visual, inputs = adapter.synthetic_visual(config, "video", grid, generator)
                ids += visual + text(2)
                parts.append(inputs)
        rows.append(ids + text(spec.text_after))
    length = max(len(r) for r in rows)
    pad = config.get_text_config().pad_token_id
    pad = PAD_TOKEN if pad is None else pad
    batch = {
        "input_ids": torch.tensor([[pad] * (length - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows]),
    }
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part[key] for part in parts if key in part]
        if isinstance(values[0], torch.Size):  # random pixels, drawn after all the text, one draw per input kind
            # inputs of different sizes (an image's tiles) are padded to the largest, as HF processors pad them
            trailing = [max(v[d] for v in values) for d in range(1, len(values[0]))]
            batch[key] = torch.randn(sum(v[0] for v in values), *trailing, generator=generator)
        else:
            batch[key] = torch.cat(values)
    batch.update(adapter.synthetic_extras(config, batch))
    return batch


def random_text_ids(config, count: int, generator: torch.Generator) -> list[int]:
    """``count`` random text ids of ``config``'s vocabulary; one that equals a special id (a visual
    placeholder, BOS / EOS / pad) is moved to the first plain id, so random text never reads as a placeholder."""
    vocab = config.get_text_config().vocab_size
    special = special_token_ids(config)
    plain = next(t for t in range(FIRST_TEXT_TOKEN, vocab) if t not in special)
    ids = torch.randint(FIRST_TEXT_TOKEN, vocab, (count,), generator=generator).tolist()
    return [plain if t in special else t for t in ids]


def special_token_ids(config) -> set[int]:
    """Every ``*_token_id`` of a config and of its sub-configs (placeholders, BOS / EOS / pad)."""
    found: set[int] = set()

    def walk(values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value)
            elif isinstance(key, str) and key.endswith("_token_id") and isinstance(value, int):
                found.add(value)

    walk(config.to_dict())
    return found
