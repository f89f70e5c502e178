"""A stand-in accelerator on the CPU: tensors that hold real CPU data but live on another device,
so vlmopt runs end to end with its real values while every op checks devices the way CUDA does.

Why not ``FakeTensorMode`` with ``device="cuda"`` alone: on the CPU-only torch 2.13 a fake CUDA
tensor aborts or fails wherever torch's C++ takes a CUDA device guard (``Tensor.contiguous()`` of a
non-contiguous tensor, indexing with a tensor, and autograd's ``AccumulateGrad``: "PyTorch is not
linked with support for cuda devices"), and fake tensors have no values, so nothing data-dependent
(planning, ``generate``'s loop, top-k selections read back) can run. ``tests/device/test_op_references.py``
still runs every op's reference under ``FakeTensorMode`` where it can.

Here a tensor on the device is an :class:`OnDevice`: a wrapper reporting the ``meta`` device (the
one non-CPU device whose device guard a CPU build has) around a real CPU tensor. Under
:func:`on_device`:

- an op that meets an :class:`OnDevice` and a CPU tensor of one element or more raises
  :class:`DeviceMismatchError`, as CUDA does (a 0-dim CPU tensor is a scalar and passes; copies,
  ``.to()`` and CPU index tensors in indexing pass, as on CUDA);
- factories given ``device=<the device>`` (``torch.arange(n, device=x.device)``, ``torch.tensor(...,
  device=...)``, ``x.to(device)``) make :class:`OnDevice` tensors with real values;
- ``.tolist()``, ``.item()`` and ``int(t)`` read values (a GPU synchronises and reads them too);
  ``.numpy()`` raises, as it does for a CUDA tensor;
- fake tensors (``vlmopt.flops``) meeting device tensors fake them, as FakeTensorMode fakes CUDA ones;
- a ``vlmopt::`` custom op runs its Python implementation on the device tensors (its ``reference``
  wherever no kernel stands in), so references are audited inside the flows too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch._library.custom_ops import CustomOpDef
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing

#: The device the stand-in tensors report.
DEVICE = torch.device("meta")

aten = torch.ops.aten

#: Ops that accept CPU tensors beside device tensors on CUDA too (copies between devices).
_MIXED = {aten.copy_.default, aten._to_copy.default, aten.lift_fresh.default, aten.lift_fresh_copy.default}
#: Indexing ops: CUDA takes CPU index tensors (their ``indices`` argument) and moves them itself.
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
_CONSTRUCTORS = (torch.tensor, torch.as_tensor, torch.asarray)


def _no_numpy(tensor: Tensor):
    raise TypeError(f"can't convert {DEVICE} device type tensor to numpy; use Tensor.cpu() first (as on a GPU)")


#: Tensor methods that read values back on the host (a GPU synchronises and reads them too).
_READERS = {Tensor.tolist: lambda t: t.elem.tolist(), Tensor.item: lambda t: t.elem.item(), Tensor.numpy: _no_numpy}


def _map(fn, value):
    """``fn`` applied to every leaf of nested lists, tuples and dicts (op arguments are shallow;
    ``torch.utils._pytree`` costs more than the ops of a tiny model)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_map(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: _map(fn, v) for k, v in value.items()}
    return fn(value)


def _leaves(value) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


_ALIASES: dict[Any, bool] = {}


def _aliases(func) -> bool:
    """Does ``func`` return a view of an argument or write into one (its schema has alias info)?"""
    if func not in _ALIASES:
        schema = func._schema
        _ALIASES[func] = any(a.alias_info is not None for a in (*schema.arguments, *schema.returns))
    return _ALIASES[func]


class DeviceMismatchError(RuntimeError):
    """A CPU tensor met device tensors in one op: this line fails on a GPU."""


class OnDevice(Tensor):
    """A real CPU tensor (``elem``) that reports :data:`DEVICE`."""

    elem: Tensor

    @staticmethod
    def __new__(cls, elem: Tensor):
        with torch.inference_mode(elem.is_inference()):  # a view of a normal tensor stays a normal tensor
            return Tensor._make_wrapper_subclass(
                cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
                layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad,
            )

    def __init__(self, elem: Tensor) -> None:
        self.elem = elem

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl  # results keep their own types

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with _Dispatch():
            return func(*args, **(kwargs or {}))


def _unwrap(value):
    return value.elem if isinstance(value, OnDevice) else value


def _as_fake(mode, value):
    return mode.from_tensor(value) if isinstance(value, OnDevice) else value


def _here(value):
    """An op argument as the CPU sees it: the data of a device tensor, the CPU for the device."""
    if isinstance(value, OnDevice):
        return value.elem
    if isinstance(value, torch.device) and value.type == DEVICE.type:
        return torch.device("cpu")
    return value


