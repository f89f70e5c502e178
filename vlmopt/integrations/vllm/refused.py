"""vLLM's own classes of the families vlmopt compiles but the plugin cannot prune in vLLM (an adapter
without ``vllm_classes``, e.g. a 1-D-RoPE family whose positions vLLM renumbers): each refuses a pass
list at engine start with the family's reason (``Adapter.vllm_refusal``) and is otherwise vLLM's own.

``vlmopt.integrations.vllm.refused:<Architecture>`` is built on first access from vLLM's model of that
architecture, so registering it imports nothing of the model until vLLM resolves it.
"""

from __future__ import annotations

from functools import cache

from vlmopt.integrations.vllm.spec import plugin_passes


def vllm_location(architecture: str) -> tuple[str, str] | None:
    """(module, class) of vLLM's built-in model for ``architecture`` (None: vLLM has none)."""
    from vllm.model_executor.models.registry import _VLLM_MODELS

    found = _VLLM_MODELS.get(architecture)
    return None if found is None else (f"vllm.model_executor.models.{found[0]}", found[1])


@cache
def refusing(architecture: str) -> type:
    """vLLM's model class of ``architecture``, with its own processor, checking the pass list when the
    processor or the model is built."""
    import importlib

    from vllm.multimodal import MULTIMODAL_REGISTRY

    location = vllm_location(architecture)
    if location is None:
        raise AttributeError(f"vLLM has no model for {architecture}")
    model_cls = getattr(importlib.import_module(location[0]), location[1])
    factories = getattr(model_cls, "_processor_factory", None)

    class Refusing(model_cls):
        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            plugin_passes(vllm_config.model_config.hf_config)
            super().__init__(vllm_config=vllm_config, prefix=prefix)

    Refusing.__name__ = Refusing.__qualname__ = architecture
    Refusing.__module__ = __name__
    Refusing.__doc__ = f"vLLM's {model_cls.__name__}, refusing vlmopt's passes with the reason."
    if factories is None:
        return Refusing

    def info(ctx):
        plugin_passes(ctx.get_hf_config())
        return factories.info(ctx)

    return MULTIMODAL_REGISTRY.register_processor(factories.processor, info=info, dummy_inputs=factories.dummy_inputs)(Refusing)


def __getattr__(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return refusing(name)
