"""vlmopt.measure.measure: the one timing loop of eval, bench, demo and the benchmarks."""

import time

import pytest
import torch

from vlmopt.measure import Timing, measure


def test_one_callable_warmup_then_timed_runs_under_inference_mode():
    calls = []

    def run():
        calls.append(torch.is_inference_mode_enabled())
        time.sleep(0.002 * len(calls))  # each run slower than the last: samples keep their order

    timing = measure(run, repeats=4, warmup=2)
    assert calls == [True] * 6
    assert isinstance(timing, Timing) and timing.repeats == 4 and timing.warmup == 2
    assert list(timing.samples_s) == sorted(timing.samples_s) and timing.samples_s[0] >= 0.006
    assert timing.min_s == timing.samples_s[0]
    assert timing.median_s == pytest.approx((timing.samples_s[1] + timing.samples_s[2]) / 2)
    assert timing.spread == pytest.approx((timing.samples_s[3] - timing.samples_s[0]) / timing.median_s)


def test_several_callables_alternate_abba():
    order = []
    timings = measure({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=4, warmup=1)
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert set(timings) == {"a", "b"} and all(t.repeats == 4 and t.warmup == 1 for t in timings.values())


@pytest.mark.parametrize("repeats, warmup", [(0, 1), (3, -1)])
def test_bad_counts_are_refused(repeats, warmup):
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=repeats, warmup=warmup)
