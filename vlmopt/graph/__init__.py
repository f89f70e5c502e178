"""Level-1 pipeline graphs: capture, the stage container, editing helpers for passes, and diff."""

from vlmopt.graph.capture import capture, mark, role
from vlmopt.graph.diff import diff, format_node
from vlmopt.graph.edit import GraphEditor
from vlmopt.graph.layout import VisualLayout
from vlmopt.graph.pipeline import STAGES, VLMGraph

__all__ = ["STAGES", "GraphEditor", "VLMGraph", "VisualLayout", "capture", "diff", "format_node", "mark", "role"]
