"""``vlmopt export`` / ``run`` / ``generate`` end to end, and their errors."""

from __future__ import annotations

import json
import shutil

import pytest

from vlmopt.cli import main

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'vlmopt[onnx]')")


@pytest.mark.parametrize("name, image_size", [("llava_proc+hiprune", 56), ("qwen_proc+pool_prune", 112)])
def test_run_gives_the_tokens_of_generate(exported, picture, tmp_path, capsys, name, image_size):
    export = exported(name)
    prompt = "what colour is the circle?"
    ran, generated = tmp_path / "run.json", tmp_path / "generate.json"
    common = ["--image", str(picture), "--prompt", prompt, "--max-new-tokens", "6"]
    assert main(["run", str(export.out), *common, "--json", str(ran)]) == 0
    assert main(["generate", "--model", str(export.checkpoint), "--passes", "+".join(export.passes), *common,
                 "--image-size", str(image_size), "--json", str(generated)]) == 0
    from_onnx, from_torch = json.loads(ran.read_text()), json.loads(generated.read_text())
    assert set(from_onnx) == {"text", "token_ids"}
    assert len(from_onnx["token_ids"]) >= 1
    assert from_onnx == from_torch
    assert from_onnx["text"] in capsys.readouterr().out


def test_check_trt_on_an_export_and_on_a_bad_file(exported, unsupported_model, tmp_path, capsys):
    export = exported("llava+random_prune")
    assert main(["export", "--check", "trt", "--out", str(export.out)]) == 0
    assert capsys.readouterr().out.count("TensorRT-ready") == 3
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(unsupported_model().SerializeToString())
    assert main(["export", "--check", "trt", "--onnx", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "NOT TensorRT-ready" in out and "find_kept [NonZero]" in out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_export_errors_are_clear(tmp_path, capsys):
    out = str(tmp_path / "out")
    missing = _error(capsys, ["export", "--model", str(tmp_path / "no-such-model"), "--out", out])
    assert "no-such-model" in missing and "known models" in missing
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{this is not json")
    message = _error(capsys, ["export", "--model", str(corrupt), "--out", out])
    assert "config.json is not valid JSON (line 1 column 2" in message and "re-save the model" in message
    message = _error(capsys, ["export", "--model", "tiny-llava-random", "--passes", "prune_everything:keep_ratio=0.5", "--out", out])
    assert "unknown pass 'prune_everything'" in message and "random_prune" in message
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = _error(capsys, ["export", "--model", "tiny-llava-random", "--out", str(blocker / "build")])
    assert "cannot write to the output directory" in message and "--out" in message
    message = _error(capsys, ["export", "--model", "tiny-llava-random", "--opset", "23", "--out", out])
    assert "opset" in message and "20" in message


def test_run_errors_are_clear(exported, picture, tmp_path, capsys):
    common = ["--image", str(picture), "--prompt", "what is it?"]
    message = _error(capsys, ["run", str(tmp_path / "nowhere"), *common])
    assert "does not exist" in message and "vlmopt export" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no manifest.json" in _error(capsys, ["run", str(empty), *common])

    export = exported("llava+random_prune")
    broken = tmp_path / "broken"
    shutil.copytree(export.out, broken)
    data = (broken / "prefill.onnx").read_bytes()
    (broken / "prefill.onnx").write_bytes(data[: len(data) // 3])
    message = _error(capsys, ["run", str(broken), *common])
    assert "prefill.onnx" in message and "corrupt" in message
    (broken / "decode.onnx").unlink()
    message = _error(capsys, ["run", str(broken), *common])
    assert "decode.onnx is missing" in message

    message = _error(capsys, ["run", str(export.out), *common])  # a random-weight export has no tokenizer
    assert "no processor" in message and "OnnxVLM.generate" in message
    message = _error(capsys, ["run", str(export.out), "--image", str(tmp_path / "none.png"), "--prompt", "x"])
    assert "none.png" in message


def test_generate_needs_a_processor(capsys, picture):
    message = _error(capsys, ["generate", "--model", "tiny-llava-siglip-random", "--image", str(picture), "--prompt", "hi"])
    assert "random-weight config without a tokenizer or processor" in message
