"""Every op file follows the op-file convention: module-level ``flop_formula`` and ``onnx_translation``,
each a function or None, found by :func:`vlmopt.ops.op_modules` without a hard-coded list."""

import pkgutil

import torch

import vlmopt.ops
from vlmopt.ops import op_modules


def test_every_op_module_defines_both_names():
    modules = op_modules()
    walked = {info.name for info in pkgutil.iter_modules(vlmopt.ops.__path__)}
    assert set(modules) == {name for name in walked if hasattr(torch.ops.vlmopt, name)}
    assert {"merge_visual", "gather_sequence", "topk_indices", "received_attention"} <= set(modules)
    for name, module in modules.items():
        for attribute in ("flop_formula", "onnx_translation"):
            value = vars(module)[attribute]  # defined in the file itself, not inherited
            assert value is None or callable(value), f"{name}.{attribute}"


def test_flop_formulas_count_from_shapes():
    from vlmopt.ops import received_attention

    assert received_attention.flop_formula((2, 5, 8), (2, 5, 8), 2) == 2 * 2 * 5 * 5 * 8
