"""Video scenes: objects (tracks) appear, move in straight lines and leave, over a static cluttered
background with fresh pixel noise in every frame.

Two tasks share the machinery:

* ``shapes-video`` (streaming: the question is asked after the last frame): what is on screen *now*
  (last two frames, one temporal patch of Qwen2.5-VL) and what appeared *first*, long ago.
* ``needle``: a long video of distractor objects; exactly one frame holds the object the question
  names (the only object of that colour, or the only one of that shape).

Like the image scenes, builders get the answer first and :func:`oracle` re-derives it from the tracks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vlmopt.reference.render import COLOURS, SHAPES, Obj, add_noise, background, draw_objects, object_rgb
from vlmopt.reference.scenes import NUMBERS

STREAM_FAMILIES: dict[str, tuple[str, ...]] = {
    "first-colour": COLOURS,
    "first-shape": SHAPES,
    "now-colour": COLOURS,
    "now-count": NUMBERS,
}
NEEDLE_FAMILIES: dict[str, tuple[str, ...]] = {"needle-shape": SHAPES, "needle-colour": COLOURS}


@dataclass(frozen=True)
class VideoConfig:
    """Parameters of the ``shapes-video`` and ``needle`` videos."""

    size: int = 112
    """Frame side (pixels; a multiple of 28 so Qwen2.5-VL needs no resize)."""
    frames: tuple[int, int] = (32, 64)
    """Least and most frames (always even: Qwen2.5-VL fuses frame pairs)."""
    radius: tuple[float, float] = (0.11, 0.125)
    """Object radius range as a fraction of the side (at most 14 px at 112 px: one 28 px cell)."""
    grid: float = 28.0
    """Object centres snap to ``grid_offset + k * grid`` pixels in every frame (0: free motion);
    28 / 14 puts each object in exactly one Qwen merged token, so motion goes cell by cell."""
    grid_offset: float = 14.0
    """Offset of that grid (pixels)."""
    max_visible: int = 3
    """Most objects on screen at once."""
    fillers_per_frame: float = 1 / 8
    """Distractor tracks per frame of video (a 64-frame video gets about 8)."""


@dataclass(frozen=True)
class Track:
    """An object's life in a video: it pops in at ``start``, moves from ``p0`` to ``p1``, pops out at ``end``."""

    id: int
    shape: str
    colour: str
    r: float
    start: int
    """First frame it is visible."""
    end: int
    """First frame it is gone (exclusive)."""
    p0: tuple[float, float]
    p1: tuple[float, float]
    grid: float = 0.0
    """Drawn positions snap to ``grid_offset + k * grid`` (0: exact positions)."""
    grid_offset: float = 0.0

    def at(self, t: int) -> Obj | None:
        """The object in frame ``t``, or None when it is not on screen."""
        if not self.start <= t < self.end:
            return None
        a = (t - self.start) / max(1, self.end - 1 - self.start)
        x = self.p0[0] + a * (self.p1[0] - self.p0[0])
        y = self.p0[1] + a * (self.p1[1] - self.p0[1])
        if self.grid:
            x = self.grid_offset + self.grid * round((x - self.grid_offset) / self.grid)
            y = self.grid_offset + self.grid * round((y - self.grid_offset) / self.grid)
        return Obj(self.shape, self.colour, x, y, self.r, rot=0.0, track=self.id)


@dataclass(frozen=True)
class VideoQuestion:
    """A video question with the parameters :func:`oracle` needs."""

    family: str
    text: str
    params: tuple
    """first-* → (), now-colour → (shape,), now-count → (), needle-shape → (colour,), needle-colour → (shape,)."""


def video_question(family: str, params: tuple = ()) -> VideoQuestion:
    """The question text of ``family`` with ``params``."""
    texts = {
        "first-colour": "what colour was the first object to appear?",
        "first-shape": "what shape was the first object to appear?",
        "now-count": "how many objects are there now?",
    }
    if family == "now-colour":
        text = f"what colour is the {params[0]} now?"
    elif family == "needle-shape":
        text = f"what shape was the {params[0]} object?"
    elif family == "needle-colour":
        text = f"what colour was the {params[0]}?"
    else:
        text = texts[family]
    return VideoQuestion(family, text, params)


def _visible(tracks: list[Track], t: int) -> list[Track]:
    return [tr for tr in tracks if tr.start <= t < tr.end]


def evidence_start(family: str, frames: int) -> int:
    """First frame a question's evidence lies in: a ``now-*`` question is about what is on screen now,
    the last temporal patch (2 frames); the others may be anywhere."""
    return frames - 2 if family.startswith("now-") else 0


