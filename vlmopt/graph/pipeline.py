"""``VLMGraph``: the stage graphs of one model, as captured and then rewritten by passes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from vlmopt.graph.capture import capture

if TYPE_CHECKING:
    from vlmopt.adapters.base import Adapter

#: Stage graphs every adapter provides.
STAGES = ("prefill", "prefill_text", "decode")


class VLMGraph:
    """The pipeline graphs of one model: ``prefill`` (with visual inputs), ``prefill_text``
    (a prompt without visual inputs) and ``decode`` (one generated token), each a
    ``torch.fx.GraphModule`` whose leaves are the model's own submodules.

    ``graph["prefill"]`` is a GraphModule; ``graph.code`` is the Python code of every stage.
    """

    def __init__(self, adapter: Adapter, stages: dict[str, fx.GraphModule]) -> None:
        self.adapter = adapter
        self.stages = dict(stages)

    @classmethod
    def capture(cls, adapter: Adapter, mode: str = "infer", chunk: bool = False) -> VLMGraph:
        """Trace the adapter's pipelines (no pass applied); ``mode="train"`` adds the training
        stages ``train_prefill`` and ``train_text`` (see :mod:`vlmopt.graph.training`); ``chunk``
        the streaming stage ``chunk`` (the prefill pipeline run on a filled cache, :mod:`vlmopt.stream`)."""
        stages = {
            "prefill": capture(adapter.prefill_pipeline(), "prefill"),
            "prefill_text": capture(adapter.text_pipeline(), "prefill_text"),
            "decode": capture(adapter.text_pipeline(), "decode"),
        }
        if chunk:
            stages["chunk"] = capture(adapter.prefill_pipeline(), "chunk")
        if mode == "train":
            from vlmopt.graph.training import add_training_outputs

            stages["train_prefill"] = add_training_outputs(capture(adapter.prefill_pipeline(), "train_prefill"))
            stages["train_text"] = add_training_outputs(capture(adapter.text_pipeline(), "train_text"))
        return cls(adapter, stages)

    def training_view(self) -> VLMGraph:
        """The training stages under the names of the prefill stages they extend (``prefill`` →
        ``train_prefill``, ``prefill_text`` → ``train_text``), sharing their GraphModules: a pass written for
        the prefill graph rewrites the training graph when applied to this view."""
        from vlmopt.graph.training import TRAIN_STAGE_OF

        return VLMGraph(self.adapter, {name: self.stages[train] for name, train in TRAIN_STAGE_OF.items()})

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def prefill(self) -> fx.GraphModule:
        return self.stages["prefill"]

    def __getitem__(self, stage: str) -> fx.GraphModule:
        if stage not in self.stages:
            raise KeyError(f"no stage {stage!r}; stages are {', '.join(self.stages)}")
        return self.stages[stage]

    def __iter__(self):
        return iter(self.stages.items())

    @property
    def code(self) -> str:
        """The generated Python of every stage graph, each under a ``# stage:`` header."""
        return "\n".join(f"# stage: {name}\n{module.code.strip()}\n" for name, module in self.stages.items())

    def recompile(self) -> None:
        for module in self.stages.values():
            module.graph.lint()
            module.recompile()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}: {len(module.graph.nodes)} nodes" for name, module in self.stages.items())
        return f"VLMGraph({self.family}; {sizes})"
