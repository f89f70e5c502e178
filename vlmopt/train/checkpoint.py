"""Loading a checkpoint folder's weights into a live model, read the way ``from_pretrained`` reads them.

``save_pretrained`` (and so every ``Trainer`` checkpoint) writes many VLMs' weights in their original
key format (a LLaVA's ``language_model.model.layers.0…``, not the module's
``model.language_model.layers.0…``), and may transform tensors on the way out. ``from_pretrained``
undoes that with the model's checkpoint conversion mapping; ``Trainer``'s resume and best-model reload
call plain ``load_state_dict`` instead, which matches no key, warns, and trains on from the weights
the model had. :func:`load_weights` reads a single-file or sharded checkpoint (safetensors or
``.bin``) through the model's own conversion (``transformers.conversion_mapping``), checks that every
tensor lands, and only then copies the values into the model's parameters in place: the parameter
objects stay the same, so a compiled model, an optimizer or tied weights that hold them keep working.
A checkpoint that does not fit is refused with :class:`~vlmopt.errors.CheckpointError`, naming the
folder and the keys, and the model is left untouched.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from vlmopt.errors import CheckpointError

#: Keys listed per kind of problem in a refusal (the count says how many more there are).
SHOWN_KEYS = 12


@dataclass
class WeightReport:
    """How a checkpoint's tensors map onto a model's state dict (keys in the model's format)."""

    missing: list[str] = field(default_factory=list)
    """Model weights the checkpoint does not hold (tied copies of loaded weights excepted)."""
    unexpected: list[str] = field(default_factory=list)
    """Checkpoint tensors no model weight takes, named as after the key conversion."""
    mismatched: list[str] = field(default_factory=list)
    """``key: checkpoint shape vs model shape`` for tensors of the wrong shape."""
    errors: list[str] = field(default_factory=list)
    """Failures of the conversion itself (a transform that could not apply)."""

    @property
    def complete(self) -> bool:
        """Does every model weight get exactly one checkpoint tensor of its shape?"""
        return not (self.missing or self.unexpected or self.mismatched or self.errors)


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The weight files of a checkpoint folder: one ``model.safetensors`` / ``pytorch_model.bin``, or
    the shards an index lists; empty when the folder holds no full-model weights (an adapter-only or
    FSDP checkpoint)."""
    folder = os.fspath(folder)
    for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    for name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        index = os.path.join(folder, name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            absent = [shard for shard in shards if not os.path.isfile(os.path.join(folder, shard))]
            if absent:
                raise CheckpointError(f"{folder}: {name} lists shards that are not in the folder: {', '.join(absent)}")
            return [os.path.join(folder, shard) for shard in shards]
    return []


def _read_tensors(files: list[str], stack: contextlib.ExitStack) -> dict[str, object]:
    """Every tensor of ``files`` by checkpoint key: lazy safetensors slices (as ``from_pretrained``
    reads them; the files stay open while ``stack`` is) or tensors of a ``.bin`` file."""
    from safetensors import safe_open

    tensors: dict[str, object] = {}
    for path in files:
        if path.endswith(".safetensors"):
            handle = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            names = handle.keys()  # a safetensors file handle, not a dict: it does not iterate its keys
            tensors.update({key: handle.get_slice(key) for key in names})
        else:
            tensors.update(torch.load(path, map_location="cpu", weights_only=True))
    return tensors


def _shadow(model: nn.Module) -> nn.Module:
    """An empty (meta-device) model of ``model``'s class and config for the conversion to fill: the
    conversion sets new parameter objects on the model it loads, which the live model must not get."""
    with torch.device("meta"):
        shadow = type(model)(copy.deepcopy(model.config))
    floating = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    # With one dtype, converting in it is what copying into the model does anyway; with several, the
    # shadow stays in float32, which holds every half- or single-precision value exactly.
    return shadow.to(floating.pop()) if len(floating) == 1 else shadow


def converted_state_dict(model: nn.Module, folder: str | os.PathLike) -> tuple[dict[str, Tensor], WeightReport]:
    """The weights of checkpoint ``folder`` in ``model``'s state-dict format (CPU tensors, converted by the
    model's checkpoint conversion mapping as ``from_pretrained`` converts them), and how they fit the model."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    files = weight_files(folder)
    if not files:
        raise CheckpointError(
            f"{os.fspath(folder)} holds no model weights ({SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or a sharded index); "
            "give the folder of a checkpoint saved with the full model (Trainer's checkpoint-N)"
        )
    shadow = _shadow(model)
    with contextlib.ExitStack() as stack:
        tensors = _read_tensors(files, stack)
        config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(shadow), device_map={"": "cpu"})
        info, _ = convert_and_load_state_dict_in_model(shadow, tensors, config)
    # What the conversion filled is real; what it did not (absent, or refused for its shape) is still on meta.
    loaded = {key: value for key, value in shadow.state_dict().items() if value.device.type != "meta"}
    tied = shadow.get_expanded_tied_weights_keys(all_submodels=True)  # tied copy → the weight it shares
    expected = model.state_dict()
    reshaped = {key for key, _, _ in info.mismatched_keys}
    report = WeightReport(
        missing=sorted(
            key for key in expected
            if key not in loaded and key not in reshaped and not (key in tied and tied[key] in loaded)
        ),
        unexpected=sorted(set(info.unexpected_keys) | (set(loaded) - set(expected))),
        mismatched=sorted(f"{key}: {tuple(theirs)} vs {tuple(ours)}" for key, theirs, ours in info.mismatched_keys),
        errors=[f"{key}: {error}" for key, error in sorted(info.conversion_errors.items())] + list(info.error_msgs),
    )
    for key, value in loaded.items():
        if key in expected and value.shape != expected[key].shape:
            report.mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(expected[key].shape)}")
    return {key: value for key, value in loaded.items() if key in expected}, report


def _listed(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS]) + (f", … and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")
    return f"\n  {title} ({len(keys)}): {shown}"


def refusal(model: nn.Module, folder: str | os.PathLike, report: WeightReport) -> CheckpointError:
    """The error of a checkpoint whose weights do not all load into ``model``: the folder, the keys, the fix."""
    text = (
        f"the weights in {os.fspath(folder)} do not all load into this {type(model).__name__} (read with the "
        "model's checkpoint key conversion, as from_pretrained reads them); nothing was loaded:"
    )
    for title, keys in (
        ("model weights the checkpoint lacks", report.missing),
        ("checkpoint tensors the model has no place for (keys as converted)", report.unexpected),
        ("tensors of another shape (checkpoint vs model)", report.mismatched),
        ("conversion errors", report.errors),
    ):
        if keys:
            text += _listed(title, keys)
    return CheckpointError(
        text + "\nThe checkpoint belongs to another model or configuration, or its files were changed: build the "
        "model from the checkpoint's config.json (from_pretrained on the folder), or train without resuming from it."
    )


def load_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy the weights of checkpoint ``folder`` into ``model``'s parameters and buffers, in place; refuse
    (:class:`~vlmopt.errors.CheckpointError`, model untouched) unless every weight loads."""
    state, report = converted_state_dict(model, folder)
    if not report.complete:
        raise refusal(model, folder, report)
    model.load_state_dict(state, strict=False)  # tied copies, left out of the checkpoint, share storage
