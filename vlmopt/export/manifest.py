"""``manifest.json``: what an export directory holds, and the checks that a directory is usable.

The manifest is plain JSON so that the runtime (numpy + onnxruntime or TensorRT) needs no PyTorch
module: it says which graphs exist, their inputs and outputs, the fixed layout (image size, visual
tokens per image before and after pruning, token ids), how positions are made, and what the export
checked (the tolerance and the largest error measured against PyTorch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmopt.export.errors import ModelDirectoryError

MANIFEST = "manifest.json"
FORMAT_VERSION = 3
"""Version 2 added ``text.cache_segments`` (per-segment decode masks of a model cut inside the LLM)
and ``layout.visual_tokens_per_row``; version 3 ``layout.sequence_inputs`` (prefill inputs planned
from the token ids). Older manifests read as having none of them."""
READABLE_VERSIONS = (1, 2, 3)
GRAPHS = ("vision", "prefill", "decode")


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export directory, after checking the directory and the files it names.

    Raises :class:`ModelDirectoryError` naming the missing or corrupt file and the fix.
    """
    directory = Path(directory)
    fix = "re-create it with `vlmopt export --model NAME --format onnx --out DIR`"
    if not directory.exists():
        raise ModelDirectoryError(f"export directory {directory} does not exist; {fix}")
    if not directory.is_dir():
        raise ModelDirectoryError(f"{directory} is not a directory; pass the directory `vlmopt export --out` wrote")
    path = directory / MANIFEST
    if not path.exists():
        raise ModelDirectoryError(f"{directory} has no {MANIFEST}, so it is not a vlmopt export; {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelDirectoryError(f"{path} is corrupt ({error}); {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_VERSIONS:
        raise ModelDirectoryError(
            f"{path} is not a vlmopt manifest of version {', '.join(map(str, READABLE_VERSIONS[:-1]))} or {READABLE_VERSIONS[-1]} (found "
            f"{manifest.get('format_version') if isinstance(manifest, dict) else type(manifest).__name__}); {fix}"
        )
    for key in ("family", "graphs", "layout", "text"):
        if key not in manifest:
            raise ModelDirectoryError(f"{path} lacks the {key!r} entry; {fix}")
    manifest["text"].setdefault("cache_segments", [])  # version 1: no cut inside the LLM
    manifest["layout"].setdefault("visual_tokens_per_row", None)
    manifest["layout"].setdefault("sequence_inputs", {})  # versions 1 and 2
    for name in GRAPHS:
        entry = manifest["graphs"].get(name)
        if entry is None:
            raise ModelDirectoryError(f"{path} lists no {name} graph; {fix}")
        for file in [entry["file"], *entry.get("external_data", [])]:
            if not (directory / file).exists():
                raise ModelDirectoryError(f"{directory / file} is missing (the {name} graph); {fix}")
    return manifest


def check_onnx_file(path: Path) -> None:
    """Parse ``path`` as ONNX (without its external weights); a clear error if it is not."""
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf raises DecodeError and others, depending on the damage
        raise ModelDirectoryError(
            f"{path} is not a readable ONNX model ({type(error).__name__}: {error}); the file is corrupt or "
            "truncated: re-create the directory with `vlmopt export`"
        ) from None
