"""Run a serialised TensorRT engine (TensorRT 10: named I/O tensors, ``execute_async_v3``).

Buffers are CUDA tensors from PyTorch (already a dependency) — no pycuda. Only imported where
TensorRT and a GPU exist (see :func:`vlmopt.export.trt_build.tensorrt_status`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlmopt.export.errors import ModelDirectoryError


class TRTGraph:
    """One engine: ``run(feeds) -> {output name: numpy array}`` with the same names as the ONNX graph."""

    def __init__(self, path: Path) -> None:
        import tensorrt as trt
        import torch

        if not Path(path).exists():
            raise ModelDirectoryError(f"TensorRT engine {path} is missing; build it with `vlmopt export --format trt`")
        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ModelDirectoryError(
                f"TensorRT cannot deserialise {path}: it is corrupt or was built by another TensorRT version or GPU; "
                "rebuild it here with `vlmopt export --format trt`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = {
            trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool,
            trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8,
        }
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        keep = []  # device buffers must outlive the launch
        for name in self.inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", self.dtypes[name]).contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        results = {}
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            results[name] = out
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        stream.synchronize()
        return {name: t.float().cpu().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.cpu().numpy() for name, t in results.items()}
