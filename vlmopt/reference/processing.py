"""Tokenizers, HF processors and prompts for the reference models, built offline.

Prompt formats (the answer is one word, then the end-of-sequence token):

* LLaVA: ``<s>USER: <image>\\n{question} ASSISTANT:`` → `` {answer}</s>`` (the processor expands
  ``<image>`` to one token per patch, 256 for 224 px / patch 14).
* Qwen2.5-VL: ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n``
  → ``{answer}<|im_end|>`` (``<|video_pad|>`` for a video; expanded to one token per merged patch).
* Qwen3-VL: the same text; a video's ``<|vision_start|><|video_pad|><|vision_end|>`` becomes, per
  temporal patch, ``<{t:.1f} seconds><|vision_start|><|video_pad|>*n<|vision_end|>`` (the
  patch's mean frame time, as ``Qwen3VLProcessor`` writes it).

The tokenizer is word-level (``tokenizers`` WordLevel, lower-casing, whitespace + punctuation
pre-tokenizer) over :func:`vlmopt.reference.tasks.vocabulary`; Qwen3-VL's also splits digits one by
one and knows the words of its video timestamps (:data:`TIMESTAMP_WORDS`).

Qwen videos: transformers' video processors need torchvision, which is not installed here, and the
Qwen processors then cannot even be constructed (their class check looks the video processor up).
:func:`load_processor` builds them without a video processor in that case, and
:mod:`vlmopt.reference.video_inputs` makes the video inputs with exactly the HF video processors'
resize rule, normalisation and patch layout. The saved ``video_preprocessor_config.json`` lets
``AutoProcessor`` load the full processor where torchvision is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmopt.reference.video_inputs import (  # noqa: F401  (re-exported: the reference API)
    QWEN3_MAX_FRAMES, QWEN3_MEAN, QWEN3_PATCH, QWEN3_STD, QWEN_VIDEO_FPS, _video_config_of, qwen3_video_placeholder,
    qwen_video_inputs, video_batch, video_config, video_grid, video_timestamps,
)

LLAVA_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
QWEN_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>", "<unk>",
)
TEMPLATE_WORDS = ("\n", "user", "assistant", ":")
TIMESTAMP_WORDS = ("<", ">", ".", "seconds", *"0123456789")
"""What Qwen3-VL's ``<{t:.1f} seconds>`` timestamps split into (digits one by one, so any length fits)."""
QWEN_ARCHS = ("qwen2_5_vl", "qwen3_vl")
"""Architectures with Qwen's prompt format, merged visual tokens, M-RoPE and ``mm_token_type_ids``."""

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _format(arch: str):
    """The :class:`~vlmopt.adapters.formats.PromptFormat` a family's adapter registers under ``arch``
    (None for the built-in ``llava`` / ``qwen`` / ``qwen3_vl`` formats)."""
    from vlmopt.adapters import formats

    return None if arch in ("llava", *QWEN_ARCHS) else formats.get(arch)


def _format_named(text: str) -> str | None:
    """The arch key of the format whose ``names`` mark ``text`` contains, else (a text without "qwen") whose
    arch key it spells."""
    from vlmopt.adapters import formats

    found = formats.formats()
    marked = text.replace("-", "_")
    if (named := next((arch for arch, fmt in found.items() if any(mark in marked for mark in fmt.names)), None)) is not None:
        return named
    flat = text.replace("-", "").replace("_", "")
    return None if "qwen" in text else next((arch for arch in found if arch.replace("_", "") in flat), None)


def arch_of(processor_or_name: Any) -> str:
    """``"llava"``, ``"qwen2_5_vl"``, ``"qwen3_vl"`` or a family format's arch key
    (:mod:`vlmopt.adapters.formats`) for a processor, a model, a model name or a model path (a name that
    says none of them: ``"llava"``)."""
    from vlmopt.adapters import formats

    named = isinstance(processor_or_name, (str, Path))
    if not named and (found := formats.of_processor(processor_or_name)) is not None:
        return found.arch
    text = (str(processor_or_name) if named else type(processor_or_name).__name__).lower()
    if (arch := _format_named(text)) is not None:
        return arch
    if "qwen" in text:
        return "qwen3_vl" if "qwen3" in text else "qwen2_5_vl"
    if named or "llava" in text:
        return "llava"
    raise TypeError(f"cannot tell the architecture of {type(processor_or_name).__name__}")


