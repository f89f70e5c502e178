"""The parts of ``benchmarks/gpu_check.py``: the CPU audits, the GPU tests and kernels, APB-V's
benchmark, the ONNX export on onnxruntime's CUDA provider, attention implementations; the reference
models and the 7B shapes are in :mod:`gpu_models`. Each part returns a JSON-able dict and raises
:class:`gpu_check.PartFailed` when a check does not hold."""

from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from gpu_check import Context, Part, PartFailed

ROOT = Path(__file__).resolve().parent.parent
#: Relative error a Triton kernel may show against its reference on the same low-precision inputs.
KERNEL_TOLERANCE = {"float16": 5e-3, "bfloat16": 2e-2}
#: The attention implementations ``compile`` must keep (hub kernels by their documented name).
ATTENTION = ("eager", "sdpa", "flash_attention_2", "kernels-community/flash-attn2")


# ----- what a part needs -------------------------------------------------------------------------
def no_gpu(context: Context | None = None) -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"no NVIDIA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, {build})"


def missing(module: str, install: str) -> str | None:
    return None if importlib.util.find_spec(module) else f"{module} is not importable ({install})"


def every(*checks) -> Any:
    """A blocker: every reason the ``checks`` (callables of the context) give, joined; None if none."""
    def blocker(context: Context) -> str | None:
        return "; ".join(r for r in (check(context) for check in checks) if r) or None

    return blocker


def no_ort_cuda(context: Context) -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install onnxruntime-gpu)"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return (f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (providers: "
                f"{', '.join(onnxruntime.get_available_providers())}); pip install onnxruntime-gpu")
    return None


# ----- the CPU audits and the gpu-marked tests, through pytest ------------------------------------
def pytest_run(context: Context, name: str, *args: str) -> dict[str, Any]:
    """Run pytest in a fresh process; its counts and failed tests (a failure fails the part)."""
    junit = context.work / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    # the audits in full: every family with every pass (the test suite runs the quick audit)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "VLMOPT_FULL_AUDIT": "1"})
    suite = ElementTree.parse(junit).getroot() if junit.exists() else None
    suite = suite if suite is None or suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) if suite is not None else 0 for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in (suite.iter("testcase") if suite is not None else [])
              if case.find("failure") is not None or case.find("error") is not None]
    result = {"command": " ".join(command[1:]), "exit_status": done.returncode, **counts, "failed_tests": failed,
              "output_tail": done.stdout[-2000:] if done.returncode else ""}
    if done.returncode != 0 or failed or not counts["tests"]:
        raise PartFailed(f"pytest exited {done.returncode}: {len(failed)} failed of {counts['tests']}", result)
    return result


def audit(context: Context) -> dict[str, Any]:
    return pytest_run(context, "audit", "tests/device/test_on_device.py", "tests/device/test_op_references.py",
                      "tests/device/test_device_audit.py")


def bf16(context: Context) -> dict[str, Any]:
    return pytest_run(context, "bf16", "tests/device/test_dtype_audit.py", "-k", "bfloat16")


def gpu_tests(context: Context) -> dict[str, Any]:
    return pytest_run(context, "gpu_tests", "-m", "gpu", "tests")


