"""The streaming runtime without a pass: answers equal a one-shot prefill of the same frames and
question; bad input gets a clear error and leaves the stream usable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmopt
from tests.stream.streams import one_shot, qwen_processor, random_frames
from vlmopt.errors import IncompatiblePassError, InputError

QUESTION = "what colour was the first object to appear?"


@pytest.fixture(scope="module")
def processor():
    return qwen_processor()


@pytest.fixture(scope="module")
def compiled(qwen):
    return vlmopt.compile(qwen)


def reference_answer(compiled, processor, frames, question, max_new_tokens=6):
    batch = one_shot(processor, frames, question)
    ids = compiled.generate(**batch, max_new_tokens=max_new_tokens)
    return ids[0, batch["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("chunks", [(8,), (2, 4, 2)])
def test_stream_equals_one_shot_prefill(compiled, processor, chunks):
    frames = random_frames(sum(chunks), seed=len(chunks))
    stream = compiled.stream(processor=processor)
    first = 0
    for count in chunks:
        stream.append(frames[first : first + count])
        first += count
    answer = stream.ask(QUESTION, max_new_tokens=6)
    assert answer.token_ids == reference_answer(compiled, processor, frames, QUESTION)
    assert answer.visual_tokens == sum(chunks) // 2 * 4 and answer.ttft_ms > 0
    # the question and answer left the cache: asking again answers the same
    assert stream.ask(QUESTION, max_new_tokens=6).token_ids == answer.token_ids


def test_frames_appended_after_a_question_continue_the_video(qwen, compiled, processor):
    frames = random_frames(8, seed=5)
    stream = compiled.stream(processor=processor)
    stream.append(list(map(_pil, frames[:4])))
    stream.ask("how many objects are there now?", max_new_tokens=3)
    stream.append(frames[4:])
    assert stream.ask(QUESTION, max_new_tokens=6).token_ids == reference_answer(compiled, processor, frames, QUESTION)
    memory = stream.memory()
    assert memory["total"] == sum(memory["layers"]) == sum(memory["tiers"].values()) > 0
    assert len(memory["layers"]) == qwen.config.get_text_config().num_hidden_layers


def test_shipped_model_needle_answers_match_one_shot():
    from vlmopt import reference

    model, processor = reference.load("tiny-qwen25vl")
    compiled = vlmopt.compile(model)
    for sample in reference.task_for("tiny-qwen25vl", "needle").samples("test", n=2):
        frames = sample.frames[:32]  # the first half of the needle video keeps the test fast
        stream = compiled.stream(processor=processor)
        stream.append(frames[:16])
        stream.append(frames[16:])
        answer = stream.ask(sample.question, max_new_tokens=3)
        assert answer.token_ids == reference_answer(compiled, processor, frames, sample.question, 3)


def _pil(frame):
    from PIL import Image

    return Image.fromarray(frame)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda f: f.astype(np.float32), "uint8"),
        (lambda f: f[..., :2], r"\[T, H, W, 3\]"),
        (lambda f: f[0], r"\[T, H, W, 3\]"),
        (lambda f: f[:3], "multiple of 2 frames"),
        (lambda f: np.ascontiguousarray(f[:, :28, :28]), "keep the frame size"),
        (lambda f: "frames.mp4", "PIL images or a uint8 array"),
    ],
)
def test_bad_frames_are_refused_and_the_stream_stays_usable(compiled, processor, bad, message):
    frames = random_frames(4, seed=7)
    stream = compiled.stream(processor=processor)
    stream.append(frames[:2])
    before = stream.cache_length
    with pytest.raises(InputError, match=message):
        stream.append(bad(frames))
    assert stream.cache_length == before and stream.state.frames == 2
    stream.append(frames[2:])
    assert stream.cache_length == before + 4


def test_the_stream_answers_after_refusing_bad_frames(compiled, processor):
    frames = random_frames(4, seed=7)
    stream = compiled.stream(processor=processor)
    stream.append(frames[:2])
    with pytest.raises(InputError):
        stream.append(frames[2:3])
    stream.append(frames[2:])
    assert stream.ask(QUESTION, max_new_tokens=3).token_ids == reference_answer(compiled, processor, frames, QUESTION, 3)


def test_ask_before_any_frame_and_bad_timestamps(compiled, processor):
    stream = compiled.stream(processor=processor)
    with pytest.raises(InputError, match="before any frame"):
        stream.ask(QUESTION)
    with pytest.raises(InputError, match="non-decreasing"):
        stream.append(random_frames(2, seed=1), timestamps=[1.0, 0.5])
    stream.append(random_frames(2, seed=1), timestamps=[0.0, 0.5])
    assert len(stream.ask(QUESTION, max_new_tokens=2).token_ids) >= 1


def test_stream_refuses_vision_passes(qwen, processor):
    compiled = vlmopt.compile(qwen, passes=["random_prune:keep_ratio=0.5"])
    with pytest.raises(IncompatiblePassError, match="kv-stage passes only"):
        compiled.stream(processor=processor)


def test_reset_forgets_frames(compiled, processor):
    stream = compiled.stream(system_prompt="you watch a video", processor=processor)
    prefix = stream.cache_length
    stream.append(random_frames(4, seed=2))
    assert stream.cache_length > prefix
    stream.reset()
    assert stream.cache_length == prefix and stream.kv_bytes_per_chunk == []
    assert torch.is_tensor(stream.state.positions)


def test_planners_count_the_visual_cache_entries_of_frames(compiled, processor, llava_clip):
    """What ``--stream-budget`` takes a fraction of: the cache entries a video's frames bring, as each
    family's planner counts them (Qwen: merged patches; LLaVA: each frame's image tokens, not its newline)."""
    from vlmopt.reference.processing import build_processor

    frames = random_frames(8, seed=9)
    stream = compiled.stream(processor=processor)
    stream.append(frames)
    assert stream.planner.visual_tokens(frames) == stream.visual_tokens == 16
    llava = vlmopt.compile(llava_clip).stream(processor=build_processor("llava", 56))
    llava.append(frames[:3])
    assert llava.planner.visual_tokens(frames[:3]) == 3 * 16 == llava.visual_tokens - 3
