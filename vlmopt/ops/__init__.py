"""The ``vlmopt::`` custom ops. Importing this package registers them with ``torch.library``.

One op per file: the op (``torch.library.custom_op``), its exact fake (so Dynamo, ``torch.export``
and ONNX export see through it), a plain-PyTorch ``reference`` that runs anywhere, and, where it
pays, a Triton kernel in :mod:`vlmopt.kernels`. Each op file also defines, at module level,
``flop_formula`` (for ``torch.utils.flop_counter``) and ``onnx_translation`` (a zero-argument
function importing onnxscript only when called), each ``None`` when the op has none;
:func:`op_modules` finds them for :mod:`vlmopt.flops` and :mod:`vlmopt.export.onnx_ops`.
"""

import importlib
import pkgutil
from types import ModuleType

from . import (
    apbv_attention,
    apbv_compress,
    compact_positions,
    cross_layer_smooth,
    evicted_mean,
    gather_sequence,
    hiprune_select,
    kcenter_select,
    last_token_attention,
    lse_merge,
    merge_visual,
    pool_tokens,
    pseudo_query_attention,
    random_scores,
    received_attention,
    recency_scores,
    regate_mask,
    rerotate_keys,
    sequence_keep_index,
    tier_blend,
    tier_keep_index,
    topk_indices,
)

__all__ = [
    "op_modules",
    "apbv_attention",
    "apbv_compress",
    "compact_positions",
    "cross_layer_smooth",
    "evicted_mean",
    "gather_sequence",
    "hiprune_select",
    "kcenter_select",
    "last_token_attention",
    "lse_merge",
    "merge_visual",
    "pool_tokens",
    "pseudo_query_attention",
    "random_scores",
    "received_attention",
    "recency_scores",
    "regate_mask",
    "rerotate_keys",
    "sequence_keep_index",
    "tier_blend",
    "tier_keep_index",
    "topk_indices",
]


def op_modules() -> dict[str, ModuleType]:
    """``{op name: its module}`` for every module of this package that registers a ``vlmopt::`` op,
    found by walking the package (an op file added beside these is picked up without edits here).

    Raises :class:`TypeError` naming a module that breaks the op-file convention: each defines
    ``flop_formula`` and ``onnx_translation`` at module level, each a function or ``None``.
    """
    from torch._library.custom_ops import CustomOpDef

    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        names = [
            value._qualname.split("::", 1)[1]
            for value in vars(module).values()
            if isinstance(value, CustomOpDef) and value._qualname.startswith("vlmopt::")
        ]
        if not names:
            continue
        for attribute in ("flop_formula", "onnx_translation"):
            value = getattr(module, attribute, _MISSING)
            if value is _MISSING or not (value is None or callable(value)):
                raise TypeError(
                    f"{module.__name__} registers vlmopt::{names[0]} but does not define {attribute} as a function "
                    f"or None at module level (the op-file convention: None when the op has none)"
                )
        found.update(dict.fromkeys(names, module))
    return found


_MISSING = object()
