"""CompiledVLM.generate follows HF generate: EOS and padding, sampling, arguments."""

import pytest
import torch

import vlmopt
from tests.conftest import padded_batch


def test_eos_stops_rows_and_pads_like_hf(any_model):
    batch = padded_batch(any_model, seed=21)
    compiled = vlmopt.compile(any_model)
    greedy = compiled.generate(**batch, max_new_tokens=6)
    prompt_len = batch["input_ids"].shape[1]
    eos = int(greedy[0, prompt_len + 1])  # row 0 ends on its second token
    with torch.no_grad():
        expected = any_model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = compiled.generate(**batch, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    new = got[0, prompt_len:].tolist()
    first = new.index(eos)
    assert all(token == 0 for token in new[first + 1 :]), "padding after EOS"


@pytest.mark.parametrize("options", [{"top_k": 5}, {"temperature": 0.7, "top_p": 0.9}], ids=["top_k", "top_p"])
def test_sampling_matches_hf_for_a_seed(llava_clip, options):
    batch = padded_batch(llava_clip, seed=22)
    compiled = vlmopt.compile(llava_clip)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = llava_clip.generate(**batch, max_new_tokens=8, do_sample=True, **options)
    torch.manual_seed(5)
    assert torch.equal(compiled.generate(**batch, max_new_tokens=8, do_sample=True, **options), expected)


def test_repetition_penalty_matches_hf(qwen):
    batch = padded_batch(qwen, seed=23)
    with torch.no_grad():
        expected = qwen.generate(**batch, max_new_tokens=8, do_sample=False, repetition_penalty=1.3)
    assert torch.equal(vlmopt.compile(qwen).generate(**batch, max_new_tokens=8, repetition_penalty=1.3), expected)


def test_bad_generation_arguments(llava_clip):
    batch = padded_batch(llava_clip)
    compiled = vlmopt.compile(llava_clip)
    with pytest.raises(vlmopt.InputError, match="max_new_tokens"):
        compiled.generate(**batch, max_new_tokens=0)
    with pytest.raises(vlmopt.InputError, match="top_p"):
        compiled.generate(**batch, max_new_tokens=2, do_sample=True, top_p=1.5)
    with pytest.raises(vlmopt.InputError, match="unsupported inputs"):
        compiled.generate(**batch, max_new_tokens=2, image_sizes=torch.tensor([[56, 56]]))


def test_forward_returns_cache_and_rejects_labels(llava_clip):
    batch = padded_batch(llava_clip)
    compiled = vlmopt.compile(llava_clip)
    out = compiled(**batch)
    assert out.past_key_values.get_seq_length() == batch["input_ids"].shape[1]
    with pytest.raises(vlmopt.InputError, match="no loss"):
        compiled(**batch, labels=batch["input_ids"])
    with pytest.raises(vlmopt.InputError, match="empty cache"):
        compiled(**batch, past_key_values=out.past_key_values)


def test_image_token_mismatch_is_a_clear_error(any_model):
    batch = padded_batch(any_model)
    ids = batch["input_ids"].clone()
    ids[ids == any_model.config.image_token_id] = 11  # image placeholders become text
    with pytest.raises(vlmopt.InputError, match="image tokens"):
        vlmopt.compile(any_model)(**dict(batch, input_ids=ids))


@pytest.mark.slow
def test_inductor_backend_matches_eager(llava_clip):
    batch = padded_batch(llava_clip, seed=24)
    eager = vlmopt.compile(llava_clip, passes=["random_prune:keep_ratio=0.5"])
    compiled = vlmopt.compile(llava_clip, passes=["random_prune:keep_ratio=0.5"], backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, eager(**batch).logits, rtol=1e-4, atol=1e-4)
