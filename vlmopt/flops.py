"""Prefill FLOPs per stage (vision, projector, LLM, LM head), counted without running the model.

The prefill graph runs under ``FakeTensorMode`` (no arithmetic, no memory for activations) inside
``torch.utils.flop_counter.FlopCounterMode``; each node's FLOPs go to the stage its role belongs to.
The ``vlmopt::`` ops' formulas come from their op files (``flop_formula``, found by
:func:`vlmopt.ops.op_modules`). PyTorch has no FLOP formula for the CPU flash-attention kernel that
SDPA dispatches to, so one is registered here (``4·b·h·s_q·s_k·d``, causal or not, like PyTorch's
other SDPA formulas).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

def _sdpa_cpu_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    batch, heads, q_len, head_dim = query.shape
    k_len, v_dim = key.shape[-2], value.shape[-1]
    return 2 * batch * heads * q_len * k_len * head_dim + 2 * batch * heads * q_len * k_len * v_dim


def register_flop_formulas() -> None:
    """Give the CPU flash-attention kernel and every ``vlmopt::`` op whose file defines a
    ``flop_formula`` their FLOP formulas (each once)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    from vlmopt.ops import op_modules

    sdpa_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if sdpa_cpu not in flop_registry:  # registered once per process; a newer torch may bring its own
        register_flop_formula(sdpa_cpu, get_raw=True)(_sdpa_cpu_flops)
    for name, module in op_modules().items():
        op = getattr(torch.ops.vlmopt, name)
        if module.flop_formula is not None and op not in flop_registry:
            register_flop_formula(op)(module.flop_formula)


@dataclass
class FlopReport:
    """FLOPs of one prefill, by stage."""

    by_stage: dict[str, int] = field(default_factory=dict)
    """FLOPs of each stage (``vision``, ``projector``, ``llm``, ``lm_head``)."""

    @property
    def total(self) -> int:
        return sum(self.by_stage.values())

    @property
    def llm(self) -> int:
        return self.by_stage.get("llm", 0)

    def __str__(self) -> str:
        rows = [f"{stage:>10}: {value / 1e9:10.3f} GFLOPs" for stage, value in self.by_stage.items()]
        return "\n".join(rows + [f"{'total':>10}: {self.total / 1e9:10.3f} GFLOPs"])


def flops(model: nn.Module, batch: dict[str, Any], *, logits_to_keep: int = 1, cache=None) -> FlopReport:
    """Count the prefill FLOPs of ``model`` (a HF VLM or a :class:`CompiledVLM`) on ``batch``.

    ``batch`` holds processor outputs; only their shapes and the token layout matter. The model may
    live on the ``meta`` device (a 7B-shaped model then costs no memory). ``logits_to_keep=1``
    counts the LM head for the last position only, as ``generate`` does. Pass an empty ``cache``
    (``DynamicCache``) to keep the fake-tensor KV cache the prefill fills (for its size).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt.compiler import compile as compile_model
    from vlmopt.graph.probe import run_with_probes
    from vlmopt.runtime import CompiledVLM

    register_flop_formulas()
    compiled = model if isinstance(model, CompiledVLM) else compile_model(model)
    prompt = compiled.plan(batch)
    module = compiled.stages[prompt.stage]
    totals: dict[str, int] = {}

    @contextmanager
    def count(node):
        # FlopCounterMode clears its counts on every __enter__: one counter per node, summed here.
        counter = FlopCounterMode(display=False)
        with counter:
            yield
        stage = node.meta.get("stage", "llm")
        totals[stage] = totals.get(stage, 0) + counter.get_total_flops()

    # Activations are fake tensors (on the meta device for a meta model); the mode is not entered,
    # so the few planned tensors HF reads back as numbers (Qwen's cu_seqlens) can stay real.
    on_meta = next(module.parameters()).device.type == "meta"
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    host = compiled.adapter.host_inputs
    inputs = {
        name: mode.from_tensor(value.to("meta") if on_meta else value)
        if isinstance(value, torch.Tensor) and name not in host
        else value
        for name, value in prompt.inputs.items()
    }
    inputs["cache"] = compiled.new_cache() if cache is None else cache
    inputs["logits_to_keep"] = logits_to_keep
    run_with_probes(module, inputs, lambda node: False, around=count)
    order = ("vision", "projector", "llm", "lm_head")
    by_stage = {stage: totals[stage] for stage in order if stage in totals}
    return FlopReport(by_stage)
