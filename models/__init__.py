"""The research bench around vlmopt's reference models; checkout-only, not part of the installed package.

The weights of the reference models live beside this package (``models/tiny-llava/``,
``models/tiny-qwen25vl/``) and are loaded with :func:`vlmopt.reference.load`. This package holds what
made and studies them, and runs from a checkout of the repository (the wheel ships ``vlmopt`` only):

* :mod:`models.train`: train a reference model from scratch and write its directory
  (``python -m models.train --model tiny-llava``);
* :mod:`models.arch`: the architectures of the tiny models;
* :mod:`models.card`: the model card (``README.md``) written from a model's ``eval.json``;
* :mod:`models.bench`: research benchmarks on the trained models (``python -m models.bench.model_probe``,
  ``tower_count``, ``token_needs``, ``train_step``).

Nothing in ``vlmopt`` imports this package.
"""
