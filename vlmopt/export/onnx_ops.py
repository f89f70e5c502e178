"""The ONNX translation of every ``vlmopt::`` op, collected from the op files.

Each op module in :mod:`vlmopt.ops` defines ``onnx_translation()``, which imports onnxscript lazily
and returns a trace-only onnxscript function written with standard ONNX ops only (fixed-k
``TopK(sorted=1)``, ``Gather``, ``ScatterND``, ``MatMul``, constants), so TensorRT's ONNX parser
reads the result without a plugin. Adding an op's translation is one function in its op file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import torch

import vlmopt.ops
from vlmopt.errors import MissingDependencyError
from vlmopt.export.errors import ExportError


def op_modules() -> dict[str, object]:
    """``{op name: its module}`` for every module of :mod:`vlmopt.ops` that registers a ``vlmopt::`` op."""
    found = {}
    for info in pkgutil.iter_modules(vlmopt.ops.__path__):
        module = importlib.import_module(f"vlmopt.ops.{info.name}")
        if hasattr(torch.ops.vlmopt, info.name):
            found[info.name] = module
    return found


def translation_table() -> dict[Callable, Callable]:
    """``{torch.ops.vlmopt.<op>.default: onnxscript function}`` for ``custom_translation_table``.

    Raises :class:`ExportError` naming any op whose file lacks ``onnx_translation()``.
    """
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            f"ONNX export needs onnxscript ({error}); install it with: pip install 'vlmopt[onnx]'"
        ) from error
    table, missing = {}, []
    for name, module in op_modules().items():
        translate = getattr(module, "onnx_translation", None)
        if translate is None:
            missing.append(name)
            continue
        table[getattr(torch.ops.vlmopt, name).default] = translate()
    if missing:
        raise ExportError(
            f"vlmopt:: op(s) {', '.join(missing)} have no ONNX translation: add `def onnx_translation()` "
            "to their file in vlmopt/ops/ (see vlmopt/ops/topk_indices.py for an example)"
        )
    return table
