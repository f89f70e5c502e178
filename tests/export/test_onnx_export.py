"""ONNX export of tiny LLaVA and Qwen2.5-VL, with and without pruning: onnxruntime matches PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmopt
from vlmopt.export.manifest import GRAPHS, read_manifest

#: Every shared export of conftest.py: both families, with and without the pruning baselines and HiPrune.
ALL_EXPORTS = ("llava", "llava+random_prune", "qwen", "qwen_proc+pool_prune", "llava_proc+hiprune")

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")


@pytest.mark.parametrize("name", ALL_EXPORTS)
def test_export_writes_checked_graphs(exported, name):
    export = exported(name)
    manifest = read_manifest(export.out)
    assert manifest["passes"] == [vlmopt.passes.parse(p).spec() for p in export.passes]
    assert manifest["opset"] == 18
    for graph in GRAPHS:
        entry = manifest["graphs"][graph]
        assert (export.out / entry["file"]).stat().st_size == entry["bytes"] > 0
        # the exporter ran onnxruntime on its example inputs and stayed within the stated tolerance
        assert entry["max_abs_error"] <= manifest["verification"]["atol"]
    layout = manifest["layout"]
    assert layout["pruned"] == bool(export.passes)
    assert (layout["kept_per_image"] < layout["tokens_per_image"]) == bool(export.passes)
    prefill = {i["name"]: i["shape"] for i in manifest["graphs"]["prefill"]["inputs"]}
    assert prefill["input_ids"] == ["batch", "sequence"]  # dynamic batch and sequence
    decode = {i["name"]: i["shape"] for i in manifest["graphs"]["decode"]["inputs"]}
    assert decode["past.0.key"][0] == "batch" and decode["past.0.key"][2] == "past_sequence"
    assert "sequence_index" in prefill if layout["pruned"] else "sequence_index" not in prefill
    import onnx

    for graph in GRAPHS:  # no graph returns a weight: layout constants (PoolPrune's index) are in the manifest
        proto = onnx.load(str(export.out / manifest["graphs"][graph]["file"]), load_external_data=False)
        assert not {o.name for o in proto.graph.output} & {i.name for i in proto.graph.initializer}
    if name.endswith("pool_prune"):
        assert set(manifest["graphs"]["vision"]["constant_outputs"]) == {"visual_index"}


def test_large_weights_go_to_external_data(tmp_path):
    """A graph over ``external_data_mb`` is written as NAME.onnx + NAME.onnx.data, and still verified."""
    from vlmopt.export.config import ExportConfig
    from vlmopt.export.graphs import GraphSpec
    from vlmopt.export.onnx import export_graph
    from vlmopt.export.onnx_ops import translation_table

    class Merge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, embeds, features, slots):
            return torch.ops.vlmopt.merge_visual(embeds, self.proj(features), slots)

    generator = torch.Generator().manual_seed(4)
    example = (torch.randn(2, 6, 8, generator=generator), torch.randn(3, 16, generator=generator), torch.tensor([1, 4, 9]))
    spec = GraphSpec("merge", Merge().eval(), ["embeds", "features", "slots"], ["merged"], example)
    entry = export_graph(spec, tmp_path, translation_table(spec.module, example, spec.name), ExportConfig(external_data_mb=0))
    assert entry["external_data"] and all((tmp_path / f).exists() for f in entry["external_data"])
    assert entry["max_abs_error"] < 1e-5


@pytest.mark.parametrize("name", ALL_EXPORTS)
def test_prefill_matches_pytorch_on_fresh_inputs(exported, fresh_batch, name):
    """vision.onnx + numpy planning + prefill.onnx == the compiled PyTorch prefill (logits, mask, KV)."""
    from vlmopt.export import OnnxVLM

    export = exported(name)
    batch = fresh_batch(export, seed=101)
    assert (batch["attention_mask"] == 0).any(), "the batch should exercise left padding"
    compiled = vlmopt.compile(export.model, passes=export.passes)
    prompt = compiled.plan(batch, for_generation=True)
    cache = compiled.new_cache()
    with torch.no_grad():
        expected = compiled.run_stage(prompt.stage, prompt.inputs, cache, logits_to_keep=1)
    vlm = OnnxVLM(export.out)
    got = vlm.prefill(vlm.plan(**{k: v.numpy() for k, v in batch.items()}))
    np.testing.assert_allclose(got["logits"], expected["logits"].numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_array_equal(got["kept_attention_mask"], expected["attention_mask"].numpy())
    real = expected["attention_mask"].numpy().astype(bool)
    for index, layer in enumerate(cache.layers):
        for kind, tensor in (("key", layer.keys), ("value", layer.values)):
            ort_value = got[f"present.{index}.{kind}"].transpose(0, 2, 1, 3)[real]
            np.testing.assert_allclose(ort_value, tensor.numpy().transpose(0, 2, 1, 3)[real], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ALL_EXPORTS)
def test_onnx_greedy_tokens_equal_compiled_generate(exported, fresh_batch, name):
    from vlmopt.export import OnnxVLM

    export = exported(name)
    batch = fresh_batch(export, seed=202)
    compiled = vlmopt.compile(export.model, passes=export.passes)
    expected = compiled.generate(**batch, max_new_tokens=6, do_sample=False)
    got = OnnxVLM(export.out).generate(**{k: v.numpy() for k, v in batch.items()}, max_new_tokens=6)
    np.testing.assert_array_equal(got, expected.numpy())


def test_execution_providers_are_chosen(exported, fresh_batch):
    from vlmopt.export import OnnxVLM

    export = exported("llava")
    feeds = {k: v.numpy() for k, v in fresh_batch(export, seed=203).items()}
    default, chosen = OnnxVLM(export.out), OnnxVLM(export.out, providers=["CPUExecutionProvider"])
    assert set(default.providers) == {"vision", "prefill", "decode"}
    assert all(providers == ["CPUExecutionProvider"] for providers in chosen.providers.values())
    np.testing.assert_array_equal(chosen.generate(**feeds, max_new_tokens=3), default.generate(**feeds, max_new_tokens=3))


def test_a_wrong_translation_fails_the_export_loudly(tmp_path):
    """The exporter's onnxruntime check catches a translation that computes the wrong thing."""
    from vlmopt.export.config import ExportConfig
    from vlmopt.export.errors import VerificationError
    from vlmopt.export.graphs import GraphSpec
    from vlmopt.export.onnx import export_graph
    from vlmopt.export.onnx_ops import translation_table

    class Merge(torch.nn.Module):
        def forward(self, embeds, features, slots):
            return torch.ops.vlmopt.merge_visual(embeds, features, slots)

    def forgets_the_features(embeds, features, slots):  # a buggy translation: returns embeds unchanged
        from onnxscript import opset18 as op

        return op.Identity(embeds)

    generator = torch.Generator().manual_seed(5)
    example = (torch.randn(2, 6, 8, generator=generator), torch.randn(3, 8, generator=generator), torch.tensor([1, 4, 9]))
    spec = GraphSpec("merge", Merge().eval(), ["embeds", "features", "slots"], ["merged"], example)
    table = translation_table(spec.module, example, spec.name)
    table[torch.ops.vlmopt.merge_visual.default] = forgets_the_features
    with pytest.raises(VerificationError, match=r"(?s)merge.onnx: onnxruntime disagrees with PyTorch.*merged: max \|ort - torch\| = .* exceeds atol"):
        export_graph(spec, tmp_path, table, ExportConfig())
