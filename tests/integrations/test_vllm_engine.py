"""The plugin in vLLM's offline engine (the vLLM environment, docs/vllm.md; skipped where vLLM is not
installed): pruned answers are vlmopt's compiled model's, under chunked prefill, prefix caching and a
batch of images of different sizes and a video; placeholder counts are the passes' kept counts; passes
and families the plugin cannot run are refused when the engine starts.

vlmopt's side runs in vlmopt's own environment (``$VLMOPT_REFERENCE_PYTHON``, default the repository's
``.venv``): ``tests/integrations/vllm_reference.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed: its environment is separate (docs/vllm.md)")

from vlmopt import reference  # noqa: E402
from vlmopt.errors import IncompatiblePassError, UnsupportedModelError  # noqa: E402
from vlmopt.integrations.vllm import evaluate  # noqa: E402
from vlmopt.integrations.vllm.spec import kept_count, merged_grid, plugin_passes  # noqa: E402
from vlmopt.reference import processing  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_PYTHON = os.environ.get("VLMOPT_REFERENCE_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
HIPRUNE = "hiprune:keep_ratio=1/3"
CHUNK = 64
"""Tokens per engine step: below the longest prompt's length here whatever the samples (a 448 px image
keeps 85 of its 256 tokens, and its prompt has text around them), so its prefill is chunked."""
BLOCK = 32
"""KV-cache block (the CPU attention's smallest): prompts of two blocks or more hit the prefix cache."""

pytestmark = pytest.mark.slow


def vlmopt_side(command: str, payload: dict):
    if not Path(REFERENCE_PYTHON).exists():
        pytest.skip(f"vlmopt's own environment is not at {REFERENCE_PYTHON} (set VLMOPT_REFERENCE_PYTHON)")
    script = ROOT / "tests" / "integrations" / "vllm_reference.py"
    # this checkout's vlmopt, whichever checkout that environment has installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([REFERENCE_PYTHON, str(script), command, json.dumps(payload)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def fresh_samples(model: str, count: int, sizes: list[int | None]):
    """Fresh test samples (random indices): images at ``sizes`` px (None: the task's), then one video."""
    rng = np.random.default_rng()
    specs = [{"task": "shapes", "index": int(rng.integers(0, 10**5)), "size": size} for size in sizes]
    return specs + [{"task": "shapes-video", "index": int(rng.integers(0, 10**5)), "size": None}][:count]


def prompts_of(model: str, specs: list[dict]):
    sys.path.insert(0, str(ROOT / "tests" / "integrations"))
    from vllm_reference import sample_of

    samples = [sample_of(model, spec) for spec in specs]
    return samples, [evaluate.vllm_prompt(model, s) for s in samples]


def first_token_logprobs(llm, prompts):
    outputs = llm.generate(prompts, vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=5), use_tqdm=False)
    result = []
    for output in outputs:
        top = output.outputs[0].logprobs[0]
        ranked = sorted(top.items(), key=lambda item: -item[1].logprob)[:5]
        result.append(({i for i, _ in ranked[:3]}, {i: p.logprob for i, p in ranked}, output))
    return result


LOGPROB_TOLERANCE = 2e-2
"""vLLM's and HF's kernels (and the processors' float rounding) differ by up to ~7e-3 on an unlikely token's
log-probability here; keeping other tokens or giving them other positions moves them by tenths."""


def assert_same_answers(ours, theirs):
    """vLLM's top tokens and their log-probabilities are vlmopt's (the towers and LLMs differ in float rounding only)."""
    for (top3, values, _), reference_side in zip(ours, theirs):
        assert reference_side["ids"][0] == max(values, key=values.get)
        for token, logprob in zip(reference_side["ids"][:3], reference_side["logprobs"][:3]):
            assert token in values and abs(values[token] - logprob) < LOGPROB_TOLERANCE, (token, values, reference_side)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-qwen3vl-random")
    # head_dim 32: vLLM's CPU attention has no kernel for the config's 16
    vlmopt_side("make", {"directory": str(directory), "config": "tiny-qwen3vl-random", "options": {"head_dim": 32},
                         "seed": int(np.random.default_rng().integers(0, 1000))})
    return str(directory)


