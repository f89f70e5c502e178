"""ONNX lowering: export a compiled VLM's graphs with ``torch.onnx.export(..., dynamo=True)``, check
them with onnxruntime, and write the export directory.

>>> from vlmopt.export import export_onnx
>>> manifest = export_onnx(model, "build/", passes=["random_prune:keep_ratio=0.5"])

The directory holds ``vision.onnx``, ``prefill.onnx``, ``decode.onnx`` (see
:mod:`vlmopt.export.graphs`), ``manifest.json`` and, when the model has one, its processor. After
writing each graph the exporter runs it with onnxruntime on the example inputs and raises
:class:`VerificationError` if any output differs from PyTorch by more than
``atol + rtol·|torch|`` (cache rows of padding slots excluded: they are never read).

``TRANSFORMERS_DISABLE_TORCH_CHECK`` is not needed and not set: the only ``torch_compilable_check``
on LLaVA's path sits in HF's ``get_placeholder_mask``, which the pipeline graphs replace by
``vlmopt::merge_visual``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import vlmopt
from vlmopt.errors import MissingDependencyError
from vlmopt.export.config import ExportConfig
from vlmopt.export.errors import ExportError, VerificationError
from vlmopt.export.graphs import GraphSpec, build_graphs, segment_first_layers, segment_mask_names
from vlmopt.export.manifest import FORMAT_VERSION, write_manifest
from vlmopt.export.onnx_ops import translation_table
from vlmopt.runtime import CompiledVLM


def require_onnx() -> None:
    """Raise :class:`MissingDependencyError` unless onnx, onnxscript and onnxruntime import."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as error:
            raise MissingDependencyError(
                f"ONNX export needs {name} ({error}); install the extra: pip install 'vlmopt[onnx]'"
            ) from error


def writable_directory(out: str | Path) -> Path:
    """Create ``out`` if needed and check that files can be written there (a clear error if not)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vlmopt-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ExportError(
            f"cannot write to the output directory {out} ({error.strerror or error}); pass --out a directory you can write to"
        ) from None
    return out


def export_onnx(
    model: nn.Module | CompiledVLM,
    out: str | Path,
    passes: Sequence[Any] = (),
    config: ExportConfig | None = None,
    processor: Any = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Export ``model`` (a HF VLM, compiled here with ``passes``, or a :class:`CompiledVLM`) to ``out``.

    Returns the manifest (also written to ``out/manifest.json``).
    """
    require_onnx()
    config = config or ExportConfig()
    if isinstance(model, CompiledVLM) and passes:
        raise ExportError("pass the passes to vlmopt.compile, or a plain model with passes, not both")
    out = writable_directory(out)
    compiled = model if isinstance(model, CompiledVLM) else vlmopt.compile(model, passes=passes)
    if "export" not in compiled.adapter.capabilities:
        from vlmopt.adapters.base import missing_capability

        raise ExportError(f"{type(compiled.adapter.model).__name__} does not export to ONNX — "
                          f"{missing_capability(compiled.adapter, 'export')}")
    if processor is not None:  # the processor the export's prompts are made with: one image is one fixed layout
        processor = compiled.adapter.export_processor(processor)
    if compiled.backend != "eager":
        compiled = vlmopt.compile(compiled.adapter.model, passes=compiled.passes)  # export traces the graphs eagerly
    start = time.perf_counter()
    with torch.no_grad():
        graphs, layout, split = build_graphs(compiled, processor, config)
    entries = {}
    for spec in graphs:
        table = translation_table(spec.module, spec.example, spec.name)
        entries[spec.name] = export_graph(spec, out, table, config)
    manifest = {
        "format_version": FORMAT_VERSION,
        "vlmopt_version": vlmopt.__version__,
        "model": model_name or type(compiled.adapter.model).__name__,
        "family": compiled.adapter.family,
        "passes": [p.spec() for p in compiled.passes],
        "opset": config.opset,
        "dtype": str(next(compiled.adapter.model.parameters()).dtype).removeprefix("torch."),
        "graphs": entries,
        "layout": layout_entry(compiled, layout, split),
        "text": text_entry(compiled, segment_mask_names(compiled)),
        "limits": {"max_batch": config.max_batch, "max_sequence": config.max_sequence},
        "verification": {"atol": config.atol, "rtol": config.rtol, "checked": config.verify},
        "processor": False,
        "export_seconds": round(time.perf_counter() - start, 3),
    }
    if processor is not None:
        from vlmopt.export.inputs import save_processor

        save_processor(processor, out)
        manifest["processor"] = True
    write_manifest(out, manifest)
    return manifest


