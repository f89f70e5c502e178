"""A bf16 and an fp16 model keep their dtype through every audited pass and family: logits, the KV
cache and gradients stay in the model's dtype in every stage graph (run on the CPU, whose kernels
take both; scores and losses may be float32 inside, the activations may not)."""

from __future__ import annotations

import pytest
import torch

from tests.device import flows


# bf16 on every audited case; fp16, which takes the same half-precision paths, on the every-pass family
CASES = [(case, torch.bfloat16) for case in flows.cases()] + [
    (case, torch.float16) for case in flows.cases((flows.EVERY_PASS_FAMILY,))
]


@pytest.mark.parametrize(("case", "dtype"), CASES, ids=[f"{flows.case_id(c)}-{d}" for c, d in CASES])
def test_flow_keeps_the_model_dtype(case, dtype):
    family, passes, flow = case
    if reason := flows.unsupported(family, passes, flow):
        pytest.skip(reason)
    model = flows.build(family, dtype)

    def keeps_dtype(stage, outputs, cache) -> None:
        assert outputs["logits"].dtype == dtype, f"{stage} logits are {outputs['logits'].dtype}"
        for layer in getattr(cache, "layers", []):
            assert layer.keys.dtype == layer.values.dtype == dtype, f"{stage} caches {layer.keys.dtype}"

    got = flows.run_flow(family, model, passes, flow, lambda batch: batch, keeps_dtype)
    assert got["stages"] == flows.STAGES[flow]
    if flow == "train":
        for step in ("image", "text"):
            assert torch.isfinite(got[f"{step}_loss"]), f"the {step} step's loss is not finite in {dtype}"
            assert got[f"{step}_grads"] and all(g.dtype == dtype for g in got[f"{step}_grads"].values())
    else:
        assert got["ids"].numel()
