"""Checkpoint surgery: start a run from a saved model (:func:`start_from`, also into a deeper LM) and
read the commands that trained it."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def start_from(model, directory: Path) -> None:
    """Copy the weights of the model saved in ``directory`` (loaded as users load it) into ``model``,
    which must be the same architecture with the same sizes, or with more LM layers: those are appended
    after the trained ones as identities (attention and MLP output projections zeroed), so the run starts
    from the trained model's exact function."""
    from vlmopt.reference import load

    trained, _ = load(directory)
    own, theirs = model.state_dict(), trained.state_dict()
    appended = lm_layers_appended(model, trained)
    if appended:
        silenced = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # an appended layer adds nothing yet
        theirs = {**theirs, **{n: torch.zeros_like(w) if n.endswith(silenced) else w for n, w in own.items() if lm_layer_index(n) in appended}}
    mismatched = sorted(n for n in own.keys() & theirs.keys() if own[n].shape != theirs[n].shape)
    if type(trained) is not type(model) or own.keys() != theirs.keys() or mismatched:
        raise ValueError(
            f"{directory} holds a {type(trained).__name__} that does not fit this {type(model).__name__} "
            f"(parameters of other shapes: {mismatched[:3]}); pass a directory trained with the same --model"
        )
    own_rope = dict(getattr(model.config.get_text_config(), "rope_parameters", None) or {})
    their_rope = dict(getattr(trained.config.get_text_config(), "rope_parameters", None) or {})
    # Another M-RoPE layout is a deliberate change (text ids are equal on the three axes, so text turns
    # the same; only visual tokens move and the run re-learns them); another base turns every token.
    own_rope.pop("mrope_section", None), their_rope.pop("mrope_section", None)
    if own_rope != their_rope:  # same shapes, other positions: the weights would be read wrongly
        raise ValueError(
            f"{directory} was trained with the LM rotary parameters {their_rope}, this run builds {own_rope}; "
            f"pass --rope-theta {their_rope.get('rope_theta', '<its base>')} to fine-tune it"
        )
    model.load_state_dict(theirs)


def lm_layer_index(name: str) -> int | None:
    """The LM decoder layer a parameter name belongs to (``...language_model.layers.<i>....``); None elsewhere."""
    _, found, tail = name.partition("language_model.layers.")
    return int(tail.split(".", 1)[0]) if found else None


def lm_layers_appended(model, trained) -> set[int]:
    """Indices of ``model``'s LM layers beyond ``trained``'s (empty when it is not deeper)."""
    ours = model.config.get_text_config().num_hidden_layers
    theirs = trained.config.get_text_config().num_hidden_layers
    return set(range(theirs, ours)) if ours > theirs else set()


def recorded_commands(directory: Path) -> list[str]:
    """The commands that trained the model in ``directory`` (its ``eval.json``), first stage first: the
    ones behind its own starting weights, then its own; [] where none is recorded."""
    record = Path(directory) / "eval.json"
    if not record.exists():
        return []
    results = json.loads(record.read_text())
    own = results.get("train_command", "")
    return [*results.get("init_from_commands", []), own] if own else []
