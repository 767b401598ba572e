"""Dashboards, alerting and recording rules, rule tests and Alertmanager routing from one definition.

:mod:`.config` holds the selectors and thresholds; :mod:`.rules`, :mod:`.dashboards` and
:mod:`.alertmanager` read them; :mod:`.generate` writes the files (``mlops-obs generate``).
"""
