"""The HERMES pass on a stream: lossless under a large budget, within budget over a long stream,
summary tokens and position re-indexing (lazy, eager), the chunk graph's golden diff."""

from __future__ import annotations

import warnings

import pytest
import torch

import vlmopt
from tests.stream.streams import qwen_processor, random_frames
from vlmopt.adapters import adapter_for
from vlmopt.errors import PassConfigError
from vlmopt.graph.pipeline import VLMGraph
from vlmopt.passes import Hermes

QUESTION = "what colour was the first object to appear?"
# The test vocabulary cannot read the paper's pseudo-queries: one test checks that warning, the rest leave it out.
pytestmark = pytest.mark.filterwarnings("ignore:Hermes.*unknown to this tokenizer")


@pytest.fixture(scope="module")
def processor():
    return qwen_processor()


def run(compiled, processor, frames, appends=2, **stream_options):
    stream = compiled.stream(processor=processor, **stream_options)
    step = len(frames) // appends
    for first in range(0, len(frames), step):
        stream.append(frames[first : first + step])
    return stream


def test_chunk_graph_diff(qwen, golden):
    before = VLMGraph.capture(adapter_for(qwen), chunk=True)["chunk"]
    after = vlmopt.compile(qwen, passes=[Hermes(kv_budget=64, chunk_frames=4)]).graph["chunk"]
    golden("hermes_chunk", vlmopt.graph.diff(before, after))


def test_budget_above_the_stream_reproduces_the_full_cache(qwen, processor):
    frames = random_frames(12, seed=11)
    # appends of chunk_frames frames, so both streams encode the same chunks
    full = run(vlmopt.compile(qwen), processor, frames, appends=3)
    hermes = run(vlmopt.compile(qwen, passes=[Hermes(kv_budget=10_000, chunk_frames=4)]), processor, frames, appends=3)
    for plain, kept in zip(full.state.cache.layers, hermes.state.cache.layers):
        assert torch.equal(plain.keys, kept.keys) and torch.equal(plain.values, kept.values)
    assert torch.equal(full.state.positions, hermes.state.positions)
    assert hermes.ask(QUESTION, 6).token_ids == full.ask(QUESTION, 6).token_ids


def test_cache_stays_within_budget_over_a_long_stream(qwen, processor):
    compiled = vlmopt.compile(qwen, passes=[Hermes(kv_budget=24, chunk_frames=4)])
    stream = compiled.stream(processor=processor)
    layers = qwen.config.get_text_config().num_hidden_layers
    for index in range(6):
        stream.append(random_frames(4, seed=20 + index))
        lengths = {layer.keys.shape[2] for layer in stream.state.cache.layers}
        assert lengths == {stream.cache_length} and stream.cache_length <= 24
        if index == 2:
            stream.ask(QUESTION, 2)  # the Q/A then conditions the pseudo-queries
    assert stream.cache_length == 24 and stream.state.frames == 24
    sizes = stream.kv_bytes_per_chunk
    assert sizes[0] < sizes[-1] and len(set(sizes[2:])) == 1  # flat once the budget is reached
    memory = stream.memory()
    assert set(memory["tiers"]) == {"working", "long_term"} and len(memory["layers"]) == layers
    # the long-term layer's last entry is its summary token, one past its largest kept position
    long_term = stream.state.positions[-1]
    assert int(long_term[:, -1].max()) == int(long_term[:, :-1].max()) + 1
    answer = stream.ask(QUESTION, 4)
    assert answer.visual_tokens == 24 - stream.state.prefix and answer.token_ids


def test_budget_below_the_system_prompt_is_refused(qwen, processor):
    compiled = vlmopt.compile(qwen, passes=[Hermes(kv_budget=6)])
    with pytest.raises(PassConfigError, match="does not exceed the system prompt"):
        compiled.stream(system_prompt="you watch a video of shapes", processor=processor)
    stream = compiled.stream(processor=processor, kv_budget=40)
    stream.append(random_frames(4, seed=3))
    assert stream.ask(QUESTION, 2).token_ids


@pytest.mark.parametrize("policy, margin", [("eager", 1024), ("lazy", 32768 - 12)])
def test_position_policies_reindex_and_answer(qwen, processor, policy, margin):
    compiled = vlmopt.compile(
        qwen, passes=[Hermes(kv_budget=20, chunk_frames=4, position_policy=policy, reindex_margin=margin)]
    )
    stream = run(compiled, processor, random_frames(16, seed=31), appends=4)
    prefix = stream.state.prefix
    visual = stream.state.positions[:, :, prefix:]
    for layer in visual:
        for axis in layer:  # dense ranks right after the prompt
            values = axis.unique()
            assert torch.equal(values, torch.arange(prefix, prefix + len(values)))
    answer = stream.ask(QUESTION, 4)
    vocab = qwen.config.get_text_config().vocab_size
    assert answer.token_ids and all(0 <= t < vocab for t in answer.token_ids)
    stream.append(random_frames(4, seed=32))  # the video continues after the compacted ids
    assert int(stream.state.positions[:, 0].max()) <= prefix + visual.shape[2] + 2


