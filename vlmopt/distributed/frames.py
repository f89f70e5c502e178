"""Frame-parallel vision encoding under a process group: each rank encodes its own frames, and the
visual tokens are all-gathered before they enter the LLM.

A prompt's visual inputs are a list of *frames* in token order: one per image, one per temporal
patch of a video (Qwen2.5-VL folds two video frames into one). Both supported towers encode frames
independently (LLaVA's CLIP/SigLIP runs each image as its own batch row; Qwen2.5-VL's windowed and
full attention never cross a frame), so a rank that encodes a contiguous run of frames computes
exactly the tokens the whole tower would for them. :func:`split_frames` balances the runs by token
count; the adapter plans each run's tower inputs (``Adapter.frame_inputs``); :class:`FrameGather`
is the graph module that joins the ranks' tokens in order.

In the one-process simulation the tower runs once over every frame: the same numbers, since the
frames are independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def split_frames(frame_tokens: list[int], hosts: int) -> list[tuple[int, int]]:
    """Contiguous frame ranges ``[first, stop)``, one per host, with near-equal visual-token counts.

    Host ``h`` ends its range at the frame boundary nearest ``(h + 1) / hosts`` of the tokens, keeping
    at least one frame for every host after it; with fewer frames than hosts, the first hosts take
    one frame each and the rest none.
    """
    count = len(frame_tokens)
    if count <= hosts:
        return [(min(h, count), min(h + 1, count)) for h in range(hosts)]
    total = sum(frame_tokens)
    ends = [0]
    for tokens in frame_tokens:
        ends.append(ends[-1] + tokens)
    bounds = [0]
    for host in range(1, hosts):
        target = total * host / hosts
        allowed = range(bounds[-1] + 1, count - (hosts - host) + 1)
        bounds.append(min(allowed, key=lambda f: abs(ends[f] - target)))
    bounds.append(count)
    return [(bounds[h], bounds[h + 1]) for h in range(hosts)]


@dataclass(frozen=True)
class FrameShare:
    """What one rank encodes and what it contributes to the gathered visual tokens."""

    frames: tuple[tuple[int, int], ...]
    """Frame range ``[first, stop)`` of every host (see :func:`split_frames`)."""
    tokens: tuple[int, ...]
    """Visual tokens every host contributes, in host order (their sum is the prompt's count)."""
    encoded: tuple[int, int]
    """The frames this rank's tower actually runs: its own range, or one frame it encodes only to
    give the graph a non-empty input when it has none (it then contributes no tokens)."""

    @classmethod
    def plan(cls, frame_tokens: list[int], hosts: int, rank: int) -> FrameShare:
        frames = split_frames(frame_tokens, hosts)
        tokens = tuple(sum(frame_tokens[first:stop]) for first, stop in frames)
        first, stop = frames[rank]
        return cls(tuple(frames), tokens, (first, stop) if stop > first else (0, 1))


class FrameGather(nn.Module):
    """The whole prompt's visual tokens [T, D] from this rank's tokens [T_rank(+), D], all-gathered
    over ``hosts`` (a :class:`~vlmopt.distributed.group.GroupHosts`): padded to the longest share
    for the collective and trimmed back."""

    def __init__(self, hosts) -> None:
        super().__init__()
        self.hosts = hosts

    def forward(self, tokens: Tensor, share: FrameShare) -> Tensor:
        rank = self.hosts.rank
        mine = tokens[: share.tokens[rank]]
        longest = max(share.tokens)
        if mine.shape[0] < longest:
            mine = torch.cat([mine, mine.new_zeros(longest - mine.shape[0], *mine.shape[1:])])
        gathered = self.hosts.all_gather({rank: mine})
        return torch.cat([part[:count] for part, count in zip(gathered, share.tokens)])

    def extra_repr(self) -> str:
        return f"all-gather of the ranks' visual tokens; {self.hosts!r}"
