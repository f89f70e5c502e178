"""Forward hooks that keep what the training losses read: the vision tower's output, the projector's
output, and the inputs of attention modules whose weights a guide recomputes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.train.config import TrainConfig


class OutputTap:
    """Keeps a module's last output (a forward hook): LLaVA's projector, for the coordinate probe."""

    def __init__(self, module: nn.Module) -> None:
        self.output = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.output = output

    def remove(self) -> None:
        self.handle.remove()


class VisionTap(OutputTap):
    """Keeps the vision tower's last output (a forward hook), for the auxiliary losses."""

    def __init__(self, module: nn.Module) -> None:
        self.hidden_states = self.pooler_output = None
        super().__init__(module)

    def _hook(self, module, args, output) -> None:
        # copy now: LLaVA / Qwen overwrite ``pooler_output`` of this object afterwards
        self.hidden_states, self.pooler_output = output.hidden_states, output.pooler_output

    def visual_tokens(self, model, qwen: bool) -> torch.Tensor:
        """[N, D] the visual tokens the auxiliary probes read, in :func:`aux_targets` order: Qwen's
        merged tokens, LLaVA's CLIP patch features (no CLS) at the layer the projector reads."""
        if qwen:
            return self.pooler_output
        return self.hidden_states[model.config.vision_feature_layer][:, 1:].flatten(0, 1)


class AttentionTap:
    """Keeps the inputs of some attention modules (forward pre-hooks), so their attention weights
    can be recomputed for the few query rows a guide needs while the model itself runs SDPA
    (reading weights from HF would need eager attention on every row: ~1/3 of a training step)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.inputs: dict[int, tuple] = {}
        self.handles = [
            m.register_forward_pre_hook(lambda mod, args, kwargs, i=i: self._keep(i, args, kwargs), with_kwargs=True)
            for i, m in enumerate(modules)
        ]

    def _keep(self, index: int, args, kwargs) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.inputs[index] = (hidden, kwargs.get("position_embeddings"))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Taps:
    """The hooks one training run reads: vision-tower output (aux losses), LM attention inputs
    (attention guide) and vision-block attention inputs at HiPrune's layers (tower guide); None where off."""

    vision: VisionTap | None = None
    lm: AttentionTap | None = None
    tower: AttentionTap | None = None
    projector: OutputTap | None = None
    relations: AttentionTap | None = None

    @classmethod
    def attach(cls, model, cfg: TrainConfig, qwen: bool) -> Taps:
        vision = (model.model.visual if qwen else model.model.vision_tower) if cfg.aux_weight > 0 else None
        lm_layers = model.model.language_model.layers
        tower = None
        if cfg.tower_guide_weight > 0:
            from vlmopt.adapters import adapter_for
            from vlmopt.passes.hiprune import HiPrune

            object_layer, deep_layer = HiPrune(keep_ratio=1.0).layers(adapter_for(model))
            if qwen:
                tower = AttentionTap([model.model.visual.blocks[i].attn for i in (object_layer, deep_layer)])
            else:
                tower = AttentionTap([model.model.vision_tower.encoder.layers[i].self_attn for i in (object_layer, deep_layer)])
        return cls(
            vision=VisionTap(vision) if vision is not None else None,
            lm=AttentionTap([layer.self_attn for layer in lm_layers]) if cfg.guide_weight > 0 else None,
            tower=tower,
            projector=OutputTap(model.model.multi_modal_projector) if cfg.coord_aux_from == "projector" and vision is not None else None,
            relations=(
                AttentionTap([model.model.visual.blocks[max(model.model.visual.fullatt_block_indexes)].attn])
                if qwen and cfg.neighbour_guide_weight > 0 else None
            ),
        )

    def remove(self) -> None:
        for tap in (self.vision, self.lm, self.tower, self.projector, self.relations):
            if tap is not None:
                tap.remove()
