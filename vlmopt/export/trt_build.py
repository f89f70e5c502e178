"""TensorRT engines from the exported ONNX graphs (TensorRT 10's Python API), or the ``trtexec``
commands that build them elsewhere.

:func:`build_engines` parses each graph with ``trt.OnnxParser``, sets one optimisation profile over
the dynamic axes (min / opt / max from :func:`profile_shapes`), the ``FP16`` / ``BF16`` builder
flags and a timing cache (``timing.cache``, reused across graphs and runs), and writes
``NAME.plan`` with ``build_serialized_network``. Where TensorRT or a CUDA GPU is missing,
:func:`tensorrt_status` says which, and :func:`trtexec_commands` gives the equivalent command lines.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmopt.errors import MissingDependencyError
from vlmopt.export.errors import ExportError, TensorRTCompatibilityError
from vlmopt.export.manifest import GRAPHS, read_manifest, write_manifest

TIMING_CACHE = "timing.cache"
ENGINE_SUFFIX = ".plan"


@dataclass(frozen=True)
class EngineConfig:
    """Options of :func:`build_engines`."""

    fp16: bool = False
    """Allow FP16 kernels (``BuilderFlag.FP16``); inputs and outputs stay in the ONNX types."""
    bf16: bool = False
    """Allow BF16 kernels (``BuilderFlag.BF16``; Ampere or newer)."""
    workspace_mib: int | None = None
    """Builder workspace limit in MiB (None: TensorRT's default, the device memory)."""
    opt_batch: int = 1
    """Batch size the profile optimises for."""
    opt_sequence: int | None = None
    """Prompt length the profile optimises for (None: one image + 64 text tokens)."""


def tensorrt_status() -> str | None:
    """None when TensorRT 10 and a CUDA GPU are usable here; else a sentence naming what is missing."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError as error:
        missing.append(f"the TensorRT Python package (`import tensorrt` fails: {error}; install TensorRT 10 "
                       "from NVIDIA, e.g. pip install 'vlmopt[tensorrt]' with NVIDIA's package index reachable)")
    import torch

    if not torch.cuda.is_available():
        missing.append("an NVIDIA GPU with a working CUDA driver (torch.cuda.is_available() is False)")
    return " and ".join(missing) if missing else None


def _dim_value(dim: Any, values: dict[str, int]) -> int:
    """The size of one ONNX dim: an int, a dim name, or a sum like ``past_sequence + 1``."""
    if isinstance(dim, int):
        return dim
    total = 0
    for sign, term in re.findall(r"([+-]?)\s*([A-Za-z_][A-Za-z0-9_]*|\d+)", dim):
        value = int(term) if term.isdigit() else values[term]
        total += -value if sign == "-" else value
    return total


def profile_shapes(manifest: dict[str, Any], graph: str, engine: EngineConfig | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min, opt, max)}`` shapes of one graph's inputs, from the manifest's dim names."""
    engine = engine or EngineConfig()
    limits, layout = manifest["limits"], manifest["layout"]
    max_batch, max_seq = limits["max_batch"], limits["max_sequence"]
    kept = layout["kept_per_image"]
    opt_seq = min(max_seq, engine.opt_sequence or layout["tokens_per_image"] + 64)
    opt_batch = min(engine.opt_batch, max_batch)
    bounds = {
        "batch": (1, opt_batch, max_batch),
        "sequence": (1, opt_seq, max_seq),
        "kept_sequence": (1, opt_seq - layout["tokens_per_image"] + kept, max_seq),
        "visual_tokens": (kept, kept * opt_batch, kept * max_batch),
        "past_sequence": (1, opt_seq, max_seq - 1),
    }
    for layer in manifest["text"].get("cache_segments", []):  # layers after a cut inside the LLM cache fewer tokens
        bounds[f"past_sequence_from_{layer}"] = bounds["past_sequence"]
    shapes = {}
    for spec in manifest["graphs"][graph]["inputs"]:
        picks = [
            tuple(_dim_value(d, {name: b[i] for name, b in bounds.items()}) for d in spec["shape"]) for i in range(3)
        ]
        shapes[spec["name"]] = tuple(picks)
    return shapes


def trtexec_commands(directory: str | Path, engine: EngineConfig | None = None) -> list[str]:
    """One ``trtexec`` command per graph that builds the same engines as :func:`build_engines`."""
    engine = engine or EngineConfig()
    directory = Path(directory)
    manifest = read_manifest(directory)
    lines = []
    for graph in GRAPHS:
        shapes = profile_shapes(manifest, graph, engine)
        parts = [
            "trtexec",
            f"--onnx={directory / manifest['graphs'][graph]['file']}",
            f"--saveEngine={directory / (graph + ENGINE_SUFFIX)}",
            f"--timingCacheFile={directory / TIMING_CACHE}",
        ]
        dynamic = {name: s for name, s in shapes.items() if s[0] != s[2]}
        for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            if dynamic:
                parts.append(flag + "=" + ",".join(f"{name}:{'x'.join(map(str, s[index]))}" for name, s in shapes.items()))
        if engine.fp16:
            parts.append("--fp16")
        if engine.bf16:
            parts.append("--bf16")
        lines.append(" ".join(parts))
    return lines


def build_engines(directory: str | Path, engine: EngineConfig | None = None) -> dict[str, Any]:
    """Build and serialise a TensorRT engine for each graph of an export directory.

    Refuses graphs the compatibility check rejects; raises :class:`MissingDependencyError` (naming
    what is missing and the ``trtexec`` lines) where TensorRT or a GPU is missing. Returns the
    manifest's new ``engines`` entry (also written to ``manifest.json``).
    """
    from vlmopt.export.trt_check import check_tensorrt

    engine = engine or EngineConfig()
    directory = Path(directory)
    manifest = read_manifest(directory)
    reports = [check_tensorrt(directory / manifest["graphs"][g]["file"]) for g in GRAPHS]
    rejected = [r for r in reports if not r.ok]
    if rejected:
        raise TensorRTCompatibilityError("\n".join(r.format() for r in rejected))
    missing = tensorrt_status()
    if missing is not None:
        commands = "\n  ".join(trtexec_commands(directory, engine))
        raise MissingDependencyError(
            f"building TensorRT engines needs {missing}. The ONNX graphs in {directory} passed the TensorRT check; "
            f"build the engines on a machine with TensorRT 10 and an NVIDIA GPU with:\n  {commands}"
        )
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = directory / TIMING_CACHE
    engines = {}
    for graph in GRAPHS:
        start = time.perf_counter()
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        onnx_path = directory / manifest["graphs"][graph]["file"]
        if not parser.parse_from_file(str(onnx_path)):
            errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}")
        config = builder.create_builder_config()
        if engine.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if engine.bf16:
            config.set_flag(trt.BuilderFlag.BF16)
        if engine.workspace_mib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, engine.workspace_mib * 2**20)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        shapes = profile_shapes(manifest, graph, engine)
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(f"TensorRT could not build an engine for {onnx_path} (see the TensorRT log above)")
        engine_path = directory / f"{graph}{ENGINE_SUFFIX}"
        engine_path.write_bytes(memoryview(serialized))
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
        engines[graph] = {
            "file": engine_path.name,
            "bytes": engine_path.stat().st_size,
            "build_seconds": round(time.perf_counter() - start, 3),
            "precision": "fp16" if engine.fp16 else "bf16" if engine.bf16 else "fp32",
            "profile": {name: [list(s) for s in triple] for name, triple in shapes.items()},
            "tensorrt_version": trt.__version__,
        }
    manifest["engines"] = engines
    write_manifest(directory, manifest)
    return engines


def engine_files(directory: Path, manifest: dict[str, Any]) -> dict[str, Path] | None:
    """The engine of each graph: from the manifest, else ``NAME.plan`` files (built by ``trtexec``)."""
    if manifest.get("engines"):
        return {g: directory / manifest["engines"][g]["file"] for g in GRAPHS}
    found = {g: directory / f"{g}{ENGINE_SUFFIX}" for g in GRAPHS}
    return found if all(p.exists() for p in found.values()) else None
