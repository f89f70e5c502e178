"""APB-V in the single-process simulation: keep-all passing blocks equal full causal attention
(logits and tokens, batches with left padding), the anchor and the first block stay exact whatever
is passed, the golden graph diff, and the errors given for bad configs and prompts."""

import pytest
import torch

import vlmopt
from vlmopt import configs
from vlmopt.errors import IncompatiblePassError, InputError, PassConfigError
from vlmopt.passes import APBV, HalfV, RandomPrune


def image_batch(model, seed):
    specs = [configs.PromptSpec(images=1, text_before=3, text_after=5), configs.PromptSpec(images=2, text_before=6, text_after=9)]
    return configs.synthetic_batch(model, specs, seed=seed)


def video_batch(model, seed, frames=4):
    spec = [configs.PromptSpec(images=0, text_before=3, text_after=6)]
    return configs.synthetic_batch(model, spec, video_grids=[(frames, 8, 8)], seed=seed)


def real_logits(compiled, batch):
    with torch.no_grad():
        logits = compiled(**batch).logits
    return [logits[row][batch["attention_mask"][row].bool()] for row in range(logits.shape[0])]


@pytest.mark.parametrize("hosts,anchor", [(1, 0), (2, 4), (3, 7)])
@pytest.mark.parametrize("make", [image_batch, video_batch])
def test_passing_every_token_is_full_causal_attention(qwen, hosts, anchor, make):
    batch = make(qwen, seed=60 + hosts)
    base = vlmopt.compile(qwen)
    compiled = vlmopt.compile(qwen, passes=[APBV(hosts=hosts, anchor_len=anchor, passing_len=10**6)])
    for expected, got in zip(real_logits(base, batch), real_logits(compiled, batch)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    tokens = compiled.generate(**batch, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(tokens, base.generate(**batch, max_new_tokens=5, eos_token_id=[]))


def test_compressed_passing_changes_later_blocks_only(qwen):
    batch = video_batch(qwen, seed=71, frames=6)
    apbv = APBV(hosts=3, anchor_len=5, passing_len=2)
    compiled = vlmopt.compile(qwen, passes=[apbv])
    (expected,), (got,) = real_logits(vlmopt.compile(qwen), batch), real_logits(compiled, batch)
    (plan,) = compiled.plan(batch).inputs["apbv_plans"]
    exact = plan.bounds[1]  # the anchor and block 0 attend only among themselves: exact in every layer
    torch.testing.assert_close(got[:exact], expected[:exact], rtol=1e-4, atol=1e-5)
    assert (got[exact:] - expected[exact:]).abs().max() > 1e-3, "a 2-token passing block must change later blocks"


def test_golden_graph_diff(qwen, golden):
    base = vlmopt.compile(qwen)
    compiled = vlmopt.compile(qwen, passes=[APBV(hosts=4)])
    golden("apbv_qwen2_5_vl", vlmopt.graph.diff(base.graph, compiled.graph))


def test_generate_on_the_reference_model_video():
    from vlmopt.reference import processing, tasks

    model, processor = vlmopt.reference.load("models/tiny-qwen25vl")
    samples = list(tasks.get("needle").samples("test", n=2))
    batch = processing.encode(processor, samples)
    compiled = vlmopt.compile(model, passes=[APBV(hosts=4)])
    ids = compiled.generate(**batch, max_new_tokens=3, do_sample=False)
    assert ids.shape[0] == 2 and batch["input_ids"].shape[1] < ids.shape[1] <= batch["input_ids"].shape[1] + 3
    # The defaults (anchor 128, nothing passed below 128-token blocks) still answer like full attention
    # on these two (the question attends the whole video exactly).
    full = vlmopt.compile(model).generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(ids, full)


@pytest.mark.parametrize("kwargs,field", [({"hosts": 0}, "hosts"), ({"hosts": 2, "pool": 4}, "pool"),
                                          ({"hosts": 2, "passing_len": -1}, "passing_len"), ({"hosts": 1.5}, "hosts")])
def test_bad_config(kwargs, field):
    with pytest.raises(PassConfigError, match=field):
        APBV(**kwargs)


def test_context_too_short_for_the_hosts(qwen):
    batch = video_batch(qwen, seed=72, frames=2)  # 2·16 visual tokens
    compiled = vlmopt.compile(qwen, passes=[APBV(hosts=32, anchor_len=4)])
    with pytest.raises(InputError, match="hosts=32 needs a context of at least"):
        compiled.generate(**batch, max_new_tokens=2)


def test_prompt_without_question_or_video(qwen):
    batch = video_batch(qwen, seed=73)
    cut = int((batch["input_ids"][0] == qwen.config.video_token_id).nonzero().max()) + 1  # ends on a visual token
    trimmed = dict(batch, input_ids=batch["input_ids"][:, :cut], attention_mask=batch["attention_mask"][:, :cut],
                   mm_token_type_ids=batch["mm_token_type_ids"][:, :cut])
    compiled = vlmopt.compile(qwen, passes=[APBV(hosts=2)])
    with pytest.raises(InputError, match="question tokens after the last visual token"):
        compiled(**trimmed)


@pytest.mark.parametrize("before", [HalfV(), RandomPrune(keep_ratio=0.5)])
def test_apbv_runs_alone(qwen, before):
    with pytest.raises(IncompatiblePassError, match=f"cannot follow {type(before).__name__}"):
        vlmopt.compile(qwen, passes=[before, APBV(hosts=2)])


def test_flops_count_on_fake_tensors(qwen):
    batch = video_batch(qwen, seed=75)
    full = vlmopt.flops(vlmopt.compile(qwen), batch)
    approx = vlmopt.flops(vlmopt.compile(qwen, passes=[APBV(hosts=2, anchor_len=4, passing_len=3)]), batch)
    assert approx.by_stage["vision"] == full.by_stage["vision"]
    assert 0 < approx.llm < full.llm  # SDPA is counted dense; APB-V per host, summed over the simulated hosts


def test_user_model_unchanged(qwen):
    batch = video_batch(qwen, seed=74)
    with torch.no_grad():
        before = qwen(**batch).logits
    vlmopt.compile(qwen, passes=[APBV(hosts=2, passing_len=1)])(**batch)
    with torch.no_grad():
        assert torch.equal(qwen(**batch).logits, before)
