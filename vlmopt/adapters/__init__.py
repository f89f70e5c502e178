"""Architecture adapters: one file per VLM family, registered by the HF classes it serves.

>>> from vlmopt.adapters import adapter_for
>>> adapter_for(model).capabilities
frozenset({'vision_qk', 'grids', ...})

A family is one adapter file plus its tests: an :class:`Adapter` subclass decorated with
:func:`~vlmopt.adapters.base.register`, imported below. Passes say what they need
(``Pass.needs``), adapters what they have (``Adapter.capabilities``); ``Pass.check`` compares them.
"""

from __future__ import annotations

from torch import nn

from vlmopt.adapters import (  # noqa: F401  (each registers its adapter)
    gemma3, internvl, llava, llava_next, llava_onevision, mistral3, qwen2_5_vl, qwen3_vl, smolvlm,
)
from vlmopt.adapters.base import CAPABILITIES, REGISTRY, Adapter, NamedConfig, Prompt, register
from vlmopt.adapters.layer_view import DecoderLayerView
from vlmopt.errors import UnsupportedModelError


def adapter_class(model: nn.Module) -> type[Adapter]:
    """The adapter class serving ``model``'s HF class (or a subclass of one); a clear error names the supported classes."""
    for cls in type(model).__mro__:
        if cls.__name__ in REGISTRY:
            return REGISTRY[cls.__name__]
    raise UnsupportedModelError(
        f"vlmopt cannot compile {type(model).__name__}: supported model classes are "
        f"{', '.join(sorted(REGISTRY))}. Load the checkpoint with one of them (for example "
        "AutoModelForImageTextToText.from_pretrained(...)), or add an adapter (docs/adding-a-family.md)."
    )


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s architecture."""
    return adapter_class(model)(model)


def adapter_for_config(config) -> type[Adapter]:
    """The adapter class of a HF config (by its ``model_type``)."""
    for cls in dict.fromkeys(REGISTRY.values()):
        if config.model_type in cls.model_classes:
            return cls
    known = sorted(t for cls in REGISTRY.values() for t in cls.model_classes)
    raise UnsupportedModelError(f"no vlmopt adapter serves model_type {config.model_type!r}; known: {', '.join(known)}")


def families() -> list[type[Adapter]]:
    """Every registered adapter class, once each, in registration order."""
    return list(dict.fromkeys(REGISTRY.values()))


__all__ = [
    "CAPABILITIES", "REGISTRY", "Adapter", "DecoderLayerView", "NamedConfig", "Prompt",
    "adapter_class", "adapter_for", "adapter_for_config", "families", "register",
]
