"""ReGATE: the mask between the per-token loss and the reduction, its schedule, its state."""

import copy
import math

import pytest
import torch

import vlmopt
from tests.conftest import padded_batch
from tests.train.train_helpers import gradients, random_labels
from vlmopt.passes import ReGATE

SPARSE = {"warmup_steps": 0, "dense_steps": 0}


def test_golden_graph_diff(llava_clip, golden):
    base = vlmopt.compile(llava_clip, mode="train")
    compiled = vlmopt.compile(llava_clip, [ReGATE(keep=0.5)], mode="train")
    golden("regate_llava", vlmopt.graph.diff(base.graph, compiled.graph))


def test_keep_one_is_exactly_the_standard_loss(family_model):
    batch = padded_batch(family_model, seed=41)
    labels = random_labels(batch, seed=42)
    standard = vlmopt.compile(family_model, mode="train")(**batch, labels=labels)
    expected = gradients(family_model, standard.loss)
    opt = vlmopt.compile(family_model, [ReGATE(keep=1.0, **SPARSE)], mode="train")
    with pytest.warns(UserWarning, match="no teacher_losses"):
        out = opt(**batch, labels=labels, sample_ids=[0, 1])
    assert not opt.pass_state("regate").is_dense(0)
    assert torch.equal(out.loss, standard.loss) and torch.equal(out.active_tokens, standard.active_tokens)
    actual = gradients(family_model, out.loss)
    assert all((g is None and actual[n] is None) or torch.equal(g, actual[n]) for n, g in expected.items())


def test_sparse_steps_keep_the_hardest_answer_tokens(llava_clip):
    batch = padded_batch(llava_clip, seed=43)
    labels = random_labels(batch, seed=44, fraction=0.8)
    teacher = torch.rand(labels.shape, generator=torch.Generator().manual_seed(45)) * 3
    opt = vlmopt.compile(llava_clip, [ReGATE(keep=0.3, lam=0.5, **SPARSE)], mode="train")
    out = opt(**batch, labels=labels, sample_ids=[7, 8], teacher_losses=teacher)
    answer = labels[:, 1:] != -100
    counts = answer.sum(1).tolist()
    assert all(n % 2 for n in counts) or any(n % 2 for n in counts)
    assert out.active_tokens.sum(1).tolist() == [math.ceil(round(0.3 * n, 9)) for n in counts]
    # First visit: the EMA is this step's loss, so the score is loss + λ·teacher on the answer tokens.
    scores = (out.token_losses + 0.5 * teacher).detach()
    for row in range(labels.shape[0]):
        candidates = [i for i in range(labels.shape[1]) if i and labels[row, i] != -100]
        ranked = sorted(candidates, key=lambda i: (-float(scores[row, i]), i))
        assert out.active_tokens[row].nonzero().squeeze(1).tolist() == sorted(ranked[: math.ceil(0.3 * len(candidates))])
    active = out.active_tokens
    torch.testing.assert_close(out.loss, out.token_losses[active].mean())


def test_warmup_and_dense_steps_are_honoured(llava_clip):
    batch = padded_batch(llava_clip, seed=46)
    labels = random_labels(batch, seed=47, fraction=0.8)
    answer = (labels[:, 1:] != -100).sum(1)
    config = ReGATE(keep=0.5, warmup_steps=2, cycle=3, dense_steps=1)
    opt = vlmopt.compile(llava_clip, [config], mode="train")
    dense = [opt.pass_state("regate").is_dense(step) for step in range(9)]
    assert dense == [True, True, True, False, False, True, False, False, True]
    with pytest.warns(UserWarning):
        for step in range(6):
            out = opt(**batch, labels=labels, sample_ids=[1, 2])
            expected = answer if dense[step] else torch.tensor([math.ceil(0.5 * int(n)) for n in answer])
            assert out.active_tokens.sum(1).tolist() == expected.tolist(), step
            gradients(llava_clip, out.loss)
    assert opt.pass_state("regate").step == 6
    with torch.no_grad():  # evaluation: every answer token, and the state stays where it was
        out = opt(**batch, labels=labels, sample_ids=[1, 2])
    assert out.active_tokens.sum(1).tolist() == answer.tolist() and opt.pass_state("regate").step == 6


