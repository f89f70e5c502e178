"""compile checks the pass list as a whole before tracing: stage order, one KV-cache manager,
train-stage passes only for training; CompiledVLM says whether its passes are lossless / query-aware."""

from dataclasses import dataclass
from typing import ClassVar

import pytest

import vlmopt
from vlmopt.passes import Pass, RandomPrune


@dataclass(frozen=True)
class InLLM(Pass):
    stage: ClassVar[str] = "llm"
    query_aware: ClassVar[bool] = True

    def apply(self, graph) -> None:
        pass


@dataclass(frozen=True)
class CacheA(Pass):
    stage: ClassVar[str] = "kv"
    lossless: ClassVar[bool] = True

    def apply(self, graph) -> None:
        pass


@dataclass(frozen=True)
class CacheB(CacheA):
    pass


@dataclass(frozen=True)
class Trainer(Pass):
    stage: ClassVar[str] = "train"

    def apply(self, graph) -> None:
        pass


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ([InLLM(), RandomPrune(keep_ratio=0.5)], r"RandomPrune \(vision stage\) comes after InLLM \(llm stage\).*list RandomPrune before InLLM"),
        ([CacheA(), RandomPrune(keep_ratio=0.5)], r"RandomPrune \(vision stage\) comes after CacheA \(kv stage\)"),
        ([CacheA(), InLLM(), CacheB()], "CacheA and CacheB are both kv-stage passes.*keep one of them"),
        ([Trainer()], r'Trainer is a train-stage pass.*compile with mode="train" or drop Trainer'),
    ],
)
def test_refused_before_tracing(llava_clip, no_tracing, passes, message):
    with pytest.raises(vlmopt.IncompatiblePassError, match=message):
        vlmopt.compile(llava_clip, passes=passes)


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ([Trainer(), RandomPrune(keep_ratio=0.5)], r"RandomPrune \(vision stage\) comes after Trainer \(train stage\)"),
        ([InLLM()], r'InLLM is an llm-stage pass, which training graphs do not support yet; compile it with mode="infer"'),
    ],
)
def test_refused_in_training_before_tracing(llava_clip, no_tracing, passes, message):
    with pytest.raises(vlmopt.IncompatiblePassError, match=message):
        vlmopt.compile(llava_clip, passes=passes, mode="train")


def test_compatible_orders_compile(llava_clip):
    compiled = vlmopt.compile(llava_clip, passes=[RandomPrune(keep_ratio=0.5), InLLM(), CacheA()])
    assert [type(p) for p in compiled.passes] == [RandomPrune, InLLM, CacheA]
    assert vlmopt.compile(llava_clip, passes=[Trainer()], training=True).training_graph


def test_a_stage_outside_the_list_is_a_definition_error():
    with pytest.raises(TypeError, match="stage must be one of vision, llm, kv, train"):

        @dataclass(frozen=True)
        class Nowhere(Pass):
            stage: ClassVar[str] = "decoder"


def test_lossless_and_query_aware_are_shown(llava_clip):
    none = vlmopt.compile(llava_clip)
    assert none.lossless and not none.query_aware
    assert "no passes (lossless, query-agnostic)" in repr(none)
    exact = vlmopt.compile(llava_clip, passes=["random_prune:keep_ratio=1.0"])
    assert exact.lossless, "a config listed in lossless_settings() is lossless"
    lossy = vlmopt.compile(llava_clip, passes=[RandomPrune(keep_ratio=0.5), CacheA()])
    assert not lossy.lossless and not lossy.query_aware
    assert vlmopt.compile(llava_clip, passes=[CacheA()]).lossless
    reading = vlmopt.compile(llava_clip, passes=[InLLM()])
    assert reading.query_aware and not reading.lossless
    assert repr(reading).endswith("in_llm (lossy, query-aware); backend=eager)")
