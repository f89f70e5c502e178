"""Question families the reference models were not trained on (task ``shapes-relations``): the same
``shapes`` pictures, new questions, for fine-tuning experiments.

* ``neighbour-shape``: "what shape is left relative to the red circle?" (answer: a shape). The
  object asked about is the only one clearly in that direction of the named object (the relation of
  :func:`scenes.relation`: the dominant axis at least twice the other), and every other object is
  clearly elsewhere (more than 45° off that direction), so the answer never depends on a judgement
  call. The named object is the only one of its colour and shape.
* ``majority-colour``: "what colour are two objects?" (answer: a colour): one colour is on exactly
  two (or three) objects and every other colour on fewer, so the answer is also the colour that
  appears most.

The reference models' tokenizers are word-level over :func:`vlmopt.reference.tasks.vocabulary` (which
has no "of", "which" or "most"): the questions use only words of that vocabulary (the tests check
the shipped ``tokenizer.json`` files), so no word becomes ``<unk>``.
"""

from __future__ import annotations

import numpy as np

from vlmopt.reference import scenes
from vlmopt.reference.render import COLOURS, SHAPES, Obj, place
from vlmopt.reference.scenes import DIRECTIONS, NUMBERS, Question, ShapesConfig

RELATION_FAMILIES: dict[str, tuple[str, ...]] = {
    "neighbour-shape": SHAPES,
    "majority-colour": COLOURS,
}
"""New family → its possible answers (each drawn equally often)."""
MAJORITY_COUNTS = ("two", "three")
"""How many objects the majority colour is on."""


def question(family: str, params: tuple) -> Question:
    """The question of a new family: ``neighbour-shape`` params (direction, (colour, shape)),
    ``majority-colour`` params (count word,)."""
    if family == "neighbour-shape":
        direction, (colour, shape) = params
        return Question(family, f"what shape is {direction} relative to the {colour} {shape}?", params)
    if family == "majority-colour":
        return Question(family, f"what colour are {params[0]} objects?", params)
    raise ValueError(f"unknown family {family!r}; expected one of {sorted(RELATION_FAMILIES)}")


def _clearly_not(direction: str, a: Obj, b: Obj) -> bool:
    """Is ``a`` more than 45° away from ``direction`` seen from ``b`` (or on the other side)?"""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along, across = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[direction]
    return along < abs(across)


def oracle(q: Question, objects: list[Obj]) -> tuple[str, list[int]] | None:
    """(answer, evidence indices) of a new-family question on ``objects``, or None if ambiguous."""
    if q.family == "neighbour-shape":
        direction, named = q.params
        ref = [i for i, o in enumerate(objects) if (o.colour, o.shape) == named]
        if len(ref) != 1:
            return None
        b = objects[ref[0]]
        others = [i for i in range(len(objects)) if i != ref[0]]
        hits = [i for i in others if scenes.relation(objects[i], b) == direction]
        if len(hits) != 1 or not all(_clearly_not(direction, objects[i], b) for i in others if i != hits[0]):
            return None
        return objects[hits[0]].shape, [hits[0], ref[0]]
    if q.family == "majority-colour":
        counts = {c: sum(o.colour == c for o in objects) for c in COLOURS}
        top = max(counts.values())
        leaders = [c for c, k in counts.items() if k == top]
        if len(leaders) != 1 or top < 2 or top > len(NUMBERS) or NUMBERS[top - 1] != q.params[0]:
            return None
        return leaders[0], [i for i, o in enumerate(objects) if o.colour == leaders[0]]
    raise ValueError(f"unknown family {q.family!r}")


def _specs(rng: np.random.Generator, family: str, answer: str, n: int) -> tuple[list[tuple[str, str]], Question]:
    """(shape, colour) of each object, evidence first, and the question."""
    pick = lambda pool: str(rng.choice(pool))
    if family == "neighbour-shape":
        named = (pick(COLOURS), pick(SHAPES))
        target = (answer, pick(COLOURS))
        while (target[1], target[0]) == named:
            target = (answer, pick(COLOURS))
        specs = [target, (named[1], named[0])]
        while len(specs) < n:
            s = (pick(SHAPES), pick(COLOURS))
            if (s[1], s[0]) != named:
                specs.append(s)
        return specs, question(family, (pick(DIRECTIONS), named))
    if family == "majority-colour":
        count = pick(MAJORITY_COUNTS)
        k = NUMBERS.index(count) + 1
        others = [c for c in COLOURS if c != answer]
        rest = [str(c) for c in rng.permutation(others)[: max(n - k, 1)]]  # each other colour once
        specs = [(pick(SHAPES), answer) for _ in range(k)] + [(pick(SHAPES), c) for c in rest]
        return specs, question(family, (count,))
    raise ValueError(f"unknown family {family!r}")


def build(rng: np.random.Generator, family: str, answer: str, config: ShapesConfig) -> tuple[list[Obj], Question, list[int]]:
    """Objects (evidence first), question and evidence indices of one new-family scene; scenes the
    oracle finds ambiguous are drawn again."""
    size = config.size
    snap = {"grid": config.grid, "offset": config.grid_offset, "jitter": config.jitter}
    for _ in range(200):
        n = int(rng.integers(config.objects[0], config.objects[1] + 1))
        specs, q = _specs(rng, family, answer, n)
        placed: list[tuple[float, float, float]] = []
        if family == "neighbour-shape":  # the named object first, then the answer in its direction
            spot = place(rng, size, config.radius, placed, **snap)
            target = None if spot is None else place(
                rng, size, config.radius, [spot], scenes._position_region(q.params[0], spot, size), **snap
            )
            if target is None:
                continue
            placed = [target, spot]
        for _ in range(len(placed), len(specs)):
            spot = place(rng, size, config.radius, placed, **snap)
            if spot is None:
                break
            placed.append(spot)
        if len(placed) != len(specs):
            continue
        objects = scenes.objects_at(rng, specs, placed)
        result = oracle(q, objects)
        if result is not None and result[0] == answer:
            return objects, q, result[1]
    raise RuntimeError(f"could not build a {family}={answer} scene in 200 tries (size {size})")


def derive(rng: np.random.Generator, objects: list[Obj], k: int, skip: set[str] = frozenset()) -> list[tuple[Question, str]]:
    """Up to ``k`` more valid (question, answer) pairs about ``objects`` for training turns: every
    valid new-family question first (shuffled, up to half of ``k``, rounded up), then the old
    families' (:func:`scenes.derive`, balanced) for the rest."""
    present = sorted({(o.colour, o.shape) for o in objects})
    candidates = [question("neighbour-shape", (d, p)) for d in DIRECTIONS for p in present]
    candidates += [question("majority-colour", (c,)) for c in MAJORITY_COUNTS]
    valid = [(q, result[0]) for q in candidates if q.text not in skip and (result := oracle(q, objects)) is not None]
    new = [valid[i] for i in rng.permutation(len(valid))[: (k + 1) // 2]]
    return new + scenes.derive(rng, objects, k - len(new), skip=skip, balanced=True)


def vocabulary_words() -> set[str]:
    """Every word and punctuation mark the new families' questions and answers use."""
    import re

    texts = [question("neighbour-shape", (d, (c, s))).text for d in DIRECTIONS for c in COLOURS for s in SHAPES]
    texts += [question("majority-colour", (c,)).text for c in MAJORITY_COUNTS]
    texts += [a for answers in RELATION_FAMILIES.values() for a in answers]
    return {w for t in texts for w in re.findall(r"[a-z]+|[^\sa-z]", t)}
