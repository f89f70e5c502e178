"""Sentence answers about the ``shapes`` pictures (task ``shapes-captions``) and their fact-level score.

The question is always ``"what objects are there?"``; the answer is a caption in two parts, in the
words the shipped word-level tokenizers already have (they have no "and", "of", "on" nor commas):

* the *inventory*: one ``NUMBER COLOUR SHAPE`` group per (colour, shape) in the picture, in a fixed
  order (colours as in :data:`~vlmopt.reference.render.COLOURS`, then shapes as in
  :data:`~vlmopt.reference.render.SHAPES`), the shape plural above one: ``"two red circles one blue
  star one green square"``;
* :data:`RELATIONS` *relations*: with ``s0, s1, s2`` the first singleton groups (count one) of the
  inventory, ``"the C S is D relative to the C S"`` for ``(s0, s1)`` then ``(s1, s2)``, ``D`` the
  direction of :func:`vlmopt.reference.scenes.relation` (the dominant axis at least twice the other:
  the rule of the ``position`` questions the reference models were trained on). Scenes where one of
  these pairs has no clear direction are drawn again.

A caption is 32 to 38 words (33 to 39 answer tokens with the end token).

**Score** (:func:`score`): the caption's *facts* are its inventory groups ``(colour, shape, count)``
and its relations ``(colour a, shape a, direction, colour b, shape b)``, a relation stated from either
side being one fact ("the red star is left relative to the blue square" is "the blue square is right
relative to the red star"). :func:`parse` reads the facts a text states wherever they appear
(``NUMBER COLOUR SHAPE`` for a group, the plural or singular shape alike, digits spelt out; the
relation sentence for a relation); a text stating two counts for one (colour, shape) states two facts.
With ``T`` the reference caption's facts and ``P`` the prediction's (sets), precision is
``|P ∩ T| / |P|``, recall ``|P ∩ T| / |T|``, and the score their harmonic mean, the F1 (0 when they
share no fact or the prediction states none). A fact true of the picture but not in the reference
caption (another pair's relation) counts as wrong: the caption, and so its facts, is a function of
the picture, which the model is trained to say.
"""

from __future__ import annotations

import re

import numpy as np

from vlmopt.reference import scenes
from vlmopt.reference.render import COLOURS, SHAPES, Obj, place
from vlmopt.reference.scenes import DIRECTIONS, NUMBERS, PLURALS, ShapesConfig

QUESTION = "what objects are there?"
"""The one question of the caption family."""
RELATIONS = 2
"""Relation sentences per caption (between consecutive singleton groups of the inventory)."""
LAYOUTS = ("one", "two", "three")
"""The caption family's balanced variants: the count of the largest group (all objects distinct, a pair, a triple)."""

_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}
_DIGITS = {"1": "one", "2": "two", "3": "three"}
_GROUP = re.compile(rf"\b({'|'.join(NUMBERS)}) ({'|'.join(COLOURS)}) ({'|'.join((*SHAPES, *PLURALS.values()))})\b")
_NAMED = rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_RELATION = re.compile(rf"\bthe {_NAMED} is ({'|'.join(DIRECTIONS)}) relative to the {_NAMED}\b")


def groups(objects: list[Obj]) -> list[tuple[str, str, int]]:
    """(colour, shape, count) of each kind of object, in caption order."""
    counts: dict[tuple[str, str], int] = {}
    for o in objects:
        counts[(o.colour, o.shape)] = counts.get((o.colour, o.shape), 0) + 1
    ordered = sorted(counts, key=lambda k: (COLOURS.index(k[0]), SHAPES.index(k[1])))
    return [(c, s, counts[(c, s)]) for c, s in ordered]


