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
