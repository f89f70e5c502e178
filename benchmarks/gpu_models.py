"""The parts of ``benchmarks/gpu_check.py`` that run whole models: every pass on the reference models
in bf16 on CUDA, and the 7B shapes at full width (time and memory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpu_check import Context, PartFailed

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: Video tasks run as streams for kv-stage passes, with this cache budget (HERMES's recorded setting).
STREAM_BUDGET = 0.32
#: bf16 answers must equal fp32's on this share of the samples; accuracy within this of the CPU record.
MIN_AGREEMENT, MAX_ACCURACY_GAP = 0.9, 0.1
#: Samples below which an accuracy is reported beside the CPU record but not judged against it.
MIN_JUDGED_SAMPLES = 50
#: GPU memory a full-width 7B shape needs while it is built in fp32 and cast to bf16.
LARGE_GPU_GIB = 60


def reference_models() -> list[str]:
    """The shipped reference models whose weights are here."""
    from vlmopt import reference

    found = []
    for name in reference.MODEL_NAMES:
        try:
            reference.path(name)
            found.append(name)
        except FileNotFoundError:
            continue
    return found


def no_reference_models(context: Context) -> str | None:
    return None if reference_models() else "no reference model weights in models/ (git lfs pull?)"


def no_large_gpu(context: Context) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None  # said by the GPU check
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    return None if total >= LARGE_GPU_GIB else f"a full-width 7B shape needs {LARGE_GPU_GIB} GiB of GPU memory, this GPU has {total:.0f}"


def on_cuda(batch: dict[str, Any]) -> dict[str, Any]:
    return {key: value.to("cuda") if hasattr(value, "to") else value for key, value in batch.items()}


def load(name: str, dtype, attn_implementation: str | None = None):
    """(model on CUDA in ``dtype``, processor) of a reference model."""
    from vlmopt import reference

    model, processor = reference.load(name, dtype=dtype)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model.to("cuda"), processor


def task_batch(name: str, dtype, attn_implementation: str | None = None, samples: int = 8):
    """(model, a CUDA batch of the first test samples of its image task) for ``attention``."""
    from vlmopt import reference
    from vlmopt.reference import processing

    model, processor = load(name, dtype, attn_implementation)
    task = reference.task_for(name, "shapes")
    return model, on_cuda(processing.encode(processor, list(task.samples("test", n=samples))))


def recorded_accuracy(model: str, task: str, spec: str) -> dict[str, Any] | None:
    """The CPU record of ``spec`` (``""``: no passes) on ``task`` in ``benchmarks/results/*.json``."""
    for path in sorted(RESULTS.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(record, dict) or Path(str(record.get("model", ""))).name != model or record.get("task") != task:
            continue
        for run in [record.get("baseline")] + list(record.get("runs", [])):
            if isinstance(run, dict) and run.get("passes") == spec:
                return {"file": path.name, "n": record.get("n"), "accuracy": run["accuracy"]}
    return None


def pass_config(cls):
    """A registered pass with its defaults (as the CPU records ran them), or, where it has none, as
    the device audit configures it."""
    from tests.device.flows import audit_configs

    try:
        return cls()
    except Exception:  # noqa: BLE001 - defaults refused (a keep ratio or a host count is required)
        return audit_configs(cls)[0]


def pass_lists(video: bool) -> list[str]:
    """Every registered pass: the kv-stage ones on a video task, the others on an image task
    (train-stage passes run in :func:`training_steps`)."""
    from vlmopt.passes import REGISTRY

    configs = [pass_config(cls) for cls in REGISTRY.values()]
    return [c.spec() for c in configs if c.stage != "train" and (c.stage == "kv") == video]


def evaluations(name: str, task_name: str, samples: int, specs: list[str]) -> list[dict[str, Any]]:
    """``vlmopt eval``'s harness on CUDA in bf16 and fp32 over the same samples, per pass list."""
    import torch

    from vlmopt import reference
    from vlmopt.evaluation import evaluate

    task = reference.task_for(name, task_name)
    items = task.samples("test", n=samples)
    reports = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, processor = load(name, dtype)
        budget = STREAM_BUDGET if task_name != "shapes" and any(specs) else None
        reports[dtype] = evaluate(model, processor, items, [[spec] for spec in specs], progress=False, stream_budget=budget)
        del model
        torch.cuda.empty_cache()
    rows = []
    for index, spec in enumerate([""] + specs):
        runs = {dtype: report["baseline"] if index == 0 else report["runs"][index - 1] for dtype, report in reports.items()}
        low, full = runs[torch.bfloat16], runs[torch.float32]
        agree = sum(a == b for a, b in zip(low.answers, full.answers)) / len(items)
        record = recorded_accuracy(name, task_name, spec)
        judged = record is not None and len(items) >= MIN_JUDGED_SAMPLES  # fewer: too noisy to judge, reported
        rows.append({
            "model": name, "task": task_name, "passes": spec or "(none)", "samples": len(items),
            "accuracy_bf16": low.accuracy, "accuracy_fp32": full.accuracy, "answers_agree_bf16_fp32": agree,
            "prefill_seconds_bf16": low.prefill_seconds, "cpu_record": record, "judged_against_record": judged,
            "ok": agree >= MIN_AGREEMENT and (not judged or abs(low.accuracy - record["accuracy"]) <= MAX_ACCURACY_GAP),
        })
    return rows


def training_steps(name: str) -> list[dict[str, Any]]:
    """Each train-stage pass (and none): one step on CUDA in bf16 and in fp32, same batch and labels."""
    import torch

    import vlmopt
    from tests.device.flows import audit_configs
    from vlmopt import reference
    from vlmopt.passes import REGISTRY
    from vlmopt.reference import processing

    # train-stage passes gated from the first step (the audit's configs), with and without elision
    configs = [()] + [(c,) for cls in REGISTRY.values() for c in audit_configs(cls) if c.stage == "train"]
    rows = []
    for passes in configs:
        losses = {}
        for dtype in (torch.float32, torch.bfloat16):
            model, processor = load(name, dtype)
            samples = list(reference.task_for(name, "shapes").samples("test", n=8))
            batch = on_cuda(processing.encode(processor, samples, answers=True))
            labels = batch.pop("labels")
            compiled = vlmopt.compile(model, passes=list(passes), mode="train")
            out = compiled(**batch, labels=labels, sample_ids=list(range(len(samples))))
            out.loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            losses[dtype] = (out.loss.item(), all(g.dtype == dtype for g in grads) and bool(grads))
            del model, compiled
        (full, _), (low, grads_ok) = losses[torch.float32], losses[torch.bfloat16]
        gap = abs(low - full) / max(abs(full), 1e-6)
        rows.append({"model": name, "passes": "+".join(p.spec() for p in passes) or "(none)", "loss_fp32": full,
                     "loss_bf16": low, "relative_gap": gap, "ok": grads_ok and gap < 5e-2})
    return rows


def passes_bf16(context: Context) -> dict[str, Any]:
    from vlmopt import reference

    rows: list[dict[str, Any]] = []
    for name in reference_models():
        tasks = json.loads((reference.path(name) / "tasks.json").read_text())
        rows += evaluations(name, "shapes", context.samples, pass_lists(video=False))
        if "shapes-video" in tasks:
            rows += evaluations(name, "shapes-video", max(10, context.samples // 5), pass_lists(video=True))
        rows += training_steps(name)
    bad = [f"{r['model']} {r.get('task', 'train')} {r['passes']}" for r in rows if not r["ok"]]
    if bad:
        raise PartFailed(f"bf16 off fp32 or off the CPU record: {', '.join(bad)}", {"runs": rows})
    return {"runs": rows, "criteria": {"min_agreement": MIN_AGREEMENT, "max_accuracy_gap": MAX_ACCURACY_GAP}}


def prefill_7b(context: Context) -> dict[str, Any]:
    """Every family's 7B shape (``*7b*-shape`` configs) at full width, random weights in bf16: HF eager's prefill
    against the identity-compiled one, HiPrune (1/3) and HalfV (defaults): time (median of
    ``context.repeats``, runs alternating) and peak memory above the weights."""
    import torch

    import vlmopt
    from vlmopt import configs
    from vlmopt.adapters import families
    from vlmopt.measure import hf_prefill_runner, measure, prefill_runner

    rows = []
    for family in families():
        for name, named in family.configs.items():
            if not (name.endswith("-shape") and "7b" in name):
                continue
            model = configs.build(named.make(width=1.0), seed=0, dtype=torch.bfloat16, device="cuda")
            grids = [named.image_grid] if named.image_grid else None
            batch = configs.synthetic_batch(model, [configs.PromptSpec(text_before=6, text_after=30)], image_grids=grids)
            batch = on_cuda(batch)
            runners = {"hf": hf_prefill_runner(model, batch)}
            for label, passes in (("identity", []), ("hiprune", ["hiprune:keep_ratio=1/3"]), ("halfv", ["halfv"])):
                runners[label] = prefill_runner(vlmopt.compile(model, passes=passes), batch)
            times = measure(runners, repeats=context.repeats, warmup=2)
            weights = torch.cuda.memory_allocated()
            peaks = {}
            for label, run in runners.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    run()
                torch.cuda.synchronize()
                peaks[label] = torch.cuda.max_memory_allocated() - weights
            hf = times["hf"].median_s
            rows.append({
                "config": name, "prompt_tokens": int(batch["input_ids"].shape[1]),
                "seconds": {label: timing.median_s for label, timing in times.items()},
                "identity_over_hf": times["identity"].median_s / hf,
                "hiprune_over_identity": times["hiprune"].median_s / times["identity"].median_s,
                "halfv_over_identity": times["halfv"].median_s / times["identity"].median_s,
                "peak_bytes_above_weights": peaks,
                "hiprune_peak_ratio": peaks["hiprune"] / peaks["identity"],
                "halfv_peak_ratio": peaks["halfv"] / peaks["identity"],
            })
            del model, runners
            torch.cuda.empty_cache()
    slow = [r["config"] for r in rows if r["identity_over_hf"] > 1.05]
    if slow:
        raise PartFailed(f"identity-compiled prefill over 1.05 of HF eager's: {', '.join(slow)}", {"shapes": rows})
    return {"shapes": rows}
