"""What an export is asked for: one dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from vlmopt.errors import PassConfigError

#: ONNX opsets the exporter writes: torch.onnx's translations start at 18; TensorRT 10's parser
#: reads up to 20 (opset 23 would turn SDPA into the ``Attention`` op, which it does not read).
OPSETS = (18, 19, 20)


@dataclass(frozen=True)
class ExportConfig:
    """Options of :func:`vlmopt.export.export_onnx`."""

    opset: int = 18
    """ONNX opset of every graph (18–20: what both torch.onnx and TensorRT 10's parser support)."""
    image_size: int | None = None
    """Image side in pixels the vision graph is fixed to; None = the model's (LLaVA: the tower's
    ``image_size``; Qwen2.5-VL: the processor's largest square image, or 224 without a processor)."""
    max_batch: int = 8
    """Largest batch the dynamic batch axis (and a TensorRT profile) allows."""
    max_sequence: int = 2048
    """Largest prompt + generated length, in tokens, the dynamic sequence axes allow."""
    atol: float = 1e-4
    """Absolute tolerance of the onnxruntime-vs-PyTorch check."""
    rtol: float = 1e-3
    """Relative tolerance of the check: an output passes when ``|ort - torch| <= atol + rtol·|torch|``."""
    external_data_mb: float = 256.0
    """Graphs whose weights exceed this many MiB are written with external data (``NAME.onnx.data``)."""
    verify: bool = True
    """Run onnxruntime on the example inputs after export and fail if outputs differ from PyTorch."""
    seed: int = 0
    """Seed of the random example inputs used to trace and verify."""

    def __post_init__(self) -> None:
        if self.opset not in OPSETS:
            raise PassConfigError(f"ExportConfig.opset must be one of {OPSETS} (TensorRT 10 reads ≤ 20), got {self.opset}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 28):
            raise PassConfigError(f"ExportConfig.image_size must be a whole number of pixels ≥ 28, got {self.image_size!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 2:
            raise PassConfigError(f"ExportConfig.max_batch must be a whole number ≥ 2, got {self.max_batch!r}")
        if not isinstance(self.max_sequence, int) or self.max_sequence < 16:
            raise PassConfigError(f"ExportConfig.max_sequence must be a whole number ≥ 16, got {self.max_sequence!r}")
        if self.atol < 0 or self.rtol < 0:
            raise PassConfigError("ExportConfig.atol and rtol must be ≥ 0")