def related_pairs(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    """The (a, b) object pairs the caption's relations are about: consecutive singletons of the inventory."""
    singles = [(c, s) for c, s, n in groups(objects) if n == 1][: RELATIONS + 1]
    by_kind = {(o.colour, o.shape): o for o in objects}
    return [(by_kind[a], by_kind[b]) for a, b in zip(singles, singles[1:])]


def caption(objects: list[Obj]) -> str:
    """The reference caption of a picture holding ``objects`` (see the module docstring)."""
    words = [f"{NUMBERS[n - 1]} {c} {s if n == 1 else PLURALS[s]}" for c, s, n in groups(objects)]
    for a, b in related_pairs(objects):
        direction = scenes.relation(a, b)
        if direction is None:
            raise ValueError(f"the {a.colour} {a.shape} has no clear direction from the {b.colour} {b.shape}; draw the scene again")
        words.append(f"the {a.colour} {a.shape} is {direction} relative to the {b.colour} {b.shape}")
    return " ".join(words)


def _relation_fact(a: tuple[str, str], direction: str, b: tuple[str, str]) -> tuple:
    if direction in ("left", "above"):  # one spelling per fact: stated from the right / below side
        a, direction, b = b, _OPPOSITE[direction], a
    return ("relation", a, direction, b)


def parse(text: str) -> set[tuple]:
    """The facts ``text`` states: ``("group", colour, shape, count)`` and ``("relation", (colour,
    shape), direction, (colour, shape))`` with direction "right" or "below" (see the module docstring)."""
    words = " ".join(_DIGITS.get(w, w) for w in re.findall(r"[a-z]+|[0-9]", text.lower()))
    facts: set[tuple] = set()
    for number, colour, shape in _GROUP.findall(words):
        facts.add(("group", colour, _SINGULAR.get(shape, shape), NUMBERS.index(number) + 1))
    for ca, sa, direction, cb, sb in _RELATION.findall(words):
        facts.add(_relation_fact((ca, sa), direction, (cb, sb)))
    return facts


def score(prediction: str, reference: str) -> float:
    """Fact F1 of ``prediction`` against the ``reference`` caption, in [0, 1] (see the module docstring)."""
    truth, stated = parse(reference), parse(prediction)
    if not truth:
        raise ValueError(f"the reference {reference!r} states no fact; pass the sample's caption (its answer)")
    right = len(truth & stated)
    if not right:
        return 0.0
    precision, recall = right / len(stated), right / len(truth)
    return 2 * precision * recall / (precision + recall)


def _specs(rng: np.random.Generator, layout: str, config: ShapesConfig) -> list[tuple[str, str]]:
    """(shape, colour) of each object: a group of ``layout``'s count, the rest distinct singletons."""
    largest = NUMBERS.index(layout) + 1
    singles = RELATIONS + 1
    n = int(rng.integers(config.objects[0], config.objects[1] + 1))
    n = max(n, singles + (largest if largest > 1 else 0))
    kinds = [(s, c) for s in SHAPES for c in COLOURS]
    chosen = [kinds[i] for i in rng.permutation(len(kinds))[: n - largest + 1]]
    return [chosen[0]] * largest + chosen[1:]


def build(rng: np.random.Generator, layout: str, config: ShapesConfig) -> list[Obj]:
    """The objects of one caption scene whose largest group has ``layout``'s count (one of
    :data:`LAYOUTS`), placed so that every related pair has a clear direction (drawn again otherwise)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown caption layout {layout!r}; expected one of {LAYOUTS}")
    snap = {"grid": config.grid, "offset": config.grid_offset, "jitter": config.jitter}
    for _ in range(500):
        specs = _specs(rng, layout, config)
        placed: list[tuple[float, float, float]] = []
        for _ in specs:
            spot = place(rng, config.size, config.radius, placed, **snap)
            if spot is None:
                break
            placed.append(spot)
        if len(placed) != len(specs):
            continue
        objects = scenes.objects_at(rng, specs, placed)
        if all(scenes.relation(a, b) is not None for a, b in related_pairs(objects)):
            return objects
    raise RuntimeError(f"could not build a caption scene ({layout}) in 500 tries (size {config.size})")


def vocabulary_words() -> set[str]:
    """Every word a caption or the caption question can use."""
    texts = [QUESTION, "the is relative to", *NUMBERS, *COLOURS, *SHAPES, *PLURALS.values(), *DIRECTIONS]
    return {w for t in texts for w in re.findall(r"[a-z]+|[^\sa-z]", t)}