@contextlib.contextmanager
def _quiet():
    """Silence torch.onnx's progress prints and warnings (errors still propagate)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_graph(spec: GraphSpec, out: Path, table: dict, config: ExportConfig) -> dict[str, Any]:
    """Export one graph to ``out/NAME.onnx``, check it with onnxruntime; its manifest entry."""
    path = out / f"{spec.name}.onnx"
    start = time.perf_counter()
    try:
        with _quiet():
            program = torch.onnx.export(
                spec.module,
                spec.example,
                dynamo=True,
                dynamic_shapes=spec.dynamic_shapes,
                custom_translation_table=table,
                opset_version=config.opset,
                input_names=spec.input_names,
                output_names=spec.output_names,
                verbose=False,
            )
    except Exception as error:
        raise ExportError(f"torch.onnx.export of the {spec.name} graph failed: {type(error).__name__}: {error}") from error
    weights = sum(value.const_value.nbytes for value in program.model.graph.initializers.values() if value.const_value is not None)
    external = weights > config.external_data_mb * 2**20
    for stale in (path, out / f"{spec.name}.onnx.data"):
        stale.unlink(missing_ok=True)
    program.save(path, external_data=external)
    constants = strip_constant_outputs(path)
    export_seconds = time.perf_counter() - start
    files = [path.name] + sorted(p.name for p in out.glob(f"{spec.name}.onnx.*"))
    entry = {
        "file": path.name,
        "external_data": files[1:],
        "bytes": sum((out / f).stat().st_size for f in files),
        "export_seconds": round(export_seconds, 3),
        **io_entry(path),
        "constant_outputs": {name: {"dtype": value.dtype.name, "value": value.tolist()} for name, value in constants.items()},
    }
    if config.verify:
        entry["max_abs_error"] = verify_graph(spec, path, config, constants)
    return entry


def strip_constant_outputs(path: Path) -> dict[str, np.ndarray]:
    """Remove graph outputs that are constants (e.g. PoolPrune's kept index, fixed by the layout).

    TensorRT engines should not return weights as outputs; the runtime reads these values from the
    manifest instead. Returns ``{output name: value}`` of the removed outputs.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer if not init.external_data}
    constant_nodes = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    found: dict[str, np.ndarray] = {}
    for output in graph.output:
        if output.name in initializers:
            found[output.name] = numpy_helper.to_array(initializers[output.name])
        elif output.name in constant_nodes:
            value = next((a for a in constant_nodes[output.name].attribute if a.name == "value"), None)
            if value is not None:
                found[output.name] = numpy_helper.to_array(value.t)
    if not found:
        return {}
    kept = [o for o in graph.output if o.name not in found]
    del graph.output[:]
    graph.output.extend(kept)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [init for init in graph.initializer if init.name in found and init.name not in read]
    for init in unused:
        graph.initializer.remove(init)
    onnx.save(model, str(path))
    return found


