"""lmms-eval plugin: ``python -m lmms_eval --model vlmopt --model_args pretrained=...,passes=...``.

lmms-eval (>= 0.7.3) finds the model through the ``lmms_eval.models`` entry point group declared in
vlmopt's ``pyproject.toml``, which points at :func:`manifest`. The model class itself,
:class:`vlmopt.integrations.lmms_eval.model.VlmoptLMM`, imports lmms-eval and is imported only when
lmms-eval asks for ``--model vlmopt``. :mod:`vlmopt.integrations.lmms_eval.tasks` writes vlmopt's
reference tasks as offline lmms-eval tasks (``vlmopt tasks export``).
"""

from __future__ import annotations

MODEL_ID = "vlmopt"
"""The name lmms-eval knows the model by (``--model vlmopt``)."""
MODEL_CLASS_PATH = "vlmopt.integrations.lmms_eval.model.VlmoptLMM"
"""Import path of the model class."""


def manifest():
    """The ``ModelManifest`` lmms-eval registers (called by lmms-eval's entry-point loader)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)
