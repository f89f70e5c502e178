"""vlmopt.train.teacher_losses: each teacher view's per-token losses equal a direct computation."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import vlmopt
from tests.conftest import padded_batch
from tests.train.train_helpers import random_labels


def answer_labels(batch, seed):
    """Random labels, none on a row's first real token (a left-padded row would predict it from padding)."""
    labels = random_labels(batch, seed=seed, fraction=0.8)
    first = batch["attention_mask"].argmax(1)
    labels[torch.arange(labels.shape[0]), first] = -100
    return labels


def direct(language_model, head, ids, labels, positions, drop):
    """Row by row, without the ``drop`` tokens: the others at their given positions, cross-entropy of each answer token."""
    out = torch.zeros(labels.shape)
    for row in range(ids.shape[0]):
        kept = [i for i in range(ids.shape[1]) if not drop[row, i]]
        index = torch.tensor(kept)
        row_positions = positions[..., row : row + 1, index]
        with torch.no_grad():
            hidden = language_model(input_ids=ids[row : row + 1, index], position_ids=row_positions).last_hidden_state
            logits = head(hidden)[0].float()
        for j in range(1, len(kept)):
            target = int(labels[row, kept[j]])
            if target != -100:
                out[row, kept[j]] = -F.log_softmax(logits[j - 1], -1)[target]
    return out


def vlm_positions(model, batch, labels):
    if model.config.model_type == "qwen2_5_vl":
        positions, _ = model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        return positions
    return torch.arange(labels.shape[1]).expand(labels.shape)


def test_the_students_own_text_only_lm(family_model):
    batch = padded_batch(family_model, seed=61)
    labels = answer_labels(batch, 62)
    visual = (batch["input_ids"] == family_model.config.image_token_id)
    got = vlmopt.train.teacher_losses(family_model, {**batch, "labels": labels}, visual="drop")
    positions = vlm_positions(family_model, batch, labels)
    padding = batch["attention_mask"] == 0
    expected = direct(family_model.model.language_model, family_model.lm_head, batch["input_ids"], labels, positions, visual | padding)
    torch.testing.assert_close(got, expected)
    answer = labels[:, 1:] != -100
    assert (got[:, 1:][answer] > 0).all() and (got[:, 1:][~answer] == 0).all()


def test_the_papers_teacher_pads_the_visual_tokens_in_place(family_model):
    """visual="pad" (the default): the LM on the whole sequence, every visual token the padding token,
    attended, at the position the VLM gives it; row by row without left padding, the same losses."""
    batch = padded_batch(family_model, seed=66)
    labels = answer_labels(batch, 67)
    visual = batch["input_ids"] == family_model.config.image_token_id
    got = vlmopt.train.teacher_losses(family_model, {**batch, "labels": labels})
    pad = family_model.config.get_text_config().pad_token_id
    ids = torch.where(visual, pad, batch["input_ids"])
    positions = vlm_positions(family_model, batch, labels)
    padding = batch["attention_mask"] == 0  # every other token stays, the visual ones as padding
    expected = direct(family_model.model.language_model, family_model.lm_head, ids, labels, positions, padding)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    dropped = vlmopt.train.teacher_losses(family_model, {**batch, "labels": labels}, visual="drop")
    assert not torch.allclose(got, dropped)  # attended padding is not removal
    with pytest.raises(vlmopt.InputError, match="pad_token_id=<the tokenizer's pad_token_id>"):
        original = family_model.config.get_text_config().pad_token_id
        family_model.config.get_text_config().pad_token_id = None
        try:
            vlmopt.train.teacher_losses(family_model, {**batch, "labels": labels}, pad_token_id=None)
        finally:
            family_model.config.get_text_config().pad_token_id = original


