"""ReGATE(elide=True): the decoder skips the tokens whose prediction is out of the loss."""

import torch

import vlmopt
from tests.conftest import padded_batch
from tests.train.train_helpers import gradients
from vlmopt.graph.elide import elision_index
from vlmopt.passes import ReGATE

SPARSE = {"warmup_steps": 0, "dense_steps": 0}


def span_labels(batch: dict, length: int) -> torch.Tensor:
    """Labels on each row's last ``length`` tokens (an answer span at the end, as in fine-tuning data)."""
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -length:] = batch["input_ids"][:, -length:]
    return labels


def test_every_token_active_equals_elide_false(family_model):
    assert_nothing_elided_equals_elide_false(family_model)


def test_elision_carries_deepstack_features():
    """Qwen3-VL adds visual features to the first layers' outputs: they follow the elision index."""
    from vlmopt import configs
    from vlmopt.adapters.qwen3_vl import qwen3vl_config

    model = configs.build(qwen3vl_config(), seed=5)
    assert_nothing_elided_equals_elide_false(model)
    batch = padded_batch(model, seed=75)
    opt = vlmopt.compile(model, [ReGATE(keep=0.5, elide=True, **SPARSE)], mode="train")
    out = opt(**batch, labels=span_labels(batch, 5), sample_ids=[0, 1])
    assert torch.isfinite(out.loss) and (~out.active_tokens & (span_labels(batch, 5) != -100)).any()


def assert_nothing_elided_equals_elide_false(family_model):
    batch = padded_batch(family_model, seed=71)
    labels = span_labels(batch, 5)
    teacher = torch.rand(labels.shape, generator=torch.Generator().manual_seed(72))
    outs, grads = [], []
    for elide in (False, True):
        opt = vlmopt.compile(family_model, [ReGATE(keep=1.0, elide=elide, **SPARSE)], mode="train")
        out = opt(**batch, labels=labels, sample_ids=[0, 1], teacher_losses=teacher)
        outs.append(out)
        grads.append(gradients(family_model, out.loss))
    torch.testing.assert_close(outs[1].loss, outs[0].loss)
    for name, grad in grads[0].items():
        assert (grad is None) == (grads[1][name] is None), name
        if grad is not None:
            torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_sparse_loss_equals_hf_on_the_computed_tokens(llava_clip):
    batch = padded_batch(llava_clip, seed=73)
    labels = span_labels(batch, 7)
    teacher = torch.rand(labels.shape, generator=torch.Generator().manual_seed(74)) * 4
    opt = vlmopt.compile(llava_clip, [ReGATE(keep=0.5, elide=True, **SPARSE)], mode="train")
    out = opt(**batch, labels=labels, sample_ids=[0, 1], teacher_losses=teacher)
    active = out.active_tokens
    answer = torch.cat([torch.zeros(2, 1, dtype=torch.bool), labels[:, 1:] != -100], dim=1)
    assert active.sum(1).tolist() == [4, 4]  # ⌈0.5 · 7⌉ of a 7-token answer span
    index = elision_index(answer, active)
    elided = answer & torch.cat([answer[:, 1:] & ~active[:, 1:], torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    assert ((index >= 0).sum(1) == labels.shape[1] - elided.sum(1)).all() and elided.any()
    # HF on the computed tokens only (same positions), each scoring the original next token when active.
    safe, real = index.clamp(min=0), index >= 0
    following = torch.cat([active, torch.zeros(2, 1, dtype=torch.bool)], dim=1).gather(1, safe + 1) & real
    shifted = torch.cat([labels, torch.full((2, 1), -100)], dim=1).gather(1, safe + 1)
    reduced = {
        "input_ids": torch.where(real, batch["input_ids"].gather(1, safe), 0),
        "attention_mask": torch.where(real, batch["attention_mask"].gather(1, safe), 0),
        "position_ids": torch.where(real, safe, 0),
        "pixel_values": batch["pixel_values"],
    }
    targets = torch.where(following, shifted, -100)
    expected = llava_clip(**reduced, labels=targets, shift_labels=targets)  # HF computes a loss only given labels
    expected_grads = gradients(llava_clip, expected.loss)
    torch.testing.assert_close(out.loss, expected.loss)
    actual = gradients(llava_clip, out.loss)
    for name, grad in expected_grads.items():
        if grad is not None:
            torch.testing.assert_close(actual[name], grad, msg=name)


def test_an_elided_token_changes_nothing(llava_clip):
    batch = padded_batch(llava_clip, seed=75)
    labels = span_labels(batch, 7)
    teacher = torch.rand(labels.shape, generator=torch.Generator().manual_seed(76)) * 4
    losses = {}
    for elide in (False, True):
        opt = vlmopt.compile(llava_clip, [ReGATE(keep=0.5, elide=elide, **SPARSE)], mode="train")
        first = opt(**batch, labels=labels, sample_ids=[0, 1], teacher_losses=teacher)
        answer = labels != -100
        nxt = torch.cat([first.active_tokens[:, 1:], torch.zeros(2, 1, dtype=torch.bool)], dim=1)
        nxt_answer = torch.cat([answer[:, 1:], torch.zeros(2, 1, dtype=torch.bool)], dim=1)
        elided = (answer & nxt_answer & ~nxt).nonzero()
        assert len(elided), "some answer token is elided"
        row, col = elided[0].tolist()
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][row, col] = (changed["input_ids"][row, col] + 1 - 10) % 200 + 10
        opt2 = vlmopt.compile(  # a fresh state, so both runs score alike
llava_clip, [ReGATE(keep=0.5, elide=elide, **SPARSE)], mode="train")
        second = opt2(**changed, labels=labels, sample_ids=[0, 1], teacher_losses=teacher)
        assert torch.equal(second.active_tokens, first.active_tokens)
        losses[elide] = (first.loss.detach(), second.loss.detach())
        gradients(llava_clip, first.loss + second.loss)
    assert not torch.equal(*losses[False]), "without elision the token is context for the loss"
    torch.testing.assert_close(*losses[True], rtol=0, atol=1e-6)
