"""HalfV's stage analysis: where in the LLM do visual tokens become redundant, and where do they saturate?

Paper: "From Inheritance to Saturation" (HalfV), https://arxiv.org/abs/2604.16462. Per decoder
layer ``l`` of the language model, on a few task samples:

* **entropy**: the truncated matrix entropy (:func:`~vlmopt.analysis.truncated_matrix_entropy`) of
  the visual tokens' input states of layer ``l``, averaged over samples — high in Stage I (alignment),
  falling in Stage II (aggregation), rising again in Stage III (saturation);
* **marginal utility** of pruning at ``l`` (``l ≥ 1``): ``MU = −ΔM / (ΔC + ε)``, the accuracy lost
  (``ΔM = accuracy − baseline``, a fraction) per fraction of LLM prefill FLOPs saved (``ΔC``) when
  only ``keep`` of the visual tokens, the most relevant to the last token (HalfV's probe), go on
  from layer ``l``. Lower is better.

Suggestions: ``ivr_layer`` = the layer of least marginal utility (among 1..L−2, so a saturation
stage fits after it; ties go to the earlier layer); ``ssr_layer`` = the layer after the entropy
minimum past ``ivr_layer`` (where entropy starts to rise again), at most the last layer.
The probe cuts are relevance-only (no k-center coverage) and FLOPs are those of the first sample.

Two entry points: :func:`analyze_stages` on labelled task samples (the metric is accuracy), and
:func:`analyze_calibration` on a few unlabelled processor outputs, which ``HalfV(ivr_layer="auto")``
uses: there the metric is *agreement*, 1 − the mean total-variation distance between the next-token
distributions after the prompt with and without the cut (1.0 for the unpruned model), a smooth
stand-in for accuracy that needs no answers and separates layers even on a handful of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from vlmopt.errors import InputError
from vlmopt.passes.base import Pass, check_range

EPSILON = 1e-6
"""ε of the marginal utility (a cut that saves nothing is not divided by zero)."""


@dataclass(frozen=True)
class LayerCut(Pass):
    """One HalfV-style cut (relevance only) before decoder layer ``layer``: the analysis' probe."""

    stage: ClassVar[str] = "llm"
    query_aware: ClassVar[bool] = True

    layer: int = 1
    """Decoder layer from which only ``keep`` of the visual tokens remain (≥ 1)."""
    keep: float = 0.25
    """Fraction of each visual input's tokens kept, in (0, 1]."""

    def __post_init__(self) -> None:
        check_range("LayerCut", "layer", self.layer, 1, 10**4, integer=True)
        check_range("LayerCut", "keep", self.keep, 0, 1, low_open=True)

    def apply(self, graph) -> None:
        from vlmopt.graph.edit import GraphEditor
        from vlmopt.passes.base import VisualSite
        from vlmopt.passes.halfv import HalfV

        editor = GraphEditor(graph["prefill"])
        layout = VisualSite.find(editor, graph.adapter).layout
        HalfV().cut(graph, editor, self.layer, layout, 1.0, self.keep, 1.0, rope=False)
        editor.finish()


@dataclass(frozen=True)
class StageReport:
    """Per-layer curves of the stage analysis and the layers it suggests."""

    entropy: tuple[float, ...]
    """Mean truncated matrix entropy of the visual input states of each decoder layer."""
    utility: tuple[float | None, ...]
    """Marginal utility of pruning before each decoder layer (None for layer 0, which has no probe)."""
    accuracy: tuple[float | None, ...]
    """The metric with the cut before each layer (None for layer 0)."""
    baseline_accuracy: float
    """The metric without pruning."""
    ivr_layer: int
    """Suggested ``HalfV.ivr_layer``."""
    ssr_layer: int
    """Suggested ``HalfV.ssr_layer``."""
    metric: str = "accuracy"
    """What ``accuracy`` measures: ``accuracy`` (labelled samples) or ``agreement`` (calibration prompts)."""

    def summary(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "entropy": list(self.entropy), "utility": list(self.utility),
            "accuracy": list(self.accuracy), "baseline_accuracy": self.baseline_accuracy,
            "ivr_layer": self.ivr_layer, "ssr_layer": self.ssr_layer,
        }


