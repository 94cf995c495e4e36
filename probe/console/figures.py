"""The console's live figures: computed in probe.metrics.figures (kept importable here)."""

from ..metrics.figures import node_figures, service_series

__all__ = ["node_figures", "service_series"]
