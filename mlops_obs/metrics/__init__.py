"""The metrics layer collectors and the exporter both stand on.

* :mod:`.families`: the one way to build metric families (:class:`FamilyBuilder`, one per
  collector, and a round's :class:`Families`);
* :mod:`.labels`: :class:`Labels`, label sets that carry their rendered text, and :class:`LabelSets`,
  the bounded cache a collector interns them in;
* :mod:`.render`: the text-format writer (:class:`Renderer`, one per collector thread);
* :mod:`._client`: every use of prometheus_client beyond its public API.

Nothing here imports the rest of ``mlops_obs``, and nothing here is module-level mutable state: every
cache belongs to an object its owner holds.
"""

from mlops_obs.metrics._client import sample
from mlops_obs.metrics.families import Families, FamilyBuilder, Spec
from mlops_obs.metrics.labels import NO_LABELS, Labels, LabelSets
from mlops_obs.metrics.render import Renderer, format_value, render

__all__ = [
    "NO_LABELS",
    "Families",
    "FamilyBuilder",
    "LabelSets",
    "Labels",
    "Renderer",
    "Spec",
    "format_value",
    "render",
    "sample",
]
