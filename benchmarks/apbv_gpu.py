"""APB-V attention on one NVIDIA GPU: the Triton kernel against SDPA (flash) and FlashAttention.

    python benchmarks/apbv_gpu.py [--context-tokens N] [--hosts 8] [--repeats 20] [--json out.json]
    python benchmarks/apbv_gpu.py --dry-run [--json out.json]   # CPU smoke path: tiny shapes, reference

Setting (APB-V, arXiv 2601.21444, 64 frames; Qwen2.5-VL-7B attention): 28 query heads, 4 KV heads,
head dim 128, bf16, batch 1. The default context is the visual tokens of 64 frames at 448×448:
14-px patches give 32×32 patches per frame, the temporal patch folds 2 frames into one, and the
2×2 spatial merge leaves 16×16 = 256 tokens per frame pair, so n = 64/2 · 256 = 8192.

The split follows the official code (``thunlp/APB``, ``modeling_qwen2_5_vl_apbvz.py``): anchor
l_a = 128·ceil((n//64)/128), passing l_p = 128·ceil((n//128)/128), 2H virtual hosts with blocks of
l_b = ceil((n − l_a)/(2H)) tokens, k1 = min(l_p, 128·floor(l_b/128)) keys passed per block.
Physical host h runs two attention calls of ``vlmopt::apbv_attention``:

- virtual host v1 = h: queries [anchor | block], keys [h·k1 passing | anchor | block];
- virtual host v2 = 2H−1−h: queries = its block, keys [v2·k1 passing | anchor | block] (the anchor
  is fully visible, so in the op's terms anchor_len = 0 and passing_len = v2·k1 + l_a).

Rows: one device's full causal attention over the n tokens (SDPA with the flash backend;
``flash_attn.flash_attn_func`` if installed), the Triton kernel on that same full causal problem
(equal work: the kernel's own quality), and the Triton kernel on each host's APB-V calls (the
slowest host is the critical path). The question block (exact attention merged by
``vlmopt::lse_merge``) and communication are not timed here. Times are medians of CUDA-event
timings after warm-up; the kernel's output is first checked against the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlmopt.ops.apbv_attention import reference, visible_pairs  # noqa: E402

QWEN25VL_7B = {"heads": 28, "kv_heads": 4, "head_dim": 128}
TRITON_CONFIGS = [  # (block_m, block_n, num_warps, num_stages); the fastest on the slowest host is kept
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
]


def frames_to_tokens(frames: int, side: int = 448, patch: int = 14, temporal_patch: int = 2, merge: int = 2) -> int:
    """Qwen2.5-VL's visual tokens for ``frames`` square frames of ``side`` pixels."""
    per_pair = (side // patch // merge) ** 2
    return math.ceil(frames / temporal_patch) * per_pair


def apbv_lengths(context: int, hosts: int) -> dict:
    """The official code's anchor, passing and block lengths for a context of ``context`` tokens."""
    anchor = 128 * math.ceil((context // 64) / 128)
    passing = 128 * math.ceil((context // 128) / 128)
    block = math.ceil((context - anchor) / (2 * hosts))
    kept = min(passing, 128 * (block // 128))
    return {"anchor": anchor, "passing": passing, "block": block, "kept_per_block": kept}


def host_calls(lengths: dict, hosts: int, host: int) -> list[dict]:
    """The two ``apbv_attention`` calls of physical host ``host``: (anchor_len, passing_len, block_len)."""
    anchor, block, kept = lengths["anchor"], lengths["block"], lengths["kept_per_block"]
    second = 2 * hosts - 1 - host
    return [
        {"virtual_host": host, "anchor_len": anchor, "passing_len": host * kept, "block_len": block},
        {"virtual_host": second, "anchor_len": 0, "passing_len": second * kept + anchor, "block_len": block},
    ]


def make_inputs(call: dict, shape: dict, dtype, device, generator):
    query_len = call["anchor_len"] + call["block_len"]
    key_len = call["passing_len"] + query_len
    q = torch.randn(1, shape["heads"], query_len, shape["head_dim"], generator=generator).to(device, dtype)
    k = torch.randn(1, shape["kv_heads"], key_len, shape["head_dim"], generator=generator).to(device, dtype)
    v = torch.randn(1, shape["kv_heads"], key_len, shape["head_dim"], generator=generator).to(device, dtype)
    return q, k, v


def timer(device: str):
    def cuda_median(fn, repeats: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def cpu_median(fn, repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cuda_median if device == "cuda" else cpu_median


def sdpa_full(context: int, shape: dict, dtype, device, generator):
    """A callable running one device's full causal attention over the context, and its description."""
    q = torch.randn(1, shape["heads"], context, shape["head_dim"], generator=generator).to(device, dtype)
    k = torch.randn(1, shape["kv_heads"], context, shape["head_dim"], generator=generator).to(device, dtype)
    v = torch.randn_like(k)
    if device != "cuda":
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), "sdpa (cpu default backend)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def gqa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        gqa()
        return gqa, "sdpa flash backend, enable_gqa"
    except RuntimeError as error:  # flash backend without GQA support: repeat the KV heads first
        group = shape["heads"] // shape["kv_heads"]
        k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

        def repeated():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

        return repeated, f"sdpa flash backend, KV heads repeated ({str(error).splitlines()[0][:80]})"


def flash_attn_full(context: int, shape: dict, dtype, generator):
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        return None, f"flash_attn is not importable ({error}); pip install flash-attn to add this row"
    q = torch.randn(1, context, shape["heads"], shape["head_dim"], generator=generator).to("cuda", dtype)
    k = torch.randn(1, context, shape["kv_heads"], shape["head_dim"], generator=generator).to("cuda", dtype)
    v = torch.randn_like(k)
    return (lambda: flash_attn_func(q, k, v, causal=True)), "flash_attn.flash_attn_func, causal (native GQA)"


def check_kernel(kernel, call: dict, shape: dict, dtype, device, generator) -> dict:
    """The kernel against the reference on one KV group (7 query heads) of ``call``'s shapes."""
    group_shape = {"heads": shape["heads"] // shape["kv_heads"], "kv_heads": 1, "head_dim": shape["head_dim"]}
    q, k, v = make_inputs(call, group_shape, dtype, device, generator)
    args = (q, k, v, call["anchor_len"], call["passing_len"], shape["head_dim"] ** -0.5)
    out, lse = kernel(*args)
    want_out, want_lse = reference(*args)
    return {
        "call": call,
        "out_relative_error": ((out.float() - want_out.float()).norm() / want_out.float().norm()).item(),
        "out_max_abs_error": (out.float() - want_out.float()).abs().max().item(),
        "lse_max_abs_error": (lse - want_lse).abs().max().item(),
    }


def run(args) -> dict:
    device = "cpu" if args.dry_run else "cuda"
    shape = {"heads": 4, "kv_heads": 2, "head_dim": 16} if args.dry_run else dict(QWEN25VL_7B)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    context = args.context_tokens or (1024 if args.dry_run else frames_to_tokens(args.frames))
    lengths = apbv_lengths(context, args.hosts)
    if lengths["block"] <= 0:
        raise SystemExit(f"--context-tokens {context} is too short for {args.hosts} hosts (no block left after the anchor)")
    generator = torch.Generator().manual_seed(0)
    median = timer(device)
    if args.dry_run:
        kernel, kernel_name = reference, "reference (plain PyTorch; --dry-run)"
    else:
        from vlmopt.kernels.apbv_attention import apbv_attention_triton

        kernel, kernel_name = apbv_attention_triton, "vlmopt Triton kernel"

    def flops_of(call):
        return 4 * shape["heads"] * shape["head_dim"] * visible_pairs(call["anchor_len"], call["passing_len"], call["block_len"])

    full_call = {"anchor_len": 0, "passing_len": 0, "block_len": context}
    rows, notes = [], []

    def add(name, fn, flops, **extra):
        ms = median(fn, args.repeats)
        rows.append({"name": name, "ms": ms, "tflops": flops / ms / 1e9, **extra})
        return ms

    heaviest = host_calls(lengths, args.hosts, args.hosts - 1)
    checks = [check_kernel(kernel, call, shape, dtype, device, generator) for call in heaviest]
    scale = shape["head_dim"] ** -0.5
    settings = {}
    if not args.dry_run:  # pick the fastest launch configuration on the slowest host's calls
        inputs = [make_inputs(call, shape, dtype, device, generator) for call in heaviest]
        sweep = []
        for block_m, block_n, warps, stages in TRITON_CONFIGS if args.sweep else TRITON_CONFIGS[:1]:
            config = {"block_m": block_m, "block_n": block_n, "num_warps": warps, "num_stages": stages}

            def both(config=config):
                for call, (q, k, v) in zip(heaviest, inputs):
                    kernel(q, k, v, call["anchor_len"], call["passing_len"], scale, **config)

            try:
                sweep.append({**config, "ms": median(both, max(3, args.repeats // 4))})
            except Exception as error:  # noqa: BLE001 - a config that does not compile on this GPU
                notes.append(f"config {config} failed: {type(error).__name__}: {str(error)[:120]}")
        if not sweep:
            raise SystemExit("no Triton launch configuration compiled on this GPU: " + "; ".join(notes))
        settings = {key: value for key, value in min(sweep, key=lambda entry: entry["ms"]).items() if key != "ms"}
        notes.append(f"triton launch configs (ms on host {args.hosts - 1}): {json.dumps(sweep)}")

    full_flops = flops_of(full_call)
    sdpa, sdpa_name = sdpa_full(context, shape, dtype, device, generator)
    sdpa_ms = add(f"full causal, {sdpa_name}", sdpa, full_flops)
    flash_ms = None
    if not args.dry_run:
        flash, flash_note = flash_attn_full(context, shape, dtype, generator)
        if flash is None:
            notes.append(flash_note)
        else:
            flash_ms = add(f"full causal, {flash_note}", flash, full_flops)
    q, k, v = make_inputs(full_call, shape, dtype, device, generator)
    add(f"full causal, {kernel_name} (equal work)", lambda: kernel(q, k, v, 0, 0, scale, **settings), full_flops)

    host_ms = []
    for host in range(args.hosts):
        calls = host_calls(lengths, args.hosts, host)
        inputs = [make_inputs(call, shape, dtype, device, generator) for call in calls]

        def both():
            for call, (q, k, v) in zip(calls, inputs):
                kernel(q, k, v, call["anchor_len"], call["passing_len"], scale, **settings)

        host_ms.append(add(f"APB-V host {host} (virtual hosts {host}, {2 * args.hosts - 1 - host}), {kernel_name}", both, sum(map(flops_of, calls)), calls=calls))
    slowest = max(host_ms)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
        "context_tokens": context,
        "hosts": args.hosts,
        "lengths": lengths,
        "triton_settings": settings,
        "kernel_check": checks,
        "rows": rows,
        "slowest_host_ms": slowest,
        "speedup_slowest_host_vs_sdpa": sdpa_ms / slowest,
        "speedup_slowest_host_vs_flash_attn": flash_ms / slowest if flash_ms else None,
        "attention_flops_per_host_ratio": max(sum(map(flops_of, host_calls(lengths, args.hosts, h))) for h in range(args.hosts)) / full_flops,
        "notes": notes,
    }


def print_table(result: dict) -> None:
    lengths = result["lengths"]
    print(f"{result['device']}, {result['dtype']}, heads {result['shape']}, n = {result['context_tokens']}, H = {result['hosts']}")
    print(f"anchor {lengths['anchor']}, passing l_p {lengths['passing']}, block {lengths['block']}, kept per block {lengths['kept_per_block']}")
    for check in result["kernel_check"]:
        print(f"kernel check (virtual host {check['call']['virtual_host']}): relative error {check['out_relative_error']:.2e}, lse max error {check['lse_max_abs_error']:.2e}")
    print(f"{'row':<92} {'ms':>9} {'TFLOP/s':>8}")
    for row in result["rows"]:
        print(f"{row['name']:<92} {row['ms']:9.3f} {row['tflops']:8.2f}")
    print(f"slowest host {result['slowest_host_ms']:.3f} ms; speedup vs SDPA full causal {result['speedup_slowest_host_vs_sdpa']:.2f}x", end="")
    if result["speedup_slowest_host_vs_flash_attn"]:
        print(f", vs flash_attn {result['speedup_slowest_host_vs_flash_attn']:.2f}x", end="")
    print(f"; attention FLOPs per host / full: {result['attention_flops_per_host_ratio']:.4f}")
    for note in result["notes"]:
        print("note:", note)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context-tokens", type=int, default=None, help="context length n (default: --frames' visual tokens)")
    parser.add_argument("--frames", type=int, default=64, help="448×448 frames whose Qwen2.5-VL tokens size the context (default 64 → 8192)")
    parser.add_argument("--hosts", type=int, default=None, help="physical hosts H (2H virtual hosts); default 8, as the paper (2 with --dry-run)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per row (median reported)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="use the first Triton launch config only")
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke path: tiny shapes, the reference instead of the kernel")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.hosts is None:
        args.hosts = 2 if args.dry_run else 8
    if args.hosts < 1:
        raise SystemExit(f"--hosts {args.hosts}: need at least one host")
    if args.dry_run:
        args.repeats = min(args.repeats, 2)
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/apbv_gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False); run with --dry-run for the CPU smoke path")
    result = run(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