def oracle(q: VideoQuestion, tracks: list[Track], frames: int) -> tuple[str, list[int]] | None:
    """(answer, evidence track ids) of ``q``, or None if ambiguous."""
    f, last = q.family, frames - 1
    if f.startswith("first-"):
        order = sorted(tracks, key=lambda tr: tr.start)
        if len(order) > 1 and order[1].start - order[0].start < 4:
            return None
        return (order[0].colour if f == "first-colour" else order[0].shape), [order[0].id]
    now = _visible(tracks, last)
    if {tr.id for tr in now} != {tr.id for tr in _visible(tracks, last - 1)}:
        return None  # something pops in or out inside the last temporal patch
    if f == "now-count":
        return (NUMBERS[len(now) - 1], [tr.id for tr in now]) if 1 <= len(now) <= len(NUMBERS) else None
    if f == "now-colour":
        hits = [tr for tr in now if tr.shape == q.params[0]]
        return (hits[0].colour, [hits[0].id]) if len(hits) == 1 else None
    attr, other = ("colour", "shape") if f == "needle-shape" else ("shape", "colour")
    hits = [tr for tr in tracks if getattr(tr, attr) == q.params[0]]
    if len(hits) != 1 or hits[0].end - hits[0].start != 1:
        return None
    return getattr(hits[0], other), [hits[0].id]


def _new_track(
    rng: np.random.Generator, tid: int, shape: str, colour: str, start: int, end: int, config: VideoConfig
) -> Track:
    size = config.size
    r = rng.uniform(*config.radius) * size
    lo, hi = r + 1, size - r - 1
    p0 = rng.uniform(lo, hi, size=2)
    step = rng.uniform(0.3, 1.5) * size / 112  # pixels per frame
    angle = rng.uniform(0, 2 * math.pi)
    travel = step * (end - 1 - start)
    p1 = np.clip(p0 + travel * np.array([math.cos(angle), math.sin(angle)]), lo, hi)
    return Track(
        tid, shape, colour, float(r), int(start), int(end), (float(p0[0]), float(p0[1])), (float(p1[0]), float(p1[1])),
        config.grid, config.grid_offset,
    )


def _fits(track: Track, tracks: list[Track], max_visible: int) -> bool:
    """No overlap with any track on a shared frame, and never more than ``max_visible`` on screen."""
    for t in range(track.start, track.end):
        others = [tr.at(t) for tr in tracks if tr.start <= t < tr.end]
        if len(others) + 1 > max_visible:
            return False
        me = track.at(t)
        if any(math.hypot(me.cx - o.cx, me.cy - o.cy) < me.r + o.r + 2 for o in others):
            return False
    return True


def _add(
    rng: np.random.Generator,
    tracks: list[Track],
    config: VideoConfig,
    shape,
    colour,
    start,
    end=None,
    last: int | None = None,
    tries: int = 10,
) -> bool:
    """Add one track if a fitting one is found in ``tries`` draws; True if added.

    ``shape``, ``colour``, ``start`` and ``end`` are values or callables of the rng; ``end=None``
    draws a 6–30 frame life, cut at ``last`` (exclusive end bound).
    """
    for _ in range(tries):
        s = shape(rng) if callable(shape) else shape
        c = colour(rng) if callable(colour) else colour
        t0 = start(rng) if callable(start) else start
        t1 = end(rng) if callable(end) else end
        if t1 is None:
            t1 = min(t0 + int(rng.integers(6, 31)), last)
        track = _new_track(rng, len(tracks), s, c, t0, t1, config)
        if track.end > track.start and _fits(track, tracks, config.max_visible):
            tracks.append(track)
            return True
    return False


def _shape(g: np.random.Generator) -> str:
    return str(g.choice(SHAPES))


def _colour(g: np.random.Generator) -> str:
    return str(g.choice(COLOURS))


