"""Placeholder during the move: the command still lives in ``mlops_obs.exporter``."""

from mlops_obs.exporter import add_arguments, run

__all__ = ["add_arguments", "run"]
