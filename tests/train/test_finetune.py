"""``vlmopt finetune`` and :mod:`vlmopt.train.finetune` on a small random-weight LLaVA written as a
reference-model directory (the reference tokenizer, 56 px pictures): a few steps each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlmopt.cli import main
from vlmopt.errors import InputError
from vlmopt.train import finetune_state
from vlmopt.train.finetune import FinetuneConfig, Plateau, Run, _follow_reference, batch_order, finetune
from vlmopt.train.finetune_report import summarize


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
    report, png, state = tmp_path / "ft.json", tmp_path / "ft.png", tmp_path / "ft.state"
    code = main([
        "finetune", "--model", str(model_dir), "--task", "shapes-relations", "--steps", "3", "--batch-size", "2",
        "--turns", "2", "--passes", "none", "--passes", "regate:keep=0.4,warmup_steps=1,dense_steps=0",
        "--eval-every", "2", "--eval-n", "3", "--test-n", "4", "--eval-batch-size", "4", "--json", str(report),
        "--plot", str(png), "--out", str(tmp_path / "models"), "--quiet", "--check-n", "2", "--checkpoint", str(state),
        "--checkpoint-every", "1",
    ])
    assert code == 0
    table = capsys.readouterr().out
    assert "| standard |" in table and "| regate:keep=0.4,warmup_steps=1,dense_steps=0 |" in table
    assert "step / s to the reference peak" in table and not state.exists()  # results written: the state is gone
    record = json.loads(report.read_text())
    standard, regate = record["runs"]
    assert record["before"]["n"] == 4 and record["task"] == "shapes-relations" and record["check"] == "shapes"
    assert [run["label"] for run in record["summary"]["runs"]] == ["standard", regate["label"]]
    for run in (standard, regate):
        assert [point["step"] for point in run["curve"]] == [0, 2, 3] and run["stopped"] == {"step": 3, "reason": "steps"}
        assert all(0 <= point["check"] <= 1 for point in run["curve"])
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


def test_a_stopped_run_resumes_to_the_unstopped_ones_end(model_dir, tmp_path, monkeypatch):
    """Stopped after its second checkpoint and started again with the same call, a fine-tuning (with
    a blank-picture ReGATE teacher frozen after the first step, and a plateau rule) ends with the
    uninterrupted one's weights, ReGATE state and records; a state of other settings is refused."""
    import vlmopt
    from vlmopt.reference import tasks

    task = tasks.get("shapes-captions", size=56, grid=0, objects=(4, 5))
    config = FinetuneConfig(steps=4, batch_size=2, turns=0, eval_every=2, eval_n=2, test_n=0, lr=1e-3, lr_warmup=0,
                            patience=3)
    gate = vlmopt.passes.ReGATE(keep=0.5, warmup_steps=1, dense_steps=0, teacher="blank", teacher_step=1)
    runs = lambda: [Run("standard"), Run("regate", [gate])]  # noqa: E731
    whole = finetune(_load(model_dir), task, runs(), config, progress=False)
    path, saves = tmp_path / "state.pt", []
    real_save = finetune_state.save

    def stop_after_two(*args):
        real_save(*args)
        saves.append(args[1])
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune_state, "save", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        finetune(_load(model_dir), task, runs(), config, progress=False, checkpoint=path, checkpoint_every=1)
    monkeypatch.setattr(finetune_state, "save", real_save)
    assert saves == [1, 2] and path.exists()
    resumed = finetune(_load(model_dir), task, runs(), config, progress=False, checkpoint=path, checkpoint_every=1)
    for a, b in zip(whole["runs"], resumed["runs"]):
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5) and a["loss_tokens"] == b["loss_tokens"]
        assert [p["accuracy"] for p in a["curve"]] == pytest.approx([p["accuracy"] for p in b["curve"]])
        assert len(b["step_seconds"]) == 4 and b["stopped"] == a["stopped"]
    for a, b in zip(whole["models"], resumed["models"]):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)
    ours, theirs = (r["compiled"][1].pass_state("regate") for r in (whole, resumed))
    assert ours.step == theirs.step == 4 and sorted(ours.ema) == sorted(theirs.ema)
    with pytest.raises(InputError, match=r"other settings \(they differ in config\)"):
        finetune(_load(model_dir), task, runs(), FinetuneConfig(**{**config.__dict__, "lr": 2e-3}), progress=False, checkpoint=path)


