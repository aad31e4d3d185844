"""The trace store: what the frozen model's own attention says about each token's future use (issue 21)."""
from .layer import DEFAULT_TARGET, LayerTrace

__all__ = ["LayerTrace", "DEFAULT_TARGET"]
