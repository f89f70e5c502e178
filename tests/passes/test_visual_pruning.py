"""RandomPrune and PoolPrune: exact counts, original positions, decoding at the unpruned length,
batch-independence, golden graph diffs, and the text-only no-op."""

import pytest
import torch

import vlmopt
from tests.conftest import padded_batch, row
from vlmopt.graph.layout import keep_count, pooled_grid
from vlmopt.graph.probe import run_with_probes

PASSES = {
    "random_prune": vlmopt.passes.RandomPrune(keep_ratio=0.5, seed=0),
    "pool_prune": vlmopt.passes.PoolPrune(keep_ratio=0.25),
}


def expected_kept(pass_, grid):
    if isinstance(pass_, vlmopt.passes.PoolPrune):
        t, h, w = pooled_grid(grid, pass_.keep_ratio)
        return t * h * w
    return keep_count(grid[0] * grid[1] * grid[2], pass_.keep_ratio, pass_.num_tokens)


def probe_prefill(compiled, batch):
    prompt = compiled.plan(batch)
    inputs = dict(prompt.inputs, cache=compiled.new_cache(), logits_to_keep=0)
    module = compiled.stages["prefill"]
    merge = next(n for n in module.graph.nodes if n.meta.get("role") == "merge")
    names = {merge.args[2].name: "kept_positions", "sequence_index": "sequence_index", "position_ids_kept": "position_ids_kept"}
    output, values = run_with_probes(module, inputs, lambda n: n.name in names)
    return prompt, output, {names[k]: v for k, v in values.items()}


@pytest.mark.parametrize("name", list(PASSES))
def test_exact_kept_count_and_original_positions(family_model, name):
    pass_ = PASSES[name]
    batch = padded_batch(family_model, seed=11)
    compiled = vlmopt.compile(family_model, passes=[pass_])
    prompt, output, values = probe_prefill(compiled, batch)
    layout = prompt.layout
    kept_positions = values["kept_positions"]
    expected_counts = [expected_kept(pass_, g) for g in layout.grids]
    assert kept_positions.numel() == sum(expected_counts)
    seq_len = layout.seq_len
    for image, (image_row, count) in enumerate(zip(layout.rows, expected_counts)):
        start = sum(expected_counts[:image])
        slots = kept_positions[start : start + count]
        assert torch.all(slots // seq_len == image_row), "kept tokens stay in their row"
        assert torch.all(slots[1:] > slots[:-1]), "kept tokens stay in order"
    index = values["sequence_index"]
    original = prompt.inputs["position_ids"]
    kept_ids = values["position_ids_kept"]
    batch_dim = 1 if original.dim() == 3 else 0
    for b in range(index.shape[0]):
        valid = index[b] >= 0
        source = original.select(batch_dim, b)[..., index[b][valid]]
        assert torch.equal(kept_ids.select(batch_dim, b)[..., valid], source), "position ids are the original ones"
    dropped = layout.total - kept_positions.numel()
    assert output["logits"].shape[1] == seq_len - min(
        layout.tokens_per_row()[b] - sum(c for r, c in zip(layout.rows, expected_counts) if r == b)
        for b in range(layout.batch)
    )
    assert dropped > 0


@pytest.mark.parametrize("name", list(PASSES))
def test_decoding_continues_at_unpruned_length(family_model, name):
    batch = padded_batch(family_model, seed=12)
    compiled = vlmopt.compile(family_model, passes=[PASSES[name]])
    seen = []
    run_stage = compiled.run_stage

    def recording(stage, inputs, cache, logits_to_keep):
        seen.append((stage, inputs["position_ids"].clone(), cache.get_seq_length()))
        return run_stage(stage, inputs, cache, logits_to_keep)

    compiled.run_stage = recording
    compiled.generate(**batch, max_new_tokens=4, eos_token_id=[])
    unpruned = compiled.plan(batch, for_generation=True).inputs["position_ids"]
    stages = [stage for stage, _, _ in seen]
    assert stages == ["prefill", "decode", "decode", "decode"]
    pruned_cache = seen[1][2]
    assert pruned_cache < batch["input_ids"].shape[1], "the cache holds the pruned prompt"
    for step, (_, position, cache_len) in enumerate(seen[1:]):
        assert torch.equal(position, unpruned[..., -1:] + 1 + step)
        assert cache_len == pruned_cache + step


@pytest.mark.parametrize("name", list(PASSES))
def test_batch_equals_rows_run_alone(family_model, name):
    batch = padded_batch(family_model, seed=13)
    compiled = vlmopt.compile(family_model, passes=[PASSES[name]])
    _, _, batched = probe_prefill(compiled, batch)
    tokens = compiled.generate(**batch, max_new_tokens=6)
    seq_len = batch["input_ids"].shape[1]
    per_row_kept = batched["kept_positions"]
    offset = 0
    for b in range(2):
        single = row(batch, b)
        pad = seq_len - single["input_ids"].shape[1]
        _, _, alone = probe_prefill(compiled, single)
        mine = per_row_kept[(per_row_kept // seq_len) == b] % seq_len - pad
        assert torch.equal(mine, alone["kept_positions"]), "the same tokens are kept"
        alone_tokens = compiled.generate(**single, max_new_tokens=6)
        assert torch.equal(tokens[b, seq_len:], alone_tokens[0, single["input_ids"].shape[1] :])
        offset += 1


def test_generation_runs_and_differs_from_unpruned(family_model):
    batch = padded_batch(family_model, seed=14)
    full = vlmopt.compile(family_model).generate(**batch, max_new_tokens=8)
    pruned = vlmopt.compile(family_model, passes=["random_prune:keep_ratio=0.1"]).generate(**batch, max_new_tokens=8)
    assert pruned.shape == full.shape
    assert not torch.equal(pruned, full)


def test_keep_ratio_one_reproduces_the_model(family_model):
    batch = padded_batch(family_model, seed=15)
    with torch.no_grad():
        expected = family_model(**batch).logits
        got = vlmopt.compile(family_model, passes=["random_prune:keep_ratio=1.0"])(**batch).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", list(PASSES))
def test_golden_graph_diff(family_model, name, golden):
    base = vlmopt.compile(family_model)
    compiled = vlmopt.compile(family_model, passes=[PASSES[name]])
    golden(f"{name}_{base.adapter.family}", vlmopt.graph.diff(base.graph, compiled.graph))


def test_random_then_random_prunes_twice(family_model):
    batch = padded_batch(family_model, seed=16)
    compiled = vlmopt.compile(family_model, passes=["random_prune:keep_ratio=0.5", "random_prune:keep_ratio=0.5,seed=1"])
    prompt, _, values = probe_prefill(compiled, batch)
    expected = sum(keep_count(keep_count(c, 0.5, None), 0.5, None) for c in prompt.layout.counts)
    assert values["kept_positions"].numel() == expected
    assert len([n for n in compiled.graph.prefill.graph.nodes if n.meta.get("role") == "sequence_index"]) == 1
