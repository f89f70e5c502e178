"""vlmopt.graph.diff: unchanged graphs, added and re-wired nodes."""

import vlmopt
from vlmopt.graph.diff import diff


def test_identical_graphs_are_unchanged(llava_clip):
    a, b = vlmopt.compile(llava_clip).graph, vlmopt.compile(llava_clip).graph
    assert diff(a, b) == "@@ prefill: unchanged\n@@ prefill_text: unchanged\n@@ decode: unchanged\n"
    assert diff(a["decode"], b["decode"]) == "(no change)\n"


def test_added_and_rewired_nodes_are_reported(qwen):
    text = diff(vlmopt.compile(qwen).graph, vlmopt.compile(qwen, ["random_prune:keep_ratio=0.5"]).graph)
    first = text.splitlines()[0]
    assert first.startswith("@@ prefill: +") and "re-wired" in first
    assert "  + scores = random_scores(visual_tokens, layout, 0)  [prune_score]" in text
    assert "  ~ merge_visual = vlmopt.merge_visual(embed_tokens, kept_tokens, kept_positions)  [merge]" in text
    assert "      was vlmopt.merge_visual(embed_tokens, visual_tokens, visual_positions)" in text
