"""``vllm serve`` on localhost with the plugin answers OpenAI chat requests with an image, its prompts
pruned (the vLLM environment, docs/vllm.md; skipped where vLLM is not installed). The test starts the
server, sends a bounded number of requests, and stops it."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: its environment is separate (docs/vllm.md)")

from vlmopt import reference  # noqa: E402
from vlmopt.integrations.vllm import engine_overrides  # noqa: E402
from vlmopt.reference import processing  # noqa: E402

START_SECONDS = 900
"""Longest wait for the server to answer /health (a loaded 2-core machine starts it in 1-5 minutes)."""
REQUESTS = 3

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    return json.loads(text) if text else {}


def test_served_chat_with_an_image_is_pruned(tmp_path):
    model = reference.path("tiny-qwen25vl")
    port, log = free_port(), tmp_path / "serve.log"
    command = [str(Path(sys.executable).parent / "vllm"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--hf-overrides", json.dumps(engine_overrides("tiny-qwen25vl", "hiprune:keep_ratio=1/3")),
               "--max-model-len", "4096", "--kv-cache-memory-bytes", str(1 << 28), "--enforce-eager", "--dtype", "float32",
               "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0})]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        began = time.monotonic()
        while True:
            assert server.poll() is None, f"vllm serve exited ({server.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() - began < START_SECONDS, f"no /health after {START_SECONDS} s:\n{log.read_text()[-4000:]}"
            try:
                call(f"{base}/health", timeout=5)
                break
            except OSError:
                time.sleep(3)
        processor = processing.load_processor(model)
        task = reference.task_for("tiny-qwen25vl", "shapes")
        for index in np.random.default_rng().choice(10**5, size=REQUESTS, replace=False).tolist():
            sample = task.sample("test", index)
            png = io.BytesIO()
            sample.pil_image().save(png, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
            reply = call(f"{base}/v1/chat/completions", {
                "model": str(model), "max_tokens": 3, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": sample.question}]}],
            })
            answer = reply["choices"][0]["message"]["content"]
            assert answer.strip(), reply
            unpruned = processing.encode(processor, [sample])["input_ids"].shape[1]
            assert reply["usage"]["prompt_tokens"] == unpruned - 256 + 85  # 256 visual tokens, 85 kept
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
