"""Every family, every pass, every stage graph, run with the model's parameters and the batch on a
non-CPU device (:mod:`tests.device.on_device`): planning, the graphs, the ops' references, the
generation loop, streams and training steps (backward included) never mix in a CPU tensor, and give
what the same flow gives on the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.device import flows
from tests.device.on_device import OnDevice, module_to_device, on_device, to_cpu, to_device


def on_the_device(stage, outputs, cache) -> None:
    for name, value in outputs.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(value, OnDevice), f"{stage} returns {name} on the CPU"
    for layer in getattr(cache, "layers", []):
        assert isinstance(layer.keys, OnDevice) and isinstance(layer.values, OnDevice), f"{stage} caches on the CPU"


def nothing(stage, outputs, cache) -> None:
    pass


@pytest.mark.parametrize("case", list(flows.cases()), ids=flows.case_id)
def test_flow_runs_on_the_device(case):
    family, passes, flow = case
    if reason := flows.unsupported(family, passes, flow):
        pytest.skip(reason)
    expected = flows.run_flow(family, flows.build(family), passes, flow, lambda batch: batch, nothing)
    model = module_to_device(flows.build(family))
    with on_device():
        got = flows.run_flow(family, model, passes, flow, to_device, on_the_device)
    assert got["stages"] == flows.STAGES[flow] == expected["stages"]
    if flow == "train":
        for step in [key.removesuffix("_loss") for key in expected if key.endswith("_loss")]:
            torch.testing.assert_close(to_cpu(got[f"{step}_loss"]), expected[f"{step}_loss"])
            grads = got[f"{step}_grads"]
            assert grads.keys() == expected[f"{step}_grads"].keys()
            assert all(isinstance(grad, OnDevice) for grad in grads.values())
    else:
        assert isinstance(got["ids"], OnDevice) or flow == "stream"
        assert torch.equal(to_cpu(got["ids"]), expected["ids"]), "the device gives other tokens than the CPU"
