"""The model card's prose about a run's recipe: its schedule, its training-only losses, probes and guides
(one sentence per ``TrainConfig`` option the run used)."""

from __future__ import annotations

def _sink_text(cfg: dict) -> str:
    """How the answer-position guide treats a sink, from the run's config (old runs: ``guide_sink``)."""
    families = cfg.get("guide_sink_families")
    if families is None:
        families = ("all",) if cfg.get("guide_sink") else ()
    if not families:
        return "."
    which = "for every family" if "all" in families else "for " + " and ".join(f"`{f}`" for f in families) + " questions"
    return f"; {which}, each of k objects gets 1/(k+1) of it and the first token (a sink) the rest, so the count stays readable."



def _schedule_text(cfg: dict) -> str:
    """Optimiser steps, learning rate, batches and seed."""
    videos = (
        f", {cfg['video_batch_size']} videos every {cfg['video_every']}nd step from step {cfg['video_from']} "
        "(alternating `shapes-video` and `needle`)"
        if cfg["video_every"]
        else ""
    )
    return (
        f"{cfg['steps']} AdamW steps (peak lr {cfg['lr']}, {cfg['warmup']} warm-up steps, cosine decay), "
        f"{cfg['batch_size']} images per image step{videos}, weight-init seed {cfg['seed']}. Data are rendered on "
        "the fly from the `train` split of the seeded generator (`vlmopt.reference.tasks`)."
    )


def _losses_text(cfg: dict, name: str) -> str:
    """One sentence per loss and training aid the run used, in the order the config lists them."""
    cls = ", and which colours/shapes the image holds from CLIP's pooled CLS" if name == "tiny-llava" else ""
    text = (
        " The language-model loss covers only the answer tokens; auxiliary "
        f"losses (weight {cfg['aux_weight']}) on the visual tokens — the colour, shape and centre of the object "
        f"under each token{cls} — speed the from-scratch vision tower up; their heads are discarded."
    )
    if cfg.get("guide_weight"):
        text += (
            f" An attention guide (weight {cfg['guide_weight']}, training only) asks each colour or shape word of a "
            "question, in the first LM layer, and each answer position, in the middle LM layers, to put their "
            "attention on the visual tokens of the objects concerned" + _sink_text(cfg)
        )
    text += "".join(sentence for key, sentence in _AID_SENTENCES if cfg.get(key) and (key != "guide_videos" or cfg.get("guide_weight")))
    if cfg.get("guide_split_families"):
        text += (
            f" For {', '.join(cfg['guide_split_families'])} questions the answer-position guide splits the heads: the "
            "first half look at the first-named object, the second half at the other."
        )
    if cfg.get("guide_split_question"):
        text += (
            " In the first LM layer those answers read their question split the same way: the first half of the "
            "heads the first-named object's colour and shape words, the second half the other's."
        )
    return text + _probe_text(cfg) + _tower_guide_text(cfg) + (
        f" Each image carries {cfg['extra_turns']} more question turns, their answers labelled too"
        + (", each drawn answer-first so the answers a picture allows come up evenly." if cfg.get("balanced_turns") else ".")
    )


_AID_SENTENCES = (
    ("guide_words_twice", " The question words look at their objects again in the second LM layer, where the objects' places first exist."),
    ("guide_read_question", " The answer position also looks, in the first LM layer, at its own question's colour and shape words "
     "(so that later layers know what to look for)."),
    ("guide_videos", " Video turns are guided too: each answer position looks at the visual tokens of its evidence objects "
     "in every frame they are on screen (the last temporal patch for questions about now)."),
)
"""(config key, sentence) of the guide options that add one fixed sentence when on."""


def _probe_text(cfg: dict) -> str:
    """The coordinate, background-dropout, relation, count and neighbour aids, where on."""
    text = ""
    if cfg.get("coord_aux"):
        text += " A probe regresses each visual token's grid row and column" + {
            "projector": " from the projector's output (the tokens the LM receives).",
            "lm": " from the input of the LM's second layer (after one LM layer with its rotary positions).",
        }.get(cfg.get("coord_aux_from", "tower"), ".")
    if cfg.get("background_dropout"):
        text += (
            f" In {100 * cfg['background_dropout']:.0f}% of the training pictures part of the background is hidden from "
            "the LM (each token no object covers is masked out of attention with a probability drawn per picture "
            "from U[0, 0.9), positions kept), so that the answers rest on the objects, not on how much background "
            "is left."
        )
    if cfg.get("relation_aux"):
        text += (
            " At the answer position of each relative-position turn, a probe regresses both named objects' grid "
            "coordinates from the LM's residual stream after its last guided layer."
        )
    if cfg.get("count_aux"):
        text += (
            " A probe classifies, on each object token, how many objects share its colour and how many its shape "
            "(1, 2, 3, 4+), so that a counting question is answered by reading the named objects."
        )
    if cfg.get("neighbour_aux"):
        text += (
            " A probe tells, on each object token of a picture, which colours and which shapes lie left of, right of, "
            "above and below its object, so that a relative-position question is answered by reading the named objects."
        )
    return text


def _tower_guide_text(cfg: dict) -> str:
    """The vision-tower attention guide, where on."""
    if not cfg.get("tower_guide_weight"):
        return ""
    return (
        f" A tower attention guide (weight {cfg['tower_guide_weight']}, training only) asks that at least "
        f"{100 * cfg.get('tower_guide_share', 1.0):.0f}% of the attention the visual tokens receive (mean over heads "
        "and all queries), at the two vision-tower layers HiPrune reads by default (object and deep layer), fall on "
        "object tokens: object-centric attention is what the HiPrune paper observes in pretrained towers and builds "
        "on, and a small tower trained from scratch on these tasks does not develop it by itself. The pruning passes "
        "are unchanged; RandomPrune and PoolPrune do not read attention."
    )
