"""The ``vlmopt::`` custom ops. Importing this package registers them with ``torch.library``.

One op per file: the op (``torch.library.custom_op``), its exact fake (so Dynamo, ``torch.export``
and ONNX export see through it), a plain-PyTorch ``reference`` that runs anywhere, and, where it
pays, a Triton kernel in :mod:`vlmopt.kernels`. Each op file also names its ONNX translation
(``onnx_translation()``, which imports onnxscript only when called).
"""

from . import (
    apbv_attention,
    apbv_compress,
    gather_sequence,
    hiprune_select,
    lse_merge,
    merge_visual,
    pool_tokens,
    random_scores,
    received_attention,
    sequence_keep_index,
    topk_indices,
)

__all__ = [
    "apbv_attention",
    "apbv_compress",
    "gather_sequence",
    "hiprune_select",
    "lse_merge",
    "merge_visual",
    "pool_tokens",
    "random_scores",
    "received_attention",
    "sequence_keep_index",
    "topk_indices",
]
