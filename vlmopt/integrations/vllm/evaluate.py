"""A reference model's task through ``vllm.LLM.generate``, with and without passes, against ``vlmopt eval``.

    python -m vlmopt.integrations.vllm.evaluate --model MODEL --task shapes --n 200 \\
        --passes hiprune:keep_ratio=1/3 --compare vlmopt-eval.json [--bench 3] [--json out.json]

Each pass list (the unpruned model first) runs in its own engine on the same test samples, prompts
written as vlmopt's processor writes them. Reported per list: accuracy, the share of answers identical
to ``vlmopt eval``'s for the same list (``--compare``: the file ``vlmopt eval --json`` wrote), the
prompt tokens vLLM reports, and their drop against the expected one (each item's visual tokens minus
the passes' kept count for its grid, per sample). ``--bench R``: requests per second of the offline
engine on the same requests (prefix and processor caches off, so every run encodes and prefills
everything): every list's engine stays up and the lists are timed alternately (A B B A ...), the
median of R timed runs each after a warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

ENGINE = dict(enforce_eager=True, dtype="float32", max_model_len=4096, kv_cache_memory_bytes=1 << 28, seed=0)
"""Engine settings of the reference models on the CPU backend (a 256 MiB KV cache holds 131,072 tokens)."""


@dataclass
class VllmRun:
    """One pass list through vLLM on a task's samples."""

    passes: str
    """The pass list (empty: unpruned)."""
    accuracy: float
    """Share of samples answered right."""
    identical: float | None = None
    """Share of answers identical to vlmopt eval's for the same pass list (None: nothing to compare)."""
    eval_accuracy: float | None = None
    """vlmopt eval's accuracy for the same pass list, on the same samples."""
    prompt_tokens: float = 0.0
    """Mean prompt tokens per request, as vLLM reports them."""
    expected_drop: float = 0.0
    """Mean prompt tokens the passes should remove per request (visual tokens minus kept, from the grids)."""
    measured_drop: float = 0.0
    """Mean prompt tokens removed against the unpruned run."""
    requests_per_second: float | None = None
    """Offline throughput (``--bench``), median of the timed runs."""
    bench_seconds: list[float] = field(default_factory=list)
    """Wall time of each timed run."""
    answers: list[str] = field(default_factory=list, repr=False)
    """Per sample: the generated text."""


def video_metadata(frames, fps: float) -> dict[str, Any]:
    """vLLM's metadata of a clip of consecutive frames at ``fps`` (every frame sampled)."""
    count = len(frames)
    return {"fps": fps, "duration": count / fps, "total_num_frames": count,
            "frames_indices": list(range(count)), "video_backend": "opencv", "do_sample_frames": False}


def reference_fps(model: str) -> float:
    """Frame rate of a reference model's clips (its saved video processor's ``fps``)."""
    from vlmopt import reference

    config = reference.path(model) / "video_preprocessor_config.json"
    return float(json.loads(config.read_text())["fps"]) if config.exists() else 2.0


def family_of(model: str):
    """(adapter class, HF config) of a reference model name or model directory."""
    from transformers import AutoConfig

    from vlmopt import reference
    from vlmopt.adapters import adapter_for_config

    config = AutoConfig.from_pretrained(reference.path(model))
    return adapter_for_config(config), config


def vllm_prompt(model: str, sample) -> dict[str, Any]:
    """A sample as a vLLM prompt for reference model ``model`` whose tokens are those of vlmopt's
    processor (``processing.encode``), as the family's adapter writes it for vLLM (``Adapter.vllm_prompt``)."""
    from vlmopt.reference import processing

    family, _ = family_of(model)
    text = family.vllm_prompt(processing.prompt(family.family, sample.question, video=sample.is_video), sample.is_video)
    if not sample.is_video:
        return {"prompt": text, "multi_modal_data": {"image": sample.pil_image()}}
    return {"prompt": text, "multi_modal_data": {"video": (sample.frames, video_metadata(sample.frames, reference_fps(model)))}}


def engine(model: str, passes: str = "", **settings):
    """A ``vllm.LLM`` serving reference model (or model directory) ``model`` with ``passes``."""
    from vllm import LLM

    from vlmopt import reference
    from vlmopt.integrations.vllm import engine_overrides

    options = dict(ENGINE, limit_mm_per_prompt={"image": 1, "video": 1}) | settings
    return LLM(model=str(reference.path(model)), hf_overrides=engine_overrides(model, passes), **options)


def generate(llm, prompts: list[dict], max_tokens: int = 3) -> tuple[list[str], list[int]]:
    """(answers, prompt token counts) of greedy generation, in the prompts' order."""
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return [o.outputs[0].text for o in outputs], [len(o.prompt_token_ids) for o in outputs]


def expected_drops(processor, samples, passes: str, merge: int) -> list[int]:
    """Per sample: visual tokens minus the passes' kept count, from the grids vlmopt's processor gives."""
    from vlmopt import passes as passes_module
    from vlmopt.integrations.vllm.spec import kept_count, merged_grid
    from vlmopt.reference import processing

    pass_list = tuple(passes_module.parse(part) for part in passes.split("+") if part.strip())
    drops = []
    for sample in samples:
        if not pass_list:
            drops.append(0)
            continue
        batch = processing.encode(processor, [sample])
        grid = merged_grid(batch["video_grid_thw" if sample.is_video else "image_grid_thw"][0].tolist(), merge)
        drops.append(grid[0] * grid[1] * grid[2] - kept_count(pass_list, grid))
    return drops