def io_entry(path: Path) -> dict[str, Any]:
    """Inputs and outputs of an ONNX file: name, element type, shape (dim names for dynamic axes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def ort_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session of ``path`` (``threads``: intra-op threads, default torch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_graph(spec: GraphSpec, path: Path, config: ExportConfig, constants: dict[str, np.ndarray] | None = None) -> float:
    """Run ``path`` with onnxruntime on the example inputs; raise if it differs from PyTorch.

    ``constants`` are outputs removed from the graph (:func:`strip_constant_outputs`), checked too.
    Returns the largest absolute error over all outputs.
    """
    constants = constants or {}
    with torch.no_grad():
        expected = (spec.reference or spec.module)(*spec.example)
    expected = [t.detach().cpu().numpy() for t in (expected if isinstance(expected, (tuple, list)) else (expected,))]
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(spec.input_names, spec.example)}
    computed = [name for name in spec.output_names if name not in constants]
    got = dict(zip(computed, ort_session(path).run(computed, feeds)))
    got = [got[name] if name in got else constants[name] for name in spec.output_names]
    values = {**feeds, **dict(zip(spec.output_names, expected))}
    worst, failures = 0.0, []
    for name, ref, ort_value in zip(spec.output_names, expected, got):
        if ref.shape != ort_value.shape:
            failures.append(f"{name}: shape {ort_value.shape} from onnxruntime, {ref.shape} from PyTorch")
            continue
        if name in spec.padding_masks:  # [B, H, S, D]: keep the slots whose mask is 1
            keep = values[spec.padding_masks[name]].astype(bool)
            ref, ort_value = ref.transpose(0, 2, 1, 3)[keep], ort_value.transpose(0, 2, 1, 3)[keep]
        if not np.issubdtype(ref.dtype, np.floating):
            if not np.array_equal(ref, ort_value):
                failures.append(f"{name}: integer outputs differ in {int((ref != ort_value).sum())} places")
            continue
        error = np.abs(ort_value.astype(np.float64) - ref.astype(np.float64))
        worst = max(worst, float(error.max(initial=0.0)))
        bound = config.atol + config.rtol * np.abs(ref.astype(np.float64))
        if not np.all(error <= bound):
            failures.append(f"{name}: max |ort - torch| = {error.max():.3g} exceeds atol={config.atol} + rtol={config.rtol}·|torch|")
    if failures:
        raise VerificationError(
            f"{path.name}: onnxruntime disagrees with PyTorch on the example inputs:\n  " + "\n  ".join(failures)
            + "\nThis is an exporter bug (an op translation or a lowering stand-in); please report it with the model config."
        )
    return worst


def layout_entry(compiled: CompiledVLM, layout, split) -> dict[str, Any]:
    """The fixed layout the runtime plans for (see :class:`vlmopt.export.graphs.FixedLayout`)."""
    config = compiled.config
    entry = {
        "image_size": list(layout.image_size),
        "pixel_shape": list(layout.pixel_shape),
        "tokens_per_image": layout.tokens_per_image,
        "kept_per_image": layout.kept_per_image,
        "pruned": split.pruned,
        "planned_inputs": {p.name: p.kind for p in split.planned},
        # prefill inputs [B, S] planned from the token ids: name -> planning.SEQUENCE_PLANNERS key
        "sequence_inputs": {name: kind for name, kind in compiled.adapter.export_sequence_inputs.items() if name in split.llm_inputs},
        "image_token_id": int(config.image_token_id),
        # graphs cut inside the LLM are bound to one image per row, of this many tokens (else None)
        "visual_tokens_per_row": layout.kept_per_image if split.row_bound else None,
    }
    if layout.grid_thw is not None:
        vision = config.vision_config
        entry.update(
            grid_thw=list(layout.grid_thw),
            spatial_merge_size=int(vision.spatial_merge_size),
            patch_size=int(vision.patch_size),
            temporal_patch_size=int(vision.temporal_patch_size),
            video_token_id=int(config.video_token_id),
        )
    return entry


def text_entry(compiled: CompiledVLM, segments: Sequence[str] = ()) -> dict[str, Any]:
    """Facts about the language model the runtime needs (cache shapes, positions, generation).

    ``cache_segments``: the first layer K of every cut inside the LLM: the prefill returns
    ``attention_mask_from_K`` and the decode graph takes it, extended by one per step."""
    from vlmopt.generation import GenerationSettings

    text = compiled.config.get_text_config()
    settings = GenerationSettings.resolve(compiled.generation_config, do_sample=False)
    heads = text.num_attention_heads
    from vlmopt.export.inputs import template_of

    return {
        "prompt_template": template_of(compiled.adapter),
        "num_layers": int(text.num_hidden_layers),
        "num_key_value_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        "vocab_size": int(text.vocab_size),
        "positions": "mrope" if compiled.adapter.position_dims == (1, 2) else "1d",
        "cache_segments": segment_first_layers(list(segments)),
        "eos_token_ids": list(settings.eos_token_ids),
        "pad_token_id": settings.pad_token_id,
        "repetition_penalty": settings.repetition_penalty,
        "max_new_tokens": settings.max_new_tokens,
    }


def file_sizes(directory: str | Path) -> dict[str, int]:
    """Bytes on disk of each graph of an export directory (its ``.onnx`` plus external data)."""
    from vlmopt.export.manifest import read_manifest

    manifest = read_manifest(directory)
    return {name: entry["bytes"] for name, entry in manifest["graphs"].items()}


__all__ = ["ExportConfig", "export_onnx", "file_sizes", "ort_session", "require_onnx", "verify_graph", "writable_directory"]