def _on_device(value) -> bool:
    return value is not None and torch.device(value).type == DEVICE.type


def _op_function(func) -> Any:
    """The Python implementation of the ``vlmopt::`` custom op ``func``."""
    from vlmopt.ops import op_modules

    qualname = func._schema.name
    module = op_modules()[qualname.split("::", 1)[1]]
    return next(v._init_fn for v in vars(module).values() if isinstance(v, CustomOpDef) and v._qualname == qualname)


def _check_devices(func, args, kwargs) -> None:
    checked = (args[:1] + args[2:], kwargs) if func in _INDEXING else (args, kwargs)
    for value in _leaves(checked):
        if isinstance(value, Tensor) and not isinstance(value, OnDevice) and value.dim() > 0:
            raise DeviceMismatchError(
                f"{func}: a CPU tensor {tuple(value.shape)} {value.dtype} meets tensors on the model's device "
                "(this fails on a GPU: create it on its inputs' device)"
            )


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat = list(_leaves((args, kwargs)))
        tagged = any(isinstance(v, OnDevice) for v in flat)
        fake = next((v for v in flat if isinstance(v, FakeTensor)), None)
        if fake is not None:  # vlmopt.flops runs the graphs on fake tensors: it fakes the parameters, as it does CUDA ones
            convert = partial(_as_fake, fake.fake_mode)
            return func(*_map(convert, args), **_map(convert, kwargs))
        if func.namespace == "vlmopt":  # torch-function modes are off inside dispatch: push ours again
            with _Functions(), self:
                return _op_function(func)(*args, **kwargs)
        if any(isinstance(v, Tensor) and not isinstance(v, OnDevice) and v.device.type == DEVICE.type for v in flat):
            if tagged:
                raise DeviceMismatchError(f"{func}: a {DEVICE} tensor without values meets device tensors")
            return func(*args, **kwargs)  # meta tensors proper (FakeTensorMode's own work): shapes, no values
        if tagged and func not in _MIXED:
            _check_devices(func, args, kwargs)
        devices = [v.type for v in flat if isinstance(v, torch.device)]
        make_here, leaving = DEVICE.type in devices, "cpu" in devices  # a factory or .to() naming a device
        out = func(*_map(_here, args), **_map(_here, kwargs))
        if (leaving and not make_here) or not (tagged or make_here) or not any(isinstance(v, Tensor) for v in _leaves(out)):
            return out
        out = _map(lambda v: OnDevice(v) if isinstance(v, Tensor) else v, out)
        if not (tagged and _aliases(func)):
            return out
        if torch.is_inference_mode_enabled():  # no version counters to share: only return what was written
            written = [a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments]
            return (args[0] if written[0] else kwargs.get("out", out)) if any(written) else out
        return return_and_correct_aliasing(func, args, kwargs, out)


class _Functions(TorchFunctionMode):
    """What happens above the dispatcher: ``torch.tensor(data, device=<the device>)`` (built on the CPU
    below it: keep its values) and reading values back (a wrapper has no storage of its own)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _READERS and isinstance(args[0], OnDevice):
            return _READERS[func](args[0])
        if func in _CONSTRUCTORS:
            args = _map(_unwrap, args)
            if _on_device(kwargs.get("device")):
                kwargs["device"] = torch.device("cpu")
                return OnDevice(func(*args, **kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_device() -> Iterator[None]:
    """Run the block with device checks and device factories (see the module docstring)."""
    with _Functions(), _Dispatch():
        yield


def to_device(value):
    """``value`` (a tensor, or dicts / lists / tuples of them) with every CPU tensor on the device."""
    return _map(lambda v: OnDevice(v) if isinstance(v, Tensor) and not isinstance(v, OnDevice) else v, value)


def to_cpu(value):
    """``value`` with every device tensor back on the CPU (the same data)."""
    return _map(_unwrap, value)


def module_to_device(module: nn.Module) -> nn.Module:
    """Put ``module``'s parameters and buffers on the device, in place (tied parameters stay tied)."""
    moved: dict[int, tuple[Tensor, Tensor]] = {}  # id → (original, moved); the original kept alive

    def move(tensor: Tensor, parameter: bool) -> Tensor:
        if id(tensor) not in moved:
            data = OnDevice(tensor.detach())
            moved[id(tensor)] = (tensor, nn.Parameter(data, requires_grad=tensor.requires_grad) if parameter else data)
        return moved[id(tensor)][1]

    for child in module.modules():
        for name, param in child._parameters.items():
            if param is not None:
                child._parameters[name] = move(param, True)
        for name, buffer in child._buffers.items():
            if buffer is not None:
                child._buffers[name] = move(buffer, False)
    return module