def build_tokenizer(arch: str):
    """A word-level ``PreTrainedTokenizerFast`` for ``arch`` ("llava", "qwen2_5_vl" or "qwen3_vl")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from vlmopt.reference.tasks import vocabulary

    fmt = _format(arch)
    special = LLAVA_SPECIAL if arch == "llava" else fmt.special if fmt else QWEN_SPECIAL
    words = list(TEMPLATE_WORDS) + [w for w in vocabulary() if w not in TEMPLATE_WORDS]
    splits = [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    if arch == "qwen3_vl" or (fmt and fmt.split_digits):
        words += [w for w in (*TIMESTAMP_WORDS, *(fmt.words if fmt else ())) if w not in words]
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    elif fmt:
        words += [w for w in fmt.words if w not in words]
    vocab = {token: i for i, token in enumerate([*special, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    if fmt is not None:
        if fmt.bos:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{fmt.bos} $A", pair=f"{fmt.bos} $A $B", special_tokens=[(fmt.bos, vocab[fmt.bos])]
            )
        roles = {"unk_token": "<unk>", **fmt.tokens}
        named = {k: roles.pop(k) for k in list(roles) if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return PreTrainedTokenizerFast(tokenizer_object=tok, **named, extra_special_tokens=roles, padding_side=fmt.padding_side)
    if arch == "llava":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
            extra_special_tokens={"image_token": "<image>"}, padding_side="left",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
        },
        padding_side="left",
    )


def build_processor(arch: str, image_size: int, video_size: int = 112, **settings):
    """The HF processor of a reference model (LlavaProcessor / Qwen2_5_VLProcessor / Qwen3VLProcessor, or
    the one a family's format assembles, with its ``settings``: a model's own, such as its tile grids).

    Qwen3-VL keeps the 14 px patches of the reference models (Qwen3-VL's own default is 16) and
    Qwen3-VL's image normalisation (mean and std 0.5); ``image_size`` is the largest image side kept,
    ``video_size`` the frame side.
    """
    tokenizer = build_tokenizer(arch)
    if (fmt := _format(arch)) is not None:
        return _assemble(fmt, tokenizer, fmt.image_processor(image_size), (image_size, video_size), settings)
    if settings:
        raise TypeError(f"the built-in {arch} processor takes no settings, got {sorted(settings)}")
    if arch == "llava":
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            image_token="<image>", chat_template=LLAVA_CHAT_TEMPLATE,
        )
    from transformers import Qwen2VLImageProcessorPil

    if arch == "qwen3_vl":
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=QWEN3_PATCH, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56,
            max_pixels=image_size * image_size, image_mean=list(QWEN3_MEAN), image_std=list(QWEN3_STD),
        )
    else:
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=image_size * image_size)
    processor = _qwen_processor(image_processor, tokenizer, QWEN_CHAT_TEMPLATE, arch=arch)
    processor._vlmopt_video_cfg = video_config(video_size, arch)
    return processor


def _assemble(fmt, tokenizer, images, sizes: tuple[int, int], settings: dict):
    """A format's processor, recording what it was built with so a saved one loads back as it was."""
    processor = fmt.assemble(tokenizer, images, *sizes, **settings)
    processor._vlmopt_sizes, processor._vlmopt_settings = sizes, settings
    return processor


def _qwen_processor(image_processor, tokenizer, chat_template, video_processor=None, arch: str = "qwen2_5_vl"):
    """``Qwen2_5_VLProcessor`` (``arch="qwen2_5_vl"``) or ``Qwen3VLProcessor`` (``"qwen3_vl"``); without a
    video processor its class check is skipped for that slot."""
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor

    from vlmopt.adapters.formats import lenient_construction

    cls = Qwen3VLProcessor if arch == "qwen3_vl" else Qwen2_5_VLProcessor
    return lenient_construction(cls, image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                chat_template=chat_template)


def save_processor(processor, path: Path) -> None:
    """Write the processor files into ``path`` (Qwen: by hand, since it has no video processor here)."""
    path = Path(path)
    arch = arch_of(processor)
    if arch == "llava":
        processor.save_pretrained(path)
        return
    if _format(arch) is not None:  # by parts: its video processor slot may be empty (no torchvision)
        processor.tokenizer.save_pretrained(path)
        processor.image_processor.save_pretrained(path)
        image_size, video_size = processor._vlmopt_sizes
        settings = {"processor_class": type(processor).__name__, "vlmopt_arch": arch, "image_size": image_size, "video_size": video_size,
                    "vlmopt_settings": getattr(processor, "_vlmopt_settings", {})}
        (path / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
        if processor.chat_template:
            (path / "chat_template.jinja").write_text(processor.chat_template)
        return
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": type(processor).__name__}, indent=2) + "\n")
    (path / "chat_template.jinja").write_text(processor.chat_template)
    (path / "video_preprocessor_config.json").write_text(json.dumps(_video_config_of(processor), indent=2) + "\n")


def load_processor(path: str | Path):
    """``AutoProcessor.from_pretrained(path)``; for Qwen2.5-VL or Qwen3-VL without torchvision, the same
    processor assembled from the saved tokenizer, image processor and chat template, minus the video processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    path = Path(path)
    settings_file = path / "processor_config.json"
    saved = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    if (fmt := _format(saved.get("vlmopt_arch", ""))) is not None:
        sizes = (saved["image_size"], saved["video_size"])
        return _assemble(fmt, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path), sizes,
                         saved.get("vlmopt_settings", {}))
    video_file = path / "video_preprocessor_config.json"
    try:
        processor = AutoProcessor.from_pretrained(path)
    except ImportError as error:
        if "torchvision" not in str(error).lower() or not video_file.exists():
            raise
        template = path / "chat_template.jinja"
        saved_class = json.loads((path / "processor_config.json").read_text()).get("processor_class", "")
        processor = _qwen_processor(
            AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
            template.read_text() if template.exists() else None, arch=arch_of(saved_class),
        )
    if video_file.exists():
        processor._vlmopt_video_cfg = json.loads(video_file.read_text())
    return processor


def prompt(arch: str, question: str, video: bool = False) -> str:
    """The prompt text (visual placeholder not yet expanded) for one question."""
    if (fmt := _format(arch)) is not None:
        return fmt.prompt(question, video)
    if arch == "llava":
        return f"USER: <image>\n{question} ASSISTANT:"
    pad = "<|video_pad|>" if video else "<|image_pad|>"
    return f"<|im_start|>user\n<|vision_start|>{pad}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


def answer_text(arch: str, answer: str) -> str:
    """What the model is trained to generate after the prompt: one word and the end token."""
    if (fmt := _format(arch)) is not None:
        return fmt.answer(answer)
    return f" {answer}</s>" if arch == "llava" else f"{answer}<|im_end|>"


def follow_up(arch: str, question: str) -> str:
    """A later conversation turn (no picture), appended after the previous answer."""
    if (fmt := _format(arch)) is not None:
        return fmt.follow_up(question)
    if arch == "llava":
        return f"USER: {question} ASSISTANT:"
    return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def prompt_for(processor_or_model_name: Any, sample) -> dict[str, Any]:
    """Keyword arguments for the processor: ``text`` and ``images`` (PIL) or ``videos`` (uint8 [T, H, W, 3]).

    Videos need :func:`encode` here (no torchvision → no HF video processor); with torchvision,
    ``processor(**prompt_for(processor, sample), return_tensors="pt")`` works for both (Qwen3-VL's
    timestamps also need the clip's ``video_metadata``: fps 2, every frame).
    """
    arch = arch_of(processor_or_model_name)
    text = prompt(arch, sample.question, video=sample.is_video)
    if sample.is_video:
        return {"text": [text], "videos": [sample.frames]}
    return {"text": [text], "images": [sample.pil_image()]}


def qwen_token_types(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """Qwen's ``mm_token_type_ids`` [B, S]: 0 text, 1 image, 2 video tokens (M-RoPE reads them)."""
    types = torch.zeros_like(input_ids)
    types[input_ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 1
    types[input_ids == tokenizer.convert_tokens_to_ids("<|video_pad|>")] = 2
    return types


def encode(processor, samples, answers: bool = False, turns: list[list[tuple[str, str]]] | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of samples (all images or all videos), left-padded for ``generate``.

    Qwen outputs include ``mm_token_type_ids`` (0 text, 1 image, 2 video); Qwen3-VL prompts carry
    each temporal patch's timestamp (:func:`qwen3_video_placeholder`). ``answers=True`` appends
    each sample's answer + end token and adds ``labels`` (-100 everywhere but the answer tokens) —
    the training format; ``turns[i]`` then adds more (question, answer) turns to sample ``i``'s
    conversation, their answers labelled too.
    """
    arch = arch_of(processor)
    tok = processor.tokenizer
    if isinstance(samples, (list, tuple)) is False:
        samples = list(samples)
    videos = [s.is_video for s in samples]
    if any(videos) and not all(videos):
        raise ValueError("encode() takes a batch of all images or all videos")
    texts = [prompt(arch, s.question, video=s.is_video) for s in samples]
    fmt = _format(arch)
    if fmt is not None and all(videos):
        if fmt.videos is None:
            raise ValueError(f"the {arch} reference format takes images only; pick an image task")
        out = dict(fmt.videos(processor, texts, [s.frames for s in samples]))
    elif not all(videos):
        pictures = [s.pil_image() for s in samples]
        if fmt is not None:  # one list of images per prompt, as every processor reads it
            pictures = [[picture] for picture in pictures]
        out = dict(processor(text=texts, images=pictures, return_tensors="pt", padding=True))
    else:
        texts, inputs = video_batch(processor, texts, [[s.frames] for s in samples])
        out = dict(tok(texts, return_tensors="pt", padding=True), **inputs)
    if arch in QWEN_ARCHS and "mm_token_type_ids" not in out:
        out["mm_token_type_ids"] = qwen_token_types(tok, out["input_ids"])
    if answers:
        rows = []
        for i, s in enumerate(samples):
            segments = [(answer_text(arch, s.answer), True)]
            for q, a in (turns[i] if turns else []):
                segments += [(follow_up(arch, q), False), (answer_text(arch, a), True)]
            rows.append(segments)
        out = _append_turns(out, tok, rows)
    return out


def batches(processor, samples, size: int) -> list[list]:
    """Consecutive runs of at most ``size`` samples that one processor call holds (a format with
    ``stacked_videos`` needs one clip length per batch: its processor stacks them), in order."""
    fmt = _format(arch_of(processor))
    stacked = fmt is not None and fmt.stacked_videos
    runs: list[list] = []
    for sample in samples:
        apart = stacked and sample.is_video and runs and len(sample.frames) != len(runs[-1][0].frames)
        if runs and len(runs[-1]) < size and not apart:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    return runs


def _append_turns(batch: dict, tok, rows: list[list[tuple[str, bool]]]) -> dict:
    """Append (text, labelled) segments to each left-padded prompt row, re-pad on the left so every
    row ends together, and add ``labels`` (token ids on labelled segments, -100 elsewhere)."""
    tails, tail_labels = [], []
    for segments in rows:
        ids, labels = [], []
        for text, labelled in segments:
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if labelled else [-100] * len(piece)
        tails.append(ids)
        tail_labels.append(labels)
    width = max(len(t) for t in tails)
    out = dict(batch)
    keys = {"input_ids": tok.pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}
    for key, pad_value in keys.items():
        if key not in batch:
            continue
        new_rows = []
        for i, tail in enumerate(tails):
            fill = tail if key == "input_ids" else [int(key == "attention_mask")] * len(tail)
            new_rows.append([pad_value] * (width - len(tail)) + batch[key][i].tolist() + fill)
        out[key] = torch.tensor(new_rows)
    prompt_len = batch["input_ids"].shape[1]
    out["labels"] = torch.tensor([[-100] * (width - len(t) + prompt_len) + lab for t, lab in zip(tails, tail_labels)])
    return out
