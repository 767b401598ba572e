"""The ``rca --html`` report: one self-contained page (inline CSS, inline SVG drawn here, no script, no
font or image fetched), so it opens the same on a laptop offline, in a ticket, or as an email
attachment.

What it shows, top down: the verdict and its root cause; the evidence lines; the symptoms and other
findings; a timeline strip of the incident (a lane per rank, a dot per event coloured by level, alerts
as marked lines); plots of the series that tell the story, each with the root cause's time and the
alerts drawn across: per-rank step rate and step time, loss, GPU utilisation and temperature from
Prometheus when the analysis had it, else per-rank step progress and loss from the ranks' step lines.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mlops_obs.rca.facts import JobFacts, trusted
from mlops_obs.rca.metrics import MetricEvidence, rate_points, ratio_points
from mlops_obs.rca.model import Report, clip
from mlops_obs.rca.times import epoch

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
LEVEL_COLOURS = {"critical": "#7f0000", "error": "#d62728", "warning": "#ff9f1c", "info": "#4a90d9", "debug": "#999"}
VERDICT_COLOURS = {"fault": "#c62828", "healthy": "#2e7d32", "unknown": "#ef6c00"}
MAX_LABELLED_SERIES = 10
NOWRAP = frozenset(("time", "source", "rank", "kind", "node", "level"))
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 860, 220, 64, 16, 28, 36

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:920px;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.badge{display:inline-block;padding:3px 10px;border-radius:4px;color:#fff;font-weight:600;text-transform:uppercase}
.summary{font-size:16px;margin:10px 0} .meta{color:#555} .meta b{color:#222}
table{border-collapse:collapse;width:100%;font-size:12.5px} th{background:#f6f6f6}
td,th{border-bottom:1px solid #eee;padding:3px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
td.t{white-space:nowrap} .mono{font-family:ui-monospace,monospace}
tr.alert td{background:#fff4e0} tr.lv-error td,tr.lv-critical td{background:#fdecea}
svg{display:block;margin:6px 0 14px;background:#fff} .none{color:#777;font-style:italic}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _clock(t: float, span: float = 60.0) -> str:
    """Axis time: to the millisecond over a span of seconds, else to the second."""
    s = _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%H:%M:%S.%f")
    return s[:12] if span < 10 else s[:8]


def _num(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e6 or a < 1e-3:
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


Marker = tuple[float, str, str]  # (time, label, colour)


def line_chart(
    title: str,
    lines: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    markers: Sequence[Marker],
    unit: str = "",
    highlight: str | None = None,
) -> str:
    """An SVG line chart: time on x, one polyline per labelled series, vertical marker lines."""
    pts = [(t, v) for _, ps in lines for t, v in ps if math.isfinite(v)]
    if not pts:
        return ""
    t0, t1 = min(t for t, _ in pts), max(t for t, _ in pts)
    for t, _, _ in markers:
        t0, t1 = min(t0, t), max(t1, t)
    if t1 <= t0:
        t1 = t0 + 1.0
    v0, v1 = min(v for _, v in pts), max(v for _, v in pts)
    if v1 <= v0:
        v1 = v0 + (abs(v0) or 1.0)
    v0 = min(v0, 0.0) if v0 >= 0 and v0 < 0.25 * v1 else v0
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def x(t: float) -> float:
        return PAD_L + (t - t0) / (t1 - t0) * pw

    def y(v: float) -> float:
        return PAD_T + ph - (v - v0) / (v1 - v0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
        f'aria-label="{_e(title)}">',
        f'<text x="{PAD_L}" y="17" font-size="13" font-weight="600">{_e(title)}</text>',
        f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>',
    ]
    for i in range(5):
        v = v0 + (v1 - v0) * i / 4
        out.append(
            f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#f0f0f0"/>'
            f'<text x="{PAD_L - 6}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end">{_e(_num(v))}</text>'
        )
        t = t0 + (t1 - t0) * i / 4
        out.append(
            f'<text x="{x(t):.1f}" y="{H - PAD_B + 15}" font-size="10" text-anchor="middle">{_clock(t, t1 - t0)}</text>'
        )
    if unit:
        out.append(
            f'<text x="12" y="{PAD_T + ph / 2:.0f}" font-size="10" transform="rotate(-90 12 {PAD_T + ph / 2:.0f})" '
            f'text-anchor="middle">{_e(unit)}</text>'
        )
    labelled = len(lines) <= MAX_LABELLED_SERIES
    for i, (label, ps) in enumerate(lines):
        good = [(t, v) for t, v in ps if math.isfinite(v)]
        if not good:
            continue
        hot = highlight is not None and label == highlight
        colour = PALETTE[i % len(PALETTE)] if labelled or hot else "#9aa"
        width = 2.2 if hot else 1.3
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in good)
        if len(good) == 1:
            out.append(f'<circle cx="{x(good[0][0]):.1f}" cy="{y(good[0][1]):.1f}" r="2.5" fill="{colour}"/>')
        else:
            out.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="{width}" points="{path}">'
                f"<title>{_e(label)}</title></polyline>"
            )
    for t, label, colour in markers:
        out.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{PAD_T}" y2="{PAD_T + ph}" stroke="{colour}" '
            f'stroke-dasharray="4 3" stroke-width="1.5"><title>{_e(label)}</title></line>'
        )
    legend = (
        [(lb, PALETTE[i % len(PALETTE)]) for i, (lb, _) in enumerate(lines)]
        if labelled
        else ([(highlight, "#000")] if highlight else [])
    )
    lx = PAD_L + 8
    for lb, colour in legend[:MAX_LABELLED_SERIES]:
        out.append(
            f'<rect x="{lx}" y="{PAD_T + 6}" width="10" height="3" fill="{colour}"/>'
            f'<text x="{lx + 14}" y="{PAD_T + 11}" font-size="10">{_e(lb)}</text>'
        )
        lx += 18 + 6 * len(str(lb))
    out.append("</svg>")
    return "".join(out)


def timeline_strip(events: Sequence[Mapping[str, Any]], markers: Sequence[Marker]) -> str:
    """Lanes (one per rank, one for events of no rank), a dot per event coloured by its level."""
    if not events:
        return ""
    times = [epoch(str(ev["@timestamp"])) for ev in events]
    t0, t1 = min(times + [t for t, _, _ in markers]), max(times + [t for t, _, _ in markers])
    if t1 <= t0:
        t1 = t0 + 1.0
    lanes = sorted({int(ev["rank"]) for ev in events if type(ev.get("rank")) is int})
    names = [f"rank {r}" for r in lanes] + ["other"]
    lane_h = 18 if len(names) <= 16 else max(6, 288 // len(names))
    height = PAD_T + lane_h * len(names) + PAD_B
    pw = W - PAD_L - PAD_R

    def x(t: float) -> float:
        return PAD_L + (t - t0) / (t1 - t0) * pw

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" '
        'role="img" aria-label="timeline">',
        f'<text x="{PAD_L}" y="17" font-size="13" font-weight="600">Timeline around the incident</text>',
    ]
    for i, name in enumerate(names):
        yy = PAD_T + i * lane_h + lane_h / 2
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>')
        if lane_h >= 10:
            out.append(f'<text x="{PAD_L - 6}" y="{yy + 4:.1f}" font-size="10" text-anchor="end">{_e(name)}</text>')
    for ev, t in zip(events, times):
        r = ev.get("rank")
        i = lanes.index(r) if type(r) is int and r in lanes else len(lanes)
        yy = PAD_T + i * lane_h + lane_h / 2
        colour = "#ff6d00" if ev.get("kind") == "alert" else LEVEL_COLOURS.get(str(ev.get("level")), "#777")
        rad = 4 if ev.get("kind") != "log" or ev.get("level") in ("error", "critical") else 2.5
        if not trusted(ev):  # drawn hollow: the time is when a shipper read the line, not when it was written
            out.append(
                f'<circle cx="{x(t):.1f}" cy="{yy:.1f}" r="{rad}" fill="none" stroke="{colour}">'
                f"<title>{_e(ev.get('@timestamp'))} (time read, not written) "
                f"{_e(clip(str(ev.get('message', '')), 160))}</title></circle>"
            )
            continue
        out.append(
            f'<circle cx="{x(t):.1f}" cy="{yy:.1f}" r="{rad}" fill="{colour}" fill-opacity="0.85">'
            f"<title>{_e(ev.get('@timestamp'))} {_e(clip(str(ev.get('message', '')), 160))}</title></circle>"
        )
    bottom = PAD_T + lane_h * len(names)
    for t, label, colour in markers:
        out.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{PAD_T}" y2="{bottom}" stroke="{colour}" '
            f'stroke-dasharray="4 3" stroke-width="1.5"><title>{_e(label)}</title></line>'
        )
    for i in range(5):
        t = t0 + (t1 - t0) * i / 4
        out.append(
            f'<text x="{x(t):.1f}" y="{bottom + 15}" font-size="10" text-anchor="middle">{_clock(t, t1 - t0)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _markers(report: Report, facts: JobFacts) -> list[Marker]:
    out: list[Marker] = []
    if report.root is not None and report.root.time:
        out.append((epoch(report.root.time), f"root cause: {report.root.kind}", "#c62828"))
    for n in facts.alerts:
        f = n.event.get("fields")
        if isinstance(f, Mapping) and f.get("status") == "firing":
            out.append((epoch(n.time), str(n.event.get("message")), "#ff6d00"))
    return out


def _metric_plots(metrics: MetricEvidence, markers: list[Marker], hot: str | None) -> list[str]:
    def by_rank(name: str) -> dict[int, list[tuple[float, float]]]:
        return {r: s.points for r, s in sorted(metrics.per_rank(name).items())}

    out: list[str] = []
    steps = by_rank("mlops_training_steps_total")
    if steps:
        out.append(
            line_chart(
                "Step rate per rank", [(f"rank {r}", rate_points(p)) for r, p in steps.items()], markers, "steps/s", hot
            )
        )
    sums, counts = (
        by_rank("mlops_training_step_duration_seconds_sum"),
        by_rank("mlops_training_step_duration_seconds_count"),
    )
    if sums and counts:
        out.append(
            line_chart(
                "Step time per rank",
                [(f"rank {r}", ratio_points(p, counts.get(r, []))) for r, p in sums.items()],
                markers,
                "seconds",
                hot,
            )
        )
    loss = by_rank("mlops_training_loss")
    if loss:
        out.append(line_chart("Loss per rank", [(f"rank {r}", p) for r, p in loss.items()], markers, "loss", hot))
    for metric, title, unit in (
        ("mlops_gpu_utilization_ratio", "GPU utilisation", "ratio"),
        ("mlops_gpu_temperature_celsius", "GPU temperature", "°C"),
    ):
        ss = metrics.named(metric)
        if ss:
            lines = [
                (
                    f"{s.labels.get('instance', '')} gpu {s.labels.get('gpu', '?')}"
                    + (f" (rank {s.labels['rank']})" if "rank" in s.labels else ""),
                    s.points,
                )
                for s in ss
            ]
            out.append(line_chart(title, lines, markers, unit))
    return [x for x in out if x]


def _log_plots(facts: JobFacts, markers: list[Marker], hot: str | None) -> list[str]:
    ranks = sorted(facts.ranks.values(), key=lambda r: r.rank)
    prog = [(f"rank {r.rank}", [(t, float(s)) for t, s, _ in sorted(r.series)]) for r in ranks if r.series]
    loss = [(f"rank {r.rank}", [(t, v) for t, _, v in sorted(r.series) if v is not None]) for r in ranks if r.series]
    out = []
    if prog:
        out.append(line_chart("Step reached per rank (from the step lines)", prog, markers, "step", hot))
    if any(ps for _, ps in loss):
        out.append(line_chart("Loss per rank (from the step lines)", loss, markers, "loss", hot))
    return [x for x in out if x]


def _rows(headers: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()) -> str:
    if not rows:
        return '<p class="none">none</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        cells = "".join(
            f'<td class="t">{_e(c)}</td>' if headers[j] in NOWRAP else f"<td>{_e(c)}</td>" for j, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _r(v: Any) -> str:
    return "" if v is None else str(v)


def render_html(report: Report, facts: JobFacts, metrics: MetricEvidence | None = None) -> str:
    """The report page for one analysis."""
    root = report.root
    colour = VERDICT_COLOURS.get(report.verdict, "#555")
    markers = _markers(report, facts)
    hot = f"rank {root.rank}" if root is not None and root.rank is not None else None
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>rca {_e(report.job)}: {_e(report.verdict)}</title><style>{CSS}</style></head><body>",
        f'<h1>Job {_e(report.job)} <span id="verdict" class="badge" style="background:{colour}" '
        f'data-verdict="{_e(report.verdict)}">{_e(report.verdict)}</span></h1>',
    ]
    if root is not None:
        parts.append(f'<p class="summary" id="root-summary">{_e(root.summary)}</p>')
        meta = [
            ("kind", root.kind),
            ("rank", root.rank),
            ("node", root.node),
            ("step", root.step),
            ("time", root.time),
            ("confidence", root.confidence),
        ]
        parts.append(
            '<p class="meta" id="root-cause">'
            + " &middot; ".join(f"{k} <b>{_e(_r(v) or '-')}</b>" for k, v in meta)
            + "</p>"
        )
        parts.append("<h2>Evidence</h2>")
        parts.append(
            _rows(
                ("time", "source", "rank", "text", "ref"),
                [(e.time or "", e.source, _r(e.rank), clip(e.text), e.ref) for e in root.evidence],
            )
        )
    else:
        parts.append(f'<p class="summary" id="root-summary">{_e(report.summary or "no fault found")}</p>')
    parts.append("<h2>Symptoms</h2>")
    parts.append(
        _rows(
            ("time", "kind", "rank", "text"),
            [
                (s.time or "", s.kind, _r(s.rank), clip(s.evidence[0].text if s.evidence else s.summary))
                for s in report.symptoms
            ],
        )
    )
    parts.append("<h2>Other findings</h2>")
    parts.append(
        _rows(
            ("time", "kind", "rank", "summary"), [(o.time or "", o.kind, _r(o.rank), o.summary) for o in report.others]
        )
    )
    parts.append("<h2>Timeline</h2>")
    tl = report.timeline
    parts.append(timeline_strip(tl, markers) or '<p class="none">no events in the window</p>')
    plots = _metric_plots(metrics, markers, hot) if metrics else []
    if not plots:
        plots = _log_plots(facts, markers, hot)
    parts.append("<h2>Series</h2>")
    parts.append("".join(plots) or '<p class="none">no series to plot</p>')
    parts.append("<h2>Events around the incident</h2>")
    classes = ["alert" if ev.get("kind") == "alert" else f"lv-{ev.get('level')}" for ev in tl]
    parts.append(
        _rows(
            ("time", "kind", "rank", "node", "level", "message"),
            [
                (
                    ev.get("@timestamp"),
                    ev.get("kind"),
                    _r(ev.get("rank")),
                    _r(ev.get("node")),
                    _r(ev.get("level")),
                    clip(str(ev.get("message", "")), 240),
                )
                for ev in tl
            ],
            classes,
        )
    )
    parts.append(
        '<p class="meta">Made by <span class="mono">mlops-obs rca</span>. Self-contained: no scripts, '
        "nothing loaded over the network.</p></body></html>"
    )
    return "".join(parts)
