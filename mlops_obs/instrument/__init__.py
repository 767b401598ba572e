"""Instrumentation SDK for training loops; see :class:`TrainingMonitor`.

No HTTP server runs in the training process: metrics go to a directory shared with the
``mlops-obs exporter`` sidecar (``--multiproc-dir``), as explained in :mod:`mlops_obs.rankdir`.
"""

from mlops_obs.instrument.monitor import BADPUT_KINDS, PHASES, TrainingMonitor

__all__ = ["BADPUT_KINDS", "PHASES", "TrainingMonitor"]
