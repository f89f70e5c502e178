"""Errors of the export tool chain. Each names the problem and the fix."""

from __future__ import annotations

from vlmopt.errors import VlmoptError


class ExportError(VlmoptError, RuntimeError):
    """A graph cannot be exported as asked (an op without translation, a layout the export cannot fix)."""


class VerificationError(ExportError):
    """onnxruntime's outputs differ from PyTorch's beyond the stated tolerance."""


class ModelDirectoryError(VlmoptError, FileNotFoundError):
    """An exported model directory is missing, incomplete or corrupt."""


class TensorRTCompatibilityError(ExportError):
    """An ONNX graph has nodes TensorRT's ONNX parser would reject."""
