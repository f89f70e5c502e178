"""Every ``vlmopt::`` op's reference — what runs on a GPU wherever no Triton kernel stands in — on
device tensors, and in bf16 / fp16. Under ``FakeTensorMode`` a custom op runs its fake, not its
reference, so the references are called directly, on their examples (``tests/ops/examples.py``):

- on fake device tensors (``FakeTensorMode``: torch's own device rules, no values) where the
  reference does not read its data;
- on device tensors with values (:mod:`tests.device.on_device`), always: the same outputs as on
  the CPU, on the device;
- with bf16 and fp16 inputs: outputs of the dtypes and shapes the op's fake promises.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from tests.device.on_device import DEVICE, OnDevice, on_device, to_device
from tests.ops.examples import EXAMPLES
from vlmopt.ops import op_modules

OPS = op_modules()


def outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def examples(name: str) -> list[tuple]:
    return EXAMPLES[name](torch.Generator().manual_seed(0))


def test_every_op_has_examples():
    missing = sorted(set(OPS) - set(EXAMPLES))
    assert not missing, f"give {', '.join(f'vlmopt::{m}' for m in missing)} example inputs in tests/ops/examples.py"
    assert not set(EXAMPLES) - set(OPS), "tests/ops/examples.py names ops that do not exist"


@pytest.mark.parametrize("name", sorted(OPS))
def test_reference_on_fake_device_tensors(name):
    ran = 0
    for args in examples(name):
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fakes = [mode.from_tensor(a).to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
            try:
                got = OPS[name].reference(*fakes)
            except (DataDependentOutputException, DynamicOutputShapeException):
                continue  # reads its values; test_reference_on_the_device runs it with values
        assert all(t.device == DEVICE for t in outputs(got)), f"vlmopt::{name}'s reference leaves the device"
        ran += 1
    if not ran:
        pytest.skip(f"vlmopt::{name}'s reference reads its values (data-dependent shapes or numbers): fake tensors cannot run it")


@pytest.mark.parametrize("name", sorted(OPS))
def test_reference_on_the_device(name):
    for args in examples(name):
        expected = OPS[name].reference(*args)
        with on_device():
            got = OPS[name].reference(*to_device(args))
        for want, have in zip(outputs(expected), outputs(got), strict=True):
            assert isinstance(have, OnDevice), f"vlmopt::{name}'s reference returns a CPU tensor"
            assert have.dtype == want.dtype and torch.equal(have.elem, want), f"vlmopt::{name} differs on the device"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(OPS))
def test_reference_keeps_the_dtypes_its_fake_promises(name, dtype):
    op = getattr(torch.ops.vlmopt, name)
    for args in examples(name):
        low = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        try:
            got = OPS[name].reference(*low)
        except (RuntimeError, NotImplementedError) as error:
            if "not implemented for" not in str(error):
                raise
            pytest.skip(f"the CPU has no {dtype} kernel for vlmopt::{name}'s reference: {str(error).splitlines()[0]}")
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            promised = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in low])
        for want, have in zip(outputs(promised), outputs(got), strict=True):
            assert (have.dtype, have.shape) == (want.dtype, want.shape), f"vlmopt::{name} in {dtype}"
            if have.is_floating_point():
                assert torch.isfinite(have).any(), f"vlmopt::{name} in {dtype} gives no finite value"
