"""Placeholder during the move: the command still lives in ``mlops_obs.logs.ship_command``."""

from mlops_obs.logs.ship_command import add_arguments, run

__all__ = ["add_arguments", "run"]
