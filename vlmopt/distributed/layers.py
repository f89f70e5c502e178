"""The attention modules APB-V's decoder-layer stand-ins call (see
:mod:`vlmopt.layers.attention_standin`): prefill over hosts, and host-merged decoding.

In the single-process simulation (:class:`~vlmopt.distributed.hosts.SimulatedHosts`) the layer sees
the whole padded batch: each row is cut into the hosts' local token sets, run through
:func:`vlmopt.distributed.attention.prefill`, and put back in place; the KV cache holds every real
token in prompt order, and the row plans ride on the cache so decoding knows which slots each host
caches. Under a process group each rank holds only its own tokens and cache
(:mod:`vlmopt.distributed.group`), and the same functions run with a real all-gather.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmopt.distributed import attention
from vlmopt.distributed.hosts import SimulatedHosts
from vlmopt.distributed.plan import HostPlan

PLANS_ATTRIBUTE = "vlmopt_host_plans"
"""Attribute of the KV cache that carries the prefill's row plans to the decode steps of the same
``generate`` call (a fresh cache per call, so nothing outlives it)."""


def host_masks(plans: list[HostPlan], total: int, device) -> Tensor:
    """[H, B, T] bool: the cache slots (prompt slots of each row, then generated tokens) each host holds."""
    hosts = plans[0].hosts
    masks = torch.zeros(hosts, len(plans), total, dtype=torch.bool, device=device)
    for row, plan in enumerate(plans):
        for host in range(hosts):
            for lo, hi in plan.cached_ranges(host):
                masks[host, row, plan.start + lo : plan.start + hi] = True
        masks[0, row, plan.start + plan.length :] = True  # host 0 appends the generated tokens
    return masks


class APBVPrefill(nn.Module):
    """Prefill attention of every row over the planned hosts (``context``: the row plans)."""

    def __init__(self, pool: int, hosts=None) -> None:
        super().__init__()
        self.pool = pool
        self.hosts = hosts
        """None: simulate the plans' H hosts in this process; else the ranks' :class:`GroupHosts`."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, cache, layer_idx: int, scale: float, context: list[HostPlan]) -> Tensor:
        if self.hosts is not None:
            return self.hosts.prefill_layer(q, k, v, cache, layer_idx, scale, context, self.pool)
        out = torch.zeros_like(q)
        for row, plan in enumerate(context):
            hosts = SimulatedHosts(plan.hosts)
            index = {h: plan.local_index(h, device=q.device) for h in hosts.local}
            local = {h: tuple(x[row : row + 1].index_select(2, index[h]) for x in (q, k, v)) for h in hosts.local}
            for host, part in attention.prefill(local, plan, hosts, scale, self.pool).items():
                out[row : row + 1].index_copy_(2, index[host], part)
        if cache is not None:
            cache.update(k, v, layer_idx)
            setattr(cache, PLANS_ATTRIBUTE, context)
        return out

    def extra_repr(self) -> str:
        where = "simulated hosts" if self.hosts is None else repr(self.hosts)
        return f"vlmopt::apbv_compress(pool={self.pool}) + vlmopt::apbv_attention + vlmopt::lse_merge; {where}"


class HostMergedDecode(nn.Module):
    """One decode step: each host attends its cache slots, merged by ``vlmopt::lse_merge``
    (``context``: the 2-D mask [B, T] over cache + new token). A cache that no APB-V prefill filled
    (a text-only prompt) is one host: plain attention."""

    def __init__(self, hosts=None) -> None:
        super().__init__()
        self.hosts = hosts

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, cache, layer_idx: int, scale: float, context: Tensor) -> Tensor:
        if self.hosts is not None:
            return self.hosts.decode_layer(q, k, v, cache, layer_idx, scale, context)
        keys, values = cache.update(k, v, layer_idx)
        real = context.bool()
        plans = getattr(cache, PLANS_ATTRIBUTE, None)
        if plans is None:
            return attention.decode(q, keys, values, {0: real[:, None, None, :]}, SimulatedHosts(1), scale)
        masks = host_masks(plans, keys.shape[2], keys.device) & real
        hosts = SimulatedHosts(plans[0].hosts)
        return attention.decode(q, keys, values, {h: masks[h][:, None, None, :] for h in hosts.local}, hosts, scale)

    def extra_repr(self) -> str:
        where = "simulated hosts" if self.hosts is None else repr(self.hosts)
        return f"per-host attention + vlmopt::lse_merge; {where}"
