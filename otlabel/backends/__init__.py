"""Backends: each supplies a :class:`~otlabel.backends.base.ScoreOperator` for the solver loop."""
