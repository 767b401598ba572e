"""Dashboards, alerting and recording rules, rule tests and Alertmanager routing from one definition.

:mod:`.config` holds the selectors and thresholds; :mod:`.rules`, :mod:`.dashboards` and
:mod:`.alertmanager` read them; :mod:`.generate` renders the files that ``mlops-obs generate``
(:mod:`mlops_obs.commands.generate`) writes and checks. ``docs/alerts.md`` lists the series they read.
"""
