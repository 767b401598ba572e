"""Placeholder during the move: the command still lives in ``mlops_obs.alert_sink``."""

from mlops_obs.alert_sink import add_arguments, run

__all__ = ["add_arguments", "run"]
