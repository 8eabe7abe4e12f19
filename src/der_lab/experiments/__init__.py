"""Experiments: one module per experiment family, run as ``der exp <name>``; each writes JSON + plots."""

__all__: list[str] = []
