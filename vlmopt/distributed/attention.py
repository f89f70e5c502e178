"""APB-V's attention on each host, for one prompt row, and the host-merged decoding.

Prefill of one decoder layer (paper: arXiv 2601.21444, https://arxiv.org/abs/2601.21444; official
``zigzag_lring_flash_attn.py``), for every host ``h`` this process plays, on the tokens it holds in
its local order ``[anchor | B^(v1) | B^(v2) | question]`` (v1 = h, v2 = 2H−1−h):

1. compress: ``vlmopt::apbv_compress`` picks ``keep`` keys per KV head of each of its two blocks
   with the question's queries; the picked keys/values are all-gathered (every host gets all 2H);
2. anchor + B^(v1): ``vlmopt::apbv_attention`` with the passing block of blocks 0..v1−1 (anchor
   rows see only the anchor, causally; block rows see the passing keys, the anchor, the block);
3. B^(v2): the same op with no anchor rows, its keys ``[passing 0..v2−1 | anchor | block]``;
4. question: exact attention over the host's cached slice ``[anchor slice h | B^(v1) | B^(v2)]``
   (plus the question itself, causally, on host 0), all-gathered as (out, lse) and merged by
   ``vlmopt::lse_merge`` — exactly the question's full attention over the whole prompt.

Decoding: every host attends its own cache slice (host 0 also the question and the generated
tokens) and the partial outputs merge by log-sum-exp: exact attention over the whole cache.

Shapes: q [1, H, S, D], k and v [1, H_kv, S, D] per row (S = the host's local tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmopt.distributed.plan import HostPlan
from vlmopt.ops.apbv_attention import masked_attention as dense_attention


def local_offsets(plan: HostPlan, host: int) -> tuple[int, int, int, int]:
    """Ends of the anchor, of B^(v1), of B^(v2) and of the question in host ``host``'s local order."""
    first, second = (plan.block(v) for v in plan.blocks_of(host))
    anchor_end = plan.anchor
    first_end = anchor_end + first[1] - first[0]
    second_end = first_end + second[1] - second[0]
    return anchor_end, first_end, second_end, second_end + plan.length - plan.context


def compress(q: Tensor, k: Tensor, v: Tensor, plan: HostPlan, host: int, pool: int) -> Tensor:
    """The passing KVs of host ``host``'s two blocks: [2 blocks, 2 (k, v), 1, H_kv, most_kept, D], each
    block's ``keep_of`` entries first (zero-padded to one shape, so hosts can all-gather it)."""
    anchor_end, first_end, second_end, end = local_offsets(plan, host)
    question = q[:, :, second_end:end]
    picked = []
    for virtual, (lo, hi) in zip(plan.blocks_of(host), ((anchor_end, first_end), (first_end, second_end))):
        index = torch.ops.vlmopt.apbv_compress(question, k[:, :, lo:hi], plan.keep_of(virtual), pool)
        index = index[..., None].expand(-1, -1, -1, k.shape[-1])
        pair = torch.stack([torch.gather(k[:, :, lo:hi], 2, index), torch.gather(v[:, :, lo:hi], 2, index)])
        picked.append(torch.nn.functional.pad(pair, (0, 0, 0, plan.most_kept - index.shape[2])))
    return torch.stack(picked)


def passing_blocks(gathered: list[Tensor], plan: HostPlan) -> list[Tensor]:
    """Per virtual block v: its passing KVs [2, 1, H_kv, keep_of(v), D], from every host's :func:`compress`."""
    blocks: list[Tensor] = [gathered[0][0]] * (2 * plan.hosts)
    for host, picked in enumerate(gathered):
        for slot, virtual in enumerate(plan.blocks_of(host)):
            blocks[virtual] = picked[slot][:, :, :, : plan.keep_of(virtual)]
    return blocks


