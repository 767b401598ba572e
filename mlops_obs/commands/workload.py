"""Placeholder during the move: the command still lives in ``mlops_obs.workload.command``."""

from mlops_obs.workload.command import add_arguments, run

__all__ = ["add_arguments", "run"]
