"""Errors vlmopt raises. Each names the problem and the fix."""


class VlmoptError(Exception):
    """Base class of every error vlmopt raises on purpose."""


class UnsupportedModelError(VlmoptError, TypeError):
    """The model's architecture has no adapter."""


class PassConfigError(VlmoptError, ValueError):
    """A pass was configured with a value outside its accepted range."""


class UnknownPassError(VlmoptError, KeyError):
    """A pass name is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class IncompatiblePassError(VlmoptError, ValueError):
    """A pass does not fit the model, or the passes before it."""


class InputError(VlmoptError, ValueError):
    """The inputs given to a compiled model are inconsistent."""


class CheckpointError(VlmoptError, ValueError):
    """A checkpoint's weights do not all load into the model (missing, unexpected or reshaped tensors)."""


class MissingDependencyError(VlmoptError, ImportError):
    """An optional dependency (onnx, onnxruntime, tensorrt, triton) or a GPU is missing."""
