"""A readable text diff of two pipeline graphs: added, removed and re-wired nodes with their roles.

Nodes are matched by name (a pass keeps the names of the nodes it does not create). A node is
*re-wired* when it exists in both graphs but reads different inputs. The text is stable, so tests
compare it with golden files.
"""

from __future__ import annotations

from torch import fx

from vlmopt.graph.capture import describe_target
from vlmopt.graph.pipeline import VLMGraph


def _format_arg(arg) -> str:
    if isinstance(arg, fx.Node):
        return arg.name
    if isinstance(arg, (tuple, list)):
        inner = ", ".join(_format_arg(a) for a in arg)
        return f"({inner})" if isinstance(arg, tuple) else f"[{inner}]"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {_format_arg(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, float):
        return f"{arg:.6g}"
    if isinstance(arg, slice):
        parts = [_format_arg(p) if p is not None else "" for p in (arg.start, arg.stop)]
        return ":".join(parts) + (f":{_format_arg(arg.step)}" if arg.step is not None else "")
    return repr(arg)


def _format_call(node: fx.Node) -> str:
    args = [_format_arg(a) for a in node.args] + [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
    return f"{describe_target(node)}({', '.join(args)})"


def _role(node: fx.Node) -> str:
    role = node.meta.get("role", "?")
    return f"{role}[{node.meta['index']}]" if "index" in node.meta else role


def format_node(node: fx.Node) -> str:
    """``name = target(args)  [role]`` — one line per node."""
    if node.op == "placeholder":
        return f"{node.name} = input  [{_role(node)}]"
    if node.op == "output":
        return f"output {_format_arg(node.args[0])}"
    return f"{node.name} = {_format_call(node)}  [{_role(node)}]"


def _inputs(node: fx.Node) -> str:
    return _format_arg((node.args, node.kwargs))


def diff_modules(before: fx.GraphModule, after: fx.GraphModule) -> list[str]:
    """Lines describing how ``after`` differs from ``before`` (empty when identical)."""
    old = {n.name: n for n in before.graph.nodes}
    new = {n.name: n for n in after.graph.nodes}
    lines = []
    for node in after.graph.nodes:
        if node.name not in old:
            lines.append(f"+ {format_node(node)}")
        elif _inputs(old[node.name]) != _inputs(node):
            lines.append(f"~ {format_node(node)}")
            lines.append(f"    was {_format_call(old[node.name]) if node.op != 'output' else _format_arg(old[node.name].args[0])}")
    for node in before.graph.nodes:
        if node.name not in new:
            lines.append(f"- {format_node(node)}")
    return lines


def diff(before: VLMGraph | fx.GraphModule, after: VLMGraph | fx.GraphModule) -> str:
    """Text diff of two pipeline graphs (every stage for :class:`VLMGraph`)."""
    if isinstance(before, fx.GraphModule) and isinstance(after, fx.GraphModule):
        lines = diff_modules(before, after)
        return "\n".join(lines) + "\n" if lines else "(no change)\n"
    out = []
    for name, module in after.stages.items():
        lines = diff_modules(before.stages[name], module)
        added = sum(line.startswith("+") for line in lines)
        removed = sum(line.startswith("-") for line in lines)
        rewired = sum(line.startswith("~") for line in lines)
        if not lines:
            out.append(f"@@ {name}: unchanged")
            continue
        out.append(f"@@ {name}: +{added} added, ~{rewired} re-wired, -{removed} removed")
        out.extend(f"  {line}" for line in lines)
    return "\n".join(out) + "\n"
