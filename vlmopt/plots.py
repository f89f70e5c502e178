"""The one way vlmopt's ``--plot`` options get matplotlib: file-only, with a clear error when it is missing."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (PNG files, no display), or
    :class:`~vlmopt.errors.MissingDependencyError` naming the install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from vlmopt.errors import MissingDependencyError

        raise MissingDependencyError("--plot needs matplotlib: pip install matplotlib (or vlmopt[plot])") from None
    return plt
