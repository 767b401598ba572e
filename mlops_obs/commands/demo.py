"""Placeholder during the move: the command still lives in ``mlops_obs.demo``."""

from mlops_obs.demo import add_arguments, run

__all__ = ["add_arguments", "run"]
