"""The ``shapes-relations`` task: new question families, unambiguous and balanced, in the shipped
tokenizers' vocabulary, and the existing tasks' samples unchanged by their addition."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlmopt import reference
from vlmopt.reference import relations, scenes, tasks
from vlmopt.reference.render import COLOURS, SHAPES, Obj

GOLDEN = Path(__file__).with_name("existing_tasks_golden.json")
"""The first samples of every existing task (question, answer, pixel hash, and for ``shapes`` the
extra training turns) and the tokenizer vocabulary, as main generated them before this task existed."""


def test_existing_tasks_samples_are_unchanged():
    golden = json.loads(GOLDEN.read_text())
    assert tasks.vocabulary() == golden.pop("vocabulary")
    for name, rows in golden.items():
        task = tasks.get(name)
        for split, index, family, question, answer, digest, turns in rows:
            s = task.sample(split, index)
            pixels = s.frames if s.is_video else s.image
            assert (s.family, s.question, s.answer) == (family, question, answer), (name, split, index)
            assert hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == digest, (name, split, index)
            if name == "shapes":
                assert [list(t) for t in s.more_questions(3)] == turns


@pytest.mark.parametrize("model", reference.MODEL_NAMES)
def test_every_word_is_in_the_shipped_vocabulary(model):
    """Questions and answers of the new families tokenize without <unk> with the models' own tokenizers."""
    from transformers import AutoTokenizer

    vocab = json.loads((reference.path(model) / "tokenizer.json").read_text())["model"]["vocab"]
    assert relations.vocabulary_words() <= set(vocab)
    tok = AutoTokenizer.from_pretrained(reference.path(model), local_files_only=True)
    task = reference.task_for(model, "shapes-relations")
    for index in range(24):
        s = task.sample("train", index)
        texts = [s.question, s.answer] + [t for pair in s.more_questions(6, seed=index) for t in pair]
        ids = tok(" ".join(texts), add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, texts
        assert len(tok(s.answer, add_special_tokens=False)["input_ids"]) == 1  # one-word answers stay one token


def test_task_uses_the_models_shapes_pictures():
    shapes, new = reference.task_for("tiny-llava", "shapes"), reference.task_for("tiny-llava", "shapes-relations")
    assert new.config == shapes.config and new.name == "shapes-relations"
    with pytest.raises(KeyError, match="not trained on task 'needle'"):
        reference.task_for("tiny-llava", "needle")


def test_answers_are_balanced_and_match_the_oracle():
    task = reference.task_for("tiny-llava", "shapes-relations")
    pairs = tasks.family_answers(task, "test", n=240)
    for family, answers in task.families.items():
        counts = Counter(a for f, a in pairs if f == family)
        assert set(counts) == set(answers) and max(counts.values()) - min(counts.values()) <= 1
    for index in range(36):
        s = task.sample("validation", index)
        assert (s.family, s.answer) == pairs[index]
        q = relations.question(s.family, s.meta["params"])
        answer, evidence = relations.oracle(q, s.objects[0])
        assert (answer, q.text) == (s.answer, s.question) and [(0, k) for k in evidence] == s.evidence
        if s.family == "neighbour-shape":
            direction, named = s.meta["params"]
            target, ref = (s.objects[0][k] for k in evidence)
            assert (ref.colour, ref.shape) == named and scenes.relation(target, ref) == direction
        else:
            colours = Counter(o.colour for o in s.objects[0])
            (top, count), *rest = colours.most_common()
            assert top == s.answer and all(c < count for _, c in rest)
            assert relations.MAJORITY_COUNTS.index(s.meta["params"][0]) + 2 == count


def _obj(shape, colour, x, y):
    return Obj(shape=shape, colour=colour, cx=float(x), cy=float(y), r=10.0)


def test_oracle_refuses_ambiguous_scenes():
    ask = lambda objects: relations.oracle(relations.question("neighbour-shape", ("left", ("red", "star"))), objects)
    star = _obj("star", "red", 150, 100)
    assert ask([star, _obj("circle", "blue", 60, 100), _obj("square", "green", 150, 30)])[0] == "circle"
    # two objects on the left: no single answer
    assert ask([star, _obj("circle", "blue", 60, 100), _obj("square", "green", 90, 110)]) is None
    # one clearly left, one diagonal (up-left at 40°): a judgement call, so refused
    assert ask([star, _obj("circle", "blue", 60, 100), _obj("square", "green", 100, 60)]) is None
    # the named object twice
    assert ask([star, _obj("star", "red", 200, 30), _obj("circle", "blue", 60, 100)]) is None
    most = lambda count, objects: relations.oracle(relations.question("majority-colour", (count,)), objects)
    two_red = [_obj("star", "red", 0, 0), _obj("circle", "red", 50, 0), _obj("star", "blue", 100, 0)]
    assert most("two", two_red)[0] == "red" and most("three", two_red) is None
    assert most("two", two_red + [_obj("cross", "blue", 150, 0)]) is None  # a tie for most


def test_training_turns_mix_new_and_old_families_and_are_valid():
    task = reference.task_for("tiny-llava", "shapes-relations")
    new_texts = {
        relations.question("neighbour-shape", (d, (c, s))).text
        for d in scenes.DIRECTIONS for c in COLOURS for s in SHAPES
    } | {relations.question("majority-colour", (c,)).text for c in relations.MAJORITY_COUNTS}
    seen_new = seen_old = 0
    for index in range(6):
        s = task.sample("train", index)
        turns = s.more_questions(8, seed=3)
        assert turns == s.more_questions(8, seed=3) and s.question not in [q for q, _ in turns]
        for text, answer in turns:
            if text in new_texts:
                seen_new += 1
                family = "majority-colour" if text.startswith("what colour are") else "neighbour-shape"
                params = _params_of(family, text)
                assert relations.oracle(relations.question(family, params), s.objects[0])[0] == answer
            else:
                seen_old += 1
    assert seen_new and seen_old


def _params_of(family: str, text: str) -> tuple:
    words = re.findall(r"[a-z]+", text)
    if family == "majority-colour":
        return (words[3],)
    return (words[3], (words[-2], words[-1]))


def test_samples_are_reproducible_and_differ_from_shapes():
    task = tasks.get("shapes-relations")
    a, b = task.sample("test", 5), tasks.get("shapes-relations").sample("test", 5)
    assert np.array_equal(a.image, b.image) and a.question == b.question
    assert not np.array_equal(a.image, tasks.get("shapes").sample("test", 5).image)
