"""One GPU check: what vlmopt claims about NVIDIA GPUs, run on a lent one, written to one JSON.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu-check.json     # on an NVIDIA GPU
    python benchmarks/gpu_check.py --dry-run [--json out.json]                   # on a CPU
    python benchmarks/gpu_check.py --parts kernels,apbv_gpu --budget-s 300        # some parts

Every part either runs, or is skipped with the reason (no GPU, no flash-attn, no onnxruntime-gpu,
not enough GPU memory, the time budget spent); the script exits 1 when a part fails. ``--dry-run``
lists every part with the reason it would be skipped here and runs the parts that need no GPU (the
device audit and the bf16 audit, both on the CPU); a GPU run skips those two unless ``--parts`` names
them (the test suite runs them on every CPU). The parts are in :mod:`gpu_parts`; on a GPU,
``--budget-s`` (default 480: an 8-minute device lease) skips the parts that no longer fit by their
time estimates (guesses until an H100 times them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SCHEMA = "vlmopt-gpu-check/1"
#: Seconds a GPU run may take by default: the 8 minutes of a device lease.
GPU_BUDGET_S = 480.0
STATUSES = ("passed", "failed", "skipped")


class PartFailed(Exception):
    """A check of a part did not hold; the part's ``result`` still goes into the JSON."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


@dataclass
class Context:
    """What every part may read."""

    dry_run: bool
    """A CPU run: GPU parts are listed, not run."""
    work: Path
    """A scratch directory (exports, sub-reports)."""
    deadline: float
    """``time.monotonic()`` after which no part starts."""
    samples: int = 100
    """Evaluation samples per pass list (``passes_bf16``)."""
    repeats: int = 10
    """Timed runs per measurement."""


@dataclass(frozen=True)
class Part:
    """One part of the check."""

    name: str
    """Key in the JSON and in ``--parts``."""
    description: str
    """One line: what the part runs and compares."""
    run: Callable[[Context], dict[str, Any]]
    """Runs the part and returns its results; raises :class:`PartFailed` when a check does not hold."""
    blocker: Callable[[Context], str | None]
    """The reason the part cannot run here, or None."""
    estimate_s: float
    """Seconds it takes on an H100 host, with a margin (for the budget)."""
    on_cpu: bool = False
    """Needs no GPU: run by ``--dry-run``; skipped by a GPU run unless named in ``--parts``."""


@dataclass
class Outcome:
    """What one part gave."""

    name: str
    description: str
    status: str
    """``passed``, ``failed`` or ``skipped``."""
    reason: str | None = None
    """Why it was skipped, or what failed."""
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)


def run_part(part: Part, context: Context, chosen: bool) -> Outcome:
    """Run ``part`` (or skip it with the reason); never raises."""
    def skipped(reason: str) -> Outcome:
        return Outcome(part.name, part.description, "skipped", reason)

    if context.dry_run and not part.on_cpu:
        blocker = part.blocker(context)
        return skipped(blocker or "--dry-run lists the GPU parts without running them")
    if not context.dry_run and part.on_cpu and not chosen:
        return skipped("runs on the CPU: the test suite and --dry-run run it (name it in --parts to run it here)")
    blocker = part.blocker(context)
    if blocker:
        return skipped(blocker)
    left = context.deadline - time.monotonic()
    if left < part.estimate_s:
        return skipped(f"time budget: it takes about {part.estimate_s:.0f} s and {max(left, 0):.0f} s are left (--budget-s)")
    began = time.monotonic()
    try:
        result = part.run(context)
        return Outcome(part.name, part.description, "passed", None, time.monotonic() - began, result)
    except PartFailed as failure:
        return Outcome(part.name, part.description, "failed", str(failure), time.monotonic() - began, failure.result)
    except Exception as error:  # noqa: BLE001 - a crash is a failed part, reported with its traceback
        tail = "".join(traceback.format_exception(error))[-4000:]
        return Outcome(part.name, part.description, "failed", f"{type(error).__name__}: {error}",
                       time.monotonic() - began, {"traceback": tail})


def environment() -> dict[str, Any]:
    """Versions and the device, without initialising anything the parts would not."""
    import importlib.metadata as metadata

    import torch

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    gpu = torch.cuda.is_available()
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
        "packages": {name: version(name) for name in (
            "transformers", "triton", "flash-attn", "kernels", "onnxruntime", "onnxruntime-gpu", "onnx")},
    }


def report(outcomes: list[Outcome], context: Context, began: float, started: str) -> dict[str, Any]:
    """The JSON document (``schema`` names its layout)."""
    return {
        "schema": SCHEMA,
        "started": started,
        "seconds": round(time.monotonic() - began, 1),
        "dry_run": context.dry_run,
        "environment": environment(),
        "parts": [vars(outcome) for outcome in outcomes],
        "failed": [o.name for o in outcomes if o.status == "failed"],
    }


def print_table(outcomes: list[Outcome], width: int = 12) -> None:
    for o in outcomes:
        note = f" — {o.reason}" if o.reason else ""
        print(f"{o.name:<{width}}  {o.status:<7} {o.seconds:6.1f} s  {o.description}{note}", flush=True)


def parse(argv: list[str] | None, names: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on a CPU: list every part, run the CPU ones")
    parser.add_argument("--parts", help=f"comma-separated parts to run, of: {', '.join(names)} (default: all)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds the parts may take in all (default {GPU_BUDGET_S:.0f} on a GPU, none with --dry-run)")
    parser.add_argument("--samples", type=int, default=100, help="evaluation samples per pass list (default 100)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (default 10)")
    args = parser.parse_args(argv)
    if args.parts is not None:
        chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = [p for p in chosen if p not in names]
        if unknown or not chosen:
            parser.error(f"--parts {args.parts!r}: unknown part(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(names)}")
        args.parts = chosen
    for name in ("budget_s", "samples", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None, parts: list[Part] | None = None) -> int:
    """Run the check; returns the exit status (1 when a part failed)."""
    import tempfile

    from gpu_parts import PARTS

    parts = PARTS if parts is None else parts
    args = parse(argv, [p.name for p in parts])
    began, started = time.monotonic(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    selected = [p for p in parts if args.parts is None or p.name in args.parts]
    with tempfile.TemporaryDirectory(prefix="vlmopt-gpu-check-") as work:
        budget = args.budget_s or (float("inf") if args.dry_run else GPU_BUDGET_S)
        context = Context(args.dry_run, Path(work), began + budget, args.samples, args.repeats)
        outcomes = []
        for part in selected:
            outcome = run_part(part, context, chosen=args.parts is not None)
            outcomes.append(outcome)
            print_table([outcome], max(len(p.name) for p in selected))
    document = report(outcomes, context, began, started)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    failed = document["failed"]
    print(f"{len(outcomes)} parts: " + ", ".join(f"{sum(o.status == s for o in outcomes)} {s}" for s in STATUSES)
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    import gpu_check  # the parts import this module by name: one copy of its classes

    sys.exit(gpu_check.main())
