"""The command line, run as users run it (python -m vlmopt ...)."""

import json
import subprocess
import sys


from vlmopt.cli import main


def cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "vlmopt", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_demo_defaults_to_the_shipped_reference_model():
    from vlmopt import reference
    from vlmopt.cli.demo import default_model

    shipped = (reference.models_dir() / "tiny-llava" / "config.json").exists()
    assert default_model() == ("tiny-llava" if shipped else "tiny-llava-random")


def test_demo_prints_the_comparison_table():
    out = cli("demo", "--model", "tiny-llava-random", "--repeats", "1", "--max-new-tokens", "3").stdout
    assert "| passes | visual tokens | prefill GFLOPs | prefill ms | generated |" in out
    assert "| (none) | 16 / 16 |" in out
    assert "| random_prune:keep_ratio=0.5 | 8 / 16 |" in out


def test_diff_and_inspect(capsys):
    assert main(["diff", "--model", "tiny-qwen25vl-random", "--passes", "pool_prune:keep_ratio=0.25"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("@@ prefill: +9 added") and "pooled_tokens" in out
    assert main(["inspect", "--model", "tiny-llava-random", "--stage", "decode"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# stage: decode") and "layers.0" in out


def test_bad_pass_and_model_give_clear_errors(capsys):
    assert main(["diff", "--model", "tiny-llava-random", "--passes", "hiprun:keep_ratio=0.5"]) == 2
    assert "unknown pass 'hiprun'" in capsys.readouterr().err
    assert main(["diff", "--model", "tiny-llava-random", "--passes", "random_prune:keep_ratio=2"]) == 2
    assert "keep_ratio must be in (0, 1]" in capsys.readouterr().err
    assert main(["inspect", "--model", "/no/such/model"]) == 2
    assert "known models are" in capsys.readouterr().err


def test_viz_writes_a_png(tmp_path):
    out = tmp_path / "kept.png"
    assert main(["viz", "--model", "tiny-llava-random", "--passes", "hiprune:keep_ratio=0.5", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_json(tmp_path):
    out = tmp_path / "bench.json"
    cli("bench", "--config", "tiny-qwen25vl-random", "--repeats", "1",
        "--passes", "random_prune:keep_ratio=1/3", "--passes", "hiprune:keep_ratio=1/3", "--json", str(out))
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert report["baseline"]["visual_tokens"] == 16 and run["visual_tokens"] == 5
    for key in ("prefill_flops", "llm_prefill_flops", "prefill_seconds", "peak_bytes", "kv_bytes"):
        assert key in run and f"{key}_ratio" in run
    assert run["prefill_flops_ratio"] < 1 and run["kv_bytes_ratio"] < 1
    assert report["runs"][1]["pass_overhead_share"] > 0