def _frames(rng: np.random.Generator, config: VideoConfig) -> int:
    return 2 * int(rng.integers(config.frames[0] // 2, config.frames[1] // 2 + 1))


def build_stream(rng: np.random.Generator, family: str, answer: str, config: VideoConfig) -> tuple[list[Track], int, VideoQuestion]:
    """Tracks, frame count and question of one ``shapes-video`` sample."""
    for _ in range(100):
        T = _frames(rng, config)
        fillers = round(T * config.fillers_per_frame)
        tracks: list[Track] = []
        if family.startswith("first-"):
            s0 = int(rng.integers(0, 4))
            end0 = s0 + int(rng.integers(8, max(9, T // 2 - s0)))
            shape, colour = (answer, _colour(rng)) if family == "first-shape" else (_shape(rng), answer)
            _add(rng, tracks, config, shape, colour, s0, end0, tries=20)
            q = video_question(family)
            for _ in range(fillers):
                _add(rng, tracks, config, _shape, _colour, lambda g: int(g.integers(s0 + 6, T - 4)), last=T)
        else:
            alive_from = lambda g: int(g.integers(max(0, T - 40), T - 6))  # noqa: E731
            if family == "now-colour":
                shape = _shape(rng)
                q = video_question(family, (shape,))
                _add(rng, tracks, config, shape, answer, alive_from, T, tries=20)
                others = lambda g: str(g.choice([x for x in SHAPES if x != shape]))  # noqa: E731
                for _ in range(int(rng.integers(0, 3))):
                    _add(rng, tracks, config, others, _colour, alive_from, T)
                if rng.random() < 0.6:  # an earlier object of the same shape in another colour
                    other = str(rng.choice([c for c in COLOURS if c != answer]))
                    _add(rng, tracks, config, shape, other, lambda g: int(g.integers(0, T - 12)), last=T - 2, tries=20)
            else:
                q = video_question(family)
                for _ in range(NUMBERS.index(answer) + 1):
                    _add(rng, tracks, config, _shape, _colour, alive_from, T, tries=20)
            for _ in range(fillers):
                _add(rng, tracks, config, _shape, _colour, lambda g: int(g.integers(0, T - 8)), last=T - 2)
        result = oracle(q, tracks, T)
        if result is not None and result[0] == answer:
            return tracks, T, q
    raise RuntimeError(f"could not build a {family}={answer} video in 100 tries")


def build_needle(rng: np.random.Generator, family: str, answer: str, config: VideoConfig) -> tuple[list[Track], int, VideoQuestion]:
    """Tracks, frame count and question of one ``needle`` sample (the needle lives one frame)."""
    for _ in range(100):
        T = _frames(rng, config)
        f = int(rng.integers(0, T))
        tracks: list[Track] = []
        if family == "needle-shape":
            colour = _colour(rng)
            _add(rng, tracks, config, answer, colour, f, f + 1, tries=20)
            shapes, colours = SHAPES, tuple(c for c in COLOURS if c != colour)
            q = video_question(family, (colour,))
        else:
            shape = _shape(rng)
            _add(rng, tracks, config, shape, answer, f, f + 1, tries=20)
            shapes, colours = tuple(s for s in SHAPES if s != shape), COLOURS
            q = video_question(family, (shape,))
        for _ in range(round(T * config.fillers_per_frame)):
            _add(
                rng, tracks, config,
                lambda g: str(g.choice(shapes)), lambda g: str(g.choice(colours)),
                lambda g: int(g.integers(0, T - 4)), last=T,
            )
        result = oracle(q, tracks, T)
        if result is not None and result[0] == answer:
            return tracks, T, q
    raise RuntimeError(f"could not build a {family}={answer} needle video in 100 tries")


def render(rng: np.random.Generator, tracks: list[Track], frames: int, size: int) -> tuple[np.ndarray, np.ndarray, list[list[Obj]]]:
    """(frames uint8 [T, H, W, 3], label masks uint8 [T, H, W], objects per frame)."""
    canvas = background(rng, size, size)
    rgbs = {tr.id: object_rgb(rng, tr.colour) for tr in tracks}
    video = np.empty((frames, size, size, 3), np.uint8)
    masks = np.empty((frames, size, size), np.uint8)
    per_frame = []
    for t in range(frames):
        objs = [o for o in (tr.at(t) for tr in tracks) if o is not None]
        image, masks[t] = draw_objects(rng, canvas, objs, [rgbs[o.track] for o in objs])
        video[t] = add_noise(rng, image, sigma=(0.01, 0.02))
        per_frame.append(objs)
    return video, masks, per_frame


def derive(
    rng: np.random.Generator,
    tracks: list[Track],
    frames: int,
    k: int,
    skip: set[str] = frozenset(),
    weights: Mapping[str, float] | None = None,
) -> list[tuple[VideoQuestion, str]]:
    """Up to ``k`` more valid (question, answer) pairs about a video (training: several turns per clip),
    drawn uniformly or, with ``weights`` (family -> weight, 1 for a family it leaves out), each question
    in proportion to its family's weight."""
    candidates = [video_question(f) for f in ("first-colour", "first-shape", "now-count")]
    candidates += [video_question("now-colour", (s,)) for s in SHAPES]
    candidates += [video_question("needle-shape", (c,)) for c in COLOURS]
    candidates += [video_question("needle-colour", (s,)) for s in SHAPES]
    valid = []
    for q in candidates:
        result = oracle(q, tracks, frames)
        if result is not None and q.text not in skip:
            valid.append((q, result[0]))
    if weights and valid:
        odds = np.array([weights.get(q.family, 1.0) for q, _ in valid])
        order = rng.choice(len(valid), size=min(k, len(valid)), replace=False, p=odds / odds.sum())
    else:
        order = rng.permutation(len(valid))[:k]
    return [valid[i] for i in order]
