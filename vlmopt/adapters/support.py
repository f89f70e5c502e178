"""The README's supported-models table, generated from the registry so it cannot drift:
``python -m vlmopt.adapters.support`` prints it, and a test checks the README holds exactly that.

For every registered family it checks, on the family's tiny random config (built on the meta device:
no weights, no memory), which passes ``Pass.check`` accepts, and reads from its capabilities whether
it streams, exports and runs APB-V across ``torchrun`` processes; every refusal is footnoted with its
reason (the family's ``Adapter.lacks`` where it lacks a capability, else the pass's own words).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The pass configs the table checks, by column.
COLUMNS = {
    "random_prune": "random_prune:keep_ratio=0.5",
    "pool_prune": "pool_prune:keep_ratio=0.25",
    "hiprune": "hiprune:keep_ratio=1/3",
    "halfv": "halfv",
    "apbv": "apbv:hosts=2",
    "regate": "regate",
    "hermes": "hermes",
}
STREAM_BASELINES = ("streaming_llm", "snapkv", "frame_subsample")


@dataclass(frozen=True)
class FamilySupport:
    """What one family supports."""

    classes: tuple[str, ...]
    """The HF classes its adapter serves."""
    config: str
    """The random config it was checked on."""
    refusals: dict[str, str]
    """Column → reason, for every column it refuses (the others work)."""


def _reason(adapter, item) -> str | None:
    from vlmopt.errors import IncompatiblePassError

    missing = [need for need in item.needs if need not in adapter.capabilities]
    if missing:
        return "; ".join(adapter.lacks.get(need) or f"no {need} capability" for need in missing)
    try:
        item.check(adapter, [])
    except IncompatiblePassError as error:
        return str(error)
    return None


def family_support(cls) -> FamilySupport | None:
    """The support of adapter class ``cls`` (None: it registers no random config to check it on)."""
    from vlmopt import configs, passes
    from vlmopt.adapters.base import CAPABILITIES

    name = next((n for n in cls.configs if n.endswith("-random")), None)
    if name is None:
        return None
    adapter = cls(configs.build(configs.CONFIGS[name](), device="meta"))
    refusals = {}
    for column, spec in COLUMNS.items():
        reason = _reason(adapter, passes.parse(spec))
        if reason:
            refusals[column] = reason
    for column, need in (("export", "export"), ("torchrun", "frames")):
        if need not in cls.capabilities:
            refusals[column] = cls.lacks.get(need) or f"no {need} capability: {CAPABILITIES[need]}"
    if "torchrun" not in refusals and "apbv" in refusals:
        refusals["torchrun"] = refusals["apbv"]
    return FamilySupport(tuple(sorted(cls.model_classes.values())), name, refusals)


def support_table() -> str:
    """The Markdown table (and its footnotes) of every registered family."""
    from vlmopt.adapters import families

    columns = [*COLUMNS, "export", "torchrun"]
    lines = ["| model class | random config | " + " | ".join(f"`{c}`" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    notes: dict[str, int] = {}
    for cls in families():
        support = family_support(cls)
        if support is None:
            continue
        cells = []
        for column in columns:
            reason = support.refusals.get(column)
            cells.append("yes" if reason is None else f"no [{notes.setdefault(reason, len(notes) + 1)}]")
        lines.append(f"| {'<br>'.join(support.classes)} | `{support.config}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"`hermes`: the stream passes (also {', '.join(f'`{b}`' for b in STREAM_BASELINES)}); "
                 "`torchrun`: APB-V, each process encoding its own frames.")
    lines.append("")
    lines += [f"- [{number}] {reason}" + ("" if reason.endswith(".") else ".") for reason, number in notes.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(support_table(), end="")
