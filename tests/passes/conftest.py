"""Fixtures the pass tests share."""

import pytest

import vlmopt


@pytest.fixture
def no_tracing(monkeypatch):
    """Make any capture fail: a pass list must be refused before ``compile`` traces the model."""

    def refuse(adapter):
        raise AssertionError("compile traced the model before refusing the pass list")

    monkeypatch.setattr(vlmopt.compiler.VLMGraph, "capture", refuse)
