"""Placeholder during the move: the command still lives in ``mlops_obs.mixin.generate``."""

from mlops_obs.mixin.generate import add_arguments, run

__all__ = ["add_arguments", "run"]