# ----- every Triton kernel, compiled, against its reference ---------------------------------------
def kernels(context: Context) -> dict[str, Any]:
    """Each ``vlmopt/kernels/<op>.py`` defines ``<op>_triton`` taking the op's arguments: run it on CUDA
    inputs (the op's examples, fp16 and bf16) against the op's reference on the same inputs."""
    import torch

    import vlmopt.kernels
    from tests.ops.examples import EXAMPLES
    from vlmopt.ops import op_modules

    ops, rows, bad = op_modules(), [], []
    for info in pkgutil.iter_modules(vlmopt.kernels.__path__):
        kernel = getattr(importlib.import_module(f"vlmopt.kernels.{info.name}"), f"{info.name}_triton")
        for dtype in (torch.float16, torch.bfloat16):
            for case, args in enumerate(EXAMPLES[info.name](torch.Generator().manual_seed(0))):
                cuda = [a.to("cuda", dtype) if torch.is_tensor(a) and a.is_floating_point() else
                        a.to("cuda") if torch.is_tensor(a) else a for a in args]
                got, want = kernel(*cuda), ops[info.name].reference(*cuda)
                got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
                row = {"kernel": info.name, "dtype": str(dtype).removeprefix("torch."), "case": case, "outputs": []}
                for have, expect in zip(got, want, strict=True):
                    if expect.is_floating_point():
                        error = ((have.float() - expect.float()).norm() / expect.float().norm().clamp_min(1e-12)).item()
                        row["outputs"].append({"relative_error": error, "ok": error <= KERNEL_TOLERANCE[row["dtype"]]})
                    else:
                        differ = int((have != expect).sum())
                        row["outputs"].append({"mismatches": differ, "ok": differ == 0})
                rows.append(row)
                if not all(o["ok"] for o in row["outputs"]):
                    bad.append(f"{info.name} {row['dtype']} case {case}")
    torch.cuda.synchronize()
    if bad:
        raise PartFailed(f"kernels differ from their references: {'; '.join(bad)}", {"checks": rows})
    return {"checks": rows, "tolerance": KERNEL_TOLERANCE}


# ----- APB-V's attention benchmark -----------------------------------------------------------------
def apbv(context: Context) -> dict[str, Any]:
    import apbv_gpu

    out = context.work / "apbv.json"
    apbv_gpu.main(["--json", str(out), "--repeats", str(context.repeats)])
    result = json.loads(out.read_text())
    worst = max(check["out_relative_error"] for check in result["kernel_check"])
    if worst > KERNEL_TOLERANCE["bfloat16"]:
        raise PartFailed(f"APB-V kernel relative error {worst:.3g} against the reference", result)
    return result


