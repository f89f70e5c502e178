"""The checks every VLM family's test module runs on its tiny random-weight model (one model per
module): bit-exactness with HF, every pass compiled and run (or refused with a reason), the
training graph's loss, lower LLM FLOPs under the pruning passes. A family's module builds its model
and batches and calls these; what only that family has (streams, DeepStack, tiles) it tests itself."""

from __future__ import annotations

import torch

import vlmopt
from tests.train.train_helpers import gradients, random_labels

#: One config of every pass, as the family tests run them (streams are the family module's own).
PASS_SPECS = (
    "random_prune:keep_ratio=0.5",
    "pool_prune:keep_ratio=0.25",
    "hiprune:keep_ratio=1/3",
    "halfv",
    "hiprune:keep_ratio=1/3+halfv",
    "apbv:hosts=2,anchor_len=4,passing_len=4",
)


def hf_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def assert_bit_exact(model, batch, max_new_tokens: int = 6) -> None:
    """With no pass: prefill logits and greedy tokens equal the HF model's, bit for bit."""
    compiled = vlmopt.compile(model)
    with torch.no_grad():
        assert torch.equal(compiled(**batch).logits, hf_logits(model, batch)), "prefill logits differ from HF's"
        expected = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    assert torch.equal(compiled.generate(**batch, max_new_tokens=max_new_tokens), expected), "greedy tokens differ from HF's"


def assert_lossless_settings_are_exact(model, batch) -> None:
    """Every pass's lossless configs (keep every token) give HF's last-position logits."""
    expected = hf_logits(model, batch)[:, -1]
    for cls in vlmopt.passes.REGISTRY.values():
        for setting in cls.lossless_settings():
            compiled = vlmopt.compile(model, passes=[setting])
            with torch.no_grad():
                got = compiled(**batch).logits[:, -1]
            assert torch.equal(got, expected), f"{setting.spec()} is lossless but changes the logits"


def run_every_pass(model, batch, specs=PASS_SPECS, max_new_tokens: int = 3) -> dict[str, torch.Tensor]:
    """Compile and run every pass list: prefill logits are finite and ``generate`` continues every row."""
    out = {}
    for spec in specs:
        compiled = vlmopt.compile(model, passes=spec.split("+"))
        with torch.no_grad():
            logits = compiled(**batch).logits
            ids = compiled.generate(**batch, max_new_tokens=max_new_tokens)
        assert torch.isfinite(logits).all(), spec
        assert ids.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] + max_new_tokens), spec
        out[spec] = logits
    return out


def assert_training_loss_equals_hf(model, batch) -> None:
    """``compile(mode="train")`` gives HF's loss and gradients on a left-padded batch."""
    labels = random_labels(batch, seed=32)
    expected = model(**batch, labels=labels)
    expected_grads = gradients(model, expected.loss)
    out = vlmopt.compile(model, mode="train")(**batch, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss)
    actual = gradients(model, out.loss)
    assert expected_grads.keys() == actual.keys()
    for name, grad in expected_grads.items():
        if grad is None:
            assert actual[name] is None, name
        else:
            torch.testing.assert_close(actual[name], grad, msg=name)


def assert_regate_loss_equals_hf(model, batch) -> None:
    """ReGATE keeping every answer token (``keep=1``, sparse from the first step) gives HF's loss: the
    training graph with its per-token loss, mask and reduction is HF's loss on this family."""
    import warnings

    labels = random_labels(batch, seed=33)
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss
    compiled = vlmopt.compile(model, passes=["regate:keep=1.0,warmup_steps=0,dense_steps=0"], mode="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no teacher losses: the score is the EMA alone, and every token is kept anyway
        out = compiled(**batch, labels=labels, sample_ids=list(range(batch["input_ids"].shape[0])))
    assert out.active_tokens.sum() == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(out.loss, expected)


def llm_flops_ratio(model, batch, spec: str) -> float:
    """LLM prefill FLOPs of ``spec`` over the unpruned model's (fake tensors, no arithmetic)."""
    base = vlmopt.flops(vlmopt.compile(model), batch).by_stage["llm"]
    return vlmopt.flops(vlmopt.compile(model, passes=spec.split("+")), batch).by_stage["llm"] / base


def assert_export_round_trip(model, processor, out, image_shape: tuple[int, int], passes=("hiprune:keep_ratio=1/3",),
                             export_size=None) -> dict:
    """Export ``model`` with ``passes`` to ``out`` (ONNX, checked by onnxruntime), encode a random image of
    ``image_shape`` (H, W) with the processor saved beside the graphs, and assert that onnxruntime generates the
    compiled model's tokens. Returns the encoded batch (numpy) for the family's own checks."""
    import numpy as np
    from PIL import Image

    from vlmopt.export import OnnxVLM, export_onnx
    from vlmopt.export.inputs import encode_prompt, load_processor, template_of

    passes = list(passes)
    export_onnx(model, out, passes=passes, processor=processor)
    compiled = vlmopt.compile(model, passes=passes)
    image = Image.fromarray(np.random.default_rng(15).integers(0, 256, (*image_shape, 3), dtype=np.uint8))
    size = () if export_size is None else (export_size,)
    batch = encode_prompt(load_processor(out), template_of(compiled.adapter), image, "what is it?", *size)
    expected = compiled.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, max_new_tokens=5)
    assert torch.equal(torch.as_tensor(OnnxVLM(out).generate(**batch, max_new_tokens=5)), expected)
    image.save(out / "picture.png")
    return batch


def merged_scores(attention: torch.Tensor, leading: int, grid: tuple[int, int], merge: int) -> torch.Tensor:
    """HiPrune's expected score per LLM token from a tower's eager attention weights [N, H, P, P] of N
    frames: the column means over heads and queries, the ``leading`` columns left out, then the mean over
    each token's ``merge × merge`` block of patches of the (h·merge, w·merge) grid, tokens in raster order."""
    h, w = grid
    columns = attention.mean(dim=(1, 2))[:, leading:].reshape(-1, h, merge, w, merge)
    return columns.mean(dim=(2, 4)).reshape(-1)


def run_cli(*argv: str) -> str:
    """``vlmopt <argv>`` in this process: its stdout (a non-zero exit status fails with its stderr)."""
    import contextlib
    import io

    from vlmopt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    assert status == 0, f"vlmopt {' '.join(argv)} exited {status}: {err.getvalue()[-2000:]}"
    return out.getvalue()