def visual_token_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the image and video placeholder tokens of ``input_ids``."""
    config = model.config
    ids = [getattr(config, name, None) for name in ("image_token_id", "video_token_id", "image_token_index")]
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in {i for i in ids if i is not None}:
        mask |= input_ids == token
    return mask


def layer_entropy(model, batches: list[dict], k: int = 50) -> list[float]:
    """Mean truncated matrix entropy of the visual input states of every decoder layer."""
    from vlmopt.analysis.entropy import truncated_matrix_entropy

    layers = model.config.get_text_config().num_hidden_layers
    totals, count = [0.0] * layers, 0
    for batch in batches:
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states
        visual = visual_token_mask(model, batch["input_ids"])
        for b in range(visual.shape[0]):
            if int(visual[b].sum()) < 2:
                continue
            for layer in range(layers):
                totals[layer] += truncated_matrix_entropy(states[layer][b][visual[b]], k)
            count += 1
    if count == 0:
        raise InputError("the stage analysis needs samples with visual tokens (images or videos); these have none")
    return [total / count for total in totals]


def accuracy_and_flops(model, processor, batches, samples, passes) -> tuple[float, int]:
    """(accuracy, LLM prefill FLOPs of the first sample) of ``model`` compiled with ``passes``."""
    import vlmopt
    from vlmopt.reference import evaluate, processing, tasks

    compiled = vlmopt.compile(model, passes=passes)
    predicted = [answer for batch in batches for answer in evaluate.answers(compiled, processor, batch)]
    correct = sum(tasks.score(a, s) for a, s in zip(predicted, samples))
    return correct / len(samples), vlmopt.flops(compiled, processing.encode(processor, samples[:1])).llm


def next_token_probabilities(compiled, batches: Sequence[dict]) -> list[torch.Tensor]:
    """[B, V] probabilities of the token after each prompt of ``batches``, per batch."""
    with torch.no_grad():
        return [compiled(**batch, logits_to_keep=1).logits[:, -1].float().softmax(-1) for batch in batches]


def suggest_layers(entropy: Sequence[float], utility: Sequence[float | None], ivr_layer: int | None = None) -> tuple[int, int]:
    """(ivr_layer, ssr_layer) from the curves (see the module docstring); a given ``ivr_layer`` is kept."""
    layers = len(entropy)
    if ivr_layer is None:
        # ivr_layer leaves room for a saturation stage after it (HalfV needs ssr_layer > ivr_layer).
        ivr_layer = min(range(1, max(2, layers - 1)), key=lambda layer: (utility[layer], layer))
    later = range(ivr_layer + 1, layers)
    ssr_layer = min(layers - 1, min(later, key=lambda layer: (entropy[layer], layer)) + 1) if later else ivr_layer
    return ivr_layer, ssr_layer


def utility_curve(layers: int, measure: Callable[[list], tuple[float, int]], keep: float, before: Sequence = ()):
    """(baseline metric, metric per layer, marginal utility per layer) of relevance cuts before each
    layer ≥ 1 after the passes ``before``; ``measure(passes)`` returns (metric, LLM prefill FLOPs)."""
    base_metric, base_flops = measure(list(before))
    metric: list[float | None] = [None]
    utility: list[float | None] = [None]
    for layer in range(1, layers):
        value, flops = measure([*before, LayerCut(layer=layer, keep=keep)])
        metric.append(value)
        utility.append((base_metric - value) / (1.0 - flops / base_flops + EPSILON))
    return base_metric, metric, utility


def analyze_stages(model, processor, samples, keep: float = 0.25, k: int = 50, batch_size: int = 16) -> StageReport:
    """Run the stage analysis of ``model`` on labelled task ``samples`` (see the module docstring)."""
    from vlmopt.reference import processing

    samples = list(samples)
    batches = [processing.encode(processor, samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    entropy = layer_entropy(model, batches, k)
    base, accuracy, utility = utility_curve(
        len(entropy), lambda passes: accuracy_and_flops(model, processor, batches, samples, passes), keep
    )
    ivr_layer, ssr_layer = suggest_layers(entropy, utility)
    return StageReport(tuple(entropy), tuple(utility), tuple(accuracy), base, ivr_layer, ssr_layer)


def analyze_calibration(
    model, batches: Sequence[dict], keep: float = 0.25, k: int = 50, before: Sequence = (), ivr_layer: int | None = None
) -> StageReport:
    """The stage analysis on unlabelled processor outputs ``batches`` (each a dict the model takes),
    after the passes ``before``; the metric is next-token agreement (see the module docstring).
    With ``ivr_layer`` given, only the entropy curve is computed and ``ssr_layer`` follows it."""
    import vlmopt

    batches = list(batches)
    if not batches:
        raise InputError("the stage analysis needs at least one calibration batch (processor outputs with images or video)")
    entropy = layer_entropy(model, batches, k)
    if ivr_layer is not None:
        ivr_layer, ssr_layer = suggest_layers(entropy, [], ivr_layer)
        return StageReport(tuple(entropy), (None,) * len(entropy), (None,) * len(entropy), 1.0, ivr_layer, ssr_layer, "agreement")
    reference: list[torch.Tensor] = []

    def agreement_and_flops(passes) -> tuple[float, int]:
        compiled = vlmopt.compile(model, passes=passes)
        probabilities = next_token_probabilities(compiled, batches)
        if not reference:  # utility_curve measures the baseline (the passes ``before``) first
            reference.extend(probabilities)
        distance = torch.cat([0.5 * (p - q).abs().sum(-1) for p, q in zip(probabilities, reference)])
        return 1.0 - float(distance.mean()), vlmopt.flops(compiled, batches[0]).llm

    base, agreement, utility = utility_curve(len(entropy), agreement_and_flops, keep, before)
    ivr_layer, ssr_layer = suggest_layers(entropy, utility)
    return StageReport(tuple(entropy), tuple(utility), tuple(agreement), base, ivr_layer, ssr_layer, "agreement")


def plot_stages(report: StageReport, path: str, title: str) -> None:
    """Draw the entropy and the marginal utility per layer to ``path`` (needs matplotlib)."""
    from vlmopt.plots import pyplot

    plt = pyplot()
    figure, left = plt.subplots(figsize=(7, 4))
    layers = list(range(len(report.entropy)))
    left.plot(layers, report.entropy, marker="o", color="tab:blue", label="visual TME")
    left.set_xlabel("decoder layer")
    left.set_ylabel("truncated matrix entropy (nats)")
    right = left.twinx()
    cut = [layer for layer in layers if report.utility[layer] is not None]
    right.plot(cut, [report.utility[layer] for layer in cut], marker="s", color="tab:red", label="marginal utility")
    right.set_ylabel("marginal utility (lower = better place to prune)")
    for layer, name in ((report.ivr_layer, "ivr"), (report.ssr_layer, "ssr")):
        left.axvline(layer, linestyle="--", color="grey")
        left.annotate(name, (layer, max(report.entropy)), textcoords="offset points", xytext=(3, 0))
    left.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
