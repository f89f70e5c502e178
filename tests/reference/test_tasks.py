"""The synthetic task generator: deterministic, disjoint splits, balanced, unambiguous answers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vlmopt.reference import scenes, tasks, videos

SMALL_VIDEO = {"frames": (32, 40)}
"""Shorter videos keep these tests fast; the generator logic is the same."""


def _task(name: str) -> tasks.Task:
    return tasks.get(name, **(SMALL_VIDEO if tasks.TASKS[name].video else {}))


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_same_seed_same_sample(name):
    task = _task(name)
    a, b = task.sample("test", 7), task.sample("test", 7)
    pixels = (a.frames, b.frames) if a.is_video else (a.image, b.image)
    assert np.array_equal(*pixels)
    assert (a.question, a.answer, a.family) == (b.question, b.answer, b.family)
    assert a.evidence == b.evidence and a.boxes() == b.boxes()
    # a fresh task object (a new process would do the same) gives the same bits
    c = _task(name).sample("test", 7)
    assert np.array_equal(c.frames if c.is_video else c.image, pixels[0])


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_different_seeds_and_splits_differ(name):
    task = _task(name)
    n_fam = len(task.families)
    first = task.sample("test", 0)
    same_family = task.sample("test", n_fam * len(task.families[first.family]))  # same family and answer (or layout)
    assert same_family.family == first.family and (task.sentences or same_family.answer == first.answer)
    px = lambda s: s.frames if s.is_video else s.image  # noqa: E731
    assert px(first).shape != px(same_family).shape or not np.array_equal(px(first), px(same_family))
    for split in ("train", "validation"):
        other = task.sample(split, 0)
        assert px(first).shape != px(other).shape or not np.array_equal(px(first), px(other))


def test_split_seed_ranges_are_disjoint():
    ranges = sorted((tasks.SPLIT_BASES[s], tasks.SPLIT_BASES[s] + tasks.SPLIT_SIZES[s]) for s in tasks.SPLIT_BASES)
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end <= start
    with pytest.raises(IndexError):
        tasks.get("shapes").sample("test", tasks.SPLIT_SIZES["test"])


def test_seeded_subsets_are_reproducible_and_distinct():
    task = tasks.get("shapes")
    a, b = task.samples("test", n=20, seed=1), task.samples("test", n=20, seed=1)
    assert a.indices == b.indices and len(set(a.indices)) == 20
    assert task.samples("test", n=20, seed=2).indices != a.indices
    assert task.samples("test", n=5).indices == list(range(5))


@pytest.mark.parametrize("name", [n for n in tasks.TASK_NAMES if not tasks.TASKS[n].sentences])
def test_answers_balanced_within_each_family(name):
    """(Sentence answers are each their own; their layouts' balance: tests/reference/test_captions.py.)"""
    task = _task(name)
    pairs = tasks.family_answers(task, "test", n=600)
    for family, answers in task.families.items():
        counts = Counter(a for f, a in pairs if f == family)
        assert set(counts) == set(answers)
        assert max(counts.values()) - min(counts.values()) <= 1
    rates = tasks.majority_rate(pairs)
    for family, answers in task.families.items():
        assert rates[family] == pytest.approx(1 / len(answers), abs=0.02)
    # rendered samples carry the answers family_answers predicts
    rendered = [task.sample("test", i) for i in range(len(task.families) * 2)]
    assert [(s.family, s.answer) for s in rendered] == pairs[: len(rendered)]


@pytest.mark.parametrize("index", range(40))
def test_image_answers_match_the_oracle(index):
    s = tasks.get("shapes").sample("validation", index)
    answer, evidence = scenes.oracle(scenes.question(s.family, s.meta["params"]), s.objects[0])
    assert answer == s.answer
    assert [(0, k) for k in evidence] == s.evidence
    assert s.question == scenes.question(s.family, s.meta["params"]).text
    area = s.image.shape[0] * s.image.shape[1]
    for x0, y0, x1, y1 in s.boxes():
        assert 0 <= x0 < x1 <= s.image.shape[1] and 0 <= y0 < y1 <= s.image.shape[0]
        assert (x1 - x0) * (y1 - y0) / area < 0.04  # small objects: most patches carry no answer
    # the label mask marks exactly the drawn objects
    assert set(np.unique(s.masks[0])) <= set(range(len(s.objects[0]) + 1))


@pytest.mark.parametrize("name", ["shapes-video", "needle"])
@pytest.mark.parametrize("index", range(8))
def test_video_answers_match_the_oracle(name, index):
    s = _task(name).sample("validation", index)
    q = videos.video_question(s.family, s.meta["params"])
    answer, ids = videos.oracle(q, s.meta["tracks"], s.meta["num_frames"])
    assert answer == s.answer and q.text == s.question
    assert s.frames.shape[0] == s.meta["num_frames"] and s.frames.shape[0] % 2 == 0
    assert s.evidence and all(s.objects[t][k].track in ids for t, k in s.evidence)
    if name == "needle":
        assert len({t for t, _ in s.evidence}) == 1  # exactly one frame holds the answer


def test_text_only_control_is_uniform_and_keeps_the_token_count():
    for name in tasks.TASK_NAMES:
        s = _task(name).sample("test", 3)
        blank = s.text_only()
        px = blank.frames if blank.is_video else blank.image
        orig = s.frames if s.is_video else s.image
        assert px.shape == orig.shape and (px == tasks.BLANK_VALUE).all()
        assert (blank.question, blank.answer) == (s.question, s.answer)
        assert blank.evidence == [] and all(not objs for objs in blank.objects)


def test_score_normalises_one_word():
    s = tasks.get("shapes").sample("test", 0)
    assert tasks.score(f"  {s.answer.upper()}.", s)
    assert tasks.score(f"{s.answer} </s>", s)
    assert not tasks.score("", s)
    assert tasks.score("2", "two") and tasks.score("Two objects", "two")
    assert not tasks.score("twenty", "two")


def test_vocabulary_covers_every_question():
    from vlmopt.reference.processing import build_tokenizer

    tok = build_tokenizer("qwen2_5_vl")
    unk = tok.convert_tokens_to_ids("<unk>")
    for name in tasks.TASK_NAMES:
        task = _task(name)
        for family, answers in task.families.items():
            for i in range(len(task.families)):
                s = task.sample("test", i)
                ids = tok(s.question + " " + s.answer)["input_ids"]
                assert unk not in ids, s.question


@pytest.mark.parametrize("balanced", [False, True])
def test_derived_turns_are_valid_and_unique(balanced):
    task = tasks.get("shapes", size=224)
    for index in range(40):
        s = task.sample("train", index)
        pairs = scenes.derive(np.random.default_rng(index), s.objects[0], 8, skip={s.question}, balanced=balanced)
        texts = [q.text for q, _ in pairs]
        assert len(set(texts)) == len(texts) and s.question not in texts
        for q, answer in pairs:
            assert scenes.oracle(q, s.objects[0])[0] == answer


def test_balanced_turns_even_out_the_answers_a_picture_allows():
    """Unbalanced, existence turns are mostly "yes" and counting turns mostly "one" (what random
    pictures hold); balanced draws bring both closer to even without changing the families."""
    task = tasks.get("shapes", size=224)
    share = {}
    for balanced in (False, True):
        answers: dict[str, Counter] = {"count": Counter(), "exist": Counter()}
        families = Counter()
        for index in range(300):
            s = task.sample("train", index)
            for q, a in scenes.derive(np.random.default_rng([7, index]), s.objects[0], 8, balanced=balanced):
                families[q.family] += 1
                if q.family in answers:
                    answers[q.family][a] += 1
        share[balanced] = (
            answers["exist"]["yes"] / sum(answers["exist"].values()),
            answers["count"]["one"] / sum(answers["count"].values()),
            families,
        )
    (yes0, one0, fam0), (yes1, one1, fam1) = share[False], share[True]
    assert abs(yes1 - 0.5) < abs(yes0 - 0.5) and one1 < one0
    assert set(fam0) == set(fam1)


def test_derived_turns_do_not_depend_on_the_process_string_hashing():
    """Training turns are the same in every process (Python salts string hashes per process, so
    iterating a set of colour/shape names would reorder them from run to run)."""
    import os
    import subprocess
    import sys

    start = int(np.random.default_rng().integers(0, 1000))
    code = (
        "import numpy as np\n"
        "from vlmopt.reference import scenes, tasks\n"
        "task = tasks.get('shapes', size=224)\n"
        f"for index in range({start}, {start + 12}):\n"
        "    s = task.sample('train', index)\n"
        "    for balanced in (False, True):\n"
        "        print([q.text for q, _ in scenes.derive(np.random.default_rng(index), s.objects[0], 8, balanced=balanced)])\n"
    )
    outputs = {
        seed: subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert outputs["1"].count("\n") == 24
    assert outputs["1"] == outputs["2"] == outputs["3"]


def test_turn_weights_draw_a_family_more_often_and_keep_turns_valid():
    """Weighted draws (a fine-tune aiming at a weak family) raise that family's share of the extra
    turns, on pictures and on videos, and every turn stays valid and unique."""
    pictures, clips = tasks.get("shapes", size=224), tasks.get("shapes-video")
    shares = {}
    for weights in (None, {"count": 4.0, "now-count": 4.0}):
        families = Counter()
        for index in range(120):
            s = pictures.sample("train", index)
            pairs = scenes.derive(np.random.default_rng([3, index]), s.objects[0], 8, skip={s.question}, weights=weights)
            texts = [q.text for q, _ in pairs]
            assert len(set(texts)) == len(texts) and s.question not in texts
            assert all(scenes.oracle(q, s.objects[0])[0] == a for q, a in pairs)
            families.update(q.family for q, _ in pairs)
        for index in range(30):
            v = clips.sample("train", index)
            tracks, frames = v.meta["tracks"], v.meta["num_frames"]
            pairs = videos.derive(np.random.default_rng([3, index]), tracks, frames, 2, skip={v.question}, weights=weights)
            assert all(videos.oracle(q, tracks, frames)[0] == a for q, a in pairs)
            families.update(q.family for q, _ in pairs)
        shares[weights is None] = {f: n / sum(families.values()) for f, n in families.items()}
    uniform, weighted = shares[True], shares[False]
    assert weighted["count"] > 1.5 * uniform["count"]
    assert weighted["now-count"] > 1.2 * uniform["now-count"]
