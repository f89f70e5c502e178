"""``vlmopt.compile(model, backend="torch_tensorrt")``: run the stage graphs under Torch-TensorRT.

Each stage GraphModule goes through ``torch.compile(..., backend="torch_tensorrt")``: TensorRT
engines for the supported subgraphs, PyTorch for the rest (the ``vlmopt::`` ops and the HF cache
updates fall back to PyTorch, so passes need no TensorRT plugin). Needs ``torch-tensorrt`` and a
CUDA GPU, with the model on it; checked when the :class:`CompiledVLM` is built.
"""

from __future__ import annotations

from torch import nn

from vlmopt.errors import MissingDependencyError

#: Options passed to Torch-TensorRT's dynamo backend.
OPTIONS = {
    "min_block_size": 3,  # tiny TensorRT islands between PyTorch fallbacks cost more than they save
    "truncate_double": True,
}


def require_torch_tensorrt() -> None:
    """Raise :class:`MissingDependencyError` unless torch-tensorrt imports and a CUDA GPU is present."""
    try:
        import torch_tensorrt  # noqa: F401  (registers the "torch_tensorrt" torch.compile backend)
    except ImportError as error:
        raise MissingDependencyError(
            f"backend='torch_tensorrt' needs torch-tensorrt ({error}); install the build matching your torch and "
            "CUDA from NVIDIA (pip install torch-tensorrt), or use backend='eager' / 'inductor'"
        ) from error
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError("backend='torch_tensorrt' needs an NVIDIA GPU with CUDA; use backend='eager' or 'inductor' here")


def compile_stage(module: nn.Module):
    """``module`` under ``torch.compile`` with the Torch-TensorRT backend."""
    import torch

    require_torch_tensorrt()
    return torch.compile(module, backend="torch_tensorrt", dynamic=False, options=dict(OPTIONS))
