"""An image and a question → model inputs, the same way for ``vlmopt run`` and ``vlmopt generate``.

The prompt text comes from the processor's chat template when it has one (one user turn: the image,
then the question; generation prompt appended), else from the reference models' format
(:func:`vlmopt.reference.processing.prompt`). Images are converted to RGB and, for an export, resized
to the export's fixed size first (a Qwen2.5-VL export is fixed to one image grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import InputError


def load_image(image: Any):
    """A PIL RGB image from a path or a PIL image; a clear error if the file is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise InputError(f"image {path} does not exist; pass --image the path of a PNG or JPEG file")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"cannot read {path} as an image ({error}); pass a PNG or JPEG file") from None


def load_processor(directory: str | Path):
    """The processor saved in ``directory`` (the reference models' loader handles Qwen without torchvision)."""
    from vlmopt.reference.processing import load_processor as load

    return load(directory)


def save_processor(processor: Any, directory: str | Path) -> None:
    """Write ``processor`` into ``directory`` so :func:`load_processor` reads it back."""
    from vlmopt.reference.processing import save_processor as save

    try:
        save(processor, Path(directory))
    except TypeError:  # not a LLaVA / Qwen processor the reference helpers know
        processor.save_pretrained(directory)


def prompt_text(processor: Any, template: str | None, question: str) -> str:
    """The full prompt for one image and ``question``, image placeholder not yet expanded: the
    processor's chat template, else ``template`` (the adapter's prompt format, ``{question}`` inside)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if template is None:
        raise InputError("the processor has no chat template and the export records no prompt format; re-export the model")
    return template.replace("{question}", question)


def template_of(adapter) -> str | None:
    """The adapter's one-image prompt format with a ``{question}`` slot (None: it has none)."""
    from vlmopt.errors import UnsupportedModelError

    try:
        return adapter.prompt_text("{question}")
    except UnsupportedModelError:
        return None


def encode_prompt(
    processor: Any, template: str | None, image: Any, question: str, image_size: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """Processor outputs (numpy) for one image and ``question`` (``template``: see :func:`prompt_text`);
    ``image_size`` (h, w) resizes first."""
    picture = load_image(image)
    if image_size is not None and picture.size != (image_size[1], image_size[0]):
        from PIL import Image

        picture = picture.resize((image_size[1], image_size[0]), Image.BICUBIC)
    text = prompt_text(processor, template, question)
    out = processor(text=[text], images=[picture], return_tensors="np", padding=True)
    keep = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "image_sizes", "batch_num_images")
    return {key: np.asarray(out[key]) for key in keep if key in out}
