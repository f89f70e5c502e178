"""Still-image scenes for the ``shapes`` task: each question family builds a scene around its answer.

A builder gets the answer first (so answers are balanced by construction) and returns the objects,
the question and the indices of the objects the answer depends on (the "evidence"). :func:`oracle`
recomputes the answer of a question from the objects alone; the generator checks every scene
against it, so a question is never ambiguous (named things are unique, relations are clear).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vlmopt.reference.render import COLOURS, SHAPES, Obj, place

NUMBERS = ("one", "two", "three")
DIRECTIONS = ("left", "right", "above", "below")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses", "diamond": "diamonds"}

IMAGE_FAMILIES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "count": NUMBERS,
    "exist": ("yes", "no"),
    "position": DIRECTIONS,
}
"""Question family → its possible answers (each drawn equally often)."""


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of the ``shapes`` images."""

    size: int = 224
    """Image side (pixels)."""
    objects: tuple[int, int] = (4, 6)
    """Least and most objects per image."""
    radius: tuple[float, float] = (0.055, 0.0625)
    """Object radius range as a fraction of the side: at most 14 px at 224 px, so an object fills a
    2×2 block of 14 px patches (~1.6% of the image)."""
    grid: float = 14.0
    """If > 0, object centres snap to multiples of this many pixels (see :func:`render.place`):
    14 at 224 px puts every object on exactly 2×2 LLaVA patches; 28 at 448 px on 2×2 Qwen merged tokens."""
    grid_offset: float = 0.0
    """Offset of that grid (pixels)."""
    jitter: float = 0.0
    """Random shift after snapping (± pixels)."""


@dataclass(frozen=True)
class Question:
    """A question with the parameters :func:`oracle` needs to answer it."""

    family: str
    text: str
    params: tuple
    """Family-specific: colour → (shape,), shape → (colour,), count → ("shape"|"colour", value),
    exist → (colour, shape), position → ((colour, shape), (colour, shape))."""


def question(family: str, params: tuple) -> Question:
    """The question text for ``family`` with ``params``."""
    if family == "colour":
        text = f"what colour is the {params[0]}?"
    elif family == "shape":
        text = f"what shape is the {params[0]} object?"
    elif family == "count":
        kind, value = params
        text = f"how many {PLURALS[value]} are there?" if kind == "shape" else f"how many {value} objects are there?"
    elif family == "exist":
        article = "an" if params[0][0] in "aeiou" else "a"
        text = f"is there {article} {params[0]} {params[1]}?"
    elif family == "position":
        (ca, sa), (cb, sb) = params
        text = f"where is the {ca} {sa} relative to the {cb} {sb}?"
    else:
        raise ValueError(f"unknown family {family!r}")
    return Question(family, text, params)


