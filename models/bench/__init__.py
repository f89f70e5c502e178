"""Research benchmarks on the reference models (checkout-only): what their visual tokens encode
(``model_probe``), whether their towers can count (``tower_count``), which tokens they need
(``token_needs``) and what a training step costs (``train_step``). Run as
``python -m models.bench.<name> --help``."""
