"""The evaluation harnesses (``vlmopt eval``'s and the reference models') on a model that lives on a
device: the processor encodes on the CPU, the harness moves each batch to the model, and the answers
are the CPU's."""

from __future__ import annotations

import pytest

from tests.device import flows
from tests.device.on_device import module_to_device, on_device
from vlmopt import configs
from vlmopt.reference import tasks


def image_task(family: str):
    """(two test samples of the family's random config's image task, its processor)."""
    named = configs.CONFIGS.named(flows.family_configs()[family])
    name, settings = next((n, s) for n, s in (named.tasks or {}).items() if n == "shapes")
    return tasks.get(name, **settings).samples("test", n=2), named.processor()


@pytest.mark.parametrize("family", list(flows.family_configs()))
def test_vlmopt_eval_on_the_device(family):
    from vlmopt.evaluation import evaluate

    samples, processor = image_task(family)
    lists = [["random_prune:keep_ratio=0.5"]]
    expected = evaluate(flows.build(family), processor, samples, lists, batch_size=2, timing_samples=1, progress=False)
    model = module_to_device(flows.build(family))
    with on_device():
        got = evaluate(model, processor, samples, lists, batch_size=2, timing_samples=1, progress=False)
    for want, have in zip([expected["baseline"], *expected["runs"]], [got["baseline"], *got["runs"]]):
        assert have.answers == want.answers and have.prefill_flops == want.prefill_flops


def test_reference_evaluation_on_the_device():
    from vlmopt.reference.evaluate import evaluate

    family = next(iter(flows.family_configs()))
    named = configs.CONFIGS.named(flows.family_configs()[family])
    task, processor = tasks.get("shapes", **named.tasks["shapes"]), named.processor()
    expected = evaluate(flows.build(family), processor, task, n=2, batch_size=2)
    model = module_to_device(flows.build(family))
    with on_device():
        got = evaluate(model, processor, task, n=2, batch_size=2)
    assert got.predictions == expected.predictions
