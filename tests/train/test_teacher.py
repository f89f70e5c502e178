"""vlmopt.train.teacher_losses: the text-only teacher's per-token losses equal a direct computation."""

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


def direct(language_model, head, ids, labels, positions, visual):
    """Row by row, unpadded: the text tokens at their given positions, cross-entropy of each answer token."""
    out = torch.zeros(labels.shape)
    for row in range(ids.shape[0]):
        kept = [i for i in range(ids.shape[1]) if not visual[row, i] and ids[row, i] != 0]
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


def test_the_students_own_text_only_lm(family_model):
    batch = padded_batch(family_model, seed=61)
    labels = answer_labels(batch, 62)
    config = family_model.config
    visual = (batch["input_ids"] == config.image_token_id)
    got = vlmopt.train.teacher_losses(family_model, {**batch, "labels": labels})
    if config.model_type == "qwen2_5_vl":
        positions, _ = family_model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
    else:
        positions = torch.arange(labels.shape[1]).expand(labels.shape)
    expected = direct(family_model.model.language_model, family_model.lm_head, batch["input_ids"], labels, positions, visual)
    torch.testing.assert_close(got, expected)
    answer = labels[:, 1:] != -100
    assert (got[:, 1:][answer] > 0).all() and (got[:, 1:][~answer] == 0).all()


def test_another_lm_with_the_same_tokenizer(llava_clip):
    text = llava_clip.config.text_config
    torch.manual_seed(63)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=text.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
    )).eval()
    batch = padded_batch(llava_clip, seed=64)
    labels = answer_labels(batch, 65)
    got = vlmopt.train.teacher_losses(lm, {**batch, "labels": labels}, student=llava_clip)
    visual = batch["input_ids"] == llava_clip.config.image_token_id
    positions = torch.arange(labels.shape[1]).expand(labels.shape)
    torch.testing.assert_close(got, direct(lm.model, lm.lm_head, batch["input_ids"], labels, positions, visual))
    with pytest.raises(vlmopt.InputError, match="pass student=<the VLM>"):
        vlmopt.train.teacher_losses(lm, {**batch, "labels": labels})
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