@pytest.mark.parametrize("model", ["tiny-qwen25vl", "qwen3"])
def test_pruned_answers_are_vlmopts_under_chunking_caching_and_batching(model, qwen3_dir):
    """One engine step holds parts of several prompts (images of three sizes and a video, each prefill
    chunked); a second run hits the prefix cache; both answer as vlmopt's compiled model answers each
    prompt alone, and each prompt is as long as its kept tokens make it."""
    name = qwen3_dir if model == "qwen3" else model
    sizes = [448, 336, 224] if model == "tiny-qwen25vl" else [112, 84, 56]
    specs = fresh_samples(name, 1, sizes)
    samples, prompts = prompts_of(name, specs)
    llm = evaluate.engine(name, HIPRUNE, max_num_batched_tokens=CHUNK, enable_prefix_caching=True, enable_chunked_prefill=True,
                          block_size=BLOCK)
    first = first_token_logprobs(llm, prompts)
    again = first_token_logprobs(llm, prompts)
    theirs = vlmopt_side("logprobs", {"model": name, "passes": HIPRUNE, "samples": specs})
    assert_same_answers(first, theirs)
    assert_same_answers(again, theirs)
    cached = [out.num_cached_tokens for _, _, out in again]
    assert all(c > 0 for c, (_, _, out) in zip(cached, again) if len(out.prompt_token_ids) >= 2 * BLOCK), cached
    assert any(cached), cached
    items = plugin_passes(llm.llm_engine.model_config.hf_config)
    processor = processing.load_processor(reference.path(name))
    for sample, (_, _, out), reference_side in zip(samples, first, theirs):
        batch = processing.encode(processor, [sample])
        grid = merged_grid(batch["video_grid_thw" if sample.is_video else "image_grid_thw"][0].tolist(), 2)
        visual = grid[0] * grid[1] * grid[2]
        assert len(out.prompt_token_ids) == reference_side["prompt_tokens"] - visual + kept_count(items, grid)
    assert max(len(out.prompt_token_ids) for _, _, out in first) > CHUNK  # chunked prefill took place


@pytest.mark.parametrize("spec, error, words", [
    ("halfv", IncompatiblePassError, "llm stage"),
    ("snapkv", IncompatiblePassError, "kv stage"),
])
def test_passes_the_plugin_cannot_run_stop_the_engine_before_it_starts(spec, error, words):
    with pytest.raises(error, match=words):
        evaluate.engine("tiny-qwen25vl", spec)


def test_a_1d_rope_family_is_refused_with_the_reason():
    with pytest.raises(UnsupportedModelError, match="1-D RoPE"):
        evaluate.engine("tiny-llava", HIPRUNE, limit_mm_per_prompt={"image": 1}, max_model_len=1024)


def test_the_plugin_runs_on_vllms_transformers():
    """vlmopt is installed --no-deps here: vLLM holds transformers below 5.20, and everything the plugin
    imports (passes, ops, layouts, the reference processors) works with it."""
    import importlib.metadata

    import transformers

    from vlmopt.adapters import qwen_vllm  # noqa: F401
    from vlmopt.integrations.vllm import refused

    assert refused.LlavaForConditionalGeneration.__mro__[1].__module__.startswith("vllm.")  # vLLM's own class, refusing

    assert tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 20)
    requirement = next(r for r in importlib.metadata.requires("vlmopt") if r.startswith("transformers"))
    assert ">=5.24" in requirement  # what pip would have refused to install beside vLLM
    assert [entry.value for entry in importlib.metadata.entry_points(group="vllm.general_plugins") if entry.name == "vlmopt"] == [
        "vlmopt.integrations.vllm:register"]
