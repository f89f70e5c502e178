"""Seeded synthetic vision-language tasks whose one-word answers need the right visual tokens.

>>> from vlmopt.reference import tasks
>>> task = tasks.get("shapes", size=224)
>>> test = task.samples("test", n=500)        # the recorded test split: indices 0..499, lazy
>>> s = test[0]; s.question, s.answer, s.family, s.image.shape
('what colour is the cross?', 'orange', 'colour', (224, 224, 3))
>>> tasks.score("Orange.", s)
True

Tasks: ``shapes`` (one image, families colour/shape/count/exist/position), ``shapes-video``
(streaming video: what is on screen now, what appeared first), ``needle`` (a long video where one
frame holds the answer), ``shapes-relations`` (the ``shapes`` pictures, question families the
reference models were not trained on: :mod:`vlmopt.reference.relations`) and ``shapes-captions``
(the same pictures described in a sentence: :mod:`vlmopt.reference.captions`). Each sample is a pure function of (task, config, split, index): the numpy
generator is seeded with ``[task code, split base + index]``, and the split bases are disjoint ranges
(train ``[0, 1e9)``, validation ``[1e9, 1.1e9)``, test ``[2e9, 2.1e9)``). Families take turns
(``index % n_families``) and answers cycle within a family, so answers are balanced in every split.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmopt.reference import captions, relations, scenes, videos
from vlmopt.reference.render import COLOURS, SHAPES, Obj, add_noise, background, draw_objects
from vlmopt.reference.scenes import IMAGE_FAMILIES, NUMBERS, PLURALS, ShapesConfig
from vlmopt.reference.videos import NEEDLE_FAMILIES, STREAM_FAMILIES, VideoConfig

SPLIT_BASES = {"train": 0, "validation": 1_000_000_000, "test": 2_000_000_000}
"""First generator seed of each split."""
SPLIT_SIZES = {"train": 1_000_000_000, "validation": 100_000_000, "test": 100_000_000}
"""Number of seeds (samples) in each split; the ranges do not overlap."""
BLANK_VALUE = 128
"""Grey level of the text-only control's uniform image."""


