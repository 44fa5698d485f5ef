"""Segmenting, reviewing and serving: importable without PyTorch (import-linter holds it, see pyproject.toml)."""
