"""Helpers of bench/scaling.py: tasks (data), models, training, fits (frontier, power law), verdicts, reports."""

__all__: list[str] = []
