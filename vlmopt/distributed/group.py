"""APB-V on a ``torch.distributed`` process group: one host per rank (gloo on CPUs, NCCL on GPUs).

``vlmopt.compile(model, passes=[APBV(hosts=H)])`` inside an initialised process group of H ranks
(``torchrun --nproc-per-node H``, or a group the user made, used as is) builds graphs in which
every rank encodes only its own frames, all-gathering the visual tokens before the LLM
(:mod:`vlmopt.distributed.frames`), and keeps only its own tokens ``[anchor | B^(h) | B^(2H−1−h) | question]`` from the first
decoder layer on (hidden states and the rotary cos/sin, i.e. the global 1-D or M-RoPE positions,
sliced by :func:`local_rows`), all-gathers the compressed passing blocks and the question's
partial (out, lse), and caches only its slice of the prompt (:meth:`HostPlan.cached_ranges`). In
decoding every rank attends its cache (rank 0 also appends the new token) and the partial outputs
are all-gathered and merged, so every rank computes the same logits and picks the same token.

Batches: every rank holds its tokens of every row, rows left-padded to one length, and runs the
rows' collectives one row after the other. Not done here: the overlap of communication with
attention (each all-gather waits).

A rank that fails stops the others: every collective runs under the group's timeout, and a rank
whose stage graph raises (in its tower, its attention, anywhere) publishes its rank in the group's
store before leaving (``APBV.stage_failed``), so the others' error names it (:class:`HostFailure`).
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from vlmopt.distributed import attention
from vlmopt.distributed.layers import PLANS_ATTRIBUTE
from vlmopt.distributed.plan import HostPlan
from vlmopt.errors import IncompatiblePassError, VlmoptError

CACHED_ATTRIBUTE = "vlmopt_rank_cached"
"""Attribute of a rank's KV cache: [B, C] bool, its real prompt slots (rows are left-padded to one length)."""
FAILED_KEY = "vlmopt_apbv_failed_rank"
READ_KEY = "vlmopt_apbv_failure_read"


class HostFailure(VlmoptError, RuntimeError):
    """A rank of the APB-V group failed or stopped answering."""


def backend_for(device: torch.device | str) -> str:
    """The collective backend for tensors on ``device``: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(timeout_s: float = 120.0, device: torch.device | str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment) unless a
    group exists. The backend follows ``device``, where this rank's model and batches live (gloo for
    the CPU, NCCL for CUDA, each rank then on GPU ``LOCAL_RANK``), not whether a GPU exists: NCCL
    cannot move CPU tensors. Returns whether a group is active."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def is_rank_zero() -> bool:
    """True outside a process group and on rank 0 (the rank that writes outputs)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def left_padded(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """1-D index rows of different lengths as one [B, L] index, left-padded to the longest (a padding
    entry repeats its row's first index; what it picks is never read), and [B, L] bool: the real entries."""
    longest = max(row.numel() for row in rows)
    index = torch.stack([torch.cat([row[:1].expand(longest - row.numel()), row]) for row in rows])
    real = torch.stack([torch.arange(longest, device=index.device) >= longest - row.numel() for row in rows])
    return index, real


def local_rows(hidden: Tensor, cos: Tensor, sin: Tensor, plans: list[HostPlan], rank: int, *others: Tensor) -> tuple[Tensor, ...]:
    """Rank ``rank``'s tokens of ``hidden`` [B, S, D], their cos/sin [B, S, Dh] and of every other
    sequence value ``others`` [B, S, ·] (DeepStack's injected features), every row left-padded to the
    longest (a graph function): [B, L, ·] each."""
    index, _ = left_padded([plan.local_index(rank, device=hidden.device) for plan in plans])

    def take(x: Tensor) -> Tensor:
        return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))

    return tuple(take(x) for x in (hidden, cos, sin, *others))


