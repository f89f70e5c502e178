"""ONNX export of HalfV (the cut inside the LLM) on both families: the graphs pass the onnxruntime
check, each cut segment's cache length is its own decode axis, and the runtime's greedy tokens equal
``CompiledVLM.generate``'s."""

from __future__ import annotations

import numpy as np
import pytest

import vlmopt
from vlmopt import configs
from vlmopt.errors import InputError
from vlmopt.export.manifest import FORMAT_VERSION, GRAPHS, read_manifest

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")

#: export name → first layers of the cut segments (HalfV's defaults on three text layers).
SEGMENTS = {"llava3+halfv": [1], "qwen3+halfv": [1, 2]}


@pytest.mark.parametrize("name", SEGMENTS)
def test_halfv_graphs_carry_the_cut(exported, name):
    from vlmopt.export.trt_check import check_tensorrt

    export = exported(name)
    manifest = read_manifest(export.out)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["text"]["cache_segments"] == SEGMENTS[name]
    assert manifest["layout"]["visual_tokens_per_row"] == manifest["layout"]["kept_per_image"]
    for graph in GRAPHS:
        assert manifest["graphs"][graph]["max_abs_error"] <= manifest["verification"]["atol"]
        report = check_tensorrt(export.out / manifest["graphs"][graph]["file"])
        assert report.ok, report.format()
    decode = {i["name"]: i["shape"] for i in manifest["graphs"]["decode"]["inputs"]}
    axes = {layer: decode[f"past.{layer}.key"][2] for layer in range(manifest["text"]["num_layers"])}
    first = SEGMENTS[name]
    expected = {layer: "past_sequence" if layer < first[0] else f"past_sequence_from_{max(k for k in first if k <= layer)}" for layer in axes}
    assert axes == expected and len(set(axes.values())) == len(first) + 1  # one axis per segment
    for k in first:
        assert decode[f"attention_mask_from_{k}"] == ["batch", f"past_sequence_from_{k} + 1"]
    prefill_outputs = [o["name"] for o in manifest["graphs"]["prefill"]["outputs"]]
    assert [f"attention_mask_from_{k}" for k in first] == [n for n in prefill_outputs if n.startswith("attention_mask_from_")]


@pytest.mark.parametrize("name", SEGMENTS)
def test_runtime_tokens_equal_compiled_generate(exported, fresh_batch, name):
    from vlmopt.export import OnnxVLM

    export = exported(name)
    compiled = vlmopt.compile(export.model, passes=export.passes)
    vlm = OnnxVLM(export.out)
    for seed in (21, 22):  # fresh, left-padded two-prompt batches the export never saw
        batch = fresh_batch(export, seed)
        expected = compiled.generate(**batch, max_new_tokens=6, do_sample=False).numpy()
        got = vlm.generate(**{k: v.numpy() for k, v in batch.items()}, max_new_tokens=6)
        np.testing.assert_array_equal(got, expected)
    prompt = vlm.plan(**{k: v.numpy() for k, v in batch.items()})
    out = vlm.prefill(prompt)
    lengths = [out[f"present.{layer}.key"].shape[2] for layer in range(vlm.text["num_layers"])]
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] < lengths[0]  # the cache really is cut
    for k in SEGMENTS[name]:
        assert out[f"attention_mask_from_{k}"].shape[1] == lengths[k]


def test_runtime_refuses_a_row_without_exactly_one_image(exported):
    from vlmopt.export import OnnxVLM
    from vlmopt.export.graphs import one_image_batch

    export = exported("llava3+halfv")
    size = read_manifest(export.out)["layout"]["image_size"][0]
    batch = one_image_batch(export.model, size, [configs.PromptSpec(images=2), configs.PromptSpec()], seed=23)
    with pytest.raises(InputError, match="exactly one image"):
        OnnxVLM(export.out).generate(**{k: v.numpy() for k, v in batch.items()}, max_new_tokens=2)


def test_version_1_manifests_still_read(tmp_path):
    """Directories exported before the cut inside the LLM read as having no cache segments (and no
    sequence inputs, which came in version 3)."""
    import json

    graphs = {}
    for name in GRAPHS:
        (tmp_path / f"{name}.onnx").write_bytes(b"")
        graphs[name] = {"file": f"{name}.onnx"}
    manifest = {"format_version": 1, "family": "llava", "graphs": graphs, "layout": {"image_size": [56, 56]}, "text": {"num_layers": 2}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    read = read_manifest(tmp_path)
    assert read["text"] == {"num_layers": 2, "cache_segments": []}
    assert read["layout"] == {"image_size": [56, 56], "visual_tokens_per_row": None, "sequence_inputs": {}}
