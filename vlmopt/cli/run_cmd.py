"""``vlmopt run`` (an export directory, onnxruntime or TensorRT) and ``vlmopt generate`` (PyTorch).

    vlmopt run build/ --image cat.png --prompt "What is in the picture?" --max-new-tokens 16 --json out.json
    vlmopt generate --model tiny-llava --passes hiprune:keep_ratio=0.33 --image cat.png --prompt "..." --json out.json

Both answer greedily and print the text; ``--json`` writes ``{"text": ..., "token_ids": [...]}``
(the generated ids only). ``run`` resizes the image to the export's fixed size; ``generate`` does
the same with ``--image-size`` (so both see the same pixels).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmopt.cli.common import load_model, pass_lists, positive_int
from vlmopt.cli.export_cmd import add_pass_list_argument


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG)")
    parser.add_argument("--prompt", required=True, help="the question about the image")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    parser.add_argument("--json", metavar="PATH", help='write {"text": ..., "token_ids": [...]} to this file')


def add_parsers(subparsers) -> None:
    run = subparsers.add_parser("run", help="generate text from an exported model directory (no PyTorch modules)")
    run.add_argument("directory", help="directory written by `vlmopt export`")
    _add_common(run)
    run.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="auto",
                     help="auto: TensorRT engines when built and runnable here, else onnxruntime")
    run.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads")
    run.set_defaults(run=run_run)

    generate = subparsers.add_parser("generate", help="generate text with the compiled PyTorch model")
    generate.add_argument("--model", required=True, help="reference model name or local checkpoint directory")
    add_pass_list_argument(generate)
    _add_common(generate)
    generate.add_argument("--image-size", type=int, help="resize the image to this square size first (as an export does)")
    generate.set_defaults(run=run_generate)


def _check_max_new(value: int) -> None:
    from vlmopt.errors import InputError

    if value < 1:
        raise InputError(f"--max-new-tokens must be ≥ 1, got {value}")


def _check_json_target(path: str | None) -> None:
    """Fail before any work if ``--json`` cannot be written."""
    from vlmopt.errors import InputError

    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise InputError(f"--json {target} is a directory; pass a file path")
    if not target.parent.exists():
        raise InputError(f"--json {target}: the directory {target.parent} does not exist")


def _emit(result: dict, path: str | None) -> None:
    from vlmopt.errors import InputError

    print(result["text"])
    if path is not None:
        try:
            Path(path).write_text(json.dumps(result, indent=2) + "\n")
        except OSError as error:
            raise InputError(f"cannot write --json {path} ({error.strerror or error})") from None


def run_run(args: argparse.Namespace) -> int:
    from vlmopt.export.inputs import load_image
    from vlmopt.export.ort_runtime import OnnxVLM

    _check_max_new(args.max_new_tokens)
    _check_json_target(args.json)
    image = load_image(args.image)
    vlm = OnnxVLM(args.directory, backend=args.backend, threads=args.threads)
    _emit(vlm.generate_text(image, args.prompt, max_new_tokens=args.max_new_tokens), args.json)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import torch

    import vlmopt
    from vlmopt import passes as passes_module
    from vlmopt.distributed.group import init_from_env, is_rank_zero
    from vlmopt.errors import InputError
    from vlmopt.export.inputs import encode_prompt, load_image, template_of

    _check_max_new(args.max_new_tokens)
    _check_json_target(args.json)
    image = load_image(args.image)
    lists = pass_lists(args.passes)
    if len(lists) > 1:
        raise InputError("generate takes one pass list (join several passes with '+')")
    resolved = [passes_module.parse(spec) for spec in (lists[0] if lists else [])]
    init_from_env()
    loaded = load_model(args.model)
    if loaded.processor is None:
        raise InputError(
            f"{args.model} is a random-weight config without a tokenizer or processor; pass a reference model "
            "(tiny-llava, tiny-qwen25vl) or a checkpoint directory with its processor files"
        )
    compiled = vlmopt.compile(loaded.model, passes=resolved)
    size = (args.image_size, args.image_size) if args.image_size else None
    batch = encode_prompt(loaded.processor, template_of(compiled.adapter), image, args.prompt, size)
    tensors = {key: torch.from_numpy(value) for key, value in batch.items()}
    ids = compiled.generate(**tensors, max_new_tokens=args.max_new_tokens, do_sample=False)
    if not is_rank_zero():  # under torchrun (APB-V's hosts as ranks) rank 0 alone writes
        return 0
    new = ids[0, batch["input_ids"].shape[1] :].tolist()
    text = loaded.processor.batch_decode([new], skip_special_tokens=True)[0].strip()
    _emit({"text": text, "token_ids": new}, args.json)
    return 0
