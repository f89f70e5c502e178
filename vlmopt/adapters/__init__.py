"""Architecture adapters: one per supported HF VLM class."""

from __future__ import annotations

from torch import nn

from vlmopt.adapters.base import Adapter, Prompt
from vlmopt.adapters.llava import LlavaAdapter
from vlmopt.adapters.qwen2_5_vl import Qwen25VLAdapter
from vlmopt.errors import UnsupportedModelError

ADAPTERS: dict[str, type[Adapter]] = {
    LlavaAdapter.model_class_name: LlavaAdapter,
    Qwen25VLAdapter.model_class_name: Qwen25VLAdapter,
}

FAMILIES = tuple(adapter.family for adapter in ADAPTERS.values())


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s architecture; a clear error names the supported classes."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model)
    raise UnsupportedModelError(
        f"vlmopt cannot compile {type(model).__name__}: supported model classes are "
        f"{', '.join(ADAPTERS)}. Load the checkpoint with one of them (for example "
        "LlavaForConditionalGeneration.from_pretrained(...))."
    )


__all__ = ["ADAPTERS", "Adapter", "FAMILIES", "LlavaAdapter", "Prompt", "Qwen25VLAdapter", "adapter_for"]
