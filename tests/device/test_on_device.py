"""The stand-in device of the audits follows torch's device rules: the same ops that FakeTensorMode
refuses on fake device tensors (and CUDA refuses on real ones) raise, the same pass, with values."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.device.on_device import DEVICE, DeviceMismatchError, OnDevice, module_to_device, on_device, to_cpu, to_device

#: (name, fn(x on the device, cpu) -> tensor, does it mix a CPU tensor into a device op?)
CASES = [
    ("add a CPU vector", lambda x, cpu: x + cpu(4), True),
    ("add a CPU scalar (0-dim)", lambda x, cpu: x + cpu(), False),
    ("cat with a CPU tensor", lambda x, cpu: torch.cat([x, cpu(3, 4)]), True),
    ("where with a CPU branch", lambda x, cpu: torch.where(x > 0, x, cpu(4)), True),
    ("index_select with a CPU index", lambda x, cpu: torch.index_select(x, 0, torch.tensor([0, 2])), True),
    ("index with a CPU index", lambda x, cpu: x[torch.tensor([0, 2])], False),
    ("arange on the input's device", lambda x, cpu: x + torch.arange(4, device=x.device), False),
    ("tensor() on the input's device", lambda x, cpu: x * torch.tensor([1.0, 2.0, 3.0, 4.0], device=x.device), False),
    ("CPU tensor moved to the device", lambda x, cpu: x + cpu(4).to(x.device), False),
    ("device tensor moved to the CPU", lambda x, cpu: x.cpu() + cpu(4), False),
    ("copy a CPU tensor in", lambda x, cpu: x.clone().copy_(cpu(3, 4)), False),
]


def fake_outcome(fn) -> bool:
    """Does FakeTensorMode (torch's device rules) refuse ``fn`` on fake device tensors?"""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        x = mode.from_tensor(torch.randn(3, 4)).to(DEVICE)
        try:
            fn(x, lambda *shape: torch.ones(shape))
        except RuntimeError as error:
            assert "device" in str(error), error
            return True
    return False


@pytest.mark.parametrize(("name", "fn", "mixes"), CASES, ids=[c[0] for c in CASES])
def test_device_rules_are_torchs(name, fn, mixes):
    assert fake_outcome(fn) == mixes, "the case's expectation disagrees with FakeTensorMode"
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with on_device():
        if mixes:
            with pytest.raises(DeviceMismatchError, match="CPU tensor"):
                fn(to_device(x), lambda *shape: torch.ones(shape))
            return
        got = fn(to_device(x), lambda *shape: torch.ones(shape))
    expected = fn(x, lambda *shape: torch.ones(shape))
    assert torch.equal(to_cpu(got), expected)


def test_values_are_read_back_but_never_as_numpy():
    with on_device():
        x = torch.arange(5, device=DEVICE) * 2
        assert isinstance(x, OnDevice) and x.device == DEVICE
        assert x.tolist() == [0, 2, 4, 6, 8] and int(x[1]) == 2 and x.sum().item() == 20
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()


def test_a_vlmopt_op_runs_its_reference_on_the_device():
    scores = torch.rand(10, generator=torch.Generator().manual_seed(1))
    with on_device():
        got = torch.ops.vlmopt.topk_indices(to_device(scores), [4, 6], [2, 3])
    assert isinstance(got, OnDevice)
    assert torch.equal(to_cpu(got), torch.ops.vlmopt.topk_indices(scores, [4, 6], [2, 3]))


def test_modules_train_on_the_device_with_tied_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
    model[1].weight = model[0].weight
    ids = torch.tensor([[1, 2, 3]])
    model(ids).sum().backward()
    expected = model[0].weight.grad.clone()
    model.zero_grad()
    module_to_device(model)
    assert model[1].weight is model[0].weight and isinstance(model[0].weight, nn.Parameter)
    with on_device():
        model(to_device(ids)).sum().backward()
        with pytest.raises(DeviceMismatchError):
            model(ids)  # the batch left on the CPU
    assert isinstance(model[0].weight.grad, OnDevice)
    torch.testing.assert_close(to_cpu(model[0].weight.grad), expected)
