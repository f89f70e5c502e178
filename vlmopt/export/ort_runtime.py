"""Generate text from an export directory with onnxruntime (or TensorRT engines), no PyTorch modules.

>>> vlm = OnnxVLM("build/")
>>> vlm.generate_text(Image.open("cat.png"), "What is in the picture?", max_new_tokens=16)
{'text': '...', 'token_ids': [...]}
>>> vlm.generate(input_ids, attention_mask, pixel_values=pixels, max_new_tokens=8)   # numpy [B, S + new]

Per prompt batch: the vision graph runs once per image (the export's fixed layout), the kept
tokens are placed at their slots, positions and the surviving sequence are planned in numpy
(:mod:`vlmopt.export.planning`), the prefill graph fills the cache, and the decode graph runs one
token at a time with the cache passed explicitly. A model cut inside the LLM (HalfV) caches fewer
tokens from each cut's layer K on: the prefill returns one 2-D mask per segment of layers
(``attention_mask_from_K``), and each is extended by one per step and fed back to the decode graph,
like :meth:`CompiledVLM.generate` does. Greedy (with the model's repetition penalty, as
``CompiledVLM.generate``); rows stop at an end token and are padded after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vlmopt.errors import InputError, MissingDependencyError
from vlmopt.export import planning
from vlmopt.export.errors import ModelDirectoryError
from vlmopt.export.manifest import GRAPHS, check_onnx_file, read_manifest


class GraphRunner(Protocol):
    """One exported graph, ready to run: ``run(feeds) -> {output name: array}``."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OrtGraph:
    """An onnxruntime session of one graph (``providers``: onnxruntime's execution providers in order
    of preference, default the CPU's; ``session.get_providers()`` says which ones it took)."""

    def __init__(self, path: Path, threads: int | None = None, providers: Sequence[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise MissingDependencyError(f"running an ONNX export needs onnxruntime ({error}); pip install 'vlmopt[onnx]'") from error
        check_onnx_file(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as error:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types
            raise ModelDirectoryError(
                f"onnxruntime cannot load {path} ({type(error).__name__}: {error}); the file or its external data "
                "is corrupt: re-create the directory with `vlmopt export`"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, {name: feeds[name] for name in self.input_names})
        return dict(zip(self.output_names, values))


class WithConstants:
    """A graph whose constant outputs (fixed by the layout) live in the manifest, not in the graph."""

    def __init__(self, graph: GraphRunner, constants: dict[str, dict]) -> None:
        self.graph = graph
        self.constants = {name: np.asarray(c["value"], dtype=c["dtype"]) for name, c in constants.items()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**self.graph.run(feeds), **self.constants}


@dataclass
class PlannedPrompt:
    """Prefill feeds of one batch, and what decoding continues from."""

    feeds: dict[str, np.ndarray]
    """Inputs of the prefill graph."""
    next_position: np.ndarray
    """Position ids of the first generated token: [B, 1] or [3, B, 1]."""


class OnnxVLM:
    """An exported VLM: plans inputs in numpy and runs the graphs with onnxruntime or TensorRT.

    ``backend``: ``"onnxruntime"``, ``"tensorrt"`` (engines built by ``vlmopt export --format trt``;
    needs TensorRT and a CUDA GPU), or ``"auto"`` (TensorRT engines when they exist and can run).
    ``providers``: onnxruntime's execution providers, e.g. ``["CUDAExecutionProvider",
    "CPUExecutionProvider"]`` with onnxruntime-gpu (default: the CPU's).
    """

    def __init__(
        self, directory: str | Path, backend: str = "onnxruntime", threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.layout = self.manifest["layout"]
        self.text = self.manifest["text"]
        self.backend = self._choose_backend(backend)
        if self.backend == "tensorrt":
            from vlmopt.export.trt_build import engine_files
            from vlmopt.export.trt_runtime import TRTGraph

            files = engine_files(self.directory, self.manifest)
            self.graphs: dict[str, GraphRunner] = {name: TRTGraph(files[name]) for name in GRAPHS}
        else:
            self.graphs = {
                name: OrtGraph(self.directory / self.manifest["graphs"][name]["file"], threads, providers) for name in GRAPHS
            }
        for name in GRAPHS:
            constants = self.manifest["graphs"][name].get("constant_outputs")
            if constants:
                self.graphs[name] = WithConstants(self.graphs[name], constants)
        self._processor = None

    def _choose_backend(self, backend: str) -> str:
        if backend not in ("onnxruntime", "tensorrt", "auto"):
            raise InputError(f"backend must be onnxruntime, tensorrt or auto, got {backend!r}")
        if backend == "onnxruntime":
            return backend
        from vlmopt.export.trt_build import engine_files, tensorrt_status

        missing = tensorrt_status()
        engines = engine_files(self.directory, self.manifest)
        if backend == "auto":
            return "tensorrt" if engines and missing is None else "onnxruntime"
        if missing is not None:
            raise MissingDependencyError(f"the TensorRT backend needs {missing}; use --backend onnxruntime here")
        if not engines:
            raise ModelDirectoryError(
                f"{self.directory} has no TensorRT engines; build them with `vlmopt export ... --format trt --out {self.directory}`"
            )
        return "tensorrt"

    @property
    def providers(self) -> dict[str, list[str]]:
        """Per graph, the onnxruntime execution providers its session runs on (none for TensorRT engines)."""
        sessions = {name: getattr(getattr(graph, "graph", graph), "session", None) for name, graph in self.graphs.items()}
        return {name: session.get_providers() if session is not None else [] for name, session in sessions.items()}

    def __repr__(self) -> str:
        passes = ", ".join(self.manifest["passes"]) or "no passes"
        return f"OnnxVLM({self.manifest['model']}; {passes}; {self.backend}; {self.directory})"

    # ----- processor-level API ----------------------------------------------------------------
    @property
    def processor(self):
        """The processor saved with the export (None for random-weight models, which have none)."""
        if self._processor is None and self.manifest.get("processor"):
            from vlmopt.export.inputs import load_processor

            self._processor = load_processor(self.directory)
        return self._processor

    def generate_text(self, image, prompt: str, max_new_tokens: int | None = None) -> dict[str, Any]:
        """Greedy answer to ``prompt`` about ``image`` (a PIL image or a path): ``{"text", "token_ids"}``."""
        from vlmopt.export.inputs import encode_prompt

        if self.processor is None:
            raise InputError(
                f"{self.directory} holds no processor (the model was exported without one), so text prompts cannot be "
                "tokenized; call OnnxVLM.generate with input_ids and pixel_values instead"
            )
        batch = encode_prompt(self.processor, self.text.get("prompt_template"), image, prompt, tuple(self.layout["image_size"]))
        ids = self.generate(**batch, max_new_tokens=max_new_tokens)
        new = ids[0, batch["input_ids"].shape[1] :].tolist()
        text = self.processor.batch_decode([new], skip_special_tokens=True)[0]
        return {"text": text.strip(), "token_ids": new}

    # ----- tensor-level API ---------------------------------------------------------------------
    def plan(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        mm_token_type_ids: np.ndarray | None = None,
        image_sizes: np.ndarray | None = None,
        batch_num_images: np.ndarray | None = None,
    ) -> PlannedPrompt:
        """Run the vision graph per image and plan the prefill feeds of one batch (``image_sizes`` and
        ``batch_num_images``, where the processor gives them, must be the export's: one image of its size a prompt)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, sequence], got shape {input_ids.shape}")
        batch, seq = input_ids.shape
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != input_ids.shape:
            raise InputError(f"attention_mask has shape {mask.shape} but input_ids has {input_ids.shape}")
        layout = self.layout
        self._check_sizes(image_sizes, batch_num_images)
        slots = planning.visual_slots(input_ids, layout["image_token_id"], layout["tokens_per_image"])
        if not slots:
            raise InputError("the prompt has no image tokens; this export runs prompts with one image each")
        if layout.get("visual_tokens_per_row") is not None:
            per_row = (input_ids == layout["image_token_id"]).sum(axis=1)
            if not np.all(per_row == layout["tokens_per_image"]):
                raise InputError(
                    f"this export cuts visual tokens inside the LLM ({', '.join(self.manifest['passes'])}) and is fixed to one "
                    f"image of {layout['tokens_per_image']} tokens in every row; the rows hold {per_row.tolist()} image "
                    "tokens: give every prompt of the batch exactly one image"
                )
        images = self._images(pixel_values, image_grid_thw, len(slots))
        embeds, kept = [], []
        for pixels, image_slots in zip(images, slots):
            out = self.graphs["vision"].run({"pixel_values": pixels})
            embeds.append(out["visual_embeds"])
            kept.append(image_slots[out["visual_index"]] if layout["pruned"] else image_slots)
        if self.text["positions"] == "mrope":
            types = mm_token_type_ids if mm_token_type_ids is not None else (input_ids == layout["image_token_id"]).astype(np.int64)
            grids = [tuple(layout["grid_thw"])] * len(slots)
            positions = planning.mrope_positions(input_ids, mask, np.asarray(types), grids, layout["spatial_merge_size"])
        else:
            positions = planning.generation_positions(mask)
        feeds = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
            "visual_embeds": np.concatenate(embeds).astype(self.manifest["dtype"]),
            "visual_slots": np.concatenate(kept).astype(np.int64),
        }
        for name, kind in layout["sequence_inputs"].items():
            if kind not in planning.SEQUENCE_PLANNERS:
                raise ModelDirectoryError(f"this runtime cannot plan the input {name!r} ({kind}); update vlmopt")
            feeds[name] = planning.SEQUENCE_PLANNERS[kind](input_ids, layout["image_token_id"])
        for name, kind in layout["planned_inputs"].items():
            if kind != "sequence_keep_index":
                raise ModelDirectoryError(f"this runtime cannot plan the input {name!r} ({kind}); update vlmopt")
            feeds[name] = planning.sequence_keep_index(np.concatenate(slots), feeds["visual_slots"], batch, seq)
        return PlannedPrompt(feeds, positions[..., -1:] + 1)

    def _check_sizes(self, image_sizes, batch_num_images) -> None:
        """Refuse images whose original size or grouping differs from the export's (tiled towers cut an
        image by its size: another size means other tiles, unpadding and token count)."""
        size = [int(v) for v in self.layout["image_size"]]
        if image_sizes is not None:
            sizes = np.asarray(image_sizes).reshape(-1, 2).tolist()
            if any(s != size for s in sizes):
                raise InputError(
                    f"this export was built for {size[1]}×{size[0]} px images (its tile count and token layout follow "
                    f"from that size); image_sizes says {sizes}: resize each image to {size[1]}×{size[0]} first"
                )
        if batch_num_images is not None and np.any(np.asarray(batch_num_images) != 1):
            raise InputError(f"this export takes one image per prompt; batch_num_images is {np.asarray(batch_num_images).tolist()}")

    def _images(self, pixel_values, image_grid_thw, count: int) -> list[np.ndarray]:
        """One array per image, each of the export's pixel shape (a clear error otherwise)."""
        if pixel_values is None:
            raise InputError(f"the prompt has {count} image(s) but no pixel_values were given")
        pixels = np.asarray(pixel_values, dtype=self.manifest["dtype"])
        shape = tuple(self.layout["pixel_shape"])
        if pixels.ndim == len(shape) + 1:  # one list of images per prompt, padded with all-zero images: the real ones
            flat = pixels.reshape(-1, *pixels.shape[2:])
            pixels = flat[np.any(flat != 0, axis=tuple(range(1, flat.ndim)))]
        size = "×".join(map(str, self.layout["image_size"]))
        if self.text["positions"] == "mrope":
            grid = tuple(self.layout["grid_thw"])
            grids = [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw).reshape(-1, 3)] if image_grid_thw is not None else []
            if grids != [grid] * count:
                raise InputError(f"this export takes {size} px images (grid {grid}); got grids {grids}: resize the image to {size}")
            return [pixels[i * shape[0] : (i + 1) * shape[0]] for i in range(count)]
        if pixels.shape != (count, *shape[1:]):
            tiles = f", each cut into {shape[1]} tiles (the base image included)" if len(shape) == 5 else ""
            raise InputError(f"this export takes pixel_values of shape {(count, *shape[1:])} ({size} px images{tiles}), "
                             f"got {pixels.shape}: resize each image to {size} px first")
        return [pixels[i : i + 1] for i in range(count)]

    def prefill(self, prompt: PlannedPrompt) -> dict[str, np.ndarray]:
        """Run the prefill graph: ``logits`` [B, 1, V], ``kept_attention_mask`` [B, S'], ``present.*``."""
        return self.graphs["prefill"].run(prompt.feeds)

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        mm_token_type_ids: np.ndarray | None = None,
        max_new_tokens: int | None = None,
        image_sizes: np.ndarray | None = None,
        batch_num_images: np.ndarray | None = None,
    ) -> np.ndarray:
        """Greedy generation: [B, S + new] ids (prompt, then new tokens; pad after an end token)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        max_new = self.text["max_new_tokens"] if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new, int) or max_new < 1:
            raise InputError(f"max_new_tokens must be a whole number ≥ 1, got {max_new!r}")
        prompt = self.plan(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, image_sizes, batch_num_images)
        out = self.prefill(prompt)
        num_layers = self.text["num_layers"]
        present = [out[f"present.{i}.{kind}"] for i in range(num_layers) for kind in ("key", "value")]
        mask, position, sequences = out["kept_attention_mask"], prompt.next_position, input_ids
        segments = {name: out[name] for name in (f"attention_mask_from_{k}" for k in self.text["cache_segments"])}
        eos = np.asarray(self.text["eos_token_ids"], dtype=np.int64)
        pad, penalty = self.text["pad_token_id"], self.text["repetition_penalty"]
        unfinished = np.ones(input_ids.shape[0], dtype=bool)
        logits = out["logits"]
        for step in range(max_new):
            scores = logits[:, -1, :].astype(np.float32)
            if penalty != 1.0:
                scores = planning.repetition_penalty(scores, sequences, penalty)
            tokens = scores.argmax(-1).astype(np.int64)
            if eos.size:
                tokens = np.where(unfinished, tokens, pad)
                unfinished &= ~np.isin(tokens, eos)
            sequences = np.concatenate([sequences, tokens[:, None]], axis=1)
            if not unfinished.any() or step == max_new - 1:
                break
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
            segments = {name: np.concatenate([m, np.ones((m.shape[0], 1), dtype=m.dtype)], axis=1) for name, m in segments.items()}
            feeds = {"input_ids": tokens[:, None], "attention_mask": mask, "position_ids": position, **segments}
            feeds.update({f"past.{i}.{kind}": present[2 * i + j] for i in range(num_layers) for j, kind in enumerate(("key", "value"))})
            out = self.graphs["decode"].run(feeds)
            present = [out[f"present.{i}.{kind}"] for i in range(num_layers) for kind in ("key", "value")]
            logits = out["logits"]
            position = position + 1
        return sequences
