"""The paired statistics of ``vlmopt.evaluation``: the retention interval and lost / gained counts."""

import numpy as np
import pytest

from vlmopt.evaluation import retention_interval


def _loop_interval(base, run, level, resamples, seed):
    """The same bootstrap written as a plain loop over draws (independent reference)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(base), size=(resamples, len(base)))
    ratios = []
    for draw in draws:
        base_right = sum(base[i] for i in draw)
        run_right = sum(run[i] for i in draw)
        ratios.append(run_right / base_right if base_right else 1.0)
    return tuple(float(q) for q in np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2]))


def _paired(rng, n, accuracy, flip):
    """Random baseline answers and a run that disagrees on exactly round(n * flip) random samples.

    An exact count (not a per-sample coin) keeps the two runs from agreeing everywhere by chance,
    which would give a point interval (0.95 ** 100 = 0.6% of draws at n = 100, flip = 0.05).
    """
    base = rng.random(n) < accuracy
    run = base.copy()
    flipped = rng.choice(n, size=round(n * flip), replace=False)
    run[flipped] = ~run[flipped]
    return base.tolist(), run.tolist()


def test_interval_equals_a_plain_loop_bootstrap():
    rng = np.random.default_rng()
    base, run = _paired(rng, 60, 0.6, 0.1)
    seed = int(rng.integers(1 << 30))
    assert retention_interval(base, run, resamples=300, seed=seed) == pytest.approx(_loop_interval(base, run, 0.95, 300, seed))


def test_interval_holds_the_estimate_and_narrows_with_more_samples():
    rng = np.random.default_rng()
    widths = []
    for n in (100, 1600):
        base, run = _paired(rng, n, 0.6, 0.05)
        low, high = retention_interval(base, run, seed=int(rng.integers(1 << 30)))
        assert low <= sum(run) / sum(base) <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_identical_runs_have_a_point_interval_and_disagreement_widens_it():
    rng = np.random.default_rng()
    base, run = _paired(rng, 200, 0.5, 0.2)
    assert retention_interval(base, base) == (1.0, 1.0)
    low, high = retention_interval(base, run)
    assert low < high


def test_interval_rejects_mismatched_lists_and_bad_levels():
    with pytest.raises(ValueError, match="equal, non-empty"):
        retention_interval([True, False], [True])
    with pytest.raises(ValueError, match="equal, non-empty"):
        retention_interval([], [])
    with pytest.raises(ValueError, match="level"):
        retention_interval([True], [True], level=1.5)


def test_sweeps_expand_the_lists_that_have_their_field():
    from vlmopt.errors import PassConfigError
    from vlmopt.evaluation import sweep_lists

    lists = [["hiprune:keep_ratio=0.5"], ["halfv"], ["random_prune:keep_ratio=0.5", "halfv:ivr_keep=0.5"]]
    expanded = sweep_lists(lists, ["keep_ratio=1/2,1/4", "ivr_keep=0.2"])
    assert expanded == [
        ["hiprune:keep_ratio=0.5"], ["hiprune:keep_ratio=0.25"], ["halfv:ivr_keep=0.2"],
        ["random_prune:keep_ratio=0.5", "halfv:ivr_keep=0.2"], ["random_prune:keep_ratio=0.25", "halfv:ivr_keep=0.2"],
    ]
    assert sweep_lists(lists, None) == lists
    with pytest.raises(PassConfigError, match="--sweep seed: none of"):
        sweep_lists([["halfv"]], "seed=1,2")
