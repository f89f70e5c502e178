"""Test suite. A regular package (not a namespace one) so that `from tests.conftest import ...` finds this
directory even when an installed distribution ships its own top-level `tests` package (lmms-eval's
dependency latex2sympy2 does, and a regular package anywhere on sys.path beats a namespace one)."""