def evaluate(model: str, task: str, n: int, pass_lists: list[str], compare: dict | None = None, bench: int = 0) -> list[VllmRun]:
    """Run the task's first ``n`` test samples through vLLM for ``""`` (unpruned) and each pass list."""
    from vlmopt import reference
    from vlmopt.reference import processing, tasks

    samples = list(reference.task_for(model, task).samples("test", n=n))
    processor = processing.load_processor(reference.path(model))
    prompts = [vllm_prompt(model, s) for s in samples]
    family, config = family_of(model)
    merge = family.vllm_tower(config)[1]
    runs: list[VllmRun] = []
    engines = []
    for passes in [""] + [p for p in pass_lists if p]:
        llm = engine(model, passes, **({"enable_prefix_caching": False, "mm_processor_cache_gb": 0} if bench else {}))
        answers, lengths = generate(llm, prompts)
        correct = [tasks.score(a, s) for a, s in zip(answers, samples)]
        run = VllmRun(passes, sum(correct) / len(samples), prompt_tokens=statistics.mean(lengths), answers=answers)
        run.expected_drop = statistics.mean(expected_drops(processor, samples, passes, merge))
        run.measured_drop = runs[0].prompt_tokens - run.prompt_tokens if runs else 0.0
        runs.append(run)
        if bench:
            generate(llm, prompts[:8])  # warm-up
            engines.append(llm)
        else:
            del llm
            gc.collect()
    # timed alternately, A B B A ..., so load that comes and goes on a shared machine hits every list alike
    for repeat in range(bench):
        order = list(zip(runs, engines))
        for run, llm in order if repeat % 2 == 0 else order[::-1]:
            began = time.perf_counter()
            generate(llm, prompts)
            run.bench_seconds.append(time.perf_counter() - began)
    for run in runs if bench else ():
        run.requests_per_second = len(prompts) / statistics.median(run.bench_seconds)
    return compared(runs, compare) if compare else runs


def compared(runs: list[VllmRun], compare: dict) -> list[VllmRun]:
    """``runs`` with vlmopt eval's accuracy and the share of identical answers, per pass list found in
    ``compare`` (what ``vlmopt eval --json`` wrote for the same samples)."""
    from vlmopt.reference import tasks

    theirs = {"": compare["baseline"]} | {run["passes"]: run for run in compare["runs"]}
    for run in runs:
        if run.passes in theirs:
            other = theirs[run.passes]
            same = [tasks.normalize(a) == tasks.normalize(b) for a, b in zip(run.answers, other["answers"], strict=True)]
            run.identical, run.eval_accuracy = sum(same) / len(same), other["accuracy"]
    return runs


def table(runs: list[VllmRun]) -> str:
    """The runs as a Markdown table."""
    lines = ["| passes | accuracy % | vlmopt eval % | identical % | prompt tokens | drop (expected) | req/s |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
        rate = "—" if run.requests_per_second is None else f"{run.requests_per_second:.2f}"
        lines.append(f"| {run.passes or '(none)'} | {pct(run.accuracy)} | {pct(run.eval_accuracy)} | {pct(run.identical)} | "
                     f"{run.prompt_tokens:.1f} | {run.measured_drop:.1f} ({run.expected_drop:.1f}) | {rate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmopt.integrations.vllm.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="reference model name or model directory (an M-RoPE family)")
    parser.add_argument("--task", default="shapes")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--passes", action="append", default=[], help="a pass list (repeatable); the unpruned model always runs")
    parser.add_argument("--compare", help="the JSON `vlmopt eval --json` wrote for the same model, task and n")
    parser.add_argument("--bench", type=int, default=0, help="timed runs for requests per second (0: none)")
    parser.add_argument("--json", help="write the runs to this file")
    parser.add_argument("--runs", help="report the runs an earlier --json wrote (no engine runs), e.g. against a --compare file")
    args = parser.parse_args(argv)
    compare = json.loads(open(args.compare).read()) if args.compare else None
    if args.runs:
        earlier = json.loads(open(args.runs).read())
        args.model, args.task, args.n = earlier["model"], earlier["task"], earlier["n"]
    elif not args.model:
        parser.error("--model is required (a reference model name or a model directory), or --runs")
    if compare and (compare["task"], compare["n"]) != (args.task, args.n):
        parser.error(f"--compare holds {compare['task']} n={compare['n']}, not {args.task} n={args.n}")
    if args.runs:
        runs = compared([VllmRun(**run) for run in earlier["runs"]], compare) if compare else [VllmRun(**r) for r in earlier["runs"]]
    else:
        runs = evaluate(args.model, args.task, args.n, args.passes, compare, args.bench)
    print(f"{args.model} on {args.task}, n={args.n}, through vllm.LLM.generate")
    print(table(runs))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "task": args.task, "n": args.n, "runs": [asdict(r) for r in runs]}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
