"""import vlmopt stays light: no triton, onnx, onnxruntime or tensorrt, no CUDA."""

import subprocess
import sys


def test_import_vlmopt_is_light():
    code = (
        "import sys, torch, vlmopt\n"
        "heavy = [m for m in ('triton', 'onnx', 'onnxruntime', 'onnxscript', 'tensorrt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_package_imports_first_in_a_fresh_process():
    """No import cycle: each package of vlmopt imports on its own, before anything else of vlmopt."""
    for module in ("vlmopt.passes.hermes", "vlmopt.passes.kv_stream", "vlmopt.stream", "vlmopt.adapters", "vlmopt.layers",
                   "vlmopt.graph.edit", "vlmopt.export.graphs", "vlmopt.configs"):
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{module}: {result.stderr[-2000:]}"
