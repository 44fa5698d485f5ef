"""The package's version, the one place it is written (pyproject.toml and `lesionseg.__version__` read it)."""

__version__ = "0.4.0"
