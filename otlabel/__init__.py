"""otlabel: balanced pseudo-labels by optimal transport (log-domain Sinkhorn-Knopp)."""

__version__ = "0.1.0"
__all__: list[str] = []