class GroupHosts:
    """This rank's host of an H-rank process group."""

    def __init__(self, group, hosts: int) -> None:
        self.group = group
        self.count = hosts
        self.rank = dist.get_rank(group)
        self.local = (self.rank,)

    @classmethod
    def current(cls, hosts: int, group=None) -> GroupHosts:
        world = dist.get_world_size(group)
        if world != hosts:
            raise IncompatiblePassError(
                f"APBV(hosts={hosts}) inside a process group of {world} ranks: one host per rank, so hosts must equal "
                f"the group's size; use apbv:hosts={world} or launch {hosts} processes (torchrun --nproc-per-node {hosts})"
            )
        return cls(group, hosts)

    def __repr__(self) -> str:
        return f"GroupHosts(rank {self.rank} of {self.count})"

    # ----- the one collective -------------------------------------------------------------
    def all_gather(self, values: dict[int, Tensor]) -> list[Tensor]:
        mine = values[self.rank].contiguous()
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(mine, FakeTensor):  # FLOP counting on fake tensors: shapes only, nothing to send
            return [torch.empty_like(mine) for _ in range(self.count)]
        gathered = [torch.empty_like(mine) for _ in range(self.count)]
        try:
            dist.all_gather(gathered, mine, group=self.group)
        except RuntimeError as error:
            raise HostFailure(self.failure_message(error)) from error
        return gathered

    def failure_message(self, error: Exception) -> str:
        failed = None
        with contextlib.suppress(Exception):  # the store may be gone with the failed rank
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=5))
            failed = store.get(FAILED_KEY).decode()
            # Rank 0 hosts the store: it stays until the other surviving ranks have read the name.
            store.add(READ_KEY, 1)
            deadline = time.monotonic() + 5
            while dist.get_rank() == 0 and store.add(READ_KEY, 0) < self.count - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        who = f"rank {failed} failed" if failed is not None else "another rank stopped answering"
        return f"APB-V host {self.rank}: {who} during a collective ({type(error).__name__}: {error}); stopping"

    def announce_failure(self) -> None:
        """Publish this rank as failed (best effort), so the other ranks' errors name it."""
        with contextlib.suppress(Exception):
            dist.distributed_c10d._get_default_store().set(FAILED_KEY, str(self.rank))

    # ----- the layers' work on this rank ---------------------------------------------------
    def cached_index(self, plan: HostPlan, device) -> Tensor:
        """[C] positions, in this rank's local order, of the tokens it caches."""
        anchor_end, _, second_end, end = attention.local_offsets(plan, self.rank)
        lo, hi = plan.anchor_slice(self.rank)
        parts = [torch.arange(lo, hi), torch.arange(anchor_end, second_end)]
        if self.rank == 0:
            parts.append(torch.arange(second_end, end))
        return torch.cat(parts).to(device)

    def prefill_layer(self, q, k, v, cache, layer_idx: int, scale: float, plans: list[HostPlan], pool: int) -> Tensor:
        """q [B, H, L, D], k/v [B, H_kv, L, D]: this rank's tokens of every row, left-padded
        (:func:`local_rows`). Rows run one after the other, every rank in the same order."""
        out = torch.zeros_like(q)
        cached = []
        for row, plan in enumerate(plans):
            pad = q.shape[2] - sum(hi - lo for lo, hi in plan.local_ranges(self.rank))
            local = tuple(x[row : row + 1, :, pad:] for x in (q, k, v))
            out[row : row + 1, :, pad:] = attention.prefill({self.rank: local}, plan, self, scale, pool)[self.rank]
            cached.append(self.cached_index(plan, k.device) + pad)
        if cache is not None:
            index, real = left_padded(cached)
            index = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            cache.update(torch.gather(k, 2, index), torch.gather(v, 2, index), layer_idx)
            setattr(cache, PLANS_ATTRIBUTE, plans)
            setattr(cache, CACHED_ATTRIBUTE, real)
        return out

    def decode_layer(self, q, k, v, cache, layer_idx: int, scale: float, mask: Tensor) -> Tensor:
        """q/k/v [B, ·, 1, D]; ``mask`` [B, T] the 2-D mask over the whole (unsplit) cache + new token."""
        if getattr(cache, PLANS_ATTRIBUTE, None) is None:  # a text-only prefill: every rank holds the whole cache
            keys, values = cache.update(k, v, layer_idx)
            return attention.dense_attention(q, keys, values, scale, mask.bool()[:, None, None, :])[0]
        prompt = getattr(cache, CACHED_ATTRIBUTE)  # [B, C]: this rank's real prompt slots
        if self.rank == 0:  # host 0 appends the new token's KVs; the others keep their prompt slice
            keys, values = cache.update(k, v, layer_idx)
            generated = keys.shape[2] - prompt.shape[1]
            visible = torch.cat([prompt, mask[:, mask.shape[1] - generated :].bool()], 1)
        else:
            keys, values = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
            visible = prompt
        return attention.decode(q, keys, values, {self.rank: visible[:, None, None, :]}, self, scale)
