"""Qwen3-VL end to end (dense and MoE): bit-exact with HF without a lossy pass, every pass (DeepStack
features follow the kept tokens, through a cut inside the LLM too), streams with timestamps, export,
the training graph and APB-V across gloo ranks."""

from __future__ import annotations

import pytest
import torch

import vlmopt
from tests.adapters import family_checks as checks
from tests.stream.streams import one_shot, random_frames
from vlmopt import configs
from vlmopt.adapters.qwen3_vl import qwen3vl_config
from vlmopt.graph.probe import run_with_probes
from vlmopt.reference.processing import build_processor


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
    return configs.build(qwen3vl_config(text_layers=4, moe=request.param == "moe"), seed=21)


@pytest.fixture(scope="module")
def dense():
    return configs.build(qwen3vl_config(text_layers=4), seed=22)


def images(model, seed=1):
    """Two left-padded rows: two images of different sizes, and one image after longer text."""
    specs = [configs.PromptSpec(images=2, text_before=3, text_after=5), configs.PromptSpec(images=1, text_before=9, text_after=7)]
    return configs.synthetic_batch(model, specs, image_grids=[(8, 8), (4, 8), (8, 4)], seed=seed)


def video(model, seed=2):
    """One row with a video of 3 temporal patches (each after its timestamp), one with text only."""
    specs = [configs.PromptSpec(images=0, text_before=9, text_after=4), configs.PromptSpec(images=0, text_before=3, text_after=6)]
    return configs.synthetic_batch(model, specs, video_grids=[(6, 8, 8)], seed=seed)


# ----- bit-exact without a lossy pass -------------------------------------------------------------
@pytest.mark.parametrize("make", [images, video], ids=["images", "video"])
def test_logits_and_greedy_tokens_equal_hf(model, make):
    batch = make(model)
    assert (batch["attention_mask"] == 0).any()
    checks.assert_bit_exact(model, batch)
    single = configs.synthetic_batch(model, [configs.PromptSpec(images=1, text_before=4)], image_grids=[(4, 4)], seed=3)
    checks.assert_bit_exact(model, single)


def test_lossless_settings_keep_deepstack_exact(dense):
    checks.assert_lossless_settings_are_exact(dense, images(dense, seed=4))


def test_images_and_video_in_one_batch_are_hf_to_float_tolerance(dense):
    """The tower runs once over the batch's images and videos (HF: one call each): the merger's matmuls
    then sum in another blocking, so logits agree to float tolerance and the greedy tokens exactly."""
    specs = [configs.PromptSpec(images=1, text_before=3), configs.PromptSpec(images=0, text_before=5)]
    batch = configs.synthetic_batch(dense, specs, image_grids=[(4, 4)], video_grids=[(4, 8, 8)], seed=5)
    compiled = vlmopt.compile(dense)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, checks.hf_logits(dense, batch), rtol=1e-5, atol=1e-5)
        expected = dense.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled.generate(**batch, max_new_tokens=6), expected)


# ----- every pass ------------------------------------------------------------------------------
def test_every_pass_runs(model):
    checks.run_every_pass(model, images(model, seed=6))
    one_video = configs.synthetic_batch(model, [configs.PromptSpec(images=0, text_before=5)], video_grids=[(6, 8, 8)], seed=7)
    checks.run_every_pass(model, one_video, specs=("hiprune:keep_ratio=1/3", "pool_prune:keep_ratio=0.25", "halfv", "apbv:hosts=2,anchor_len=4,passing_len=4"))


@pytest.mark.parametrize(
    "spec", ["random_prune:keep_ratio=0.5", "pool_prune:keep_ratio=0.25", "hiprune:keep_ratio=1/3", "halfv", "apbv:hosts=2"]
)
def test_golden_graph_diff(dense, golden, spec):
    base = vlmopt.compile(dense)
    golden(f"qwen3_vl_{spec.split(':')[0]}", vlmopt.graph.diff(base.graph, vlmopt.compile(dense, passes=[spec]).graph))


def deepstack_values(compiled, batch):
    """The DeepStack features injected after decoder layer 0, as the graph computes them [B, S', D]."""
    prompt = compiled.plan(batch)
    module = compiled.stages["prefill"]
    adds = [n for n in module.graph.nodes if n.meta.get("role") == "deepstack" and n.meta.get("index") == 0]
    injected = adds[-1].args[1]
    _, values = run_with_probes(module, dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=1),
                                lambda n: n.name in (injected.name, "kept_positions"))
    return prompt, values[injected.name], values.get("kept_positions")