# ----- attention implementations kept by compile ---------------------------------------------------
def attention(context: Context) -> dict[str, Any]:
    """Every reference model loaded with each implementation, in bf16 on CUDA: ``compile`` keeps it,
    and the compiled greedy tokens and prefill logits equal the HF model's with the same one."""
    import torch

    import vlmopt
    from gpu_models import reference_models, task_batch

    rows, bad = [], []
    for name in reference_models():
        for implementation in ATTENTION:
            row: dict[str, Any] = {"model": name, "attn_implementation": implementation}
            try:
                model, batch = task_batch(name, torch.bfloat16, implementation)
            except Exception as error:  # noqa: BLE001 - flash-attn / hub kernels not installed or not downloadable
                rows.append({**row, "skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
                continue
            given = model.config.get_text_config()._attn_implementation
            compiled = vlmopt.compile(model)
            with torch.inference_mode():
                ours, theirs = compiled(**batch, logits_to_keep=1).logits, model(**batch, logits_to_keep=1).logits
                tokens = compiled.generate(**batch, max_new_tokens=8)
                expected = model.generate(**batch, max_new_tokens=8, do_sample=False)
            kept = model.config.get_text_config()._attn_implementation
            row.update(given=given, kept=kept, tokens_equal=bool(torch.equal(tokens, expected)),
                       logits_max_abs_difference=(ours.float() - theirs.float()).abs().max().item())
            rows.append(row)
            if not row["tokens_equal"] or kept != given:
                bad.append(f"{name} {implementation}")
            del model, compiled
            torch.cuda.empty_cache()
    if bad:
        raise PartFailed(f"compiled and HF differ, or the implementation changed: {', '.join(bad)}", {"runs": rows})
    return {"runs": rows}


# ----- the ONNX export on onnxruntime's CUDA execution provider ------------------------------------
def export_cuda(context: Context) -> dict[str, Any]:
    """A reference model exported (on the CPU) with HiPrune, run by onnxruntime on the CUDA provider
    and on the CPU's: the same greedy tokens, prefill logits within 1% of their largest."""
    import numpy as np

    from gpu_models import reference_models
    from vlmopt import configs
    from vlmopt.cli.common import load_model
    from vlmopt.export import OnnxVLM, export_onnx
    from vlmopt.export.graphs import one_image_batch

    rows, bad = [], []
    for name in reference_models()[:1]:  # the CPU tests export every model and pass; here the provider is the question
        loaded = load_model(name)
        for passes in (["hiprune:keep_ratio=0.33"],):
            out = context.work / f"export-{name}-{len(passes)}"
            began = time.perf_counter()
            manifest = export_onnx(loaded.model, out, passes=passes, processor=loaded.processor, model_name=name)
            size = manifest["layout"]["image_size"][0]
            batch = one_image_batch(loaded.model, size, [configs.PromptSpec(text_before=6, text_after=30)], seed=17)
            feeds = {k: v.numpy() for k, v in batch.items()}
            cpu, gpu = OnnxVLM(out), OnnxVLM(out, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            logits = [vlm.prefill(vlm.plan(**feeds))["logits"] for vlm in (cpu, gpu)]
            tokens = [vlm.generate(**feeds, max_new_tokens=8) for vlm in (cpu, gpu)]
            difference = float(np.abs(logits[0] - logits[1]).max() / max(np.abs(logits[0]).max(), 1e-6))
            row = {"model": name, "passes": passes, "export_seconds": round(time.perf_counter() - began, 1),
                   "providers": gpu.providers, "logits_max_relative_difference": difference,
                   "tokens_equal": bool(np.array_equal(tokens[0], tokens[1]))}
            rows.append(row)
            on_gpu = all(p and p[0] == "CUDAExecutionProvider" for p in gpu.providers.values())
            if not (on_gpu and row["tokens_equal"] and difference < 1e-2):  # cuBLAS may use TF32
                bad.append(f"{name} {passes or 'no passes'}")
    if bad:
        raise PartFailed(f"CUDA provider off, or differs from the CPU's: {', '.join(bad)}", {"runs": rows})
    return {"runs": rows}


def _parts() -> list[Part]:
    from gpu_models import no_large_gpu, no_reference_models, passes_bf16, prefill_7b

    gpu = no_gpu

    def triton(context: Context) -> str | None:
        return missing("triton", "pip install vlmopt[triton]")
    return [  # in order of what a short lease should measure first; estimates are guesses until an H100 times them
        Part("audit", "device audit on the CPU: every family, pass, stage and op reference on a stand-in device",
             audit, lambda c: None, 900, on_cpu=True),
        Part("bf16", "dtype audit on the CPU: every family and pass in bf16 keeps bf16 logits, cache and gradients",
             bf16, lambda c: None, 600, on_cpu=True),
        Part("kernels", "every Triton kernel compiled, fp16 and bf16, against its op's reference on CUDA",
             kernels, every(gpu, triton), 45),
        Part("gpu_tests", "the gpu-marked tests (pytest -m gpu)", gpu_tests, every(gpu), 60),
        Part("passes_bf16", "every pass on the reference models on CUDA in bf16: answers against fp32 on CUDA, "
             "accuracy on the eval samples against the CPU record", passes_bf16, every(gpu, no_reference_models), 150),
        Part("prefill_7b", "7B shapes at full width in bf16: identity-compile, HiPrune and HalfV prefill time "
             "against HF eager, peak memory", prefill_7b, every(gpu, no_large_gpu), 150),
        Part("attention", "compile keeps eager / SDPA / flash-attention-2 / hub kernels; tokens equal HF's with each",
             attention, every(gpu, no_reference_models), 45),
        Part("apbv_gpu", "benchmarks/apbv_gpu.py: APB-V's Triton kernel against SDPA flash and FlashAttention",
             apbv, every(gpu, triton), 60),
        Part("export_cuda", "ONNX export run by onnxruntime's CUDA execution provider against its CPU provider",
             export_cuda, every(gpu, no_ort_cuda, no_reference_models), 90),
    ]


PARTS = _parts()
