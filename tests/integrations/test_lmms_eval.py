"""lmms-eval plugin: ``--model vlmopt`` through lmms-eval's own evaluator on an exported reference task
gives the answers ``vlmopt eval`` gives; the inputs it builds are the ones ``vlmopt eval`` builds."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from vlmopt import reference
from vlmopt.errors import InputError
from vlmopt.integrations.lmms_eval import inputs
from vlmopt.reference import processing

LMMS_MISSING = "lmms-eval is not installed (pip install 'vlmopt[lmms]', see the README's lmms-eval section)"


def _random_samples(model: str, task: str, k: int):
    """``k`` test samples at random indices (fresh each run)."""
    indices = np.random.default_rng().choice(100_000, size=k, replace=False)
    return [reference.task_for(model, task).sample("test", int(i)) for i in indices]


def _visuals(sample):
    return [sample.frames] if sample.is_video else [sample.pil_image()]


@pytest.mark.parametrize("model, task", [("tiny-llava", "shapes"), ("tiny-qwen25vl", "shapes"), ("tiny-qwen25vl", "shapes-video")])
def test_inputs_equal_vlmopt_eval_inputs(model, task):
    processor = processing.load_processor(reference.path(model))
    samples = _random_samples(model, task, 3)
    prompts = [inputs.prompt_of(s.question, _visuals(s), max_frames=32) for s in samples]
    ours = inputs.encode(processor, processing.arch_of(model), prompts)
    theirs = processing.encode(processor, samples)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_several_images_per_prompt_and_placeholders():
    processor = processing.load_processor(reference.path("tiny-qwen25vl"))
    images = [s.pil_image() for s in _random_samples("tiny-qwen25vl", "shapes", 2)]
    batch = inputs.encode(processor, "qwen2_5_vl", [inputs.prompt_of("left <image> right <image> which?", images, 32)])
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_image = int(batch["image_grid_thw"][0].prod()) // 4
    assert int((batch["input_ids"] == pad).sum()) == 2 * per_image and batch["image_grid_thw"].shape[0] == 2
    text = inputs.chat_text(processor, inputs.prompt_of("left <image> right <image> which?", images, 32))
    assert "left <|vision_start|><|image_pad|><|vision_end|> right <|vision_start|>" in text


def test_unsupported_inputs_give_clear_errors():
    processor = processing.load_processor(reference.path("tiny-llava"))
    frames = np.random.default_rng().integers(0, 255, size=(4, 56, 56, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="the Qwen families read videos"):
        inputs.encode(processor, "llava", [inputs.prompt_of("what?", [frames], 32)])
    with pytest.raises(InputError, match="images or videos, not both"):
        inputs.prompt_of("what?", [frames, frames[0]], 32)
    with pytest.raises(InputError, match="is not supported; vlmopt reads PIL images"):
        inputs.prompt_of("what?", [{"bytes": b""}], 32)


def test_export_writes_the_samples_and_a_scorer(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install 'vlmopt[lmms]')")
    from vlmopt.cli import main

    seed = int(np.random.default_rng().integers(1 << 30))
    assert main(["tasks", "export", "--task", "shapes", "--n", "5", "--seed", str(seed), "--out", str(tmp_path)]) == 0
    expected = reference.task_for("tiny-llava", "shapes").samples("test", n=5, seed=seed)
    data = datasets.load_from_disk(str(tmp_path / "vlmopt_shapes_data"))["test"]
    assert [row["question"] for row in data] == [s.question for s in expected]
    assert [row["answer"] for row in data] == [s.answer for s in expected]
    assert all(np.array_equal(np.asarray(row["image"]), s.image) for row, s in zip(data, expected))
    assert "task: vlmopt_shapes\n" in (tmp_path / "vlmopt_shapes.yaml").read_text()
    spec = importlib.util.spec_from_file_location("exported_utils", tmp_path / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    row = data[0]
    assert utils.process_results(row, [f" {row['answer'].upper()}."])["accuracy"] == 1.0
    wrong = next(a for a in utils.doc_to_choice(row) if a != row["answer"])
    scored = utils.process_results(row, [wrong])
    assert scored["accuracy"] == 0.0 and scored[f"accuracy_{row['family']}"] == 0.0
    assert main(["tasks", "export", "--task", "needle", "--n", "2", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_lmms_eval_evaluator_matches_vlmopt_eval(tmp_path, monkeypatch):
    """lmms-eval's own ``simple_evaluate`` (the plugin found through its entry point) on the exported
    task: same accuracy and same answer per sample as :func:`vlmopt.evaluation.evaluate`, with and
    without HiPrune, and each logged sample carries its pass statistics."""
    pytest.importorskip("lmms_eval", reason=LMMS_MISSING)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlmopt.cli import main
    from vlmopt.evaluation import evaluate

    n, prune = 20, "hiprune:keep_ratio=1/3"
    assert main(["tasks", "export", "--task", "shapes", "--n", str(n), "--out", str(tmp_path)]) == 0
    model, processor = reference.load("tiny-llava")
    samples = reference.task_for("tiny-llava", "shapes").samples("test", n=n)
    report = evaluate(model, processor, samples, [[prune]], batch_size=16, timing_samples=1, progress=False)
    manager = TaskManager(include_path=str(tmp_path))
    for passes, expected, kept in [("", report["baseline"], 256), (prune, report["runs"][0], 85)]:
        out = simple_evaluate(model="vlmopt", model_args=f"pretrained=tiny-llava,passes={passes}", tasks=["vlmopt_shapes"],
                              batch_size=16, task_manager=manager, log_samples=True)
        assert out is not None, "lmms-eval's evaluator returned nothing"
        logged = sorted(out["samples"]["vlmopt_shapes"], key=lambda s: s["doc_id"])
        assert [s["filtered_resps"][0] for s in logged] == [a.strip() for a in expected.answers]
        assert [bool(s["accuracy"]) for s in logged] == expected.correct
        assert out["results"]["vlmopt_shapes"]["accuracy,none"] == pytest.approx(expected.accuracy)
        stats = logged[0]["token_counts"][0]
        assert stats["visual_tokens"] == 256 and stats["visual_tokens_kept"] == kept
        assert stats["prefill_flops"] == expected.prefill_flops and stats["llm_prefill_flops"] == expected.llm_prefill_flops
    assert report["runs"][0].prefill_flops < report["baseline"].prefill_flops
    # the likelihood variant: lmms-eval ranks the family's answers by the losses the plugin returns
    out = simple_evaluate(model="vlmopt", model_args=f"pretrained=tiny-llava,passes={prune}", tasks=["vlmopt_shapes_choice"],
                          batch_size=16, task_manager=manager, log_samples=True, limit=4)
    logged = out["samples"]["vlmopt_shapes_choice"]
    losses = [pair[0] for s in logged for pair in (r[0] for r in s["resps"])]
    assert len(logged) == 4 and all(isinstance(x, float) and x >= 0 for x in losses)
    assert 0 <= out["results"]["vlmopt_shapes_choice"]["acc,none"] <= 1


@pytest.mark.slow
def test_loglikelihood_is_the_hf_models_and_ranks_answers(tmp_path):
    """Without passes, the loss the plugin returns is the HF model's −log P(continuation), and the
    greedy flag is the HF model's argmax."""
    pytest.importorskip("lmms_eval", reason=LMMS_MISSING)
    from lmms_eval.api.instance import Instance

    from vlmopt.integrations.lmms_eval.model import VlmoptLMM

    lmm = VlmoptLMM(pretrained="tiny-llava", batch_size=4)
    samples = _random_samples("tiny-llava", "shapes", 3)
    lmm.task_dict = {"t": {"test": samples}}
    choices = [list(reference.tasks.TASKS["shapes"].families[s.family]) for s in samples]
    requests = [
        Instance("loglikelihood", (s.question, f" {c}", _visuals, i, "t", "test"), idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
        for i, (s, options) in enumerate(zip(samples, choices)) for c in options[:2]
    ]
    losses = [r.text for r in lmm.loglikelihood(requests)]
    model, processor = reference.load("tiny-llava")
    for request, (loss, greedy) in zip(requests, losses):
        context, continuation, _, doc_id, _, _ = request.args
        sample = samples[doc_id]
        head = processing.prompt("llava", sample.question)
        count = len(processor.tokenizer(head + continuation)["input_ids"]) - len(processor.tokenizer(head)["input_ids"])
        batch = processor(text=[head + continuation], images=[sample.pil_image()], return_tensors="pt")
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(**batch).logits[0, -count - 1 : -1].float(), -1)
        target = batch["input_ids"][0, -count:]
        assert loss == pytest.approx(-float(logprobs.gather(-1, target[:, None]).sum()), rel=1e-4, abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == target).all())
    with pytest.raises(InputError, match="quote the passes"):
        VlmoptLMM(pretrained="tiny-llava", passes="hiprune:keep_ratio=1/3", alpha=0.1)
    with pytest.raises(NotImplementedError, match="multi-round"):
        lmm.generate_until_multi_round([])


def test_import_vlmopt_does_not_import_lmms_eval():
    import subprocess

    code = "import vlmopt, vlmopt.reference, sys; print('lmms_eval' in sys.modules, 'vlmopt.integrations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
