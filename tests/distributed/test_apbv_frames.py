"""Frame-parallel vision encoding: the split balances contiguous frame runs, and a run's planned
tower inputs give exactly that run's visual tokens (both families, images and videos mixed)."""

import random

import pytest
import torch
from torch import fx

import vlmopt
from vlmopt import configs
from vlmopt.distributed.frames import FrameShare, split_frames
from vlmopt.errors import InputError
from vlmopt.adapters.llava import llava_config
from vlmopt.adapters.qwen2_5_vl import qwen25vl_config


def tower_tokens(compiled, inputs: dict) -> torch.Tensor:
    """The prefill graph run up to the visual tokens the merge reads (the tower and projector)."""
    module = compiled.stages["prefill"]
    merge = next(n for n in module.graph.nodes if n.meta.get("role") == "merge")
    features = merge.args[1]
    graph, env = fx.Graph(), {}
    for node in module.graph.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
        if node is features:
            break
    graph.output(env[features])
    tower = fx.GraphModule(module, graph)
    names = [n.target for n in graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        return tower(**{name: inputs.get(name) for name in names})


@pytest.mark.parametrize("seed", range(40))
def test_split_is_contiguous_and_balanced(seed):
    rng = random.Random(seed)
    frames = [rng.choice([16, 24, 64, 100]) for _ in range(rng.randint(1, 20))]
    for hosts in range(1, 9):
        ranges = split_frames(frames, hosts)
        assert len(ranges) == hosts and ranges[0][0] == 0 and ranges[-1][1] == len(frames)
        assert all(ranges[h][1] == ranges[h + 1][0] for h in range(hosts - 1)), ranges
        shares = [sum(frames[a:b]) for a, b in ranges]
        assert sum(1 for a, b in ranges if b > a) == min(hosts, len(frames)), "no idle host while another has two frames"
        if len(frames) >= hosts:
            # each boundary is the frame boundary nearest its target: no share is off by a whole frame more
            assert max(shares) - sum(frames) / hosts <= max(frames), (frames, hosts, shares)


def test_a_host_without_frames_encodes_one_and_sends_none():
    share = FrameShare.plan([16, 16], hosts=3, rank=next(r for r, (a, b) in enumerate(split_frames([16, 16], 3)) if a == b))
    assert share.encoded == (0, 1) and sum(share.tokens) == 32 and 0 in share.tokens


def qwen_prompt(seed):
    model = configs.build(qwen25vl_config(), seed=seed)
    specs = [configs.PromptSpec(images=1, text_before=3, text_after=6), configs.PromptSpec(images=0, text_before=3, text_after=6)]
    batch = configs.synthetic_batch(model, specs, image_grids=[(8, 12)], video_grids=[(8, 8, 12)], seed=seed + 10)
    return model, batch


def llava_prompt(seed):
    model = configs.build(llava_config(), seed=seed)
    specs = [configs.PromptSpec(images=2, text_before=3, text_after=6), configs.PromptSpec(images=3, text_before=4, text_after=5)]
    return model, configs.synthetic_batch(model, specs, seed=seed + 10)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_any_frame_run_encodes_to_its_slice_of_the_whole(family):
    model, batch = (qwen_prompt if family == "qwen2_5_vl" else llava_prompt)(seed=7)
    compiled = vlmopt.compile(model)
    prompt = compiled.plan(batch)
    frames = compiled.adapter.frame_tokens(prompt)
    whole = tower_tokens(compiled, prompt.inputs)
    assert sum(frames) == whole.shape[0] == prompt.inputs["visual_positions"].numel()
    starts = [sum(frames[:f]) for f in range(len(frames) + 1)]
    rng = random.Random(3)
    runs = [(0, len(frames)), (len(frames) - 1, len(frames))] + [tuple(sorted(rng.sample(range(len(frames) + 1), 2))) for _ in range(4)]
    for first, stop in runs:
        part = tower_tokens(compiled, prompt.inputs | compiled.adapter.frame_inputs(prompt, first, stop))
        # same arithmetic on fewer rows: equal up to the GEMM's row-blocking
        torch.testing.assert_close(part, whole[starts[first] : starts[stop]], rtol=1e-6, atol=1e-6)


def test_frames_outside_the_prompt_are_refused():
    model, batch = qwen_prompt(seed=1)
    compiled = vlmopt.compile(model)
    prompt = compiled.plan(batch)
    count = len(compiled.adapter.frame_tokens(prompt))
    with pytest.raises(InputError, match=f"outside this prompt's {count} frames"):
        compiled.adapter.frame_inputs(prompt, count, count + 1)
