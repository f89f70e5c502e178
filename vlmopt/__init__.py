"""vlmopt — compiler passes that make vision-language models cheaper to run and to train.

>>> opt = vlmopt.compile(model, passes=[vlmopt.passes.RandomPrune(keep_ratio=0.5)])
>>> ids = opt.generate(**processor_outputs, max_new_tokens=32)

``import vlmopt`` imports torch and transformers only: never triton, onnx, onnxruntime or tensorrt,
and it never touches CUDA.
"""

from vlmopt import ops  # noqa: F401  (registers the vlmopt:: custom ops)
from vlmopt import graph, passes
from vlmopt.compiler import compile  # noqa: A004
from vlmopt.flops import FlopReport, flops
from vlmopt.errors import (
    IncompatiblePassError,
    InputError,
    MissingDependencyError,
    PassConfigError,
    UnknownPassError,
    UnsupportedModelError,
    VlmoptError,
)
from vlmopt.runtime import CompiledVLM

__version__ = "0.1.0"

__all__ = [
    "CompiledVLM",
    "FlopReport",
    "IncompatiblePassError",
    "InputError",
    "MissingDependencyError",
    "PassConfigError",
    "UnknownPassError",
    "UnsupportedModelError",
    "VlmoptError",
    "compile",
    "flops",
    "graph",
    "passes",
    "train",
]


def __getattr__(name: str):
    if name == "train":  # imported on first use: it brings transformers' output classes (and PIL) along
        import importlib

        return importlib.import_module("vlmopt.train")
    raise AttributeError(f"module 'vlmopt' has no attribute {name!r}")
