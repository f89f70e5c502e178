"""The auxiliary probes (linear heads trained with the model, then thrown away) and their losses."""

from __future__ import annotations

import torch
from torch import nn

from models.train.config import TrainConfig
from models.train.targets import COORD_SCALE, COUNT_CLASSES, NEIGHBOUR_ATTRIBUTES
from vlmopt.reference import scenes
from vlmopt.reference.render import COLOURS, SHAPES


class AuxHeads(nn.Module):
    """Linear probes trained with the model and then thrown away."""

    def __init__(
        self, token_dim: int, cls_dim: int | None, coords: bool = False, counts: bool = False,
        coord_dim: int | None = None, relation_dim: int | None = None, neighbours: bool = False,
    ) -> None:
        super().__init__()
        self.neighbours = nn.Linear(token_dim, len(scenes.DIRECTIONS) * NEIGHBOUR_ATTRIBUTES) if neighbours else None
        self.relation = nn.Linear(relation_dim, 4) if relation_dim else None
        self.colour = nn.Linear(token_dim, len(COLOURS) + 1)
        self.shape = nn.Linear(token_dim, len(SHAPES) + 1)
        self.centre = nn.Linear(token_dim, 1)
        self.presence = nn.Linear(cls_dim, len(COLOURS) + len(SHAPES)) if cls_dim else None
        self.coords = nn.Linear(coord_dim or token_dim, 2) if coords else None
        self.counts = nn.Linear(token_dim, 2 * COUNT_CLASSES) if counts else None

    @classmethod
    def for_model(cls, model, cfg: TrainConfig, qwen: bool) -> AuxHeads:
        """The probes ``cfg`` asks for, sized to where they read: Qwen's merged tokens (LM width, no
        CLS), LLaVA's CLIP features and CLS; the coordinate probe off the tower and the relation
        probe read LM-width tokens."""
        text, vision = model.config.text_config.hidden_size, model.config.vision_config.hidden_size
        token_dim, cls_dim = (text, None) if qwen else (vision, vision)
        return cls(
            token_dim, cls_dim, coords=cfg.coord_aux, counts=cfg.count_aux,
            coord_dim=text if cfg.coord_aux_from != "tower" else None,
            relation_dim=text if cfg.relation_aux else None, neighbours=cfg.neighbour_aux,
        )

    def terms(
        self, tokens: torch.Tensor, targets: torch.Tensor, cls: torch.Tensor | None, presence: torch.Tensor | None,
        coord_tokens: torch.Tensor | None = None, coords: bool = True, neighbours: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each probe's loss term, by name (their sum is the aux loss). ``tokens`` [N, D] visual tokens,
        ``targets`` [N, 7]; ``cls`` [B, Dc], ``presence`` [B, 12]; ``coord_tokens`` [N, Dp] the same
        tokens elsewhere in the model, for the coordinate probe (default: ``tokens``); ``coords=False``
        leaves that probe out (position aids not on yet). A coordinate probe that reads nothing scores
        about 4/3 (4 × the variance of a uniform place in [-1, 1]). ``neighbours`` [N, 48]
        (:func:`neighbour_targets`, pictures only) feeds the neighbour probe, on object tokens."""
        weight = 1.0 + 3.0 * (targets[:, 0] > 0).float()  # objects are a few % of the tokens
        ce = nn.functional.cross_entropy
        out = {
            "colour": (ce(self.colour(tokens), targets[:, 0], reduction="none") * weight).mean(),
            "shape": (ce(self.shape(tokens), targets[:, 1], reduction="none") * weight).mean(),
            "centre": nn.functional.binary_cross_entropy_with_logits(
                self.centre(tokens).squeeze(-1), targets[:, 2].float(), pos_weight=torch.tensor(10.0)
            ),
        }
        if self.presence is not None and cls is not None:
            out["presence"] = nn.functional.binary_cross_entropy_with_logits(self.presence(cls), presence)
        if self.coords is not None and coords:
            where = targets[:, 3:5].float() * (2.0 / COORD_SCALE) - 1.0  # column, row in [-1, 1]
            coord_from = tokens if coord_tokens is None else coord_tokens
            out["coords"] = 4.0 * nn.functional.mse_loss(self.coords(coord_from), where)
        if self.neighbours is not None and neighbours is not None:
            on_object = targets[:, 0] > 0
            if on_object.any():
                out["neighbours"] = nn.functional.binary_cross_entropy_with_logits(
                    self.neighbours(tokens[on_object]), neighbours[on_object]
                ) * float(NEIGHBOUR_ATTRIBUTES)  # per direction summed over its 12 answers: each one is rare
        if self.counts is not None:
            same_colour, same_shape = self.counts(tokens).split(COUNT_CLASSES, dim=-1)
            out["counts"] = (ce(same_colour, targets[:, 5], reduction="none") * weight).mean() + (
                ce(same_shape, targets[:, 6], reduction="none") * weight
            ).mean()
        return out
