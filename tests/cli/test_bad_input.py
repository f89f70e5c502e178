"""Bad input, as a new user types it, to every verb: exit status 2 and one line on stderr,
``vlmopt <verb>: error: ...``, that names the problem (and the fix); never a traceback.

Every case fails before a model's weights load or any prefill runs, so the table runs in seconds.
"""

import importlib.util
import json

import pytest

from vlmopt.cli import build_parser, main
from vlmopt.export.manifest import FORMAT_VERSION, GRAPHS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Broken inputs: model directories, export directories, images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bad-input")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.json").write_text('{"model_type": "llava",\n  "x": 1,\n    oops\n')
    (root / "no-config").mkdir()
    (root / "no-config" / "model.safetensors").write_bytes(b"")
    (root / "no-model-type").mkdir()
    (root / "no-model-type" / "config.json").write_text('{"hidden_size": 8}')
    (root / "empty-export").mkdir()
    (root / "corrupt-manifest").mkdir()
    (root / "corrupt-manifest" / "manifest.json").write_text("{not json")
    # A manifest that reads, naming graph files that are not ONNX.
    garbage = root / "garbage-onnx"
    garbage.mkdir()
    graphs = {}
    for name in GRAPHS:
        (garbage / f"{name}.onnx").write_bytes(b"\x00 not protobuf \xff" * 7)
        graphs[name] = {"file": f"{name}.onnx"}
    manifest = {"format_version": FORMAT_VERSION, "family": "llava", "graphs": graphs, "layout": {}, "text": {}}
    (garbage / "manifest.json").write_text(json.dumps(manifest))
    future = root / "future-manifest"  # written by a newer vlmopt
    future.mkdir()
    (future / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    Image.new("RGB", (20, 20), (200, 30, 30)).save(root / "ok.png")
    (root / "bad.png").write_bytes(b"this is not a png")
    (root / "a-file").write_text("")
    return root


IMAGE = ["--image", "{root}/ok.png", "--prompt", "what is it?"]
TENSORRT = importlib.util.find_spec("tensorrt") is not None

CATALOGUE = [
    # demo
    (["demo", "--model", "no-such-model"], "no reference model 'no-such-model': known models are tiny-llava, tiny-qwen25vl"),
    (["demo", "--model", "{root}/corrupt"], "corrupt/config.json is not valid JSON (line 3 column 5"),
    (["demo", "--model", "{root}/no-config"], "no-config is not a model directory (no config.json); pass a Hugging Face model directory"),
    (["demo", "--model", "tiny-llava-random", "--passes", "nopass:keep_ratio=0.5"], "unknown pass 'nopass'; known passes: "),
    (["demo", "--repeats", "0"], "argument --repeats: must be ≥ 1, got 0"),
    # inspect, diff
    (["inspect", "--model", "tiny-llava-random", "--passes", "random_prune:keep_ratio=1.5"], "keep_ratio must be in (0, 1], got 1.5"),
    (["inspect", "--model", "tiny-llava-random", "--passes", "random_prune:keep_ratio=a/b"], "cannot read 'a/b'"),
    (["inspect", "--model", "tiny-llava-random", "--passes", "random_prune:keepratio=0.5"], "not key=value with a key of RandomPrune (keep_ratio"),
    (["inspect", "--model", "{root}/no-model-type"], "has no \"model_type\""),
    (["inspect", "--model", "{root}/a-file"], "a-file is a file, not a model directory"),
    (["inspect", "--model", "tiny-llava-random", "--stage", "middle"], "argument --stage: invalid choice: 'middle'"),
    (["diff", "--model", "tiny-llava-random", "--passes", "hiprun:keep_ratio=0.5"], "unknown pass 'hiprun'"),
    (["diff"], "the following arguments are required: --model"),
    # eval
    (["eval", "--task", "nosuchtask"], "unknown task 'nosuchtask'; known tasks: needle, shapes, shapes-captions, shapes-relations, shapes-video"),
    (["eval", "--model", "tiny-llava", "--task", "shapes-video"], "tiny-llava was not trained on task 'shapes-video'"),
    (["eval", "--model", "{root}/corrupt"], "is not valid JSON"),
    (["eval", "--model", "{root}/no-config"], "is not a model directory (no config.json)"),
    (["eval", "--model", "tiny-llava-siglip-random"], "tiny-llava-siglip-random is a random-weight config without task 'shapes'"),
    (["eval", "--n", "0"], "argument --n: must be ≥ 1, got 0"),
    (["eval", "--stream-budget", "1.5"], "argument --stream-budget: must be in (0, 1], got 1.5"),
    (["eval", "--passes", "hermes:position_policy=sometimes"], "Hermes.position_policy must be one of lazy, eager"),
    (["eval", "--n", "many"], "argument --n: 'many' is not a whole number"),
    (["eval", "--batch-size", "0"], "argument --batch-size: must be ≥ 1"),
    (["eval", "--sweep", "keep_ratio"], "--sweep takes key=value,value,...; got 'keep_ratio'"),
    (["eval", "--passes", "random_prune:keep_ratio=0.5", "--sweep", "alpha=0.1,0.2"], "none of ['random_prune:keep_ratio=0.5'] has a field 'alpha'"),
    (["eval", "--passes", "halfv:ivr_layer=auto"], "pass calibration=[processor outputs, ...]"),
    (["eval", "--passes", "halfv:ssr_layer=last"], "HalfV.ssr_layer must be a decoder layer (a whole number) or 'auto', got 'last'"),
    # bench
    (["bench", "--config", "gpt-4-shape"], "argument --config: invalid choice: 'gpt-4-shape'"),
    (["bench", "--passes", "hiprune:keep_ratio=0"], "HiPrune.keep_ratio must be in (0, 1], got 0"),
    (["bench", "--width", "0"], "argument --width: must be in (0, 1], got 0"),
    (["bench", "--width", "wide"], "argument --width: 'wide' is not a number such as 0.125 or 1/8"),
    (["bench", "--repeats", "-3"], "argument --repeats: must be ≥ 1, got -3"),
    (["bench", "--stream", "--config", "llava-1.5-7b-shape"], "bench --stream needs a family that streams frames and takes whole videos"),
    (["bench", "--stream", "--passes", "snapkv:kernel_size=4"], "SnapKV.kernel_size must be odd, got 4"),
    (["bench", "--config", "qwen2.5-vl-7b-shape", "--context-tokens", "4096", "--passes", "hiprune:keep_ratio=0.5"],
     "--context-tokens / --video-frames measure APB-V alone; give --passes apbv:hosts=H"),
    (["bench", "--config", "qwen2.5-vl-7b-shape", "--context-tokens", "4096", "--video-frames", "8", "--passes", "apbv:hosts=2"],
     "give --context-tokens or --video-frames, not both"),
    (["bench", "--config", "qwen2.5-vl-7b-shape", "--context-tokens", "100", "--passes", "apbv:hosts=8"],
     "APB-V with hosts=8 needs a context of at least anchor + 2·hosts = 128 + 16 tokens"),
    (["bench", "--context-tokens", "0", "--passes", "apbv:hosts=2"], "argument --context-tokens: must be ≥ 1, got 0"),
    (["bench", "--passes", "apbv:hosts=0"], "APBV.hosts must be in [1, 4096], got 0"),
    # viz
    (["viz", "--model", "tiny-llava-random"], "the following arguments are required: --out"),
    (["viz", "--model", "tiny-llava-random", "--out", "{root}/no-dir/kept.png"], "the directory {root}/no-dir does not exist"),
    (["viz", "--model", "tiny-llava", "--image", "{root}/bad.png", "--out", "{root}/kept.png"], "cannot read {root}/bad.png as an image"),
    # export
    (["export", "--model", "tiny-llava-random"], "pass --out DIR"),
    (["export"], "pass --model NAME --out DIR to export"),
    (["export", "--model", "{root}/corrupt", "--out", "{root}/build"], "is not valid JSON (line 3 column 5"),
    (["export", "--model", "tiny-llava-random", "--max-batch", "1", "--out", "{root}/build"], "max_batch must be a whole number ≥ 2"),
    (["export", "--model", "tiny-llava-random", "--out", "{root}/a-file/build"], "cannot write to the output directory"),
    (["export", "--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    # run, generate
    (["run", "{root}/nowhere", *IMAGE], "export directory {root}/nowhere does not exist; re-create it with `vlmopt export"),
    (["run", "{root}/empty-export", *IMAGE], "has no manifest.json, so it is not a vlmopt export"),
    (["run", "{root}/corrupt-manifest", *IMAGE], "corrupt-manifest/manifest.json is corrupt"),
    (["run", "{root}/garbage-onnx", *IMAGE], "vision.onnx is not a readable ONNX model"),
    (["run", "{root}/future-manifest", *IMAGE], "is not a vlmopt manifest of version 1, 2 or 3 (found 4); re-create it"),
    (["run", "{root}/garbage-onnx", "--image", "{root}/none.png", "--prompt", "x"], "image {root}/none.png does not exist"),
    (["run", "{root}/garbage-onnx", *IMAGE, "--max-new-tokens", "0"], "--max-new-tokens must be ≥ 1"),
    (["run", "{root}/garbage-onnx", *IMAGE, "--threads", "0"], "argument --threads: must be ≥ 1"),
    (["run", "{root}/garbage-onnx", "--prompt", "x"], "the following arguments are required: --image"),
    pytest.param(
        ["run", "{root}/garbage-onnx", *IMAGE, "--backend", "tensorrt"], "the TensorRT backend needs",
        marks=pytest.mark.skipif(TENSORRT, reason="TensorRT is installed here: the backend is not missing"),
        id="run-tensorrt-missing",
    ),
    (["generate", "--model", "no-such-model", *IMAGE], "no reference model 'no-such-model'"),
    (["generate", "--model", "tiny-llava", "--image", "{root}/bad.png", "--prompt", "x"], "cannot read {root}/bad.png as an image"),
    (["generate", "--model", "tiny-llava-random", *IMAGE, "--passes", "random_prune:keep_ratio=0.5", "--passes", "pool_prune:keep_ratio=0.5"], "generate takes one pass list"),
    (["tasks", "export", "--task", "nosuch", "--n", "5", "--out", "{root}/tasks"], "unknown task 'nosuch'; known tasks: shapes"),
    (["tasks", "export", "--task", "shapes", "--n", "0", "--out", "{root}/tasks"], "argument --n: must be ≥ 1"),
    (["tasks", "export", "--task", "shapes", "--model", "no-such-model", "--out", "{root}/tasks"], "no reference model 'no-such-model'"),
    (["tasks", "export", "--task", "needle", "--model", "tiny-llava", "--out", "{root}/tasks"], "was not trained on task 'needle'"),
    (["tasks", "frobnicate"], "argument VERB: invalid choice: 'frobnicate'"),
    (["regate", "precompute", "--model", "tiny-llava", "--task", "nosuch", "--n", "3", "--out", "{root}/t.pt"], "unknown task 'nosuch'; known tasks"),
    (["regate", "precompute", "--model", "tiny-llava", "--task", "needle", "--n", "3", "--out", "{root}/t.pt"], "was not trained on task 'needle'"),
    (["regate", "precompute", "--model", "no-such-model", "--task", "shapes", "--n", "3", "--out", "{root}/t.pt"], "no reference model 'no-such-model'"),
    (["regate", "precompute", "--model", "tiny-llava", "--task", "shapes", "--n", "0", "--out", "{root}/t.pt"], "argument --n: must be ≥ 1"),
    (["regate", "frobnicate"], "argument ACTION: invalid choice: 'frobnicate'"),
    (["finetune", "--model", "tiny-llava", "--task", "nosuch", "--steps", "3"], "unknown task 'nosuch'; known tasks"),
    (["finetune", "--model", "tiny-llava", "--task", "shapes-relations", "--steps", "0"], "argument --steps: must be ≥ 1, got 0"),
    (["finetune", "--model", "tiny-llava", "--task", "shapes-relations"], "the following arguments are required: --steps"),
    (["finetune", "--model", "tiny-llava", "--task", "shapes-relations", "--steps", "3", "--batch-size", "0"], "argument --batch-size: must be ≥ 1"),
    (["finetune", "--model", "tiny-llava", "--task", "shapes-relations", "--steps", "3", "--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["finetune", "--model", "tiny-llava", "--task", "shapes-relations", "--steps", "3", "--lr", "fast"], "argument --lr: 'fast' is not a number"),
    (["finetune", "--model", "tiny-llava", "--task", "shapes-relations", "--steps", "3", "--turns", "-1"], "argument --turns: must be ≥ 0, got -1"),
    (["finetune", "--model", "tiny-llava", "--task", "shapes-relations", "--steps", "3", "--train-n", "4"], "--train-n 4 is smaller than --batch-size 8"),
    (["finetune", "--model", "tiny-llava", "--task", "shapes-relations", "--steps", "3", "--passes", "regate:keep=2"], "keep must be in (0, 1], got 2"),
    (["finetune", "--model", "tiny-llava", "--task", "shapes-relations", "--steps", "3", "--passes", "+"], "--passes '+' names no pass"),
    (["finetune", "--model", "tiny-llava", "--task", "shapes-relations", "--steps", "3", "--passes", "none", "--passes", "none"], "--passes lists the same run twice"),
    (["finetune", "--model", "tiny-llava", "--task", "needle", "--steps", "3"], "was not trained on task 'needle'"),
    (["finetune", "--model", "tiny-qwen25vl", "--task", "shapes-video", "--steps", "3"], "finetune trains on image tasks; 'shapes-video' is a video task"),
    (["finetune", "--model", "tiny-llava-siglip-random", "--task", "shapes-relations", "--steps", "3"], "is a random-weight config without task"),
    (["finetune", "--model", "no-such-model", "--task", "shapes-relations", "--steps", "3"], "no reference model 'no-such-model'"),
    (["analyze", "stages", "--model", "tiny-llava", "--task", "nosuch", "--n", "3"], "unknown task 'nosuch'; known tasks"),
    (["analyze", "stages", "--model", "tiny-llava", "--task", "needle", "--n", "3"], "was not trained on task 'needle'"),
    (["analyze", "stages", "--model", "no-such-model", "--n", "3"], "no reference model 'no-such-model'"),
    (["analyze", "stages", "--model", "tiny-llava-siglip-random", "--n", "3"], "is a random-weight config without task"),
    (["analyze", "stages", "--model", "tiny-llava", "--n", "0"], "argument --n: must be ≥ 1"),
    (["analyze", "frobnicate"], "argument ANALYSIS: invalid choice: 'frobnicate'"),
    # no verb
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
]


def _verb(argv):
    return argv[0] if argv[0] in _verbs() else None


def _verbs():
    return set(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("argv, expected", CATALOGUE)
def test_bad_input_gives_one_clear_line(argv, expected, files, capsys):
    argv = [part.format(root=files) for part in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    verb = _verb(argv)
    # A verb with verbs of its own (``tasks export``) reports argparse errors under its full name.
    prefixes = [f"vlmopt {verb}: error: "] if verb else ["vlmopt: error: "]
    if verb and len(argv) > 1:
        prefixes.append(f"vlmopt {verb} {argv[1]}: error: ")
    assert len(lines) == 1 and lines[0].startswith(tuple(prefixes)), captured.err
    assert expected.format(root=files) in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_the_catalogue_covers_every_verb():
    argvs = [case.values[0] if hasattr(case, "values") else case[0] for case in CATALOGUE]
    assert len(argvs) >= 23
    assert {argv[0] for argv in argvs} >= _verbs()
