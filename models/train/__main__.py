"""``python -m models.train``: train a reference model (see :mod:`models.train`)."""

from models.train.cli import main

main()