def train(model, config, batches, steps, saved=None):
    """SGD steps with ReGATE; returns (losses, masks, a checkpoint after the steps)."""
    opt = vlmopt.compile(model, [config], mode="train")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    if saved is not None:
        opt.load_state_dict(saved["compiled"])
        optimizer.load_state_dict(saved["optimizer"])
    losses, masks = [], []
    start = opt.pass_state("regate").step
    for step in range(start, start + steps):
        batch, labels, ids, teacher = batches[step % len(batches)]
        out = opt(**batch, labels=labels, sample_ids=ids, teacher_losses=teacher)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.detach())
        masks.append(out.active_tokens)
    return losses, masks, {"compiled": copy.deepcopy(opt.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}


def test_a_resumed_run_equals_an_uninterrupted_one(llava_clip):
    config = ReGATE(keep=0.5, beta=0.6, warmup_steps=1, cycle=2, dense_steps=1)
    batches = []
    for seed, ids in ((50, [10, 11]), (52, [12, 13])):
        batch = padded_batch(llava_clip, seed=seed)
        labels = random_labels(batch, seed=seed + 1, fraction=0.8)
        batches.append((batch, labels, ids, torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed))))
    whole = copy.deepcopy(llava_clip)
    losses, masks, end = train(whole, config, batches, 7)
    first = copy.deepcopy(llava_clip)
    head_losses, head_masks, saved = train(first, config, batches, 4)
    assert saved["compiled"]["pass_states._extra_state"]["regate"]["step"] == 4
    resumed = copy.deepcopy(llava_clip)  # fresh weights: the checkpoint restores them too
    tail_losses, tail_masks, resumed_end = train(resumed, config, batches, 3, saved)
    assert torch.equal(torch.stack(losses), torch.stack(head_losses + tail_losses))
    assert all(torch.equal(a, b) for a, b in zip(masks, head_masks + tail_masks))
    ema, resumed_ema = (e["compiled"]["pass_states._extra_state"]["regate"]["ema"] for e in (end, resumed_end))
    assert sorted(ema) == [10, 11, 12, 13] and all(torch.equal(ema[k], resumed_ema[k]) for k in ema)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bad_state_and_inputs_are_refused(llava_clip):
    state = vlmopt.compile(llava_clip, [ReGATE(keep=0.5)], mode="train").pass_state("regate")
    other = vlmopt.compile(llava_clip, [ReGATE(keep=0.25, cycle=64)], mode="train").pass_state("regate")
    with pytest.raises(vlmopt.InputError, match="saved under another configuration \\(differs in cycle, keep"):
        other.load_state_dict(state.state_dict())
    batch = padded_batch(llava_clip, seed=55)
    labels = random_labels(batch, seed=56)
    opt = vlmopt.compile(llava_clip, [ReGATE(keep=0.5)], mode="train")
    with pytest.warns(UserWarning, match="no teacher_losses"):
        opt(**batch, labels=labels, sample_ids=[1, 2])
    fewer = labels.clone()
    fewer[0, (fewer[0] != -100).nonzero()[-1]] = -100
    with pytest.raises(vlmopt.InputError, match="sample id 1 had \\d+ answer tokens when ReGATE last saw it"):
        opt(**batch, labels=fewer, sample_ids=[1, 2])
    with pytest.raises(vlmopt.InputError, match="sample_ids must hold one whole number per sample"):
        opt(**batch, labels=labels, sample_ids=[1])
    with pytest.raises(vlmopt.InputError, match="teacher_losses must be a float tensor shaped like labels"):
        opt(**batch, labels=labels, teacher_losses=torch.zeros(2, 3))
    with pytest.raises(vlmopt.IncompatiblePassError, match='compile with mode="train"'):
        vlmopt.compile(llava_clip, ["regate:keep=0.5"])
    with pytest.raises(vlmopt.IncompatiblePassError, match="ReGATE is listed twice"):
        vlmopt.compile(llava_clip, ["regate:keep=0.5", "regate:keep=0.25"], mode="train")


def test_warns_once_without_ids(llava_clip):
    batch = padded_batch(llava_clip, seed=57)
    labels = random_labels(batch, seed=58)
    opt = vlmopt.compile(llava_clip, [ReGATE(keep=0.5)], mode="train")
    with pytest.warns(UserWarning) as record:
        for _ in range(2):
            opt(**batch, labels=labels, teacher_losses=torch.zeros(labels.shape))
    expected = (
        "ReGATE: the batch has no sample_ids, so the loss EMA has no memory across steps (scores use this step's "
        "losses); pass sample_ids [B] to key the EMAs"
    )
    assert [str(w.message) for w in record if "ReGATE" in str(w.message)] == [expected]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep": 0}, r"keep must be in \(0, 1\]"),
        ({"beta": 1.0}, "beta must be in"),
        ({"dense_steps": 200}, r"dense_steps must be in \[0, 128\]"),
        ({"elide": "yes"}, "elide must be True or False"),
        ({"teacher": "none"}, "teacher must be one of pad, blank, drop, got 'none'"),
        ({"warmup_steps": 10, "teacher_step": 11}, r"teacher_step must be in \[0, 10\], got 11"),
    ],
)
def test_config_is_validated(kwargs, message):
    with pytest.raises(vlmopt.PassConfigError, match=message):
        ReGATE(**kwargs)
    assert vlmopt.passes.parse("regate:keep=0.25,cycle=64") == ReGATE(keep=0.25, cycle=64)
    assert vlmopt.passes.parse("regate:teacher=blank") == ReGATE(teacher="blank")


@pytest.mark.parametrize("elide", [False, True])
def test_after_a_visual_pruning_pass(llava_clip, elide):
    from vlmopt.passes import RandomPrune

    batch = padded_batch(llava_clip, seed=59)
    labels = random_labels(batch, seed=60, fraction=0.8)
    teacher = torch.rand(labels.shape, generator=torch.Generator().manual_seed(61))
    opt = vlmopt.compile(llava_clip, [RandomPrune(keep_ratio=0.5), ReGATE(keep=0.5, elide=elide, **SPARSE)], mode="train")
    with pytest.warns(UserWarning, match="no sample_ids"):
        out = opt(**batch, labels=labels, teacher_losses=teacher)
    assert out.active_tokens.shape[1] < labels.shape[1], "the visual tokens were pruned"
    counts = (labels[:, 1:] != -100).sum(1).tolist()
    assert out.active_tokens.sum(1).tolist() == [math.ceil(0.5 * n) for n in counts]
    assert torch.isfinite(out.loss) and out.loss > 0
