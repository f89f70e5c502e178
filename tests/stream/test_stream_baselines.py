"""The eviction baselines on the KV-tier machinery (StreamingLLM, SnapKV), uniform frame sampling,
streams of LLaVA, and the stream paths of ``vlmopt eval`` and ``vlmopt bench --stream``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vlmopt
from tests.stream.streams import qwen_processor, random_frames
from vlmopt.passes import FrameSubsample, SnapKV, StreamingLLM

QUESTION = "what colour was the first object to appear?"


@pytest.fixture(scope="module")
def processor():
    return qwen_processor()


def test_streaming_llm_keeps_sinks_and_the_recent_window(qwen, processor):
    frames = random_frames(12, seed=51)
    full = vlmopt.compile(qwen).stream(processor=processor)
    for first in range(0, 12, 4):
        full.append(frames[first : first + 4])
    stream = vlmopt.compile(qwen, passes=[StreamingLLM(kv_budget=20, chunk_frames=4, sink_tokens=3)]).stream(processor=processor)
    stream.append(frames)
    prefix = stream.state.prefix
    budget = 20 - prefix
    visual = full.state.positions[0, :, prefix:]
    expected = torch.cat([visual[:, :3], visual[:, -(budget - 3) :]], dim=1)
    for layer in stream.state.positions:
        assert torch.equal(layer[:, prefix:], expected)
    # the kept entries are the full cache's own keys, unchanged (lazy: no re-indexing)
    kept = torch.cat([torch.arange(prefix + 3), torch.arange(full.cache_length - budget + 3, full.cache_length)])
    torch.testing.assert_close(stream.state.cache.layers[1].keys, full.state.cache.layers[1].keys[:, :, kept])
    assert stream.ask(QUESTION, 3).token_ids


def test_snapkv_stays_within_budget_and_answers(qwen, processor):
    compiled = vlmopt.compile(qwen, passes=[SnapKV(kv_budget=22, chunk_frames=4, window=4, kernel_size=3)])
    stream = compiled.stream(processor=processor)
    for index in range(3):
        stream.append(random_frames(4, seed=60 + index))
        assert stream.cache_length <= 22
    assert stream.cache_length == 22 and stream.ask(QUESTION, 3).token_ids
    nodes = {n.name for n in compiled.graph["chunk"].graph.nodes}
    assert {"window_queries", "window_attention", "pooled_scores", "tier_keep"} <= nodes


def test_frame_subsample_encodes_a_uniform_share_of_whole_patches(qwen, processor):
    frames = random_frames(20, seed=70)
    compiled = vlmopt.compile(qwen, passes=[FrameSubsample(keep_ratio=0.4, chunk_frames=4)])
    stream = compiled.stream(processor=processor)
    stream.append(frames[:8])
    stream.append(frames[8:])
    kept = [p for p in range(10) if FrameSubsample(keep_ratio=0.4).keeps_patch(p)]
    assert len(kept) == 4 and stream.visual_tokens == 4 * 4
    # the kept patches sit at their original times: the one-shot video's positions of those patches
    full = vlmopt.compile(qwen).stream(processor=processor)
    full.append(frames)
    prefix = full.state.prefix
    times = full.state.positions[0, 0, prefix:].reshape(10, 4)[kept]
    assert torch.equal(stream.state.positions[0, 0, prefix:].reshape(4, 4), times)
    assert stream.ask(QUESTION, 2).token_ids


def test_llava_stream_equals_one_shot_prefill():
    from PIL import Image

    from vlmopt import reference

    model, processor = reference.load("tiny-llava")
    frames = random_frames(2, seed=80, size=224)
    compiled = vlmopt.compile(model)
    question = "what colour is the circle?"
    text = "USER: " + "<image>\n" * 2 + f"{question} ASSISTANT:"
    batch = dict(processor(text=[text], images=[Image.fromarray(f) for f in frames], return_tensors="pt"))
    expected = compiled.generate(**batch, max_new_tokens=3)[0, batch["input_ids"].shape[1] :].tolist()
    stream = compiled.stream(processor=processor)
    stream.append(frames[:1])
    stream.append([Image.fromarray(frames[1])])
    assert stream.ask(question, 3).token_ids == expected


def test_eval_runs_streams_with_a_kv_pass(qwen, processor):
    from vlmopt.evaluation import evaluate

    samples = [
        SimpleNamespace(question=QUESTION, answer="red", family="first-colour", is_video=True, frames=random_frames(8, seed=s))
        for s in (90, 91)
    ]
    report = evaluate(qwen, processor, samples, [["hermes:chunk_frames=4"]], batch_size=2, timing_samples=1,
                      progress=False, stream_budget=0.5)
    run = report["runs"][0]
    assert run.visual_tokens == 8  # half of each video's 16 visual tokens
    assert len(run.answers) == 2 and run.prefill_seconds > 0
    assert report["baseline"].visual_tokens == 16


def test_bench_stream_reports_ttft_and_flat_kv_bytes():
    from vlmopt.stream.bench import stream_bench

    report = stream_bench("tiny-qwen25vl-random", ["hermes:kv_budget=20,chunk_frames=4"], frames=16, width=1.0,
                          repeats=1, frame_size=56)
    assert report["visual_tokens_total"] == 32 and report["cache_tokens"] == 20
    sizes = report["kv_bytes_per_chunk"]
    assert len(sizes) == 4 and sizes[1] == sizes[2] == sizes[3] > sizes[0]
    assert report["ttft_seconds"] > 0 and report["ttft_ratio"] == report["ttft_seconds"] / report["reprefill_seconds"]
