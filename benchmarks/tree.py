"""Print the short repository tree the README shows: the folders and the files a newcomer opens first.

    python benchmarks/tree.py

The list is curated (one line each), not generated from ``git ls-files``; every path in it must
exist, so ``tests/test_docs.py`` fails when a listed file moves or disappears. Exits with status 1,
naming them on stderr, when some do not.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (path, what it holds); a trailing ``/`` marks a folder.
ENTRIES: tuple[tuple[str, str], ...] = (
    ("vlmopt/compiler.py", "vlmopt.compile: check the passes, capture the graphs, apply the passes"),
    ("vlmopt/runtime.py", "CompiledVLM: runs the stage graphs like the HF model (forward, generate)"),
    ("vlmopt/adapters/", "one file per VLM family: registry, capabilities, pipelines, planning, layer view"),
    ("vlmopt/graph/", "capture (capture.py), VLMGraph, GraphEditor (edit.py), diff"),
    ("vlmopt/passes/", "one pass per file (hiprune.py, halfv.py, hermes.py, apbv.py, regate.py, baselines)"),
    ("vlmopt/layers/", "decoder-layer stand-ins passes put in place (APB-V's attention, HalfV's frozen rows)"),
    ("vlmopt/ops/", "one vlmopt:: custom op per file: op, fake, reference, FLOPs, ONNX"),
    ("vlmopt/kernels/", "Triton kernels behind the ops on CUDA, imported lazily"),
    ("vlmopt/export/", "ONNX export checked by onnxruntime, its runtime, TensorRT engines and check"),
    ("vlmopt/cli/", "the vlmopt command line, one module per subcommand"),
    ("vlmopt/stream/", "the streaming runtime (CompiledVLM.stream); KV-tier passes in passes/kv_stream.py"),
    ("vlmopt/distributed/", "APB-V's hosts: the one-process simulation and the torch.distributed group"),
    ("vlmopt/train/", "training with compiled models: step, teacher losses, fine-tuning, HF Trainer"),
    ("vlmopt/integrations/", "lmms-eval plugin (--model vlmopt), task export, vLLM plugin"),
    ("vlmopt/evaluation.py", "the harness behind vlmopt eval: accuracy, retention, cost"),
    ("vlmopt/reference/", "the reference models' world: loading, synthetic tasks, processors, evaluator"),
    ("models/tiny-llava/", "a shipped reference model: HF checkpoint, model card, training log"),
    ("models/tiny-qwen25vl/", "the same for Qwen2.5-VL"),
    ("models/tiny-qwen3vl/", "the same for Qwen3-VL, with a 12-layer LLM (depth for HalfV and HERMES)"),
    ("models/train/", "training of the reference models: python -m models.train"),
    ("models/bench/", "research benchmarks on the reference models (python -m models.bench.<name>)"),
    ("benchmarks/", "core.py, export.py, gpu_check.py, this tree (tree.py), results/ (measured numbers)"),
    ("docs/", "adding a family, reference models, evaluation, export, benchmarks (numbers with commands)"),
    ("tests/", "mirrors the package; one module per family in tests/adapters/; golden graph diffs"),
    (".ci/run", "CI: install from scratch, then the test command"),
)


def missing(entries: tuple[tuple[str, str], ...] = ENTRIES) -> list[str]:
    """Listed paths that do not exist (a folder must exist as a folder)."""
    return [
        path
        for path, _ in entries
        if not ((ROOT / path).is_dir() if path.endswith("/") else (ROOT / path).is_file())
    ]


def render(entries: tuple[tuple[str, str], ...] = ENTRIES) -> str:
    """The tree as the README shows it: one ``path  description`` line per entry."""
    width = max(len(path) for path, _ in entries) + 2
    return "\n".join(f"{path:<{width}}{description}" for path, description in entries) + "\n"


def main() -> int:
    sys.stdout.write(render())
    gone = missing()
    if gone:
        print(f"tree.py: listed but missing: {', '.join(gone)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
