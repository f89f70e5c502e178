"""The ``shapes-captions`` task: captions true of their pictures, 15-40 answer tokens the shipped
tokenizers know, balanced layouts, and the fact F1 that scores them (hand-built cases and random ones)."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from vlmopt import reference
from vlmopt.reference import captions, scenes, tasks
from vlmopt.reference.render import COLOURS, SHAPES, Obj


def _obj(shape, colour, x, y):
    return Obj(shape=shape, colour=colour, cx=float(x), cy=float(y), r=8.0)


@pytest.mark.parametrize("model", reference.MODEL_NAMES)
def test_no_caption_word_is_unknown_to_the_shipped_tokenizer(model):
    """Every caption and the question tokenize without <unk> with the model's own shipped tokenizer,
    and an answer (caption + end token) is 15-40 tokens."""
    from transformers import AutoTokenizer

    vocab = json.loads((reference.path(model) / "tokenizer.json").read_text())["model"]["vocab"]
    assert captions.vocabulary_words() <= set(vocab)
    tok = AutoTokenizer.from_pretrained(reference.path(model), local_files_only=True)
    task = reference.task_for(model, "shapes-captions")
    start = int(np.random.default_rng().integers(0, 10_000))
    lengths = []
    for index in range(start, start + 30):
        s = task.sample("train", index)
        ids = tok(s.question + " " + s.answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, s.answer
        answer = tok(s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert len(answer) == len(s.answer.split()) + 1  # one token per word
        lengths.append(len(answer))
    assert 15 <= min(lengths) and max(lengths) <= 40, lengths


def test_caption_is_true_of_the_picture():
    task = reference.task_for("tiny-llava", "shapes-captions")
    start = int(np.random.default_rng().integers(0, 10_000))
    for index in range(start, start + 24):
        s = task.sample("validation", index)
        objects = s.objects[0]
        assert s.question == captions.QUESTION and s.family == "caption"
        facts = captions.parse(s.answer)
        kinds = Counter((o.colour, o.shape) for o in objects)
        assert {f for f in facts if f[0] == "group"} == {("group", c, sh, n) for (c, sh), n in kinds.items()}
        assert max(kinds.values()) == scenes.NUMBERS.index(s.meta["layout"]) + 1
        relations = [f for f in facts if f[0] == "relation"]
        assert len(relations) == captions.RELATIONS
        for _, a, direction, b in relations:
            (oa,), (ob,) = ([o for o in objects if (o.colour, o.shape) == k] for k in (a, b))
            assert scenes.relation(oa, ob) == direction
        # the inventory comes in colour order, then shape order
        groups = re.findall(rf"({'|'.join(COLOURS)}) (\w+)", s.answer.split(" the ")[0])
        keys = [(COLOURS.index(c), SHAPES.index(captions._SINGULAR.get(sh, sh))) for c, sh in groups]
        assert keys == sorted(keys)
        assert s.evidence == [(0, k) for k in range(len(objects))]


def test_layouts_are_balanced_and_the_pictures_are_the_models():
    task = reference.task_for("tiny-llava", "shapes-captions")
    assert task.config == reference.task_for("tiny-llava", "shapes").config and task.sentences
    layouts = Counter(task.sample("test", i).meta["layout"] for i in range(12))
    assert layouts == {layout: 4 for layout in captions.LAYOUTS}


def test_hand_built_caption_and_its_facts():
    objects = [_obj("circle", "red", 40, 100), _obj("circle", "red", 60, 180), _obj("star", "blue", 120, 100),
               _obj("square", "green", 120, 20), _obj("cross", "red", 200, 20)]
    text = captions.caption(objects)
    assert text == ("two red circles one red cross one green square one blue star "
                    "the red cross is right relative to the green square the green square is above relative to the blue star")
    assert captions.parse(text) == {  # a relation is kept as stated from its right / lower side
        ("group", "red", "circle", 2), ("group", "red", "cross", 1), ("group", "green", "square", 1),
        ("group", "blue", "star", 1), ("relation", ("red", "cross"), "right", ("green", "square")),
        ("relation", ("blue", "star"), "below", ("green", "square")),
    }
    with pytest.raises(ValueError, match="no clear direction"):
        captions.caption([_obj("circle", "red", 0, 0), _obj("star", "blue", 30, 30), _obj("cross", "green", 50, 0)])


def test_score_on_hand_built_cases():
    truth = ("two red circles one red cross one green square one blue star "
             "the red cross is right relative to the green square the green square is above relative to the blue star")
    assert captions.score(truth, truth) == 1.0
    assert captions.score("", truth) == 0.0 and captions.score("purple purple purple", truth) == 0.0
    # the same facts in another order, digits, a relation stated from the other side: all the same facts
    same = ("the blue star is below relative to the green square 1 blue star one green square "
            "the green square is left relative to the red cross 2 red circle one red cross")
    assert captions.score(same, truth) == 1.0
    # one count wrong: 5 of 6 stated facts right, 5 of 6 true facts stated
    assert captions.score(truth.replace("two red circles", "three red circles"), truth) == pytest.approx(5 / 6)
    # half the facts, nothing wrong: precision 1, recall 1/2
    assert captions.score("two red circles one red cross one green square", truth) == pytest.approx(2 / 3)
    # every fact plus two false ones: precision 6/8, recall 1
    extra = truth + " one purple star the red cross is below relative to the blue star"
    assert captions.score(extra, truth) == pytest.approx(2 * 0.75 / 1.75)
    # a repeated fact is one fact
    assert captions.score(truth + " two red circles", truth) == 1.0
    with pytest.raises(ValueError, match="states no fact"):
        captions.score(truth, "nothing here")


def test_score_of_random_fact_subsets():
    """Stating k of a caption's n facts and m false ones scores 2k / (2k + (n - k) + m) (F1), on
    fresh random captions."""
    rng = np.random.default_rng()
    task = tasks.get("shapes-captions")
    for index in rng.integers(0, 10_000, size=12).tolist():
        truth = task.sample("train", index).answer
        groups = re.findall(r"(?:one|two|three) \w+ \w+", truth)
        relations = re.findall(r"the \w+ \w+ is \w+ relative to the \w+ \w+", truth)
        parts = groups + relations
        n = len(parts)
        k = int(rng.integers(0, n + 1))
        kept = [parts[i] for i in sorted(rng.permutation(n)[:k])]
        present = {(c, s) for _, c, s, _ in (f for f in captions.parse(truth) if f[0] == "group")}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        m = int(rng.integers(0, 3))
        false = [f"three {c} {scenes.PLURALS[s]}" for c, s in absent[:m]]
        text = " ".join(kept + false)
        expected = 0.0 if k == 0 else 2 * k / (2 * k + (n - k) + m)
        assert captions.score(text, truth) == pytest.approx(expected), (text, truth)


def test_task_scores_sentences_with_the_fact_f1():
    task = tasks.get("shapes-captions")
    s = task.sample("test", 1)
    assert task.score_answer(s.answer, s) == 1.0 and task.score_answer(s.answer.split(" the ")[0], s) < 1.0
    assert task.max_new_tokens >= 40
    shapes = tasks.get("shapes")
    one = shapes.sample("test", 0)
    assert shapes.score_answer(one.answer, one) is True and not shapes.sentences
