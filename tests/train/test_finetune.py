"""``vlmopt finetune`` and :mod:`vlmopt.train.finetune` on a small random-weight LLaVA written as a
reference-model directory (the reference tokenizer, 56 px pictures): a few steps each."""

from __future__ import annotations

import json

import pytest
import torch

from vlmopt.cli import main
from vlmopt.errors import InputError
from vlmopt.train.finetune import FinetuneConfig, Run, batch_order, finetune


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    from models import arch
    from vlmopt.reference import processing

    shape = arch.LlavaArch(image_size=56, vision_hidden=32, vision_layers=2, vision_intermediate=64, text_hidden=64,
                           text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=128)
    processor = processing.build_processor("llava", shape.image_size)
    torch.manual_seed(3)
    model = LlavaForConditionalGeneration(arch.llava_config(shape, processor.tokenizer))
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out = tmp_path_factory.mktemp("models") / "small-llava"
    model.save_pretrained(out, safe_serialization=True)
    processing.save_processor(processor, out)
    (out / "tasks.json").write_text(json.dumps({"shapes": {"size": 56, "grid": 0, "objects": [4, 5]}}))
    return out


def _load(model_dir):
    from vlmopt import reference

    return lambda: reference.load(model_dir)


def test_cli_trains_standard_and_regate_runs_on_the_same_batches(model_dir, tmp_path, capsys):
    report, png = tmp_path / "ft.json", tmp_path / "ft.png"
    code = main([
        "finetune", "--model", str(model_dir), "--task", "shapes-relations", "--steps", "3", "--batch-size", "2",
        "--turns", "2", "--passes", "none", "--passes", "regate:keep=0.4,warmup_steps=1,dense_steps=0",
        "--eval-every", "2", "--eval-n", "3", "--test-n", "4", "--eval-batch-size", "4", "--json", str(report),
        "--plot", str(png), "--out", str(tmp_path / "models"), "--quiet",
    ])
    assert code == 0
    table = capsys.readouterr().out
    assert "| standard |" in table and "| regate:keep=0.4,warmup_steps=1,dense_steps=0 |" in table
    record = json.loads(report.read_text())
    standard, regate = record["runs"]
    assert record["before"]["n"] == 4 and record["task"] == "shapes-relations"
    for run in (standard, regate):
        assert [point["step"] for point in run["curve"]] == [0, 2, 3]
        assert len(run["step_seconds"]) == len(run["losses"]) == 3 and run["median_step_s"] > 0
        assert run["test"]["n"] == 4 and 0 <= run["test"]["accuracy"] <= 1
        assert [p["loss_tokens"] for p in run["curve"]] == sorted(p["loss_tokens"] for p in run["curve"])
    # the same samples and turns (3 steps x 2 samples x 3 turns x (word + end token) = 36 answer tokens) ...
    assert standard["answer_tokens"] == regate["answer_tokens"] == 36
    # ... all in the standard loss; ReGATE's first step dense (6 x 2 tokens), then ceil(0.4 x 6) = 3 per sample
    assert standard["loss_tokens"] == 36 and regate["loss_tokens"] == 12 + 2 * 2 * 3
    assert regate["regate_steps"] == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = tmp_path / "models" / "regate_keep=0.4_warmup_steps=1_dense_steps=0"
    assert (saved / "model.safetensors").exists() and (saved / "vlmopt_pass_states.pt").exists()
    assert (saved / "tokenizer.json").exists() and not (tmp_path / "models" / "standard" / "vlmopt_pass_states.pt").exists()


def test_regate_keeping_every_token_trains_exactly_like_standard(model_dir):
    """Lockstep runs see the same batches: ReGATE with keep=1 (every answer token in the loss, a
    teacher computed on the side) ends with the standard run's weights."""
    from vlmopt.reference import tasks

    task = tasks.get("shapes-relations", size=56, grid=0, objects=(4, 5))
    config = FinetuneConfig(steps=2, batch_size=2, turns=1, eval_every=5, eval_n=2, test_n=0, lr=1e-3, lr_warmup=0)
    import vlmopt

    runs = [Run("standard"), Run("regate", [vlmopt.passes.ReGATE(keep=1.0, warmup_steps=0, dense_steps=0)])]
    record = finetune(_load(model_dir), task, runs, config, progress=False)
    standard, regate = record["models"]
    assert record["runs"][0]["loss_tokens"] == record["runs"][1]["loss_tokens"]
    assert record["runs"][0]["losses"] == pytest.approx(record["runs"][1]["losses"], rel=1e-5)
    for (name, a), b in zip(standard.state_dict().items(), regate.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(standard.parameters(), vlmopt.reference.load(model_dir)[0].parameters()))


def test_batch_order_is_seeded_and_covers_each_epoch():
    config = FinetuneConfig(steps=6, batch_size=4, train_n=8, seed=5)
    order = batch_order(config)
    assert order == batch_order(config) and order != batch_order(FinetuneConfig(steps=6, batch_size=4, train_n=8, seed=6))
    flat = [i for batch in order for i in batch]
    for epoch in range(3):
        assert sorted(flat[8 * epoch : 8 * epoch + 8]) == list(range(8))
    assert len({tuple(flat[8 * e : 8 * e + 8]) for e in range(3)}) > 1  # reshuffled every epoch


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", -1), ("lr", 0.0), ("train_n", 2), ("turns", -2)])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(InputError, match=field):
        FinetuneConfig(**{"steps": 3, "batch_size": 4, field: value})
