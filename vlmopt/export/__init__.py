"""Lowering: ONNX export, an onnxruntime runtime, TensorRT engines and a TensorRT compatibility check.

>>> from vlmopt.export import export_onnx, OnnxVLM
>>> export_onnx(model, "build/", passes=["hiprune:keep_ratio=0.33"], processor=processor)
>>> OnnxVLM("build/").generate(input_ids=..., pixel_values=..., max_new_tokens=16)

Importing this package imports neither onnx, onnxruntime, onnxscript nor tensorrt: each is imported
inside the function that needs it, and a missing one raises :class:`vlmopt.MissingDependencyError`
naming the extra to install.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ExportConfig": "vlmopt.export.config",
    "export_onnx": "vlmopt.export.onnx",
    "file_sizes": "vlmopt.export.onnx",
    "OnnxVLM": "vlmopt.export.ort_runtime",
    "check_tensorrt": "vlmopt.export.trt_check",
    "TRTReport": "vlmopt.export.trt_check",
    "build_engines": "vlmopt.export.trt_build",
    "trtexec_commands": "vlmopt.export.trt_build",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ExportConfig",
    "OnnxVLM",
    "TRTReport",
    "build_engines",
    "check_tensorrt",
    "export_onnx",
    "file_sizes",
    "trtexec_commands",
]
