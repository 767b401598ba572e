"""One module a ``mlops-obs`` subcommand, all of the same shape.

Each module here provides ``add_arguments(parser) -> list[Setting]`` (its settings, which ``cli.py``
turns into flags, ``MLOPS_OBS_*`` variables and config-file keys) and ``run(config) -> int`` (the exit
code). ``cli.COMMANDS`` is the table that finds them. A command module holds the wiring of one command:
settings, start-up, signal handling, exit codes; the machinery it drives lives in the packages beside
(``exporter``, ``logs``, ``workload``, ``mixin``...). Heavy imports (torch, grafanalib) stay inside
``run`` so that ``mlops-obs --help`` and the exporter start fast.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

# The signals a long-running command (exporter, alert-sink) takes: stop, stop now, reload.
SERVICE_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@contextmanager
def signals_for_sigwait() -> Iterator[set[signal.Signals]]:
    """Block :data:`SERVICE_SIGNALS` for the block's duration, so the caller takes them with
    ``signal.sigwait``; yields the set to wait on.

    A Python handler that set an Event could deadlock on the Event's own lock if the signal landed
    while the main thread held it; taken synchronously, a signal is just a return value. Enter this
    before any thread starts, so that every thread inherits the mask and only ``sigwait`` sees them.
    The previous mask comes back on the way out, for callers (tests) that run a command in-process.
    """
    handled = set(SERVICE_SIGNALS)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    try:
        yield handled
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