def _passing_for(blocks: list[Tensor], virtual: int) -> tuple[Tensor, Tensor]:
    """(k, v) [1, H_kv, Σ keep, D]: the compressed blocks 0..virtual−1 in order."""
    if virtual == 0:
        empty = blocks[0][:, :, :, :0]
        return empty[0], empty[1]
    joined = torch.cat(blocks[:virtual], dim=3)
    return joined[0], joined[1]


def host_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: HostPlan, host: int, blocks: list[Tensor], scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 2–4 on host ``host``: (out of anchor + B^(v1) + B^(v2) [1, H, ·, D], question partial out
    [1, H, Lq, D], its lse [1, H, Lq])."""
    anchor_end, first_end, second_end, end = local_offsets(plan, host)
    first, second = plan.blocks_of(host)
    apbv = torch.ops.vlmopt.apbv_attention
    pk, pv = _passing_for(blocks, first)
    out_first, _ = apbv(
        q[:, :, :first_end], torch.cat([pk, k[:, :, :first_end]], 2), torch.cat([pv, v[:, :, :first_end]], 2),
        anchor_end, pk.shape[2], scale,
    )
    pk, pv = _passing_for(blocks, second)
    keys = torch.cat([pk, k[:, :, :anchor_end], k[:, :, first_end:second_end]], 2)
    values = torch.cat([pv, v[:, :, :anchor_end], v[:, :, first_end:second_end]], 2)
    out_second, _ = apbv(q[:, :, first_end:second_end], keys, values, 0, pk.shape[2] + anchor_end, scale)
    lo, hi = plan.anchor_slice(host)
    keys = torch.cat([k[:, :, lo:hi], k[:, :, anchor_end:second_end]], 2)
    values = torch.cat([v[:, :, lo:hi], v[:, :, anchor_end:second_end]], 2)
    question = q[:, :, second_end:end]
    if host == 0:  # the question's own keys, causally, on one host only
        out_q, lse_q = apbv(
            question, torch.cat([keys, k[:, :, second_end:end]], 2), torch.cat([values, v[:, :, second_end:end]], 2),
            0, keys.shape[2], scale,
        )
    else:
        out_q, lse_q = dense_attention(question, keys, values, scale)
    return torch.cat([out_first, out_second], 2), out_q, lse_q


def prefill(local: dict[int, tuple[Tensor, Tensor, Tensor]], plan: HostPlan, hosts, scale: float, pool: int) -> dict[int, Tensor]:
    """APB-V attention of one row on the hosts ``hosts`` plays: ``local[h]`` = host h's (q, k, v) in
    its local order; returns each host's output [1, H, S_h, D] in the same order."""
    picked = hosts.all_gather({h: compress(*local[h], plan, h, pool) for h in hosts.local})
    blocks = passing_blocks(picked, plan)
    partial = {h: host_attention(*local[h], plan, h, blocks, scale) for h in hosts.local}
    outs = hosts.all_gather({h: partial[h][1] for h in hosts.local})
    lses = hosts.all_gather({h: partial[h][2] for h in hosts.local})
    out_q, _ = torch.ops.vlmopt.lse_merge(torch.stack(outs), torch.stack(lses))
    return {h: torch.cat([partial[h][0], out_q.to(partial[h][0].dtype)], 2) for h in hosts.local}


def decode(q: Tensor, keys: Tensor, values: Tensor, visible: dict[int, Tensor], hosts, scale: float) -> Tensor:
    """One decoding step merged over hosts: q [B, H, 1, D]; ``keys``/``values`` the KVs this process
    holds; ``visible[h]`` [B, 1, 1, T] bool the keys host ``h`` attends. Returns [B, H, 1, D]."""
    partial = {h: dense_attention(q, keys, values, scale, visible[h]) for h in hosts.local}
    outs = hosts.all_gather({h: partial[h][0] for h in hosts.local})
    lses = hosts.all_gather({h: partial[h][1] for h in hosts.local})
    out, _ = torch.ops.vlmopt.lse_merge(torch.stack(outs), torch.stack(lses))
    return out
