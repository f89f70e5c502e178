"""APB-V's cost per host: attention FLOPs on fake tensors (checked against a closed form) and the CPU
time of one layer's attention against SDPA, for ``vlmopt bench --context-tokens N --passes apbv:hosts=H``.

FLOPs: one host runs, in every decoder layer, the compressor on its two blocks, two
``vlmopt::apbv_attention`` calls, its part of the question's exact attention and the question's
``vlmopt::lse_merge`` (:mod:`vlmopt.distributed.attention`). Those calls run here on fake tensors
(no memory, no arithmetic) inside ``FlopCounterMode`` with the ops' own FLOP formulas, for every
host; ``attention_flops_per_host_ratio`` is the busiest host's count over one device's full causal
attention of the same prompt (``vlmopt::apbv_attention`` with nothing passed: ``4·H·D·S(S+1)/2``;
not SDPA, whose counter charges the masked half as well). It is the same for every layer, so one
layer stands for the model. :func:`analytic_host_flops` gives the closed form the count must equal.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from vlmopt.distributed import attention
from vlmopt.distributed.hosts import SimulatedHosts
from vlmopt.distributed.plan import HostPlan, plan_row
from vlmopt.ops.apbv_attention import visible_pairs


@dataclass(frozen=True)
class AttentionShape:
    """The attention of one decoder layer."""

    heads: int
    """Query heads."""
    kv_heads: int
    """Key/value heads (GQA)."""
    head_dim: int
    """Channels per head."""

    @classmethod
    def of(cls, text_config) -> AttentionShape:
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(heads, text_config.num_key_value_heads, head_dim)


def bench_plan(context: int, question: int, hosts: int, anchor_len: int | None, passing_len: int | None) -> HostPlan:
    """The plan of one unpadded prompt of ``context`` tokens then ``question`` tokens."""
    return plan_row(hosts, 0, context, context + question, anchor_len, passing_len)


def _local(plan: HostPlan, host: int, shape: AttentionShape, dtype, generator=None):
    size = sum(hi - lo for lo, hi in plan.local_ranges(host))

    def make(heads):
        return torch.randn(1, heads, size, shape.head_dim, dtype=dtype, generator=generator)

    return make(shape.heads), make(shape.kv_heads), make(shape.kv_heads)


def host_layer(q, k, v, plan: HostPlan, host: int, blocks, scale: float, pool: int) -> None:
    """One layer's APB-V attention work on host ``host`` (its local q, k, v; the passing ``blocks``
    already gathered): the compressor on its blocks, its attention calls and the question's merge
    (with its own partial standing in for the other hosts', which cost the same)."""
    attention.compress(q, k, v, plan, host, pool)
    _, out_q, lse_q = attention.host_attention(q, k, v, plan, host, blocks, scale)
    torch.ops.vlmopt.lse_merge(torch.stack([out_q] * plan.hosts), torch.stack([lse_q] * plan.hosts))


def host_flops(plan: HostPlan, shape: AttentionShape, pool: int = 5) -> list[int]:
    """FLOPs of one layer's APB-V attention on each host, counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt.flops import register_flop_formulas

    register_flop_formulas()
    counts = []
    with FakeTensorMode():
        local = {h: _local(plan, h, shape, torch.float16) for h in range(plan.hosts)}
        picked = [attention.compress(*local[h], plan, h, pool) for h in range(plan.hosts)]
        blocks = attention.passing_blocks(picked, plan)
        for host in range(plan.hosts):
            with FlopCounterMode(display=False) as counter:
                host_layer(*local[host], plan, host, blocks, 1.0, pool)
            counts.append(counter.get_total_flops())
    return counts


def full_causal_flops(length: int, shape: AttentionShape) -> int:
    """One device's causal attention over ``length`` tokens, counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt.flops import register_flop_formulas

    register_flop_formulas()
    with FakeTensorMode(), FlopCounterMode(display=False) as counter:
        q = torch.empty(1, shape.heads, length, shape.head_dim, dtype=torch.float16)
        k = torch.empty(1, shape.kv_heads, length, shape.head_dim, dtype=torch.float16)
        torch.ops.vlmopt.apbv_attention(q, k, k, 0, 0, 1.0)
    return counter.get_total_flops()


def analytic_host_flops(plan: HostPlan, host: int, shape: AttentionShape) -> int:
    """The closed form of :func:`host_flops` for one host (the sum the ops' formulas give)."""
    heads, kv_heads, dim = shape.heads, shape.kv_heads, shape.head_dim
    first, second = plan.blocks_of(host)
    length = {v: plan.block(v)[1] - plan.block(v)[0] for v in (first, second)}
    passed = {v: sum(plan.keep_of(u) for u in range(v)) for v in (first, second)}
    question = plan.length - plan.context
    lo, hi = plan.anchor_slice(host)
    pairs = visible_pairs(plan.anchor, passed[first], length[first])
    pairs += visible_pairs(0, passed[second] + plan.anchor, length[second])
    pairs += question * (hi - lo + length[first] + length[second])
    pairs += question * (question + 1) // 2 if host == 0 else 0
    compress = 2 * (heads * question * dim) + 2 * kv_heads * (length[first] + length[second]) * dim
    merge = 2 * plan.hosts * heads * question * dim
    return 4 * heads * dim * pairs + compress + merge


def time_attention(plan: HostPlan, shape: AttentionShape, repeats: int, pool: int = 5, seed: int = 0) -> dict:
    """CPU seconds (medians) of one layer's attention in float32: SDPA's causal attention over the
    whole prompt against APB-V's busiest host (host 0: compressor, both blocks, its question part
    and the merge; the reference ops, as on a CPU)."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    length = plan.length
    q = torch.randn(1, shape.heads, length, shape.head_dim, generator=generator)
    k = torch.randn(1, shape.kv_heads, length, shape.head_dim, generator=generator)
    v = torch.randn(1, shape.kv_heads, length, shape.head_dim, generator=generator)
    scale = shape.head_dim**-0.5
    hosts = SimulatedHosts(plan.hosts)
    local = {h: tuple(x.index_select(2, plan.local_index(h)) for x in (q, k, v)) for h in hosts.local}
    blocks = attention.passing_blocks([attention.compress(*local[h], plan, h, pool) for h in hosts.local], plan)

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    def one_host():
        host_layer(*local[0], plan, 0, blocks, scale, pool)

    runs = {"sdpa_causal": sdpa, "apbv_one_host": one_host}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(repeats):  # interleaved, so a passing load slows every variant alike
            for name, fn in runs.items():
                began = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - began)
    return {f"{name}_seconds": statistics.median(values) for name, values in samples.items()} | {
        "samples_s": samples, "tokens": length, "hosts": plan.hosts,
    }


def apbv_report(text_config, context: int, question: int, hosts: int, anchor_len=None, passing_len=None, pool: int = 5,
                time_context: int = 4096, repeats: int = 3) -> dict:
    """What ``vlmopt bench`` prints and writes for an APB-V pass at a long-video context."""
    shape = AttentionShape.of(text_config)
    plan = bench_plan(context, question, hosts, anchor_len, passing_len)
    counted = host_flops(plan, shape, pool)
    analytic = [analytic_host_flops(plan, h, shape) for h in range(hosts)]
    full = full_causal_flops(plan.length, shape)
    busiest = max(range(hosts), key=counted.__getitem__)
    # At a CPU-sized context the 128-token tiles would round the passing blocks away, so the timed
    # split takes the paper's fractions unrounded (n/64, n/128) where the pass leaves them unset.
    timed_plan = bench_plan(
        time_context, question, hosts, time_context // 64 if anchor_len is None else anchor_len,
        time_context // 128 if passing_len is None else passing_len,
    )
    return {
        "context_tokens": context, "question_tokens": question, "hosts": hosts,
        "anchor_len": plan.anchor, "passing_len": plan.keep, "block_tokens": [plan.block(v)[1] - plan.block(v)[0] for v in range(2 * hosts)],
        "attention": {"heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim},
        "host_attention_flops": counted, "host_attention_flops_analytic": analytic, "busiest_host": busiest,
        "full_causal_attention_flops": full,
        "attention_flops_per_host_ratio": counted[busiest] / full,
        "analytic_ratio": analytic[busiest] / full,
        "cpu_time_one_layer": time_attention(timed_plan, shape, repeats, pool) | {
            "anchor_len": timed_plan.anchor, "passing_len": timed_plan.keep,
        },
    }
