"""Replay: one incident timeline across ranks, the launcher, alerts and nodes.

- :mod:`.timeline`: which events a replay shows and in which order (the job's events merged with the
  alerts of the nodes it ran on), from any :class:`~mlops_obs.logs.source.Source`;
- :mod:`.files`: events straight from log files through the shipper's parser (``--source``);
- :mod:`.render`: the terminal view (aligned columns, colours, repeated lines folded, gaps in a
  process's ``seq`` marked, alerts with their state) and the ``--json`` lines.

Pure functions over event iterators; ``mlops_obs.commands.replay`` wires them to the command line.
"""