def relation(a: Obj, b: Obj) -> str | None:
    """Where ``a`` is relative to ``b``: the dominant axis must be at least twice the other."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= 2 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def oracle(q: Question, objects: list[Obj]) -> tuple[str, list[int]] | None:
    """(answer, evidence indices) of ``q`` on ``objects``, or None if the question is ambiguous."""
    f, p = q.family, q.params
    if f == "colour":
        hits = [i for i, o in enumerate(objects) if o.shape == p[0]]
        return (objects[hits[0]].colour, hits) if len(hits) == 1 else None
    if f == "shape":
        hits = [i for i, o in enumerate(objects) if o.colour == p[0]]
        return (objects[hits[0]].shape, hits) if len(hits) == 1 else None
    if f == "count":
        hits = [i for i, o in enumerate(objects) if getattr(o, p[0]) == p[1]]
        return (NUMBERS[len(hits) - 1], hits) if 1 <= len(hits) <= len(NUMBERS) else None
    if f == "exist":
        hits = [i for i, o in enumerate(objects) if (o.colour, o.shape) == p]
        return ("yes", hits) if len(hits) == 1 else ("no", []) if not hits else None
    if f == "position":
        ia = [i for i, o in enumerate(objects) if (o.colour, o.shape) == p[0]]
        ib = [i for i, o in enumerate(objects) if (o.colour, o.shape) == p[1]]
        if len(ia) != 1 or len(ib) != 1:
            return None
        rel = relation(objects[ia[0]], objects[ib[0]])
        return (rel, ia + ib) if rel else None
    raise ValueError(f"unknown family {f!r}")


def _other(rng: np.random.Generator, pool: tuple[str, ...], *exclude: str) -> str:
    return str(rng.choice([x for x in pool if x not in exclude]))


def _specs(rng: np.random.Generator, family: str, answer: str, n: int) -> tuple[list[tuple[str, str]], Question]:
    """(shape, colour) of each object, evidence first, and the question."""
    if family == "colour":
        shape = str(rng.choice(SHAPES))
        specs = [(shape, answer)] + [(_other(rng, SHAPES, shape), str(rng.choice(COLOURS))) for _ in range(n - 1)]
        return specs, question(family, (shape,))
    if family == "shape":
        colour = str(rng.choice(COLOURS))
        specs = [(answer, colour)] + [(str(rng.choice(SHAPES)), _other(rng, COLOURS, colour)) for _ in range(n - 1)]
        return specs, question(family, (colour,))
    if family == "count":
        k = NUMBERS.index(answer) + 1
        n = max(n, k + 1)
        if rng.random() < 0.5:
            value = str(rng.choice(SHAPES))
            specs = [(value, str(rng.choice(COLOURS))) for _ in range(k)]
            specs += [(_other(rng, SHAPES, value), str(rng.choice(COLOURS))) for _ in range(n - k)]
            return specs, question(family, ("shape", value))
        value = str(rng.choice(COLOURS))
        specs = [(str(rng.choice(SHAPES)), value) for _ in range(k)]
        specs += [(str(rng.choice(SHAPES)), _other(rng, COLOURS, value)) for _ in range(n - k)]
        return specs, question(family, ("colour", value))
    if family == "exist":
        colour, shape = str(rng.choice(COLOURS)), str(rng.choice(SHAPES))
        specs = [(shape, colour)] if answer == "yes" else []
        if answer == "no":  # near misses: the colour and the shape are there, just not together
            if rng.random() < 0.8:
                specs.append((_other(rng, SHAPES, shape), colour))
            if rng.random() < 0.8:
                specs.append((shape, _other(rng, COLOURS, colour)))
        while len(specs) < n:
            s, c = str(rng.choice(SHAPES)), str(rng.choice(COLOURS))
            if (s, c) != (shape, colour):
                specs.append((s, c))
        return specs, question(family, (colour, shape))
    if family == "position":
        a = (str(rng.choice(SHAPES)), str(rng.choice(COLOURS)))
        b = (_other(rng, SHAPES, a[0]), str(rng.choice(COLOURS)))
        specs = [a, b]
        while len(specs) < n:
            s = (str(rng.choice(SHAPES)), str(rng.choice(COLOURS)))
            if s not in (a, b):
                specs.append(s)
        return specs, question(family, ((a[1], a[0]), (b[1], b[0])))
    raise ValueError(f"unknown family {family!r}")


def _position_region(answer: str, b: tuple[float, float, float], size: int) -> tuple[float, float, float, float]:
    """Where to put the centre of A so that A is ``answer`` of B (a 2:1 cone, clipped to a box)."""
    bx, by, br = b
    gap = br + 0.12 * size
    if answer == "left":
        return (0.0, by - 0.2 * size, bx - gap, by + 0.2 * size)
    if answer == "right":
        return (bx + gap, by - 0.2 * size, size, by + 0.2 * size)
    if answer == "above":
        return (bx - 0.2 * size, 0.0, bx + 0.2 * size, by - gap)
    return (bx - 0.2 * size, by + gap, bx + 0.2 * size, size)


def objects_at(rng: np.random.Generator, specs: list[tuple[str, str]], placed: list[tuple]) -> list[Obj]:
    """The objects ``specs`` ((shape, colour) each) at the ``placed`` (x, y, r) spots, each slightly rotated."""
    return [
        Obj(shape=s, colour=c, cx=float(x), cy=float(y), r=float(r), rot=float(rng.uniform(-12, 12)))
        for (s, c), (x, y, r) in zip(specs, placed)
    ]


def build(rng: np.random.Generator, family: str, answer: str, config: ShapesConfig) -> tuple[list[Obj], Question, list[int]]:
    """Objects (evidence first), question and evidence indices of one ``shapes`` scene."""
    size = config.size
    for _ in range(100):
        n = int(rng.integers(config.objects[0], config.objects[1] + 1))
        specs, q = _specs(rng, family, answer, n)
        placed: list[tuple[float, float, float]] = []
        for k in range(len(specs)):
            region = None
            if family == "position" and k == 0:  # B (index 1) is placed first, then A around it
                continue
            snap = {"grid": config.grid, "offset": config.grid_offset, "jitter": config.jitter}
            spot = place(rng, size, config.radius, placed, region, **snap)
            if spot is None:
                break
            placed.append(spot)
            if family == "position" and k == 1:
                spot_a = None
                for _ in range(50):
                    spot_a = place(rng, size, config.radius, placed, _position_region(answer, spot, size), **snap)
                    if spot_a is not None:
                        break
                if spot_a is None:
                    break
                placed.insert(0, spot_a)
        if len(placed) != len(specs):
            continue
        objects = objects_at(rng, specs, placed)
        result = oracle(q, objects)
        if result is not None and result[0] == answer:
            return objects, q, result[1]
    raise RuntimeError(f"could not build a {family}={answer} scene in 100 tries (size {size})")


def derive(
    rng: np.random.Generator,
    objects: list[Obj],
    k: int,
    skip: set[str] = frozenset(),
    balanced: bool = False,
    weights: Mapping[str, float] | None = None,
) -> list[tuple[Question, str]]:
    """Up to ``k`` more valid (question, answer) pairs about ``objects`` (training: several turns per image).

    Families are drawn uniformly among those with a valid question, or in proportion to ``weights``
    (family -> weight, 1 for a family it leaves out); texts in ``skip`` are left out.
    Within a family a question is drawn uniformly, or with ``balanced`` an answer is drawn uniformly
    among the family's answers on this picture first (so "two" and "no" come up as often as "one"
    and "yes" wherever the picture allows them).
    """
    present = sorted({(o.colour, o.shape) for o in objects})  # sorted: a set's order changes with each process's string hashing
    pool: dict[str, list[Question]] = {f: [] for f in IMAGE_FAMILIES}
    pool["colour"] = [question("colour", (s,)) for s in SHAPES]
    pool["shape"] = [question("shape", (c,)) for c in COLOURS]
    pool["count"] = [question("count", ("shape", s)) for s in SHAPES] + [question("count", ("colour", c)) for c in COLOURS]
    near = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and any(c == pc or s == ps for pc, ps in present)]
    pool["exist"] = [question("exist", p) for p in present] + [question("exist", near[i]) for i in rng.permutation(len(near))[:3]]
    pool["position"] = [question("position", (a, b)) for a in present for b in present if a != b and a[1] != b[1]]
    valid: dict[str, list[tuple[Question, str]]] = {}
    for family, questions in pool.items():
        for q in questions:
            result = oracle(q, objects)
            if result is not None and q.text not in skip:
                valid.setdefault(family, []).append((q, result[0]))
    out: list[tuple[Question, str]] = []
    while len(out) < k and valid:
        families = sorted(valid)
        if weights:
            odds = np.array([weights.get(f, 1.0) for f in families])
            family = families[int(rng.choice(len(families), p=odds / odds.sum()))]
        else:
            family = families[int(rng.integers(len(families)))]
        options = valid[family]
        if balanced:
            answers = sorted({a for _, a in options})
            chosen = answers[int(rng.integers(len(answers)))]
            picks = [i for i, (_, a) in enumerate(options) if a == chosen]
            out.append(options.pop(picks[int(rng.integers(len(picks)))]))
        else:
            out.append(options.pop(int(rng.integers(len(options)))))
        if not options:
            del valid[family]
    return out