@dataclass
class Sample:
    """One question about one image or video.

    ``image`` is uint8 [H, W, 3] (None for a video); ``frames`` uint8 [T, H, W, 3] (None for an
    image). ``objects[t]`` lists the objects drawn in frame ``t`` (an image has one frame), and
    ``masks`` is the matching uint8 label map [T, H, W] (0 background, k → ``objects[t][k-1]``).
    ``evidence`` holds (frame, object index) pairs the answer depends on: their boxes are the
    tokens a good pruning method must keep.
    """

    task: str
    split: str
    index: int
    family: str
    question: str
    answer: str
    image: np.ndarray | None
    frames: np.ndarray | None
    objects: list[list[Obj]]
    masks: np.ndarray | None
    evidence: list[tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_video(self) -> bool:
        return self.frames is not None

    def boxes(self, frame: int = 0) -> list[tuple[int, int, int, int]]:
        """Bounding boxes (x0, y0, x1, y1) of the objects in ``frame``."""
        return [o.box for o in self.objects[frame]]

    def evidence_boxes(self) -> list[tuple[int, tuple[int, int, int, int]]]:
        """(frame, box) of each object the answer depends on."""
        return [(t, self.objects[t][k].box) for t, k in self.evidence]

    def pil_image(self):
        """The image as a PIL image (images only)."""
        from PIL import Image

        return Image.fromarray(self.image)

    def pil_frames(self) -> list:
        """The frames as PIL images (videos only)."""
        from PIL import Image

        return [Image.fromarray(f) for f in self.frames]

    def more_questions(self, k: int, seed: int = 0) -> list[tuple[str, str]]:
        """Up to ``k`` other valid (question, answer) pairs about the same picture (training uses them
        as extra conversation turns; they are not balanced like the sample's own question)."""
        rng = np.random.default_rng([seed, self.index])
        if self.is_video:
            pairs = videos.derive(rng, self.meta["tracks"], self.meta["num_frames"], k, skip={self.question})
        elif self.task == ShapesRelationsTask.name:
            pairs = relations.derive(rng, self.objects[0], k, skip={self.question})
        else:
            pairs = scenes.derive(rng, self.objects[0], k, skip={self.question})
        return [(q.text, a) for q, a in pairs]

    def text_only(self) -> Sample:
        """The same question with the picture replaced by a uniform grey one of the same size
        (same number of visual tokens): what the model answers without seeing anything."""
        blank = lambda a: None if a is None else np.full_like(a, BLANK_VALUE)  # noqa: E731
        return dataclasses.replace(
            self,
            image=blank(self.image),
            frames=blank(self.frames),
            objects=[[] for _ in self.objects],
            masks=None if self.masks is None else np.zeros_like(self.masks),
            evidence=[],
            meta={**self.meta, "text_only": True},
        )


class Samples(Sequence):
    """A lazy, indexable list of samples: each is rendered when accessed (videos are megabytes)."""

    def __init__(self, task: Task, split: str, indices: Sequence[int]) -> None:
        self.task, self.split, self.indices = task, split, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Samples(self.task, self.split, self.indices[i])
        return self.task.sample(self.split, self.indices[i])

    def __iter__(self) -> Iterator[Sample]:
        for index in self.indices:
            yield self.task.sample(self.split, index)


class Task:
    """A seeded question generator. Subclasses implement :meth:`_build`."""

    name: str
    code: int
    """Mixed into the seed so two tasks never share a random stream."""
    families: dict[str, tuple[str, ...]]
    """Family → answers (each family's answers come up equally often); for a task with sentence
    answers, family → the scene layouts it cycles through (equally often)."""
    video: bool
    sentences: bool = False
    """Are the answers sentences (scored by :meth:`score_answer`), not one word?"""
    max_new_tokens: int = 3
    """Tokens a greedy answer may take (evaluation's ``generate``)."""

    def __init__(self, config) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def sample(self, split: str, index: int) -> Sample:
        """Sample ``index`` of ``split`` (bit-identical on every call and machine)."""
        if split not in SPLIT_BASES:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_BASES)}")
        if not 0 <= index < SPLIT_SIZES[split]:
            raise IndexError(f"{split} index {index} outside [0, {SPLIT_SIZES[split]})")
        names = list(self.families)
        family = names[index % len(names)]
        answers = self.families[family]
        answer = answers[(index // len(names)) % len(answers)]
        rng = np.random.default_rng([self.code, SPLIT_BASES[split] + index])
        return self._build(rng, split, index, family, answer)

    def samples(self, split: str = "test", n: int = 500, seed: int | None = None, start: int = 0) -> Samples:
        """``n`` samples of ``split``, rendered lazily.

        ``seed=None``: the recorded set, indices ``start .. start+n-1`` (``split="test"``: the test
        split every reported number uses). An integer ``seed`` draws ``n`` distinct indices of the
        split at random instead (a fresh set, still reproducible).
        """
        if seed is None:
            indices = range(start, start + n)
        else:
            indices = np.random.default_rng(seed).choice(SPLIT_SIZES[split], size=n, replace=False).tolist()
        return Samples(self, split, indices)

    def _build(self, rng: np.random.Generator, split: str, index: int, family: str, answer: str) -> Sample:
        raise NotImplementedError

    def score_answer(self, prediction: str, sample: Sample) -> bool | float:
        """How right ``prediction`` is for ``sample``: whether its first word is the answer
        (:func:`score`); tasks with sentence answers give a fraction in [0, 1]."""
        return score(prediction, sample)


class ShapesTask(Task):
    """``shapes``: small saturated shapes on a cluttered background, one question each."""

    name, code, video = "shapes", 101, False
    families = IMAGE_FAMILIES

    def __init__(self, config: ShapesConfig | None = None) -> None:
        super().__init__(config or ShapesConfig())

    scene = staticmethod(scenes.build)
    """Builds (objects, question, evidence) for a family and answer: the task's scene generator."""

    def _build(self, rng, split, index, family, answer) -> Sample:
        objects, q, evidence = self.scene(rng, family, answer, self.config)
        canvas = background(rng, self.config.size, self.config.size)
        image, mask = draw_objects(rng, canvas, objects)
        image = add_noise(rng, image)
        return Sample(
            self.name, split, index, family, q.text, answer, image, None, [objects], mask[None],
            [(0, k) for k in evidence], {"params": q.params},
        )


class ShapesRelationsTask(ShapesTask):
    """``shapes-relations``: the ``shapes`` pictures with question families the reference models were
    not trained on (:mod:`vlmopt.reference.relations`), for fine-tuning experiments."""

    name, code = "shapes-relations", 104
    families = relations.RELATION_FAMILIES
    base = "shapes"
    """The task whose picture configuration a model's ``tasks.json`` gives this one."""

    scene = staticmethod(relations.build)


class ShapesCaptionsTask(ShapesTask):
    """``shapes-captions``: the ``shapes`` pictures described in a sentence of 32-38 words
    (:mod:`vlmopt.reference.captions`), scored by the F1 of its facts: for fine-tuning on long answers.
    The family ``caption`` cycles through :data:`captions.LAYOUTS` (all objects distinct, a pair, a
    triple); ``meta["layout"]`` says which."""

    name, code, sentences, max_new_tokens = "shapes-captions", 105, True, 48
    families = {"caption": captions.LAYOUTS}
    base = "shapes"
    """The task whose picture configuration a model's ``tasks.json`` gives this one."""

    def _build(self, rng, split, index, family, answer) -> Sample:
        objects = captions.build(rng, answer, self.config)
        canvas = background(rng, self.config.size, self.config.size)
        image, mask = draw_objects(rng, canvas, objects)
        image = add_noise(rng, image)
        return Sample(
            self.name, split, index, family, captions.QUESTION, captions.caption(objects), image, None, [objects],
            mask[None], [(0, k) for k in range(len(objects))], {"layout": answer},
        )

    def score_answer(self, prediction: str, sample: Sample) -> float:
        """The fact F1 of ``prediction`` against the sample's caption (:func:`captions.score`)."""
        return captions.score(prediction, sample.answer)


class _VideoTask(Task):
    video = True

    def __init__(self, config: VideoConfig | None = None) -> None:
        super().__init__(config or self.default_config())

    @staticmethod
    def default_config() -> VideoConfig:
        return VideoConfig()

    def _scene(self, rng, family, answer):
        raise NotImplementedError

    def _build(self, rng, split, index, family, answer) -> Sample:
        tracks, T, q = self._scene(rng, family, answer)
        _, evidence_ids = videos.oracle(q, tracks, T)
        frames, masks, objects = videos.render(rng, tracks, T, self.config.size)
        start = videos.evidence_start(family, T)
        evidence = [(t, k) for t, objs in enumerate(objects) if t >= start for k, o in enumerate(objs) if o.track in evidence_ids]
        meta = {"params": q.params, "tracks": tracks, "num_frames": T}
        return Sample(self.name, split, index, family, q.text, answer, None, frames, objects, masks, evidence, meta)


class ShapesVideoTask(_VideoTask):
    """``shapes-video``: streaming questions about the last frames and about the first object seen."""

    name, code = "shapes-video", 202
    families = STREAM_FAMILIES

    def _scene(self, rng, family, answer):
        return videos.build_stream(rng, family, answer, self.config)


class NeedleTask(_VideoTask):
    """``needle``: long videos of distractors; exactly one frame holds the object asked about."""

    name, code = "needle", 303
    families = NEEDLE_FAMILIES

    @staticmethod
    def default_config() -> VideoConfig:
        return VideoConfig(frames=(64, 128), max_visible=3, fillers_per_frame=1 / 10)

    def _scene(self, rng, family, answer):
        return videos.build_needle(rng, family, answer, self.config)


TASKS: dict[str, type[Task]] = {
    "shapes": ShapesTask, "shapes-video": ShapesVideoTask, "needle": NeedleTask, "shapes-relations": ShapesRelationsTask,
    "shapes-captions": ShapesCaptionsTask,
}
TASK_NAMES = tuple(TASKS)


def get(name: str, **config: Any) -> Task:
    """The task ``name`` (``shapes``, ``shapes-video``, ``needle``, ``shapes-relations``, ``shapes-captions``); keyword arguments override its
    config (:class:`ShapesConfig` or :class:`VideoConfig` fields, e.g. ``size=448``)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    cls = TASKS[name]
    base = ShapesConfig() if issubclass(cls, ShapesTask) else cls.default_config()
    return cls(dataclasses.replace(base, **config))


# ---------------------------------------------------------------- scoring


_DIGITS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "color": "colour", "gray": "grey"}


def normalize(text: str) -> str:
    """The first word of ``text``, lower-cased, punctuation stripped, digits spelt out ("" if none)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return _DIGITS.get(words[0], words[0]) if words else ""


def score(prediction: str, sample: Sample | str) -> bool:
    """Whether the first word of ``prediction`` is the answer (of ``sample``, or a string answer)."""
    answer = sample if isinstance(sample, str) else sample.answer
    return normalize(prediction) == normalize(answer)


def majority_rate(samples: Sequence[Sample] | Sequence[tuple[str, str]]) -> dict[str, float]:
    """Per family (and ``"overall"``): the accuracy of always giving the family's most common answer.

    Accepts samples or (family, answer) pairs (cheap: no rendering needed for the latter).
    """
    pairs = [(s.family, s.answer) if isinstance(s, Sample) else s for s in samples]
    counts: dict[str, Counter] = {}
    for family, answer in pairs:
        counts.setdefault(family, Counter())[answer] += 1
    rates = {f: c.most_common(1)[0][1] / sum(c.values()) for f, c in sorted(counts.items())}
    rates["overall"] = sum(c.most_common(1)[0][1] for c in counts.values()) / max(1, len(pairs))
    return rates


def family_answers(task: Task, split: str = "test", n: int = 500, start: int = 0) -> list[tuple[str, str]]:
    """(family, answer) of samples ``start..start+n-1`` without rendering them."""
    names = list(task.families)
    out = []
    for index in range(start, start + n):
        family = names[index % len(names)]
        answers = task.families[family]
        out.append((family, answers[(index // len(names)) % len(answers)]))
    return out


def vocabulary() -> list[str]:
    """Every word a question or an answer of any task can contain (for the tokenizer)."""
    words: set[str] = set()

    def add(text: str) -> None:
        words.update(re.findall(r"[a-z]+|[^\sa-z]", text))

    for s in SHAPES:
        for c in COLOURS:
            for family, params in [
                ("colour", (s,)), ("shape", (c,)), ("count", ("shape", s)), ("count", ("colour", c)),
                ("exist", (c, s)), ("position", ((c, s), (c, s))),
            ]:
                add(scenes.question(family, params).text)
            for family, params in [("now-colour", (s,)), ("needle-shape", (c,)), ("needle-colour", (s,))]:
                add(videos.video_question(family, params).text)
    for family in ("first-colour", "first-shape", "now-count"):
        add(videos.video_question(family).text)
    for answers in (*IMAGE_FAMILIES.values(), *STREAM_FAMILIES.values(), *NEEDLE_FAMILIES.values()):
        for a in answers:
            add(a)
    words.update(PLURALS.values())
    words.update(NUMBERS)
    return sorted(words)