def test_deepstack_features_follow_the_kept_tokens(dense):
    """HiPrune keeps a third of the tokens: the features added after layer 0 sit exactly at the kept
    tokens' slots of the pruned sequence, and each equals the unpruned graph's feature at that slot."""
    batch = images(dense, seed=8)
    full_prompt, full, _ = deepstack_values(vlmopt.compile(dense), batch)
    _, pruned, kept = deepstack_values(vlmopt.compile(dense, passes=["hiprune:keep_ratio=1/3"]), batch)
    seq = full_prompt.layout.seq_len
    flat_full = full.reshape(-1, full.shape[-1])
    assert pruned.shape[1] < seq
    for row in range(pruned.shape[0]):
        slots = kept[kept // seq == row].sort().values
        present = pruned[row][pruned[row].abs().sum(-1) > 0]
        assert torch.equal(present, flat_full[slots])


def test_pruning_lowers_the_llm_flops(dense):
    """One 16×16-patch image (64 visual tokens) after a short question: HiPrune at 1/3 and HalfV's
    defaults both cut the LLM's prefill FLOPs, and together more than either."""
    batch = configs.synthetic_batch(dense, [configs.PromptSpec(images=1, text_before=4, text_after=8)], image_grids=[(16, 16)], seed=9)
    hiprune = checks.llm_flops_ratio(dense, batch, "hiprune:keep_ratio=1/3")
    halfv = checks.llm_flops_ratio(dense, batch, "halfv")
    both = checks.llm_flops_ratio(dense, batch, "hiprune:keep_ratio=1/3+halfv")
    assert hiprune < 0.6 and halfv < 0.7 and both < min(hiprune, halfv)


# ----- streams ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor():
    return build_processor("qwen3_vl", 56, video_size=56)


@pytest.fixture(scope="module")
def stream_model():
    """A random Qwen3-VL whose special ids are the reference tokenizer's (the random configs' are)."""
    return configs.build(qwen3vl_config(text_layers=4), seed=23)


@pytest.mark.parametrize("chunks", [(8,), (2, 4, 2)])
def test_stream_equals_one_shot_prefill(stream_model, processor, chunks):
    question = "what colour was the first object to appear?"
    frames = random_frames(sum(chunks), seed=len(chunks))
    compiled = vlmopt.compile(stream_model)
    batch = one_shot(processor, frames, question)
    expected = compiled.generate(**batch, max_new_tokens=6)[0, batch["input_ids"].shape[1] :].tolist()
    with torch.no_grad():
        hf = stream_model.generate(**batch, max_new_tokens=6, do_sample=False)[0, batch["input_ids"].shape[1] :].tolist()
    assert expected == hf
    stream = compiled.stream(processor=processor)
    first = 0
    for count in chunks:
        stream.append(frames[first : first + count])
        first += count
    assert stream.ask(question, max_new_tokens=6).token_ids == expected


def test_hermes_keeps_the_stream_within_its_budget(stream_model, processor, golden):
    from vlmopt.adapters import adapter_for
    from vlmopt.graph.pipeline import VLMGraph

    compiled = vlmopt.compile(stream_model, passes=["hermes:kv_budget=40,chunk_frames=4"])
    before = VLMGraph.capture(adapter_for(stream_model), chunk=True)["chunk"]
    golden("qwen3_vl_hermes_chunk", vlmopt.graph.diff(before, compiled.graph["chunk"]))
    stream = compiled.stream(processor=processor)
    frames = random_frames(16, seed=11)
    for first in range(0, 16, 4):
        stream.append(frames[first : first + 4])
        assert stream.cache_length <= 40
    assert len(stream.ask("what is there?", max_new_tokens=3).token_ids) >= 1
    assert len(set(stream.kv_bytes_per_chunk[1:])) == 1, "memory stays flat once the budget is reached"


# ----- training, export, hosts -----------------------------------------------------------------
def test_training_loss_equals_hf(model):
    checks.assert_training_loss_equals_hf(model, images(model, seed=12))


def test_regate_runs_on_the_training_graph(dense, golden):
    from tests.train.train_helpers import random_labels

    batch = images(dense, seed=13)
    compiled = vlmopt.compile(dense, passes=["regate:keep=0.5,warmup_steps=0,dense_steps=0"], mode="train")
    golden("qwen3_vl_regate", vlmopt.graph.diff(vlmopt.compile(dense, mode="train").graph, compiled.graph))
    with pytest.warns(UserWarning, match="no teacher_losses"):
        out = compiled(**batch, labels=random_labels(batch, seed=14), sample_ids=[0, 1])
    assert out.active_tokens.sum() < (random_labels(batch, seed=14)[:, 1:] != -100).sum()


def test_export_round_trip_with_hiprune_and_halfv(stream_model, processor, tmp_path):
    pytest.importorskip("onnxruntime")
    from vlmopt.export import OnnxVLM, export_onnx

    passes = ["hiprune:keep_ratio=1/3", "halfv"]
    export_onnx(stream_model, tmp_path, passes=passes, processor=processor)
    compiled = vlmopt.compile(stream_model, passes=passes)
    from PIL import Image

    image = Image.fromarray(random_frames(1, seed=15, size=112)[0])
    from vlmopt.export.inputs import encode_prompt, template_of

    batch = {k: torch.from_numpy(v) for k, v in encode_prompt(processor, template_of(compiled.adapter), image, "what is it?").items()}
    expected = compiled.generate(**batch, max_new_tokens=5)
    assert torch.equal(torch.as_tensor(OnnxVLM(tmp_path).generate(**{k: v.numpy() for k, v in batch.items()}, max_new_tokens=5)), expected)


def test_apbv_under_two_gloo_ranks_matches_the_simulation(tmp_path):
    from tests.distributed.apbv_worker import SETTINGS, run, tiny_model, video_prompt
    from tests.distributed.test_apbv_group import launch
    from vlmopt.passes import APBV

    model = tiny_model("qwen3_vl")
    compiled = vlmopt.compile(model, passes=[APBV(hosts=2, **SETTINGS)])
    expected_logits, expected_tokens, _ = run(compiled, video_prompt(model, frames=8))
    results, _ = launch(tmp_path, 2, frames=8, family="qwen3_vl")
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        torch.testing.assert_close(result["logits"], expected_logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(result["tokens"], expected_tokens)
