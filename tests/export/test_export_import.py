"""The export package and its CLI import none of onnx, onnxruntime, onnxscript or tensorrt until used."""

import subprocess
import sys


def test_export_modules_import_lightly():
    code = (
        "import sys, vlmopt, vlmopt.export, vlmopt.export.onnx, vlmopt.export.ort_runtime, vlmopt.export.trt_build\n"
        "import vlmopt.export.trt_check, vlmopt.cli\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'tensorrt', 'torch_tensorrt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
