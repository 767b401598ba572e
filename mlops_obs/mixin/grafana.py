"""The one module that touches grafanalib.

grafanalib is thinly maintained and its defaults are from old Grafana (``schemaVersion`` 12, the base
threshold written as the string ``'null'``, no ``uid``, no field data links), so dashboards are described
with the small neutral types below and everything grafanalib gets wrong is set explicitly here. Swapping
grafanalib out means rewriting this file only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from grafanalib import core as g
from grafanalib._gen import DashboardEncoder

SCHEMA_VERSION = 39  # Grafana 10.x dashboards
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Link:
    title: str
    url: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str
    description: str
    # (value, colour) steps above the base colour; the value is the mixin threshold the alert also uses.
    thresholds: tuple[tuple[float, str], ...] = ()
    kind: str = "timeseries"  # timeseries | stat | heatmap
    width: int = 8
    height: int = 8
    links: tuple[Link, ...] = ()
    stack: bool = False
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    query: str  # a label_values(...) query; "" for the datasource variable
    include_all: bool = True


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    rows: list[Row]
    variables: list[Variable]
    tags: tuple[str, ...] = ()
    alert_annotation_expr: str = 'ALERTS{alertstate="firing"}'
    links: list[dict[str, Any]] = field(default_factory=list)


def _thresholds(p: Panel) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    steps += [{"color": colour, "value": value} for value, colour in p.thresholds]
    return {"mode": "absolute", "steps": steps}


def _field_defaults(p: Panel) -> dict[str, Any]:
    d: dict[str, Any] = {"unit": p.unit, "thresholds": _thresholds(p)}
    if p.min is not None:
        d["min"] = p.min
    if p.max is not None:
        d["max"] = p.max
    if p.links:
        d["links"] = [{"title": link.title, "url": link.url, "targetBlank": True} for link in p.links]
    return d


def _panel(p: Panel, pid: int, x: int, y: int) -> Any:
    targets = [
        g.Target(expr=q.expr, legendFormat=q.legend, refId=chr(ord("A") + i), datasource=DATASOURCE,
                 format="heatmap" if p.kind == "heatmap" else "time_series")
        for i, q in enumerate(p.queries)
    ]  # fmt: skip
    pos = g.GridPos(h=p.height, w=p.width, x=x, y=y)
    extra: dict[str, Any] = {"fieldConfig": {"defaults": _field_defaults(p)}}
    common: dict[str, Any] = dict(
        title=p.title, description=p.description, dataSource=DATASOURCE, targets=targets, gridPos=pos, id=pid
    )
    if p.kind == "stat":
        return g.Stat(**common, format=p.unit, reduceCalc="lastNotNull", graphMode="none", extraJson=extra)
    if p.kind == "heatmap":
        extra.update(
            {
                "options": {
                    "calculate": False,
                    "yAxis": {"unit": p.unit},
                    "color": {"mode": "scheme", "scheme": "Spectral"},
                    "cellGap": 1,
                    "tooltip": {"show": True, "yHistogram": True},
                },
            }
        )
        return g.Heatmap(**common, dataFormat="tsbuckets", extraJson=extra)
    ts = g.TimeSeries(
        **common,
        unit=p.unit,
        thresholdsStyleMode="line" if p.thresholds else "off",
        stacking={"mode": "normal", "group": "A"} if p.stack else {},
        fillOpacity=30 if p.stack else 10,
        legendDisplayMode="table",
        legendCalcs=["lastNotNull", "max"],
        tooltipMode="multi",
        extraJson=extra,
    )
    return ts


def _variable(v: Variable) -> Any:
    if not v.query:
        return g.Template(name=v.name, label=v.label, query="prometheus", type="datasource", default="Prometheus")
    return g.Template(
        name=v.name,
        label=v.label,
        query=v.query,
        dataSource=DATASOURCE,
        includeAll=v.include_all,
        multi=True,
        allValue=".*",
        default="All",
        refresh=2,  # on time range change, so chained variables follow their parent
        sort=3,  # numerical ascending: rank 2 before rank 10
    )


def render(d: Dashboard) -> dict[str, Any]:
    panels: list[Any] = []
    pid, y = 1, 0
    for row in d.rows:
        panels.append(g.RowPanel(title=row.title, gridPos=g.GridPos(h=1, w=WIDTH, x=0, y=y), id=pid))
        pid, y, x, line_h = pid + 1, y + 1, 0, 0
        for p in row.panels:
            if x + p.width > WIDTH:
                x, y, line_h = 0, y + line_h, 0
            panels.append(_panel(p, pid, x, y))
            pid, x, line_h = pid + 1, x + p.width, max(line_h, p.height)
        y += line_h
    alerts_annotation = {
        "datasource": DATASOURCE,
        "enable": True,
        "expr": d.alert_annotation_expr,
        "iconColor": "red",
        "name": "Alerts",
        "step": "60s",
        "titleFormat": "{{ alertname }}",
        "textFormat": "{{ severity }} {{ job }} {{ instance }}",
        "tagKeys": "severity,job",
        "useValueForTime": False,
    }
    dash = g.Dashboard(
        title=d.title,
        uid=d.uid,
        description=d.description,
        tags=list(d.tags),
        panels=panels,
        templating=g.Templating(list=[_variable(v) for v in d.variables]),
        annotations=g.Annotations(list=[alerts_annotation]),
        schemaVersion=SCHEMA_VERSION,
        graphTooltip=1,
        refresh="30s",
        time=g.Time("now-3h", "now"),
        timezone="utc",
        links=d.links,
    )
    data: dict[str, Any] = json.loads(json.dumps(dash.to_json_data(), cls=DashboardEncoder))
    data.pop("rows", None)  # legacy (pre-5.0) layout; panels + row panels are the modern one
    data.pop("style", None)
    return data


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