def test_the_teachers_losses_are_what_each_view_gives(model_dir):
    """A ReGATE run's cached teacher losses are the untouched model's: the padded text for teacher=pad,
    the whole model on the blank picture for teacher=blank."""
    import vlmopt
    from vlmopt import reference
    from vlmopt.reference import processing, tasks
    from vlmopt.train import teacher_losses
    from vlmopt.train.finetune import _Learner

    task = tasks.get("shapes-captions", size=56, grid=0, objects=(4, 5))
    config = FinetuneConfig(steps=1, batch_size=2, turns=0, test_n=0, lr_warmup=0)
    model, processor = reference.load(model_dir)
    samples = [task.sample("train", i) for i in (3, 4)]
    batch = processing.encode(processor, samples, answers=True)
    blank = processing.encode(processor, [s.text_only() for s in samples], answers=True)
    assert torch.equal(batch["input_ids"], blank["input_ids"]) and not torch.equal(batch["pixel_values"], blank["pixel_values"])
    for teacher, view, seen in (("pad", "pad", batch), ("blank", "image", blank)):
        learner = _Learner(Run(teacher, [vlmopt.passes.ReGATE(teacher=teacher)]), reference.load(model_dir)[0], config)
        learner.step(0, batch, [3, 4], lambda: blank)
        expected = teacher_losses(model, seen, visual=view)
        torch.testing.assert_close(learner.teacher_cache.for_batch([3, 4], batch["labels"]), expected, rtol=1e-5, atol=1e-5)
        assert learner.record["teacher"] == teacher and learner.record["teacher_seconds"] > 0
    # teacher_step=1: no teacher on the first step; then the model as the first step left it
    learner = _Learner(Run("later", [vlmopt.passes.ReGATE(warmup_steps=1, teacher_step=1)]), reference.load(model_dir)[0], config)
    learner.step(0, batch, [3, 4], lambda: blank)
    assert learner.teacher is None and len(learner.teacher_cache) == 0
    after_one = {k: v.clone() for k, v in learner.model.state_dict().items()}
    learner.step(1, batch, [3, 4], lambda: blank)
    for name, value in learner.teacher.state_dict().items():
        torch.testing.assert_close(value, after_one[name], msg=name)
    assert not torch.equal(learner.model.lm_head.weight, after_one["lm_head.weight"])
    torch.testing.assert_close(learner.teacher_cache.for_batch([3, 4], batch["labels"]),
                               teacher_losses(learner.teacher, batch, visual="pad"))


def test_plateau_is_patience_evaluations_without_a_new_best():
    """With min_delta 0 a plateau comes at the first score after which the last `patience` scores hold
    no new maximum (random integer scores, ties included)."""
    rng = np.random.default_rng()
    for _ in range(200):
        patience = int(rng.integers(1, 4))
        scores = rng.integers(0, 5, size=12).tolist()
        rule, stopped = Plateau(patience), None
        for i, score in enumerate(scores):
            if rule.update(score):
                stopped = i
                break
        expected = next((i for i in range(patience, len(scores)) if max(scores[i - patience + 1 : i + 1]) <= max(scores[: i - patience + 1])), None)
        assert stopped == expected, (patience, scores)
    rule = Plateau(2, min_delta=0.1)
    assert [rule.update(s) for s in (0.5, 0.55, 0.58, 0.7)] == [False, False, True, False]  # +0.05, +0.08 do not count
    assert not any(Plateau(None).update(0.0) for _ in range(5))


def test_every_run_stops_when_the_reference_run_plateaus():
    """Random sets of runs, some stopped: once the first run without passes (the reference) has stopped,
    every run still going stops at this step; before that, or with follow_reference=False, none does."""
    from types import SimpleNamespace

    rng = np.random.default_rng()
    for _ in range(200):
        n, step = int(rng.integers(1, 6)), int(rng.integers(1, 500))
        learners = []
        for i in range(n):
            stopped = {"step": int(rng.integers(0, step)), "reason": "plateau"} if rng.random() < 0.4 else None
            learner = SimpleNamespace(run=Run(f"r{i}", [] if rng.random() < 0.4 else ["regate"]), record={"stopped": stopped})
            learner.active = learner.record["stopped"] is None
            learners.append(learner)
        before = [dict(lr.record) for lr in learners]
        follow = bool(rng.random() < 0.8)
        _follow_reference(learners, step, FinetuneConfig(steps=3, follow_reference=follow))
        reference = next((lr for lr in learners if not lr.run.passes), None)
        stops = follow and reference is not None and not reference.active
        for learner, old in zip(learners, before):
            expected = {"step": step, "reason": "reference plateau"} if stops and old["stopped"] is None else old["stopped"]
            assert learner.record["stopped"] == expected


