"""TensorRT: engine building and running where TensorRT and a GPU exist; the fallback messages anywhere."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")


def _tensorrt_missing() -> str | None:
    from vlmopt.export.trt_build import tensorrt_status

    return tensorrt_status()


def test_trtexec_commands_cover_every_graph_and_dynamic_axis(exported):
    from vlmopt.export.manifest import read_manifest
    from vlmopt.export.trt_build import EngineConfig, profile_shapes, trtexec_commands

    export = exported("llava+random_prune")
    lines = trtexec_commands(export.out, EngineConfig(fp16=True))
    assert len(lines) == 3 and all(line.startswith("trtexec --onnx=") and "--fp16" in line for line in lines)
    prefill = next(line for line in lines if "prefill.onnx" in line)
    assert "--saveEngine=" in prefill and "prefill.plan" in prefill and "--timingCacheFile=" in prefill
    assert "--minShapes=input_ids:1x1" in prefill and "--maxShapes=input_ids:8x2048" in prefill
    decode = profile_shapes(read_manifest(export.out), "decode")
    low, _, high = decode["attention_mask"]
    assert low[1] == decode["past.0.key"][0][2] + 1 and high[1] == decode["past.0.key"][2][2] + 1  # past + 1
    assert all(a <= b <= c for name in decode for a, b, c in zip(*decode[name]))


def test_build_engines_says_what_is_missing(exported):
    from vlmopt.errors import MissingDependencyError
    from vlmopt.export.trt_build import build_engines

    if _tensorrt_missing() is None:
        pytest.skip("TensorRT and a GPU are present: the engines are built in test_engines_generate_like_onnxruntime")
    with pytest.raises(MissingDependencyError, match="trtexec --onnx=") as raised:
        build_engines(exported("llava+random_prune").out)
    assert "TensorRT" in str(raised.value)


def test_export_format_trt_writes_onnx_then_explains(exported, tmp_path, capsys):
    from vlmopt.cli import main

    if _tensorrt_missing() is None:
        pytest.skip("TensorRT and a GPU are present")
    out = tmp_path / "trt"
    code = main(["export", "--model", "tiny-llava-random", "--format", "trt", "--fp16", "--out", str(out), "--no-verify"])
    assert code == 3
    text = capsys.readouterr().out
    assert (out / "prefill.onnx").exists() and "TensorRT engines were not built" in text and "trtexec --onnx=" in text


def test_torch_tensorrt_backend_is_refused_clearly(llava_clip):
    import vlmopt

    if _tensorrt_missing() is None:
        pytest.importorskip("torch_tensorrt")
    with pytest.raises(vlmopt.MissingDependencyError, match="torch"):
        vlmopt.compile(llava_clip, backend="torch_tensorrt")


@pytest.mark.tensorrt
def test_engines_generate_like_onnxruntime(exported, fresh_batch, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (`import tensorrt` fails)")
    missing = _tensorrt_missing()
    if missing:
        pytest.skip(f"needs {missing}")
    import shutil

    from vlmopt.export import OnnxVLM
    from vlmopt.export.trt_build import build_engines

    export = exported("llava+random_prune")
    directory = tmp_path / "engines"
    shutil.copytree(export.out, directory)
    build_engines(directory)
    batch = {k: v.numpy() for k, v in fresh_batch(export, seed=303).items()}
    expected = OnnxVLM(directory).generate(**batch, max_new_tokens=6)
    got = OnnxVLM(directory, backend="tensorrt").generate(**batch, max_new_tokens=6)
    np.testing.assert_array_equal(got, expected)
