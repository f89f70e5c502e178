"""compile(mode="train"): the training graph gives HF's loss and gradients, and refuses bad input."""

import pytest
import torch

import vlmopt
from tests.conftest import padded_batch
from tests.train.train_helpers import gradients, random_labels
from vlmopt import configs
from vlmopt.passes import RandomPrune


def assert_same_gradients(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, grad in expected.items():
        if grad is None:
            assert actual[name] is None, f"{name} gets a gradient HF does not give"
        else:
            assert actual[name] is not None, f"{name} gets no gradient"
            torch.testing.assert_close(actual[name], grad, msg=name)


def test_loss_and_gradients_equal_hf(family_model):
    batch = padded_batch(family_model, seed=31)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    labels = random_labels(batch, seed=32)
    expected = family_model(**batch, labels=labels)
    expected_grads = gradients(family_model, expected.loss)
    opt = vlmopt.compile(family_model, mode="train")
    out = opt(**batch, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.logits, expected.logits)
    assert_same_gradients(expected_grads, gradients(family_model, out.loss))
    assert out.token_losses.dtype == torch.float32 and out.token_losses.shape == labels.shape
    active = out.active_tokens
    assert torch.equal(active[:, 1:], labels[:, 1:] != -100) and not active[:, 0].any()
    assert torch.equal(out.token_losses != 0, active), "a loss exactly where a token is active"
    torch.testing.assert_close(out.token_losses.sum() / active.sum(), out.loss)


def test_text_only_batch_and_training_alias(llava_clip):
    batch = configs.synthetic_batch(llava_clip, [configs.PromptSpec(images=0, text_before=5, text_after=7)], seed=33)
    labels = random_labels(batch, seed=34)
    expected = llava_clip(**batch, labels=labels)
    expected_grads = gradients(llava_clip, expected.loss)
    opt = vlmopt.compile(llava_clip, training=True)
    out = opt(**batch, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss)
    assert_same_gradients(expected_grads, gradients(llava_clip, out.loss))


def test_compiled_module_holds_the_models_parameters(llava_clip):
    opt = vlmopt.compile(llava_clip, mode="train")
    own = {id(p) for p in llava_clip.parameters()}
    assert {id(p) for p in opt.parameters()} <= own
    assert {"train_prefill", "train_text", "prefill", "decode"} <= set(opt.graph.stages)
    roles = [n.meta["role"] for n in opt.graph["train_prefill"].graph.nodes]
    assert roles.index("lm_head") < roles.index("token_loss") < roles.index("loss_reduce")
    labels = next(n for n in opt.graph["train_prefill"].graph.nodes if n.target == "labels")
    assert labels.meta["seq_dim"] == (0, 1)


def test_labels_follow_a_sequence_changing_pass(llava_clip):
    batch = padded_batch(llava_clip, seed=35)
    labels = random_labels(batch, seed=36)
    plain = vlmopt.compile(llava_clip, mode="train")(**batch, labels=labels)
    kept_all = vlmopt.compile(llava_clip, [RandomPrune(keep_ratio=1.0)], mode="train")(**batch, labels=labels)
    torch.testing.assert_close(kept_all.loss, plain.loss)
    half = vlmopt.compile(llava_clip, [RandomPrune(keep_ratio=0.5)], mode="train")(**batch, labels=labels)
    assert half.token_losses.shape[1] < labels.shape[1], "visual tokens were dropped"
    # Text tokens (the only ones with labels) all survive, so the same tokens carry the loss.
    assert half.active_tokens.sum() == plain.active_tokens.sum()
    assert torch.isfinite(half.loss)


def test_bad_input_is_refused(llava_clip):
    batch = padded_batch(llava_clip, seed=37)
    labels = random_labels(batch, seed=38)
    opt = vlmopt.compile(llava_clip, mode="train")
    with pytest.raises(vlmopt.InputError, match='mode="train" runs training steps: pass labels'):
        opt(**batch)
    with pytest.raises(vlmopt.InputError, match=r"labels have shape \(2, \d+\) but input_ids have"):
        opt(**batch, labels=labels[:, 1:])
    with pytest.raises(vlmopt.InputError, match="labels must be an integer tensor"):
        opt(**batch, labels=labels.float())
    with pytest.raises(vlmopt.InputError, match='inference mode; compile with mode="train"'):
        vlmopt.compile(llava_clip)(**batch, labels=labels)
    with pytest.raises(vlmopt.PassConfigError, match="mode must be one of infer, train, got 'training'"):
        vlmopt.compile(llava_clip, mode="training")


def test_a_training_model_still_generates_like_hf(llava_clip):
    batch = padded_batch(llava_clip, seed=39)
    opt = vlmopt.compile(llava_clip, mode="train")
    with torch.no_grad():
        expected = llava_clip.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(opt.generate(**batch, max_new_tokens=4), expected)


def test_cli_shows_the_training_graphs(capsys):
    from vlmopt.cli import main

    assert main(["diff", "--model", "tiny-llava-random", "--passes", "regate:keep=0.5", "--mode", "train"]) == 0
    out = capsys.readouterr().out
    assert "@@ train_prefill: +9 added, ~2 re-wired" in out and "regate_active = vlmopt.regate_mask" in out
    assert main(["inspect", "--model", "tiny-llava-random", "--stage", "train_text", "--mode", "train"]) == 0
    assert "token_losses = token_losses(lm_head, labels)  [token_loss]" in capsys.readouterr().out
    assert main(["inspect", "--model", "tiny-llava-random", "--stage", "train_text"]) == 2
    assert "add --mode train" in capsys.readouterr().err