def test_runs_with_passes_stop_when_the_reference_plateaus_not_at_their_own(model_dir, monkeypatch):
    """Validation scores drawn at random: with follow_reference the standard run stops at its own
    plateau and the ReGATE run there too, whatever its scores; without, each run at its own plateau."""
    from types import SimpleNamespace

    import vlmopt
    from vlmopt.reference import evaluate as evaluation
    from vlmopt.reference import tasks

    rng = np.random.default_rng()
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: SimpleNamespace(accuracy=float(rng.integers(0, 3)) / 2, per_family={}))
    task = tasks.get("shapes-relations", size=56, grid=0, objects=(4, 5))
    gate = vlmopt.passes.ReGATE(keep=0.5, warmup_steps=1, dense_steps=0)

    def own_plateau(curve, steps):
        rule = Plateau(1)
        return next(({"step": p["step"], "reason": "plateau"} for p in curve if rule.update(p["accuracy"])), {"step": steps, "reason": "steps"})

    for follow in (True, False, True):
        config = FinetuneConfig(steps=5, batch_size=2, turns=0, eval_every=1, eval_n=2, test_n=0, patience=1, follow_reference=follow)
        standard, regate = finetune(_load(model_dir), task, [Run("standard"), Run("regate", [gate])], config, progress=False)["runs"]
        assert standard["stopped"] == own_plateau(standard["curve"], 5)
        if not follow:
            assert regate["stopped"] == own_plateau(regate["curve"], 5)
        elif standard["stopped"]["reason"] == "plateau":
            assert regate["stopped"] == {"step": standard["stopped"]["step"], "reason": "reference plateau"}
        else:
            assert regate["stopped"] == {"step": 5, "reason": "steps"}
        assert regate["curve"][-1]["step"] == regate["stopped"]["step"] and len(regate["losses"]) == regate["stopped"]["step"]


def test_summary_finds_the_peaks_and_when_each_run_reaches_the_reference_peak():
    def curve(*points):
        return [{"step": s, "accuracy": a, "loss_tokens": t, "seconds": 2.0 * s, "teacher_seconds": 0.0} for s, a, t in points]

    def run(label, passes, points):
        return {"label": label, "passes": passes, "curve": curve(*points), "loss_tokens": points[-1][2], "answer_tokens": 1000,
                "median_step_s": 2.0, "median_sparse_step_s": None}

    record = {"runs": [
        run("fast", ["regate"], [(0, 0.1, 0), (10, 0.5, 200), (20, 0.62, 350), (30, 0.6, 500)]),
        run("standard", [], [(0, 0.1, 0), (10, 0.4, 400), (20, 0.6, 800), (30, 0.6, 1200)]),
        run("late", ["regate"], [(0, 0.1, 0), (10, 0.3, 300), (20, 0.5, 500), (30, 0.6, 700)]),
        run("never", ["regate"], [(0, 0.1, 0), (30, 0.59, 600)]),
    ]}
    summary = summarize(record)
    assert summary["reference"] == "standard" and summary["reference_peak"]["step"] == 20  # the first of equal peaks
    fast, standard, late, never = summary["runs"]
    assert fast["peak"]["accuracy"] == 0.62 and fast["to_reference_peak"]["step"] == 20 and fast["claim"]  # 350 <= 0.6 * 800
    assert standard["to_reference_peak"]["step"] == 20 and "claim" not in standard
    assert late["to_reference_peak"]["loss_tokens"] == 700 and not late["claim"]  # fewer tokens, but more steps
    assert never["to_reference_peak"] is None and not never["claim"]


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", -1), ("lr", 0.0), ("train_n", 2), ("turns", -2),
                                          ("patience", 0), ("min_delta", -0.1), ("check_n", -1)])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(InputError, match=field):
        FinetuneConfig(**{"steps": 3, "batch_size": 4, field: value})
