"""What a reference model's visual tokens encode, where its LM can find their places, and where its answers look.

    python -m models.bench.model_probe [--model tiny-llava] [--n 320] [--json out.json]

Three diagnostics of a trained reference model (LLaVA or Qwen2.5-VL), on fresh ``train``-split pictures
(probes) and the recorded test split (attention):

* **Linear probes** on the object tokens the LM receives (LLaVA: CLIP features at the selected layer;
  Qwen: merged tokens): colour, shape, and how many objects share the token's colour and its shape
  (:func:`models.train.cell_targets`). A logistic regression fitted on 70% of the tokens,
  scored on the rest, against the majority class. Whatever a probe cannot read, an LM reading those
  tokens cannot either.
* **Where each visual token is**: the R² of a ridge regression of each visual token's grid column and
  row (every token, background included) from the input of each LM layer's attention (layer 1: the
  tokens the LM receives, normalised), fitted on 70% of the tokens and scored on the rest. A relative-position answer
  needs the places of the objects it compares in the residual stream; M-RoPE alone puts them only
  into attention scores.
* **Answer-position attention**: per question family and LM layer, the attention mass (mean over
  heads) that the position predicting the answer puts on the question's evidence objects and on all
  objects. A model that answers by looking at the asked objects puts its middle layers' mass on them.
* **How a relative-position answer reads its two objects**, on fresh ``train``-split position
  questions: per LM layer, the attention mass of the first and the second half of the heads on the
  first-named object (A) and on the other (B), which the split guide asks to be (A, B); the R² of
  both objects' grid columns and rows from the answer position's input to each layer, and from the
  two objects' shape words in the question (their inputs side by side); and a linear probe of the
  answer itself at the answer position. They locate where the chain objects → places → answer breaks.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from models import train
from vlmopt import reference
from vlmopt.reference import processing, scenes

PROBES = {"colour": 0, "shape": 1, "same-colour count": 5, "same-shape count": 6}
"""Probe name → row of :func:`models.train.cell_targets`."""


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, steps: int = 300, seed: int = 0) -> tuple[float, float]:
    """(held-out accuracy, held-out majority rate) of a linear probe ``features`` [N, D] → ``labels`` [N]
    fitted on a seeded random 70% of the rows (the split and the initialisation are seeded)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(labels))
    fit, held = order[:cut], order[cut:]
    with torch.random.fork_rng():  # a seeded initialisation, without touching the caller's generator
        torch.manual_seed(seed)
        head = torch.nn.Linear(features.shape[1], int(labels.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(features[fit]), labels[fit]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = (head(features[held]).argmax(-1) == labels[held]).float().mean().item()
    majority = (labels[held] == labels[fit].mode().values).float().mean().item()
    return accuracy, majority


def train_picture_features(model, processor, task, n: int, qwen: bool, batch_size: int = 16):
    """From one forward of each of ``n`` fresh train-split pictures: (the visual tokens the object
    probes read [N, D], the input of each LM layer's attention at the visual tokens [N, Dt] per layer,
    :func:`models.train.aux_targets` [N, 7]), rows in the same token order."""
    vision = train.VisionTap(model.model.visual if qwen else model.model.vision_tower)
    layers = model.model.language_model.layers
    lm = train.AttentionTap([layer.self_attn for layer in layers])
    tokens, lm_inputs, targets = [], [[] for _ in layers], []
    for start in range(0, n, batch_size):
        samples = [task.sample("train", 900_000 + start + i) for i in range(min(batch_size, n - start))]
        batch = processing.encode(processor, samples)
        with torch.inference_mode():
            model(**batch)
        tokens.append(vision.visual_tokens(model, qwen).float())
        visual = batch["input_ids"] == model.config.image_token_id
        for i, chunks in enumerate(lm_inputs):
            chunks.append(lm.inputs[i][0][visual].float())
        targets.append(train.aux_targets(samples, train.token_cell(model)))
    vision.remove()
    lm.remove()
    return torch.cat(tokens), [torch.cat(chunks) for chunks in lm_inputs], torch.cat(targets)


def object_token_probes(features: torch.Tensor, labels: torch.Tensor) -> dict[str, dict[str, float]]:
    """Probe accuracies on the object tokens among ``features`` [N, D] (``labels`` [N, 7]: aux targets)."""
    on_object = labels[:, 0] > 0
    out = {}
    for name, row in PROBES.items():
        accuracy, majority = probe_accuracy(features[on_object], labels[on_object, row])
        out[name] = {"accuracy": round(accuracy, 4), "majority": round(majority, 4), "tokens": int(on_object.sum())}
    return out


def ridge_r2(features: torch.Tensor, targets: torch.Tensor, seed: int = 0, ridge: float = 1e-2) -> list[float]:
    """Held-out R² of a ridge regression ``features`` [N, D] → each column of ``targets`` [N, K], fitted
    on a seeded random 70% of the rows (features standardised on that part)."""
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(targets))
    fit, held = order[:cut], order[cut:]
    x = features.double()
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
    x = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = targets.double()
    gram = x[fit].T @ x[fit] + ridge * len(fit) * torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(gram, x[fit].T @ y[fit])
    residual = ((x[held] @ weights - y[held]) ** 2).sum(0)
    total = ((y[held] - y[fit].mean(0)) ** 2).sum(0)
    return (1 - residual / total).tolist()


def token_coordinates(lm_inputs: list[torch.Tensor], labels: torch.Tensor) -> dict[str, dict[str, float]]:
    """R² of each visual token's grid column and row (``labels`` [N, 7]: aux targets) from the input of
    each LM layer's attention (``lm_inputs``: [N, Dt] per layer; layer 1: the tokens the LM receives,
    normalised)."""
    out = {}
    for i, features in enumerate(lm_inputs):
        column, row = ridge_r2(features, labels[:, 3:5].float())
        out[f"LM layer {i + 1} input"] = {"column": round(column, 3), "row": round(row, 3)}
    return out


def answer_attention(model, processor, task, n: int, qwen: bool, batch_size: int = 16) -> dict[str, dict[str, list[float]]]:
    """Per family: mean attention mass of the answer position on the evidence objects and on all
    objects, per LM layer, over the first ``n`` test samples."""
    layers = model.model.language_model.layers
    tap = train.AttentionTap([layer.self_attn for layer in layers])
    visual_id, cell = model.config.image_token_id, train.token_cell(model)
    mass: dict[str, list[np.ndarray]] = defaultdict(list)
    for start in range(0, n, batch_size):
        samples = [task.sample("test", start + i) for i in range(min(batch_size, n - start))]
        batch = processing.encode(processor, samples)
        if not qwen:  # as generate() makes them with left padding
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            model(**batch)
            L = batch["input_ids"].shape[1]
            rows, last = torch.arange(len(samples)), torch.full((len(samples),), L - 1)
            attn = torch.stack([train.lm_attention_rows(tap, i, batch["attention_mask"], rows, last).mean(1) for i in range(len(layers))], 1)
        for i, s in enumerate(samples):
            visual = np.flatnonzero(batch["input_ids"][i].numpy() == visual_id)
            evidence = train.object_cells(s, [k for _, k in s.evidence], cell)
            every = train.object_cells(s, list(range(len(s.objects[0]))), cell)
            on = [visual[np.concatenate(g)] if g else np.zeros(0, np.int64) for g in (evidence, every)]
            mass[s.family].append(np.stack([attn[i][:, positions].sum(-1).numpy() for positions in on]))
    tap.remove()
    return {
        family: {"evidence": np.round(np.mean(m, 0)[0], 3).tolist(), "objects": np.round(np.mean(m, 0)[1], 3).tolist()}
        for family, m in mass.items()
    }


def position_reading(model, processor, task, n: int, batch_size: int = 16) -> dict[str, dict]:
    """Per LM layer, over ``n`` fresh train-split relative-position questions: the mean attention mass
    of each half of the heads on object A (first named) and B at the answer position, the held-out R²
    of (column, row) of A and of B from that position's input to the layer (normalised) and from the
    inputs at the two objects' shape words, and a linear probe's held-out accuracy on the answer from
    the answer position's."""
    layers = model.model.language_model.layers
    tap = train.AttentionTap([layer.self_attn for layer in layers])
    visual_id, cell = model.config.image_token_id, train.token_cell(model)
    samples = []
    index = 950_000
    while len(samples) < n:
        s = task.sample("train", index)
        index += 1
        if s.family == "position":
            samples.append(s)
    words = train.attribute_words(processor.tokenizer)
    halves, features, word_features, places, answers = [], [[] for _ in layers], [[] for _ in layers], [], []
    for start in range(0, n, batch_size):
        chunk = samples[start : start + batch_size]
        batch = processing.encode(processor, chunk)
        with torch.inference_mode():
            model(**batch)
            L = batch["input_ids"].shape[1]
            rows, last = torch.arange(len(chunk)), torch.full((len(chunk),), L - 1)
            attn = torch.stack([train.lm_attention_rows(tap, i, batch["attention_mask"], rows, last) for i in range(len(layers))], 1)
        H = attn.shape[2]
        for i, s in enumerate(chunk):
            visual = np.flatnonzero(batch["input_ids"][i].numpy() == visual_id)
            side = int(round(len(visual) ** 0.5))
            a, b = train.object_cells(s, [k for _, k in s.evidence], cell)
            mass = [[attn[i, :, half, visual[g]].sum(-1).mean(-1).numpy() for g in (a, b)] for half in (slice(0, H // 2), slice(H // 2, H))]
            halves.append(np.array(mass))  # [2 halves, 2 objects, layers]
            places.append([v for g in (a, b) for v in (np.mean(g % side), np.mean(g // side))])
            answers.append(scenes.DIRECTIONS.index(s.answer))
        asked = [np.flatnonzero(np.isin(ids.numpy(), list(words))) for ids in batch["input_ids"]]  # A colour, A shape, B colour, B shape
        shape_words = torch.tensor([[a[1], a[3]] for a in asked])  # [B, 2]: A's and B's shape word
        for k in range(len(layers)):
            features[k].append(tap.inputs[k][0][:, -1].float())
            word_features[k].append(tap.inputs[k][0][torch.arange(len(chunk))[:, None], shape_words].flatten(1).float())
    tap.remove()
    halves, places, answers = np.mean(halves, 0), torch.tensor(places), torch.tensor(answers)
    out = {}
    for k in range(len(layers)):
        x = torch.cat(features[k])
        out[f"LM layer {k + 1}"] = {
            "first_half_on": {"A": round(float(halves[0, 0, k]), 3), "B": round(float(halves[0, 1, k]), 3)},
            "second_half_on": {"A": round(float(halves[1, 0, k]), 3), "B": round(float(halves[1, 1, k]), 3)},
            "input_r2": dict(zip(("A column", "A row", "B column", "B row"), (round(v, 3) for v in ridge_r2(x, places)))),
            "shape_words_r2": dict(
                zip(("A column", "A row", "B column", "B row"), (round(v, 3) for v in ridge_r2(torch.cat(word_features[k]), places)))
            ),
            "answer_probe": round(probe_accuracy(x, answers)[0], 3),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m models.bench.model_probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llava", help="a reference model's name or directory")
    parser.add_argument("--n", type=int, default=320, help="pictures for the probes and test samples for the attention")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.n < 10:
        parser.error(f"--n {args.n}: need at least 10 pictures to fit and score a probe")
    torch.set_num_threads(args.threads)
    model, processor = reference.load(args.model)
    model.eval()
    qwen = "qwen" in type(model).__name__.lower()
    task = reference.task_for(args.model, "shapes")
    tokens, lm_inputs, labels = train_picture_features(model, processor, task, args.n, qwen)
    result = {
        "model": str(args.model),
        "n": args.n,
        "probes": object_token_probes(tokens, labels),
        "coordinates": token_coordinates(lm_inputs, labels),
        "answer_attention": answer_attention(model, processor, task, args.n, qwen),
        "position_reading": position_reading(model, processor, task, args.n),
    }
    print("| probe on object tokens | accuracy | majority |\n|---|---|---|")
    for name, r in result["probes"].items():
        print(f"| {name} | {100 * r['accuracy']:.1f}% | {100 * r['majority']:.1f}% |")
    print("\n| visual tokens read at | R² of the grid column | R² of the grid row |\n|---|---|---|")
    for name, r in result["coordinates"].items():
        print(f"| {name} | {r['column']:.2f} | {r['row']:.2f} |")
    print("\n| family | answer attention on evidence, per LM layer | on all objects |\n|---|---|---|")
    for family, r in result["answer_attention"].items():
        print(f"| {family} | {' / '.join(f'{x:.2f}' for x in r['evidence'])} | {' / '.join(f'{x:.2f}' for x in r['objects'])} |")
    print(
        "\n| position answers, LM layer | first half of the heads on A / B | second half on A / B "
        "| R² at its input: A column, row / B column, row | the same at the shape words | answer probe |\n|---|---|---|---|---|---|"
    )
    for layer, r in result["position_reading"].items():
        f, h, q, w = r["first_half_on"], r["second_half_on"], r["input_r2"], r["shape_words_r2"]
        print(
            f"| {layer} | {f['A']:.2f} / {f['B']:.2f} | {h['A']:.2f} / {h['B']:.2f} "
            f"| {q['A column']:.2f}, {q['A row']:.2f} / {q['B column']:.2f}, {q['B row']:.2f} "
            f"| {w['A column']:.2f}, {w['A row']:.2f} / {w['B column']:.2f}, {w['B row']:.2f} | {100 * r['answer_probe']:.0f}% |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
