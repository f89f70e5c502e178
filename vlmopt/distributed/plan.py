"""How APB-V splits one prompt over H hosts: anchor, 2H zigzag context blocks, passing lengths.

APB-V (arXiv 2601.21444, https://arxiv.org/abs/2601.21444; ``thunlp/APB``) cuts a prompt of
``n`` context tokens followed by a question block into

    [ anchor (l_a) | B^(0) | B^(1) | ... | B^(2H-1) | question ]

and gives physical host ``h`` the virtual blocks ``h`` and ``2H-1-h`` (zigzag: every host then
attends ``(2H-1)·l_p`` passing tokens, so the load is balanced). The anchor and the question sit on
every host; host ``h`` caches the ``h``-th of H slices of the anchor, its two blocks, and (host 0
only) the question and the generated tokens.

Defaults follow the official code: ``l_a = 128·⌈(n // 64) / 128⌉`` and ``l_p = 128·⌈(n // 128) / 128⌉``,
each block then passes ``k = min(l_p, 128·⌊l_b / 128⌋)`` tokens (its CUDA kernel works in tiles of
128, so a block shorter than 128 tokens passes nothing by default). Explicit ``anchor_len`` and
``passing_len`` are used as given (block v passes ``min(passing_len, l_v)``): the Triton kernel and
the reference need no tiles; a block shorter than ``passing_len`` passes all its tokens. Blocks split the rest as evenly as possible (lengths differ by at most
one; the official code gives the last block the remainder).

The context of a row is everything up to its last visual token; the question block is the text
after it (question and ``assistant`` header), which must not be empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vlmopt.errors import InputError

TILE = 128
"""The official kernel's tile: default lengths are multiples of it."""


def default_lengths(context: int) -> tuple[int, int]:
    """``(l_a, l_p)`` of the official code for a context of ``context`` tokens."""
    return TILE * math.ceil((context // 64) / TILE), TILE * math.ceil((context // 128) / TILE)


@dataclass(frozen=True)
class HostPlan:
    """The split of one prompt row (slots counted in the padded row, so ``start`` skips left padding)."""

    hosts: int
    """Physical hosts H (2H virtual hosts / context blocks)."""
    start: int
    """First real slot of the row (the left padding before it belongs to no host)."""
    anchor: int
    """Anchor length l_a (tokens at the start of the context)."""
    bounds: tuple[int, ...]
    """2H + 1 block boundaries, relative to ``start``: block v is ``bounds[v]:bounds[v + 1]``;
    ``bounds[0]`` is the anchor length and ``bounds[-1]`` the context length n."""
    keep: int
    """Most tokens a block passes on (top-k of the query-aware compressor), per KV head; a block
    shorter than that passes all its tokens (:meth:`keep_of`)."""
    length: int
    """Prompt length of the row (context + question), without padding."""

    @property
    def context(self) -> int:
        return self.bounds[-1]

    @property
    def question(self) -> tuple[int, int]:
        """Slots (relative) of the question block."""
        return self.context, self.length

    def block(self, virtual: int) -> tuple[int, int]:
        return self.bounds[virtual], self.bounds[virtual + 1]

    def blocks_of(self, host: int) -> tuple[int, int]:
        """The two virtual blocks of a physical host (zigzag)."""
        return host, 2 * self.hosts - 1 - host

    def anchor_slice(self, host: int) -> tuple[int, int]:
        """The part of the anchor host ``host`` keeps in its cache (H near-equal slices)."""
        step = self.anchor / self.hosts
        return round(step * host), round(step * (host + 1))

    def local_ranges(self, host: int) -> list[tuple[int, int]]:
        """Relative slot ranges host ``host`` holds: anchor, its two blocks, the question."""
        first, second = self.blocks_of(host)
        return [(0, self.anchor), self.block(first), self.block(second), self.question]

    def cached_ranges(self, host: int) -> list[tuple[int, int]]:
        """Relative slot ranges of host ``host``'s KV cache (the question only on host 0)."""
        first, second = self.blocks_of(host)
        ranges = [self.anchor_slice(host), self.block(first), self.block(second)]
        return ranges + ([self.question] if host == 0 else [])

    def local_index(self, host: int, device=None) -> Tensor:
        """[S_h] absolute slots (in the padded row) of the tokens host ``host`` holds, in its order."""
        parts = [torch.arange(lo, hi, device=device) for lo, hi in self.local_ranges(host)]
        return torch.cat(parts) + self.start

    def keep_of(self, virtual: int) -> int:
        """Tokens block ``virtual`` passes on: ``min(keep, its length)``."""
        lo, hi = self.block(virtual)
        return min(self.keep, hi - lo)

    @property
    def most_kept(self) -> int:
        """The longest passing part of one block (what a host sends per block, padded)."""
        return max(self.keep_of(v) for v in range(2 * self.hosts))


def plan_row(hosts: int, start: int, context: int, length: int, anchor_len: int | None, passing_len: int | None) -> HostPlan:
    """The :class:`HostPlan` of one row with ``context`` tokens before a question ending at ``length``."""
    default_anchor, default_passing = default_lengths(context)
    anchor = default_anchor if anchor_len is None else anchor_len
    rest = context - anchor
    if rest < 2 * hosts:
        raise InputError(
            f"APB-V with hosts={hosts} needs a context of at least anchor + 2·hosts = {anchor} + {2 * hosts} tokens "
            f"(each of the {2 * hosts} virtual hosts holds one block), but this prompt's context (everything up to "
            f"its last visual token) has {context}; use fewer hosts, a shorter anchor_len, or a longer video"
        )
    blocks = 2 * hosts
    sizes = [rest // blocks + (1 if v < rest % blocks else 0) for v in range(blocks)]
    bounds = [anchor]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    keep = min(default_passing, TILE * (min(sizes) // TILE)) if passing_len is None else passing_len
    return HostPlan(hosts, start, anchor, tuple(bounds), keep, length)


def plan_prompt(inputs: dict, hosts: int, anchor_len: int | None, passing_len: int | None) -> list[HostPlan]:
    """:func:`plan_hosts` of a planned prefill's inputs (``visual_positions``: flat ``b·S + s`` slots)."""
    mask = inputs["attention_mask"]
    span = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    span = span.index_fill(0, inputs["visual_positions"], True).view(mask.shape)
    return plan_hosts(span, mask, hosts, anchor_len, passing_len)


def plan_hosts(
    visual_span: Tensor, attention_mask: Tensor, hosts: int, anchor_len: int | None, passing_len: int | None
) -> list[HostPlan]:
    """One :class:`HostPlan` per row of a left-padded prefill batch, planned in eager Python.

    ``visual_span`` [B, S] bool marks the visual tokens; ``attention_mask`` [B, S] the real ones.
    """
    plans = []
    seq = attention_mask.shape[1]
    for row in range(attention_mask.shape[0]):
        real = attention_mask[row].bool()
        start = int(real.int().argmax()) if bool(real.any()) else seq
        if not bool(real[start:].all()):
            raise InputError("APB-V needs left padding (real tokens contiguous at the end of each row)")
        visual = visual_span[row].nonzero().flatten()
        if visual.numel() == 0:
            raise InputError(f"APB-V splits a visual context over hosts, but row {row} has no visual tokens")
        context = int(visual[-1]) + 1 - start
        length = seq - start
        if context == length:
            raise InputError(
                f"APB-V needs question tokens after the last visual token (row {row} ends with a visual token): "
                "the question block drives the compressor and is attended exactly"
            )
        plans.append(plan_row(hosts, start, context, length, anchor_len, passing_len))
    return plans
