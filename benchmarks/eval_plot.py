"""Draw one accuracy-against-FLOPs plot from several ``vlmopt eval --json`` files of the same model,
task and test set (runs measured in separate commands: each file's baseline must agree).

    python benchmarks/eval_plot.py benchmarks/results/tiny-qwen25vl-shapes.json \
        benchmarks/results/tiny-qwen25vl-halfv.json --out benchmarks/results/tiny-qwen25vl-shapes.png
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

from vlmopt.evaluation import plot


def merged_report(paths: list[str]) -> tuple[dict, str]:
    """(report for :func:`vlmopt.evaluation.plot`, title) from eval JSON files; refuses files whose
    model, task, test set or baseline differ."""
    payloads = [json.load(open(path)) for path in paths]
    first = payloads[0]
    key = ("model", "task", "n", "seed")
    for path, payload in zip(paths, payloads):
        if tuple(payload[k] for k in key) != tuple(first[k] for k in key):
            raise SystemExit(f"{path} is {payload['model']} on {payload['task']} (n={payload['n']}); {paths[0]} is {first['model']} on {first['task']} (n={first['n']})")
        if payload["baseline"]["accuracy"] != first["baseline"]["accuracy"]:
            raise SystemExit(f"{path}'s baseline accuracy differs from {paths[0]}'s: not the same test set or model")
    runs = [SimpleNamespace(**run) for payload in payloads for run in payload["runs"]]
    report = {"baseline": SimpleNamespace(**first["baseline"]), "runs": runs}
    return report, f"{first['model']} — {first['task']} (n={first['n']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="vlmopt eval --json files")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    report, title = merged_report(args.json)
    plot(report, args.out, title)
    print(f"wrote {args.out} ({len(report['runs'])} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
