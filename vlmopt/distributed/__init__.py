"""Sequence parallelism across hosts (APB-V): the per-row host plan, the per-host attention, the
hosts themselves (simulated in one process, or the ranks of a ``torch.distributed`` group)."""
