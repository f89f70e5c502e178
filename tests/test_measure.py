"""vlmopt.measure.measure: the one timing loop of eval, bench, demo and the benchmarks."""

import pytest
import torch

from vlmopt.measure import Timing, measure


def test_one_callable_warmup_then_timed_runs_under_inference_mode(monkeypatch):
    """A fake clock: each run takes a known time, so the samples and their statistics are exact."""
    import vlmopt.measure

    now = [0.0]
    monkeypatch.setattr(vlmopt.measure.time, "perf_counter", lambda: now[0])
    durations = [9.0, 8.0, 0.5, 0.2, 0.4, 0.3]  # two warm-up runs, then four timed ones
    calls = []

    def run():
        calls.append(torch.is_inference_mode_enabled())
        now[0] += durations[len(calls) - 1]

    timing = measure(run, repeats=4, warmup=2)
    assert calls == [True] * 6
    assert isinstance(timing, Timing) and timing.repeats == 4 and timing.warmup == 2
    assert timing.samples_s == pytest.approx((0.5, 0.2, 0.4, 0.3))
    assert timing.median_s == pytest.approx(0.35) and timing.min_s == pytest.approx(0.2)
    assert timing.spread == pytest.approx(0.3 / 0.35)


def test_several_callables_alternate_abba():
    order = []
    timings = measure({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=4, warmup=1)
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert set(timings) == {"a", "b"} and all(t.repeats == 4 and t.warmup == 1 for t in timings.values())


@pytest.mark.parametrize("repeats, warmup", [(0, 1), (3, -1)])
def test_bad_counts_are_refused(repeats, warmup):
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=repeats, warmup=warmup)


def test_timing_never_starts_cuda():
    """measure() waits for queued CUDA work only in a process that uses CUDA: here it must not start it."""
    measure(lambda: torch.ones(3).sum(), repeats=2, warmup=1)
    assert not torch.cuda.is_initialized()
