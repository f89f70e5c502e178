"""``vlmopt export``: write a model's graphs as ONNX (checked with onnxruntime) or TensorRT engines.

    vlmopt export --model tiny-llava --passes hiprune:keep_ratio=0.33 --format onnx --out build/
    vlmopt export --model tiny-llava --passes hiprune:keep_ratio=0.33 --format trt --fp16 --out build/
    vlmopt export --check trt --out build/          # check an existing export against TensorRT's parser

Exit status: 0 done; 2 error; 3 ONNX written and TensorRT-ready, but the engines were not built
because TensorRT or a GPU is missing here (the message names what, and prints the ``trtexec`` lines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmopt.cli.common import load_model, markdown_table, model_directory, pass_lists

EXIT_ENGINES_NOT_BUILT = 3


def add_pass_list_argument(parser: argparse.ArgumentParser) -> None:
    """``--passes``: one pass list (export and generate run one model, not a comparison)."""
    parser.add_argument(
        "--passes", action="append", default=[], metavar="SPEC",
        help="passes to apply, e.g. 'hiprune:keep_ratio=0.33' (several passes: join with '+')",
    )


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a model's graphs to ONNX / TensorRT (and check them)")
    parser.add_argument("--model", help="reference model name, local checkpoint path, or random config name")
    add_pass_list_argument(parser)
    parser.add_argument("--format", choices=["onnx", "trt"], default="onnx", help="onnx, or trt (ONNX + TensorRT engines)")
    parser.add_argument("--out", help="output directory (created if needed); with --check alone, the export to check")
    parser.add_argument("--check", choices=["trt"], help="check the ONNX graphs against TensorRT's parser rules")
    parser.add_argument("--onnx", nargs="+", metavar="FILE", help="with --check: ONNX files to check instead of --out's export")
    parser.add_argument("--fp16", action="store_true", help="TensorRT: allow FP16 kernels")
    parser.add_argument("--bf16", action="store_true", help="TensorRT: allow BF16 kernels")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18–20 (TensorRT 10 reads ≤ 20)")
    parser.add_argument("--image-size", type=int, help="image side in pixels the export is fixed to (default: the model's)")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch of the dynamic axes / TensorRT profile")
    parser.add_argument("--max-sequence", type=int, default=2048, help="largest prompt + generated length")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlmopt.errors import InputError

    if args.model is None:
        if args.check != "trt" or not (args.out or args.onnx):
            raise InputError("pass --model NAME --out DIR to export, or --check trt with --out DIR (an export) or --onnx FILE")
        return run_check(args)
    if args.out is None:
        raise InputError("pass --out DIR, the directory to write the export to")
    return run_export(args)


def run_check(args: argparse.Namespace) -> int:
    """Check ONNX files (``--onnx``) or an export directory (``--out``) against TensorRT's rules."""
    from vlmopt.export.manifest import GRAPHS, read_manifest
    from vlmopt.export.trt_check import check_tensorrt

    if args.onnx:
        files = [Path(f) for f in args.onnx]
    else:
        manifest = read_manifest(args.out)
        files = [Path(args.out) / manifest["graphs"][g]["file"] for g in GRAPHS]
    ok = True
    for file in files:
        if not file.exists():
            from vlmopt.export.errors import ModelDirectoryError

            raise ModelDirectoryError(f"{file} does not exist")
        report = check_tensorrt(file)
        print(report.format())
        ok &= report.ok
    return 0 if ok else 1


def run_export(args: argparse.Namespace) -> int:
    from vlmopt import passes as passes_module
    from vlmopt.errors import InputError
    from vlmopt.export.config import ExportConfig
    from vlmopt.export.onnx import export_onnx, require_onnx, writable_directory
    from vlmopt.export.trt_build import (
        EngineConfig,
        build_engines,
        tensorrt_status,
        trtexec_commands,
    )

    lists = pass_lists(args.passes)
    if len(lists) > 1:
        raise InputError("export takes one pass list (join several passes with '+', not several --passes)")
    specs = lists[0] if lists else []
    resolved = [passes_module.parse(spec) for spec in specs]  # unknown pass / bad config: fail before loading
    config = ExportConfig(
        opset=args.opset, image_size=args.image_size, max_batch=args.max_batch, max_sequence=args.max_sequence,
        verify=not args.no_verify,
    )
    model_directory(args.model)  # a missing or corrupt model directory fails before any work
    require_onnx()
    out = writable_directory(args.out)
    loaded = load_model(args.model)
    manifest = export_onnx(loaded.model, out, passes=resolved, config=config, processor=loaded.processor, model_name=args.model)
    print_summary(manifest, out)
    ready = print_trt_check(out, manifest, verbose=args.check == "trt" or args.format == "trt")
    if args.format != "trt":
        return 0 if ready or args.check != "trt" else 1
    if not ready:
        print("error: the ONNX graphs are not TensorRT-ready (see above); no engines were built", file=sys.stderr)
        return 1
    engine = EngineConfig(fp16=args.fp16, bf16=args.bf16)
    missing = tensorrt_status()
    if missing is not None:
        print(f"\nTensorRT engines were not built: this machine lacks {missing}.")
        print(f"The ONNX graphs in {out} are written, checked with onnxruntime and TensorRT-ready. On a machine with "
              "TensorRT 10 and an NVIDIA GPU, run the same `vlmopt export ... --format trt` command, or build the engines with:")
        for line in trtexec_commands(out, engine):
            print(f"  {line}")
        print(f"then run them with: vlmopt run {out} --backend tensorrt --image IMAGE --prompt TEXT")
        return EXIT_ENGINES_NOT_BUILT
    engines = build_engines(out, engine)
    for entry in engines.values():
        print(f"engine {entry['file']}: {entry['bytes'] / 2**20:.1f} MiB, {entry['precision']}, built in {entry['build_seconds']:.1f} s")
    return 0


def print_summary(manifest: dict, out: Path) -> None:
    rows = []
    for name, entry in manifest["graphs"].items():
        error = entry.get("max_abs_error")
        rows.append([name, entry["file"], f"{entry['bytes'] / 2**20:.2f}", f"{entry['export_seconds']:.1f}",
                     "not checked" if error is None else f"{error:.2g}"])
    check = manifest["verification"]
    print(f"exported {manifest['model']} ({manifest['family']}; passes: {', '.join(manifest['passes']) or 'none'}) "
          f"to {out} in {manifest['export_seconds']:.1f} s, opset {manifest['opset']}")
    print(markdown_table(["graph", "file", "MiB", "export s", "max |ort - torch|"], rows))
    layout = manifest["layout"]
    print(f"layout: {'×'.join(map(str, layout['image_size']))} px images, {layout['kept_per_image']} of "
          f"{layout['tokens_per_image']} visual tokens reach the LLM; tolerance atol={check['atol']} rtol={check['rtol']}")
    segments = manifest["text"].get("cache_segments", [])
    if segments:
        print(f"cut inside the LLM before layer(s) {', '.join(map(str, segments))}: each segment's cache has its own "
              "length; one image per prompt row")


def print_trt_check(out: Path, manifest: dict, verbose: bool) -> bool:
    from vlmopt.export.trt_check import check_tensorrt

    reports = [check_tensorrt(out / entry["file"]) for entry in manifest["graphs"].values()]
    for report in reports:
        if verbose or not report.ok:
            print(report.format())
    ready = all(r.ok for r in reports)
    if not verbose:
        print("TensorRT check: " + ("every graph is TensorRT-ready" if ready else "NOT TensorRT-ready (see above)"))
    return ready
