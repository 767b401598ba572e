"""One module a ``mlops-obs`` subcommand, all of the same shape.

Each module here provides ``add_arguments(parser) -> list[Setting]`` (its settings, which ``cli.py``
turns into flags, ``MLOPS_OBS_*`` variables and config-file keys) and ``run(config) -> int`` (the exit
code). ``cli.COMMANDS`` is the table that finds them. A command module holds the wiring of one command:
settings, start-up, signal handling, exit codes; the machinery it drives lives in the packages beside
(``exporter``, ``logs``, ``workload``, ``mixin``...). Heavy imports (torch, grafanalib) stay inside
``run`` so that ``mlops-obs --help`` and the exporter start fast.
"""
