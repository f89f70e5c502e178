"""vLLM's classes of the families vlmopt compiles but the plugin cannot prune in vLLM (LLaVA: 1-D RoPE,
whose positions vLLM renumbers), each refusing a pass list at engine start with the reason
(:data:`vlmopt.integrations.vllm.spec.REFUSED`) and otherwise vLLM's own, unchanged."""

from __future__ import annotations

from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from vlmopt.integrations.vllm.spec import plugin_passes


def refusing(model_cls: type) -> type:
    """``model_cls`` with its own processor, checked when the processor or the model is built."""
    factories = model_cls._processor_factory

    def info(ctx):
        plugin_passes(ctx.get_hf_config())
        return factories.info(ctx)

    class Refusing(model_cls):
        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            plugin_passes(vllm_config.model_config.hf_config)
            super().__init__(vllm_config=vllm_config, prefix=prefix)

    Refusing.__name__ = Refusing.__qualname__ = model_cls.__name__
    Refusing.__doc__ = f"vLLM's {model_cls.__name__}, refusing vlmopt's passes with the reason."
    return MULTIMODAL_REGISTRY.register_processor(factories.processor, info=info, dummy_inputs=factories.dummy_inputs)(Refusing)


Llava = refusing(LlavaForConditionalGeneration)