def test_the_image_view_runs_the_whole_model_on_the_batch(family_model):
    """visual="image": the VLM's own forward on the pictures given (a blank picture's batch, for the
    blank-picture teacher); other views and a text-only LM with it are refused."""
    batch = padded_batch(family_model, seed=68)
    labels = answer_labels(batch, 69)
    got = vlmopt.train.teacher_losses(family_model, {**batch, "labels": labels}, visual="image")
    with torch.no_grad():
        logits = family_model(**batch).logits
    expected = torch.zeros(labels.shape)
    for row in range(labels.shape[0]):
        for j in range(1, labels.shape[1]):
            if labels[row, j] != -100:
                expected[row, j] = -F.log_softmax(logits[row, j - 1].float(), -1)[labels[row, j]]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(vlmopt.InputError, match="visual must be one of pad, drop, image, got 'none'"):
        vlmopt.train.teacher_losses(family_model, {**batch, "labels": labels}, visual="none")


def test_another_lm_with_the_same_tokenizer(llava_clip):
    text = llava_clip.config.text_config
    torch.manual_seed(63)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=text.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
    )).eval()
    batch = padded_batch(llava_clip, seed=64)
    labels = answer_labels(batch, 65)
    got = vlmopt.train.teacher_losses(lm, {**batch, "labels": labels}, student=llava_clip, visual="drop")
    visual = batch["input_ids"] == llava_clip.config.image_token_id
    positions = torch.arange(labels.shape[1]).expand(labels.shape)
    padding = batch["attention_mask"] == 0
    torch.testing.assert_close(got, direct(lm.model, lm.lm_head, batch["input_ids"], labels, positions, visual | padding))
    padded = vlmopt.train.teacher_losses(lm, {**batch, "labels": labels}, student=llava_clip, visual="pad")
    ids = torch.where(visual, llava_clip.config.text_config.pad_token_id, batch["input_ids"])
    torch.testing.assert_close(padded, direct(lm.model, lm.lm_head, ids, labels, positions, padding))
    with pytest.raises(vlmopt.InputError, match="pass student=<the VLM>"):
        vlmopt.train.teacher_losses(lm, {**batch, "labels": labels})
    with pytest.raises(vlmopt.InputError, match="has no vision tower"):
        vlmopt.train.teacher_losses(lm, {**batch, "labels": labels}, student=llava_clip, visual="image")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=text.vocab_size + 7, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(vlmopt.InputError, match=r"does not share the student's tokenizer \(vocab_size: teacher \d+"):
        vlmopt.train.teacher_losses(other, {**batch, "labels": labels}, student=llava_clip)


def test_precompute_cli_writes_a_cache_regate_reads(tmp_path, capsys):
    import warnings

    from vlmopt import reference
    from vlmopt.cli import main

    out = tmp_path / "teacher.pt"
    assert main(["regate", "precompute", "--model", "tiny-llava", "--task", "shapes", "--n", "3", "--start", "5",
                 "--batch-size", "2", "--out", str(out)]) == 0
    assert "wrote teacher losses of 3 samples" in capsys.readouterr().out
    cache = vlmopt.train.TeacherCache.load(out)
    assert sorted(cache.losses) == [5, 6, 7] and cache.meta["task"] == "shapes"
    model, processor = reference.load("tiny-llava")
    samples = list(reference.task_for("tiny-llava", "shapes").samples("train", n=3, start=5))
    batch = reference.processing.encode(processor, samples, answers=True)
    direct = vlmopt.train.teacher_losses(model, batch)
    # other batching (2 + 1 rows, other padding) than here: equal up to float32 rounding
    torch.testing.assert_close(cache.for_batch([5, 6, 7], batch["labels"]), direct, rtol=1e-5, atol=1e-4)
    opt = vlmopt.compile(model, [vlmopt.passes.ReGATE(keep=0.5)], mode="train")
    opt.pass_state("regate").teacher_cache = cache
    labels = batch.pop("labels")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt(**batch, labels=labels, sample_ids=[5, 6, 7])
    assert not [w for w in record if "teacher_losses" in str(w.message)], "the cache supplied the teacher losses"
    with pytest.raises(vlmopt.InputError, match="no teacher losses for sample id 9 in the cache"):
        opt(**batch, labels=labels, sample_ids=[5, 6, 9])
    assert main(["regate", "precompute", "--model", "tiny-llava", "--task", "nope", "--n", "1", "--out", str(out)]) == 2
