"""Pass registry, spec parsing, config validation and compatibility refusals."""

import pytest

import vlmopt
from vlmopt.passes import PoolPrune, RandomPrune


def test_registry_keys_are_snake_case():
    assert vlmopt.passes.get("random_prune") is RandomPrune
    assert vlmopt.passes.get("pool_prune") is PoolPrune


def test_parse_specs_with_fractions():
    assert vlmopt.passes.parse("random_prune:keep_ratio=0.5,seed=3") == RandomPrune(keep_ratio=0.5, seed=3)
    assert vlmopt.passes.parse("random_prune:keep_ratio=1/3").keep_ratio == pytest.approx(1 / 3)
    assert vlmopt.passes.parse("random_prune:num_tokens=7") == RandomPrune(num_tokens=7)
    assert vlmopt.passes.parse(" pool_prune : keep_ratio = 0.25 ") == PoolPrune(keep_ratio=0.25)


def test_spec_round_trips():
    for item in (RandomPrune(keep_ratio=0.25, seed=4), PoolPrune(keep_ratio=0.5), RandomPrune(num_tokens=9)):
        assert vlmopt.passes.parse(item.spec()) == item


def test_unknown_pass_lists_the_known_ones():
    with pytest.raises(vlmopt.UnknownPassError, match="random_prune") as error:
        vlmopt.passes.get("hiprunee")
    assert "unknown pass 'hiprunee'" in str(error.value)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, 2])
def test_keep_ratio_outside_zero_one(value):
    with pytest.raises(vlmopt.PassConfigError, match=r"keep_ratio must be in \(0, 1\]"):
        RandomPrune(keep_ratio=value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("random_prune:keep_ratio=abc", "cannot read"),
        ("random_prune:ratio=0.5", "not key=value with a key of RandomPrune"),
        ("random_prune", "exactly one of keep_ratio"),
        ("random_prune:keep_ratio=0.5,num_tokens=3", "exactly one of keep_ratio"),
        ("random_prune:keep_ratio=0.5,seed=-1", "seed must be"),
        ("pool_prune:num_tokens=4", "takes keep_ratio"),
        ("random_prune:num_tokens=0", r"num_tokens must be in \[1"),
    ],
)
def test_bad_configs_name_the_field(spec, message):
    with pytest.raises(vlmopt.PassConfigError, match=message):
        vlmopt.passes.parse(spec)


def test_pool_prune_needs_the_whole_grid(llava_clip):
    with pytest.raises(vlmopt.IncompatiblePassError, match="must come before RandomPrune"):
        vlmopt.compile(llava_clip, passes=[RandomPrune(keep_ratio=0.5), PoolPrune(keep_ratio=0.5)])


def test_passes_must_be_passes_or_specs(llava_clip):
    with pytest.raises(vlmopt.PassConfigError, match="spec strings"):
        vlmopt.compile(llava_clip, passes=[0.5])
