"""What a lockstep fine-tuning record shows: each run's peak, when it first reaches the reference run's
peak, what that cost; the learning-curve plot.

The *reference* run is the first run without passes (standard fine-tuning), else the first run. A run
*reaches* the reference's peak at its first evaluation whose validation score is at least that peak
(no tolerance: the same validation samples are scored at every evaluation of every run). Its cost
there is read off that evaluation: steps, tokens in the loss (cumulative) and seconds (the run's own
training steps, cumulative; its teacher's seconds apart). ReGATE's claim (arXiv 2507.21420), as
tested here: a run reaches the reference's peak with at least :data:`CLAIM_TOKEN_CUT` fewer tokens in
the loss than the reference had at its peak, and in no more steps.
"""

from __future__ import annotations

from typing import Any

CLAIM_TOKEN_CUT = 0.4
"""The fraction of the reference's loss tokens (at its peak) a run must save for the claim."""


def reference_index(record: dict) -> int:
    """Index of the reference run: the first without passes, else 0."""
    return next((i for i, run in enumerate(record["runs"]) if not run["passes"]), 0)


def _point(point: dict) -> dict[str, Any]:
    keep = ("step", "accuracy", "loss_tokens", "seconds", "teacher_seconds", "check")
    return {k: point[k] for k in keep if k in point}


def summarize(record: dict) -> dict[str, Any]:
    """Per run: ``peak`` (the first evaluation at its best score), ``to_reference_peak`` (the first at
    or above the reference's peak, or None: never), the tokens in the loss, s/step, where it stopped,
    the one-word ``check`` at the start and at the end, and ``claim`` (non-reference runs: does it
    reach the reference's peak with ≥ 40% fewer loss tokens and in no more steps?)."""
    ref = reference_index(record)
    curves = [run["curve"] for run in record["runs"]]
    ref_peak = max(curves[ref], key=lambda p: p["accuracy"])
    out = {"reference": record["runs"][ref]["label"], "reference_peak": _point(ref_peak), "runs": []}
    for i, run in enumerate(record["runs"]):
        curve = curves[i]
        peak = max(curve, key=lambda p: p["accuracy"])  # max() keeps the first of equal scores
        reach = next((p for p in curve if p["accuracy"] >= ref_peak["accuracy"]), None)
        entry = {
            "label": run["label"], "peak": _point(peak), "to_reference_peak": None if reach is None else _point(reach),
            "loss_tokens": run["loss_tokens"], "answer_tokens": run["answer_tokens"],
            "median_step_s": run.get("median_step_s"), "median_sparse_step_s": run.get("median_sparse_step_s"),
            "stopped": run.get("stopped"), "teacher": run.get("teacher"), "teacher_seconds": run.get("teacher_seconds"),
            "check_start": curve[0].get("check"), "check_end": curve[-1].get("check"),
        }
        if i != ref:
            entry["claim"] = reach is not None and (
                reach["loss_tokens"] <= (1 - CLAIM_TOKEN_CUT) * ref_peak["loss_tokens"] and reach["step"] <= ref_peak["step"]
            )
        out["runs"].append(entry)
    return out


def table(summary: dict) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the summary, one row per run, for :func:`vlmopt.cli.common.markdown_table`."""
    ref = summary["reference_peak"]
    headers = ["run", "peak score %", "step / s to the reference peak", "loss tokens there (vs reference)",
               "loss tokens in all", "median s/step (sparse)", "stopped", "one-word check %"]
    rows = []
    for run in summary["runs"]:
        reach = run["to_reference_peak"]
        where = "never" if reach is None else f"{reach['step']} / {reach['seconds']:.0f}"
        tokens = "—" if reach is None else f"{reach['loss_tokens']:,} ({100 * (reach['loss_tokens'] / max(1, ref['loss_tokens']) - 1):+.1f}%)"
        sparse = "" if run["median_sparse_step_s"] is None else f" ({run['median_sparse_step_s']:.3f})"
        check = "" if run["check_start"] is None else f"{100 * run['check_start']:.1f} → {100 * run['check_end']:.1f}"
        stopped = run["stopped"] or {}
        rows.append([
            run["label"], f"{100 * run['peak']['accuracy']:.1f} (step {run['peak']['step']})", where, tokens,
            f"{run['loss_tokens']:,}", f"{run['median_step_s']:.3f}{sparse}",
            f"{stopped.get('step', '')} ({stopped.get('reason', '')})", check,
        ])
    return headers, rows


def plot(record: dict, path: str, title: str | None = None) -> None:
    """Validation score against steps and against the tokens in the loss, one line per run (dotted:
    the one-word check), the reference's peak dashed (a PNG; needs matplotlib)."""
    from vlmopt.plots import pyplot

    plt = pyplot()
    figure, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(11, 4), dpi=90)
    peak = 100 * max(p["accuracy"] for p in record["runs"][reference_index(record)]["curve"])
    for run in record["runs"]:
        steps = [p["step"] for p in run["curve"]]
        scores = [100 * p["accuracy"] for p in run["curve"]]
        label = f"{run['label']} ({run['median_step_s']:.2f} s/step)" if "median_step_s" in run else run["label"]
        line, = by_step.plot(steps, scores, marker="o", markersize=3, label=label)
        if all("check" in p for p in run["curve"]):
            by_step.plot(steps, [100 * p["check"] for p in run["curve"]], linestyle=":", color=line.get_color())
        by_tokens.plot([p["loss_tokens"] for p in run["curve"]], scores, marker="o", markersize=3, color=line.get_color())
    for axis, xlabel in ((by_step, "step"), (by_tokens, "tokens in the loss (cumulative)")):
        axis.axhline(peak, color="grey", linestyle="--", linewidth=0.8)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    n = record["config"]["eval_n"]
    check = f"; dotted: one-word {record['check']} (n={record['config']['check_n']})" if record.get("check") else ""
    by_step.set_ylabel(f"validation score % (n={n}){check}", fontsize=8)
    by_step.legend(fontsize=7)
    figure.suptitle(title or f"fine-tuning on {record['task']} (dashed: the reference run's peak)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