def test_lazy_policy_keeps_original_positions(qwen, processor):
    frames = random_frames(16, seed=41)
    full = run(vlmopt.compile(qwen), processor, frames, appends=4)
    lazy = run(vlmopt.compile(qwen, passes=[Hermes(kv_budget=20, chunk_frames=4)]), processor, frames, appends=4)
    original = {tuple(p) for p in full.state.positions[0].T.tolist()}
    for layer, summary in zip(lazy.state.positions, Hermes().summary_layers(len(lazy.state.positions))):
        kept = layer.T.tolist()[: -1 if summary else None]
        assert {tuple(p) for p in kept} <= original


def test_without_summary_long_term_layers_keep_one_more_entry(qwen, processor):
    """``summary=False``: no layer holds a summary token; every layer, long-term ones too, keeps
    ``kv_budget`` distinct entries of the stream at their original positions."""
    frames = random_frames(16, seed=31)
    full = run(vlmopt.compile(qwen), processor, frames, appends=4)
    plain = run(vlmopt.compile(qwen, passes=[Hermes(kv_budget=24, chunk_frames=4, summary=False)]), processor, frames, appends=4)
    layers = len(plain.state.positions)
    assert not any(Hermes(summary=False).summary_layers(layers)) and Hermes().summary_layers(layers)[-1]
    original = {tuple(p) for p in full.state.positions[0].T.tolist()}
    for layer in plain.state.positions:
        kept = [tuple(p) for p in layer.T.tolist()]
        assert len(set(kept)) == len(kept) == plain.cache_length == 24 and set(kept) <= original
    assert plain.ask(QUESTION, 4).token_ids


def test_pseudo_queries_in_the_models_words(qwen, processor):
    """The paper's pseudo-queries are mostly unknown words to the reference vocabulary: the pass warns
    and names the fix; queries in the model's words are tokenised into the chunk graph's inputs."""
    stream = vlmopt.compile(qwen, passes=[Hermes(kv_budget=24, chunk_frames=4)]).stream(processor=processor)
    with pytest.warns(UserWarning) as record:
        Hermes().query_inputs(stream)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2 and all("unknown to this tokenizer" in m for m in messages)
    assert messages[0].startswith("Hermes.global_query: ") and "pass Hermes(local_query=...)" in messages[1]
    own = Hermes(local_query="what objects are there now?", global_query="what was the first object to appear?")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inputs = own.query_inputs(stream)
    ids, spans = inputs["pseudo_query_ids"], inputs["pseudo_query_spans"]
    for span, text in (("local", own.local_query), ("global", own.global_query)):
        assert ids[0, slice(*spans[span])].tolist() == stream.text_ids(text)[0].tolist()
        assert processor.tokenizer.unk_token_id not in ids[0, slice(*spans[span])].tolist()
    assert spans["mixed"] == (0, ids.shape[1])
    with pytest.raises(PassConfigError, match="global_query is empty"):
        Hermes(global_query="  ")


def test_config_is_validated():
    with pytest.raises(PassConfigError, match="position_policy"):
        Hermes(position_policy="sometimes")
    with pytest.raises(PassConfigError, match="sensory_frac"):
        Hermes(sensory_frac=0.8, longterm_frac=0.3)
    with pytest.raises(PassConfigError, match="kv_budget"):
        Hermes(kv_budget=0)
    assert vlmopt.passes.parse("hermes:kv_budget=64,position_policy=eager") == Hermes(kv_budget=64, position_policy="eager")


def test_tiers_and_schedules():
    hermes = Hermes()
    tiers = hermes.tiers(28)
    assert tiers[:2] == ["sensory"] * 2 and tiers[2:19] == ["working"] * 17 and tiers[19:] == ["long_term"] * 9
    from vlmopt.adapters.llava import LlavaAdapter
    from vlmopt.adapters.qwen2_5_vl import Qwen25VLAdapter

    alphas, rates = hermes.schedule(Qwen25VLAdapter, 28)  # the class: only its paper_settings are read
    assert alphas[0] == 1 and alphas[2] == pytest.approx(0.75) and alphas[19] == 0
    assert rates[2] == pytest.approx(20) and alphas[18] == pytest.approx(0.75 - 0.6 * 16 / 17)
    llava_alphas, llava_rates = hermes.schedule(LlavaAdapter, 28)
    assert llava_alphas[18] == pytest.approx(1 - 0.9 * 16 / 17) and llava_rates[18] == pytest.approx(20 - 19.5 * 16 / 17)
