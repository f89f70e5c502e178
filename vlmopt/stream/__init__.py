"""Streaming video: :class:`Stream` (``CompiledVLM.stream``) and the KV-tier machinery its passes share."""

from vlmopt.stream.session import Answer, Stream

__all__ = ["Answer", "Stream"]
