"""Who computes what: the H hosts of a sequence-parallel run, simulated in one process or real.

The APB-V attention code (:mod:`vlmopt.distributed.attention`) is written once for "the hosts this
process plays" (``local``) and one collective, :meth:`all_gather`. :class:`SimulatedHosts` plays all
H hosts in one process (the gather is a list); :class:`vlmopt.distributed.group.GroupHosts` plays
one rank of a ``torch.distributed`` process group (the gather is ``dist.all_gather``). The same
arithmetic runs in both, so the simulation gives the numbers H processes give.
"""

from __future__ import annotations

from torch import Tensor


class SimulatedHosts:
    """All ``count`` hosts in this process."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.local = tuple(range(count))

    def all_gather(self, values: dict[int, Tensor]) -> list[Tensor]:
        """Every host's tensor (``values`` holds one per local host), by host."""
        return [values[host] for host in range(self.count)]

    def __repr__(self) -> str:
        return f"SimulatedHosts({self.count})"
