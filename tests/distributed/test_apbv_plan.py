"""APB-V's host plan: the official default lengths, zigzag blocks, the hosts' caches partitioning
the prompt exactly once, and the short-context error."""

import pytest

from vlmopt.distributed.plan import default_lengths, plan_row
from vlmopt.errors import InputError


def test_official_defaults():
    assert default_lengths(131072) == (2048, 1024)
    assert default_lengths(32768) == (512, 256)
    assert default_lengths(200) == (128, 128)  # rounded up to the kernel's 128-token tiles
    assert default_lengths(63) == (0, 0)
    plan = plan_row(8, 0, 131072, 131102, None, None)
    assert plan.keep == 1024 and plan.keep_of(15) == 1024
    assert plan_row(4, 0, 900, 930, None, None).keep == 0  # 96-token blocks pass nothing by default


@pytest.mark.parametrize("hosts,start,context,question,anchor,passing", [(3, 2, 101, 7, 10, 4), (4, 0, 517, 11, None, 9), (1, 5, 30, 3, 0, 100)])
def test_zigzag_and_caches_partition_the_prompt(hosts, start, context, question, anchor, passing):
    plan = plan_row(hosts, start, context, context + question, anchor, passing)
    sizes = [plan.block(v)[1] - plan.block(v)[0] for v in range(2 * hosts)]
    assert sum(sizes) == context - plan.anchor and max(sizes) - min(sizes) <= 1
    assert sorted(v for h in range(hosts) for v in plan.blocks_of(h)) == list(range(2 * hosts))
    assert all(plan.blocks_of(h) == (h, 2 * hosts - 1 - h) for h in range(hosts))
    cached = sorted(slot for h in range(hosts) for lo, hi in plan.cached_ranges(h) for slot in range(lo, hi))
    assert cached == list(range(context + question)), "every prompt slot is cached by exactly one host"
    for h in range(hosts):
        local = plan.local_index(h).tolist()
        assert local == sorted(local) and local[0] == start and local[-1] == start + context + question - 1
    assert all(plan.keep_of(v) == min(passing, sizes[v]) for v in range(2 * hosts))


def test_context_shorter_than_the_hosts_need():
    with pytest.raises(InputError, match="hosts=4 needs a context of at least anchor \\+ 2·hosts = 10 \\+ 8 tokens"):
        plan_row(4, 0, 17, 20, 10, None)
