"""Analyses of a model's hidden states that guide where passes act.

:mod:`vlmopt.analysis.entropy` — truncated matrix entropy of a token subset's hidden states (HalfV's
stage analysis, arXiv 2604.16462). :mod:`vlmopt.analysis.stages` — HalfV's per-layer stage analysis
(visual entropy and the marginal utility of pruning; ``vlmopt analyze stages``), imported on use.
"""

from .entropy import truncated_matrix_entropy

__all__ = ["truncated_matrix_entropy"]
