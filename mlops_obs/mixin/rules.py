"""Alerting and recording rules, each alert with the unit-test cases that prove it fires and stays quiet.

Every expression reads :class:`~mlops_obs.mixin.config.MixinConfig`, so the production rules, the scaled
copies the end-to-end tests run and the dashboards' threshold lines are one definition. Each alert carries
a firing case and a quiet case; :func:`rule_tests` turns them into Prometheus 2.42 ``promtool test rules``
input, at the shipped time scale or any other, so an alert cannot be added without both.

The series these rules read, and what each must mean, are listed in ``docs/alerts.md`` (the contract
the sidecar and the SDK implement). Three conventions run through the expressions:

* Series of one rank's snapshot share their labels, so joins between them use ``ignoring (<the extra
  label>)``; a rank that is not ``running`` is excluded with ``unless``, which also keeps the rules
  working where a series is not produced.
* Node names and GPU owners are joined from the sidecar's ``_info`` series through two recording rules
  that always have a row for every scraped sidecar and GPU (falling back to the target's own address
  and to no owner), so a join never drops an alert.
* Counters that appear with their first event (XIDs) or already non-zero (ECC since driver load) are
  counted whole when their series is born within the window: ``increase()`` alone reads them as 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from mlops_obs.mixin.config import MixinConfig, duration, scaled, seconds, selector

Labels = dict[str, str]
UNCORRECTED, VOLATILE, IDLE = 'type="uncorrected"', 'scope="volatile"', 'mode="idle"'

# Recording rules other rules join with (their definitions are in recording_rules()).
NODE_INFO = "instance:mlops_exporter_node_info:recent"
GPU_OWNER = "instance_gpu:mlops_gpu_owner_info:recent"
STRAGGLER = "job_rank:mlops_training_straggler_score:ratio"
GOODPUT = "job:mlops_training_goodput:ratio"
STEP = "mlops_training_step_duration_seconds"
STEP_RECENT, STEP_BASELINE = f"job_rank:{STEP}:mean_recent", f"job_rank:{STEP}:mean_baseline"
SAMPLES_RECENT = "job:mlops_training_samples:rate_recent"
PHASE_RATIO = "job_rank:mlops_training_phase_seconds:ratio_rate_recent"
CURRENT_PHASE = "mlops_training_current_phase_start_timestamp_seconds"
# Fleet views: what the GPU alerts and the overview and GPU dashboards read instead of every GPU's (and
# every link's) raw series. Windows in the names are the shipped ones (gpu_error_window, node_rate_window,
# gpu_idle_window); a config that changes a window keeps the name.
NVLINK_ERRORS = "instance_gpu:mlops_gpu_nvlink_errors:increase10m"
NVLINK_BYTES = {d: f"instance_gpu:mlops_gpu_nvlink_{d}_bytes:rate5m" for d in ("transmit", "receive")}
ECC_ERRORS = "instance_gpu:mlops_gpu_ecc_errors:increase10m"
THROTTLE = "instance_gpu:mlops_gpu_throttle_seconds:rate5m"
GPU_IDLE = "instance_gpu:mlops_gpu_utilization_ratio:avg_over_time30m"
NODE_GPU_UTIL = "instance:mlops_gpu_utilization_ratio:avg"
CLUSTER_GPU_UTIL = "cluster:mlops_gpu_utilization_ratio:avg"
JOB_GPU_UTIL = "job:mlops_gpu_utilization_ratio:avg"
JOB_RANKS = "job:mlops_training_ranks:count"
JOB_FAILED_RANKS = "job:mlops_training_failed_ranks:count"
STEP_BUCKETS = "job_le:mlops_training_step_duration_seconds_bucket:rate_recent"
# Labels a device's series may carry that the per-GPU rules sum away: the owner (joined again from
# GPU_OWNER by the alerts), and what only the full GPU profile reports (per link, per error type).
PER_GPU_DROP = "job, rank"

# Values of series that hold for a whole test case (the joins' inputs), as long as the case.
ALWAYS = "1x{n}"


@dataclass(frozen=True)
class Case:
    """Input series (``'metric{labels}' -> 'values'``), an evaluation time, and the alerts expected then.

    ``value`` is the alerts' expected value where an annotation prints it.
    """

    series: dict[str, str]
    at: str
    alerts: tuple[Labels, ...] = ()
    value: float | None = None


@dataclass(frozen=True)
class Alert:
    name: str
    group: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    fires: Case
    quiet: Case
    extra_labels: Labels = field(default_factory=dict)
    # Further cases where the alert must stay quiet (a known false positive it guards against) or fire.
    also_quiet: tuple[Case, ...] = ()
    also_fires: tuple[Case, ...] = ()

    def rule(self, cfg: MixinConfig) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity, **self.extra_labels},
            "annotations": self.annotations(cfg),
        }

    def annotations(self, cfg: MixinConfig) -> dict[str, str]:
        return {"summary": self.summary, "description": self.description, "runbook_url": cfg.runbook_url(self.name)}

    def cases(self) -> list[tuple[Case, bool]]:
        return [(self.fires, True), *((f, True) for f in self.also_fires), (self.quiet, False),
                *((q, False) for q in self.also_quiet)]  # fmt: skip


@dataclass(frozen=True)
class RecordingCase:
    """Input series, an evaluation time, and the recorded samples expected then (``'{labels}' -> value``).

    ``per_second``: the values are rates of a count, so on a clock ``f`` times faster they are ``1/f``
    times larger (rates of a seconds counter, counts and ratios are the same on any clock)."""

    series: dict[str, str]
    at: str
    expected: dict[str, float]
    per_second: bool = False


@dataclass(frozen=True)
class Recording:
    record: str
    expr: str
    group: str = "joins"
    labels: Labels = field(default_factory=dict)
    # Cases proving what it records; a rule reading GPU series has one with the full profile's shape (per
    # link, per pid) and one with the default's (per GPU), expecting the same output.
    cases: tuple[RecordingCase, ...] = ()

    def rule(self) -> dict[str, Any]:
        out: dict[str, Any] = {"record": self.record, "expr": self.expr}
        if self.labels:
            out["labels"] = dict(self.labels)
        return out


def _labels(d: Labels) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in d.items()) + "}"


def _equalities(sel: str) -> Labels:
    """The ``k="v"`` matchers of a selector: test series must carry them to be selected at all."""
    return dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', re.sub(r'\w+\s*(!=|=~|!~)\s*"[^"]*"', "", sel)))


def _g(x: float) -> str:
    """A number as PromQL and people read it (``0.05``, ``600``), exact where ``%g`` would round."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def _num(x: float) -> str:
    """Thresholds as people write them (``0.05``, ``600``, ``64Mi``) in descriptions."""
    if x >= 1024**2 and x == int(x) and int(x) % 1024**2 == 0:
        n = int(x) // 1024**2
        return f"{n // 1024}Gi" if n % 1024 == 0 else f"{n}Mi"
    return f"{_g(x)}"


def _secs(x: float) -> str:
    """A threshold in seconds as a duration people read (``60`` -> ``1m``)."""
    try:
        return duration(x)
    except ValueError:
        return f"{_g(x)}s"


def _minutes(secs: float) -> int:
    return math.ceil(secs / 60.0)


def _pct(x: float) -> str:
    return f"{round(x * 100, 9):g}%"


def _runs(values: list[float | None]) -> str:
    """One sample a test interval, in promtool's notation: runs of equal values as ``vxN``, gaps as ``_xN``."""
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        v, n = values[i], j - i + 1
        out.append(f"_x{n}" if v is None else (f"{_g(v)}x{n - 1}" if n > 1 else f"{_g(v)}"))
        i = j + 1
    return " ".join(out)


def _instance(c: MixinConfig) -> Labels:
    """The labels of one scraped sidecar in test cases."""
    last = c.instance_labels[-1]
    return {lab: ("n1:9477" if lab == last else "c1") for lab in c.instance_labels}


def _scrape_job(c: MixinConfig) -> Labels:
    return _equalities(c.exporter_selector)


# --- joins ------------------------------------------------------------------------------------------------


def with_node(c: MixinConfig, expr: str) -> str:
    """``expr`` (series of one sidecar) with the sidecar's ``node`` name joined in."""
    return f"({expr}) * on ({c.instance}) group_left (node) {NODE_INFO}"


def with_owner(c: MixinConfig, expr: str) -> str:
    """``expr`` (per-GPU series) with the GPU's owning ``job``/``rank`` (none when unowned) and ``node``.

    The series' own ``job``/``rank`` are dropped first: where a device series carries its owner, an
    ownership change inside a window would otherwise leave two series that the join makes identical.
    """
    inner = f"max without (job, rank) ({expr}) * on ({c.instance}, gpu) group_left (job, rank) {GPU_OWNER}"
    return with_node(c, inner)


def _node_context(c: MixinConfig) -> dict[str, str]:
    """What the node join reads in a test: the sidecar's ``up`` and its node name."""
    inst = {**_scrape_job(c), **_instance(c)}
    return {f"up{_labels(inst)}": ALWAYS, f"mlops_exporter_node_info{_labels({**inst, 'node': 'n1'})}": ALWAYS}


def _with_context(ctx: dict[str, str], series: dict[str, str], at: str, expected: tuple[Labels, ...]) -> Case:
    """A case whose series include ``ctx`` (``{n}`` in a value: the case's length in minutes)."""
    n = math.ceil(seconds(at) / 60.0) + 1
    return Case({**{k: v.format(n=n) for k, v in ctx.items()}, **series}, at, expected)


def new_or_increase(c: MixinConfig, metric: str, identity: str) -> str:
    """Events of a counter in ``gpu_error_window``, counting a series born inside it (at 1, or already
    non-zero) whole. ``identity`` names the labels of one counter, so a series that reappears under other
    labels (a new owner) is not taken for a new one."""
    w, back = c.gpu_error_window, c.counter_birth_lookback
    born = f"{metric} unless on ({c.instance}, {identity}) max_over_time({metric}[{back}] offset {w})"
    return f"({born} or increase({metric}[{w}]))"


# --- recording rules ------------------------------------------------------------------------------------


def _rank_ended(c: MixinConfig) -> str:
    """Ranks that finished or failed (1 on their state series)."""
    ended = selector(c.training_selector, 'state!="running"')
    return f"(mlops_training_rank_state{ended} == 1)"


def running(c: MixinConfig, expr: str, *extra: str) -> str:
    """``expr`` (series of a rank's snapshot, with the ``extra`` labels besides) without the ranks that
    finished or failed."""
    return f"{expr} unless ignoring ({', '.join(('state', *extra))}) {_rank_ended(c)}"


def recording_rules(c: MixinConfig) -> list[Recording]:
    return [*join_rules(c), *gpu_rules(c), *training_rules(c)]


def _device(c: MixinConfig, gpu: str = "0") -> tuple[Labels, Labels]:
    """A GPU's series as scraped in test cases (the scrape job's label, unowned), and the labels of what
    a per-GPU rule records for it (no ``job``)."""
    g: Labels = {**_equalities(c.gpu_selector), **_scrape_job(c), **_instance(c), "gpu": gpu, "uuid": f"GPU-{gpu}",
                 "model": "H100"}  # fmt: skip
    return g, {k: v for k, v in g.items() if k != "job"}


def join_rules(c: MixinConfig) -> list[Recording]:
    """Node names and GPU owners, which other rules and panels join; the per-job GPU utilisation."""
    e, s = c.exporter_selector, c.gpu_selector
    inst, last = c.instance, c.instance_labels[-1]
    i = _instance(c)
    g0, _ = _device(c, "0")
    g1, _ = _device(c, "1")
    owner = f"mlops_gpu_owner_info{_labels({**_equalities(s), **i, 'gpu': '0', 'uuid': 'GPU-0', 'job': 'train-a', 'rank': '0'})}"  # noqa: E501
    lost = {f"mlops_gpu_lost{_labels({**_equalities(s), **i, 'gpu': x})}": "0x20" for x in "01"}
    return [
        # One row per scraped sidecar: its node name, or its address where it reports none (yet).
        Recording(NODE_INFO,
                  f"topk by ({inst}) (1, group by ({inst}, node) (last_over_time(mlops_exporter_node_info"
                  f"{selector(e)}[{c.node_info_lookback}]))) or on ({inst}) label_replace(group by ({inst}) "
                  f'(up{selector(e)}), "node", "$1", "{last}", "(.*)")'),
        # One row per GPU: its last owner in gpu_owner_lookback, or none.
        Recording(GPU_OWNER,
                  f"topk by ({inst}, gpu) (1, max by ({inst}, gpu, job, rank) (last_over_time("
                  f"mlops_gpu_owner_info{selector(s)}[{c.gpu_owner_lookback}]))) or on ({inst}, gpu) "
                  f"group by ({inst}, gpu) (mlops_gpu_lost{selector(s)})"),
        # The mean utilisation of each job's GPUs (the overview's per-job view); unowned GPUs have no job.
        Recording(JOB_GPU_UTIL,
                  f"avg by (job) (max without ({PER_GPU_DROP}) (mlops_gpu_utilization_ratio{selector(s)}) "
                  f'* on ({inst}, gpu) group_left (job) {GPU_OWNER}{{job!=""}})',
                  cases=(RecordingCase({**lost, owner: "1x20", f"mlops_gpu_utilization_ratio{_labels(g0)}": "0.25x20",
                                        f"mlops_gpu_utilization_ratio{_labels(g1)}": "0.75x20"}, "10m",
                                       {'{job="train-a"}': 0.25}),)),
    ]  # fmt: skip


def gpu_rules(c: MixinConfig) -> list[Recording]:
    """Per-GPU aggregates over the alerts' windows, the same whichever GPU profile the sidecars run: the
    GPU alerts and panels read a few series a GPU from here instead of every link's and reason's window."""
    s, inst = c.gpu_selector, c.instance
    w, rw = c.gpu_error_window, c.node_rate_window
    g, d = _device(c)
    g1, _ = _device(c, "1")
    at = "15m"

    def link(lb: Labels, n: int, **extra: str) -> str:
        return _labels({**lb, "link": str(n), **extra})

    def per_gpu(name: str, drop: str) -> str:
        return f"sum without ({drop}, {PER_GPU_DROP}) ({name})"

    ecc = f"mlops_gpu_ecc_errors_total{selector(s, VOLATILE)}"
    unc = f"mlops_gpu_ecc_errors_total{_labels({**g, 'type': 'uncorrected', 'scope': 'volatile'})}"
    agg = f"mlops_gpu_ecc_errors_total{_labels({**g, 'type': 'uncorrected', 'scope': 'aggregate'})}"  # full only
    ecc_out = _labels({**d, "type": "uncorrected", "scope": "volatile"})
    # (class, reason matcher, its share in the test cases)
    classes = (("thermal", f'reason=~"{c.thermal_throttle_reasons}"', 0.5),
               ("power", f'reason=~"{c.power_throttle_reasons}"', 0.375))  # fmt: skip
    throttle_full = {"power": "0+15x20", "board_limit": "0+7.5x20", "thermal": "0+30x20", "sync_boost": "0+60x20",
                     "low_utilization": "0+60x20"}  # fmt: skip
    util = f"mlops_gpu_utilization_ratio{selector(s)}"
    by_cluster = ", ".join(c.instance_labels[:-1])
    cluster_out = _labels({k: v for k, v in _instance(c).items() if k in c.instance_labels[:-1]})
    two_gpus = {f"mlops_gpu_utilization_ratio{_labels(g)}": "0.25x40", f"mlops_gpu_utilization_ratio{_labels(g1)}":
                "0.75x40"}  # fmt: skip
    return [
        # NVLink errors of every link and type in the error window (full profile: per link and type; default:
        # one counter a GPU).
        Recording(NVLINK_ERRORS, per_gpu(f"increase(mlops_gpu_nvlink_errors_total{selector(s)}[{w}])", "link, type"),
                  "gpu-errors",
                  cases=(RecordingCase({f"mlops_gpu_nvlink_errors_total{link(g, 0, type='crc')}": "0+2x20",
                                        f"mlops_gpu_nvlink_errors_total{link(g, 0, type='replay')}": "0x20",
                                        f"mlops_gpu_nvlink_errors_total{link(g, 1, type='replay')}": "0+1x20"}, at,
                                       {_labels(d): 30.0}),
                         RecordingCase({f"mlops_gpu_nvlink_errors_total{_labels(g)}": "0+3x20"}, at,
                                       {_labels(d): 30.0}))),
        # Volatile ECC errors by type in the error window, a count a GPU already had when its series
        # appeared (since the driver loaded) included.
        Recording(ECC_ERRORS, f"sum without ({PER_GPU_DROP}) {new_or_increase(c, ecc, 'gpu, type, scope')}",
                  "gpu-errors",
                  cases=(RecordingCase({unc: "0x5 2x20", agg: "7x5 9x20"}, "10m", {ecc_out: 2.0}),
                         RecordingCase({unc: "0x5 2x20"}, "10m", {ecc_out: 2.0}),
                         # Already non-zero when its series appeared.
                         RecordingCase({unc: "_x5 3x20"}, "10m", {ecc_out: 3.0}))),
        # The share of time each class of reasons held the clocks down (full profile: every reason; default:
        # the reasons the classes read).
        *(Recording(THROTTLE, per_gpu(f"rate(mlops_gpu_throttle_seconds_total{selector(s, reason)}[{rw}])", "reason"),
                    "gpu", {"class": cls},
                    cases=tuple(RecordingCase({f"mlops_gpu_throttle_seconds_total{_labels({**g, 'reason': r})}": v
                                               for r, v in throttle_full.items() if r in keep}, at,
                                              {_labels({**d, "class": cls}): value})
                                for keep in (set(throttle_full), {"power", "board_limit", "thermal"})))
          for cls, reason, value in classes),
        *(Recording(NVLINK_BYTES[dr], per_gpu(f"rate(mlops_gpu_nvlink_{dr}_bytes_total{selector(s)}[{rw}])", "link"),
                    "gpu",
                    cases=(RecordingCase({f"mlops_gpu_nvlink_{dr}_bytes_total{link(g, 0)}": "0+61440x20",
                                          f"mlops_gpu_nvlink_{dr}_bytes_total{link(g, 1)}": "0+122880x20"}, at,
                                         {_labels(d): 3072.0}, per_second=True),
                           RecordingCase({f"mlops_gpu_nvlink_{dr}_bytes_total{_labels(g)}": "0+184320x20"}, at,
                                         {_labels(d): 3072.0}, per_second=True)))
          for dr in ("transmit", "receive")),
        # Each GPU's mean utilisation over the idle window (the two idle alerts read it).
        Recording(GPU_IDLE, f"max without ({PER_GPU_DROP}) (avg_over_time({util}[{c.gpu_idle_window}]))", "gpu",
                  cases=(RecordingCase({f"mlops_gpu_utilization_ratio{_labels(g)}": "0.25x40"}, "40m",
                                       {_labels(d): 0.25}),
                         # A new owner within the window: the GPU is idle only if it was under each.
                         RecordingCase({f"mlops_gpu_utilization_ratio{_labels(g)}": "0x35 _x10",
                                        f"mlops_gpu_utilization_ratio{_labels({**g, 'job': 'b', 'rank': '0'})}":
                                        "_x35 0.5x10"}, "40m", {_labels(d): 0.5}))),
        # Mean utilisation per node and over all nodes (of a cluster, where instance_labels name one).
        Recording(NODE_GPU_UTIL, f"avg by ({inst}) ({util})", "gpu",
                  cases=(RecordingCase(two_gpus, "10m", {_labels(_instance(c)): 0.5}),)),
        Recording(CLUSTER_GPU_UTIL, f"avg by ({by_cluster}) ({util})" if by_cluster else f"avg ({util})", "gpu",
                  cases=(RecordingCase(two_gpus, "10m", {cluster_out or "{}": 0.5}),)),
    ]  # fmt: skip


def training_rules(c: MixinConfig) -> list[Recording]:
    t = c.training_selector
    rw, bw, gw = c.training_rate_window, c.training_baseline_window, c.goodput_window
    median = running(c, f"mlops_training_step_compute_median_seconds{selector(t)}")
    good = running(c, f"increase(mlops_training_goodput_seconds_total{selector(t)}[{gw}])")
    started = running(c, f"min_over_time(mlops_training_process_start_time_seconds{selector(t)}[{gw}])")
    rank = {**_equalities(t), "job": "train-a", "node": "n1"}
    failed = selector(t, 'state="failed"')

    def state(r: int, current: str) -> dict[str, str]:
        return {f"mlops_training_rank_state{_labels({**rank, 'rank': str(r), 'state': st})}": f"{int(st == current)}x20"
                for st in ("running", "finished", "failed")}  # fmt: skip

    ranks = {**state(0, "running"), **state(1, "failed"), **state(2, "finished"),
             **{f"mlops_training_world_size{_labels({**rank, 'rank': str(r)})}": "4x20" for r in range(4)}}  # fmt: skip
    bucket = {le: f"{STEP}_bucket{_labels({**rank, 'rank': '0', 'le': le})}" for le in ("0.5", "+Inf")}
    return [
        # Each running rank's median step compute time against the other ranks': the median of all ranks
        # from three on (one straggler cannot move it), the other rank's at two.
        Recording(STRAGGLER,
                  f"(quantile by (job) (0.5, {median}) / on (job) group_right () ({median})"
                  f" and on (job) count by (job) ({median}) >= 3)"
                  f" or ((sum by (job) ({median}) - on (job) group_right () ({median})) / ({median})"
                  f" and on (job) count by (job) ({median}) == 2)", "training"),
        Recording(STEP_RECENT, f"rate({STEP}_sum{selector(t)}[{rw}]) / rate({STEP}_count{selector(t)}[{rw}])",
                  "training"),
        # The baseline ends where the recent window starts, so a slowdown does not raise its own baseline.
        Recording(STEP_BASELINE, f"rate({STEP}_sum{selector(t)}[{bw}] offset {rw}) / "
                                 f"rate({STEP}_count{selector(t)}[{bw}] offset {rw})", "training"),
        Recording(SAMPLES_RECENT, f"sum by (job) (rate(mlops_training_samples_total{selector(t)}[{rw}]))",
                  "training"),
        Recording(PHASE_RATIO,
                  f"rate(mlops_training_phase_seconds_total{selector(t)}[{rw}]) / ignoring (phase) group_left () "
                  f"sum without (phase) (rate(mlops_training_phase_seconds_total{selector(t)}[{rw}]))", "training"),
        # Productive seconds over the running ranks' wall seconds in the window (since their first start in
        # it): hung, waiting and restart time count as lost. Both sides cover only the history the job has.
        Recording(GOODPUT,
                  f"sum by (job) ({good}) / sum by (job) (clamp_max(time() - ({started}), {_g(seconds(gw))}))",
                  "training"),
        # Running and failed ranks per job: the overview's job and rank counts read these, not every rank.
        Recording(JOB_RANKS, f"count by (job) ({running(c, f'mlops_training_world_size{selector(t)}')})", "training",
                  cases=(RecordingCase(ranks, "10m", {'{job="train-a"}': 2.0}),)),
        Recording(JOB_FAILED_RANKS,
                  f"count by (job) (mlops_training_rank_state{failed} == 1)", "training",
                  cases=(RecordingCase(ranks, "10m", {'{job="train-a"}': 1.0}),)),
        # Step-time buckets per job, for the heatmap across a job's ranks.
        Recording(STEP_BUCKETS, f"sum by (job, le) (rate({STEP}_bucket{selector(t)}[{rw}]))", "training",
                  cases=(RecordingCase({bucket["0.5"]: "0+60x20", bucket["+Inf"]: "0+120x20",
                                        bucket["0.5"].replace('rank="0"', 'rank="1"'): "0+60x20",
                                        bucket["+Inf"].replace('rank="0"', 'rank="1"'): "0+60x20"}, "10m",
                                       {'{job="train-a", le="0.5"}': 2.0, '{job="train-a", le="+Inf"}': 3.0},
                                       per_second=True),)),
    ]  # fmt: skip


def alerts(cfg: MixinConfig) -> list[Alert]:
    return [*gpu_alerts(cfg), *node_alerts(cfg), *training_alerts(cfg), *pipeline_alerts(cfg)]


# --- GPU ------------------------------------------------------------------------------------------------


def gpu_alerts(c: MixinConfig) -> list[Alert]:
    s = c.gpu_selector
    inst = _instance(c)
    # A device series as scraped (with the scrape job's label), and the alert it gives: owner and node joined.
    g: Labels = {**_equalities(s), **_scrape_job(c), **inst, "gpu": "0", "uuid": "GPU-0", "model": "H100"}
    gl = _labels(g)
    dev: Labels = {k: v for k, v in g.items() if k != "job"}
    out: Labels = {**dev, "job": "train-a", "rank": "1", "node": "n1"}
    ctx = {
        **_node_context(c),
        f"mlops_gpu_lost{_labels({**_equalities(s), **inst, 'gpu': '0'})}": "0x{n}",
        f"mlops_gpu_owner_info{_labels({**_equalities(s), **inst, 'gpu': '0', 'uuid': 'GPU-0', 'job': 'train-a', 'rank': '1'})}": ALWAYS,  # noqa: E501
    }

    def case(series: dict[str, str], at: str, *expected: Labels) -> Case:
        return _with_context(ctx, series, at, expected)

    where = "GPU {{ $labels.gpu }} on {{ $labels.node }}"
    w = c.gpu_error_window
    crit = "|".join(str(x) for x in c.xid_critical_codes)
    not_other = "|".join(str(x) for x in (*c.xid_critical_codes, *c.xid_ignored_codes))

    def xid(matcher: str) -> str:
        return with_owner(c, new_or_increase(c, f"mlops_gpu_xid_errors_total{selector(s, matcher)}", "gpu, xid")
                          + " > 0")  # fmt: skip

    def xid_in(code: str) -> str:
        return f"mlops_gpu_xid_errors_total{_labels({**g, 'xid': code})}"

    xid_born, xid_rises = "_x5 1x30", "1x5 2x30"  # a first XID of the code (the counter appears at 1); a next

    def throttle(name: str, cls: str, reasons: str) -> Alert:
        key = f"mlops_gpu_throttle_seconds_total{_labels({**g, 'reason': reasons.split('|')[0]})}"
        return Alert(
            name, "gpu-health", with_owner(c, f'{THROTTLE}{{class="{cls}"}} > {c.throttle_ratio}'),
            c.for_medium, "warning",
            f"{where} is {cls} throttled",
            f"{where} spent more than {_pct(c.throttle_ratio)} of the time throttled for {cls} reasons; "
            "steps on it (and on every rank waiting for it) slow down.",
            case({key: "0+30x40"}, "30m", {**out, "class": cls}),
            case({key: "0+1x40"}, "30m"),
        )  # fmt: skip

    temp, slow = f"mlops_gpu_temperature_celsius{selector(s)}", f"mlops_gpu_slowdown_temperature_celsius{selector(s)}"
    used, total = f"mlops_gpu_memory_used_bytes{selector(s)}", f"mlops_gpu_memory_total_bytes{selector(s)}"
    on = f"on ({c.instance}, gpu)"
    idle = f"{GPU_IDLE} < {c.gpu_idle_utilization}"
    ecc = {**g, "type": "uncorrected", "scope": "volatile"}
    nodes = {**_scrape_job(c), **inst}
    slow_in = f"mlops_gpu_slowdown_temperature_celsius{gl}"
    return [
        Alert(
            "GpuXidCritical", "gpu", xid(f'xid=~"{crit}"'), c.for_critical, "critical",
            f"{where} reported XID {{{{ $labels.xid }}}}",
            f"XID {{{{ $labels.xid }}}} means a hardware or driver fault on {where}: drain the node and follow "
            "the runbook for that code (reset, reboot or RMA).",
            case({xid_in("79"): xid_born}, "8m", {**out, "xid": "79"}),
            case({xid_in("13"): xid_born}, "8m"),
            also_fires=(
                case({xid_in("79"): xid_rises}, "8m", {**out, "xid": "79"}),
                # An unowned GPU: the alert has no job or rank, and still the node.
                _with_context({**ctx, next(k for k in ctx if k.startswith("mlops_gpu_owner")): "_x{n}"},
                              {xid_in("79"): xid_born}, "8m", ({**dev, "node": "n1", "xid": "79"},)),
            ),
            also_quiet=(
                # Old XIDs: a counter that has been at 2 for an hour is no new event.
                case({xid_in("79"): "2x100"}, "90m"),
                # A node that was not scraped for a while (a gap at the window's start) is no new event.
                case({xid_in("79"): "2x60 _x5 2x30"}, "70m"),
            ),
        ),
        Alert(
            "GpuXidError", "gpu", xid(f'xid!~"{not_other}"'), c.for_critical, "warning",
            f"{where} reported XID {{{{ $labels.xid }}}}",
            f"XID {{{{ $labels.xid }}}} on {where} is neither an application error nor a known hardware fault; "
            "check dmesg on the node and the XID catalogue.",
            case({xid_in("109"): xid_born}, "8m", {**out, "xid": "109"}),
            case({xid_in("13"): xid_born}, "8m"),
        ),
        Alert(
            "GpuEccUncorrectedErrors", "gpu",
            with_owner(c, f"{ECC_ERRORS}{{{UNCORRECTED}}} > 0"), c.for_critical, "critical",
            f"{where} had uncorrectable ECC errors",
            f"Uncorrectable memory errors on {where} corrupt or kill the job using it; drain the node and reset "
            "the GPU (row remapping happens on reset). A count the GPU already had when its series first "
            "appeared (since the driver loaded) fires too.",
            case({f"mlops_gpu_ecc_errors_total{_labels(ecc)}": "0x5 2x30"}, "8m",
                 {**out, "type": "uncorrected", "scope": "volatile"}),
            case({f"mlops_gpu_ecc_errors_total{_labels({**ecc, 'type': 'corrected'})}": "0x5 2x30"}, "8m"),
            also_fires=(
                # Already non-zero when the sidecar first reported it.
                case({f"mlops_gpu_ecc_errors_total{_labels(ecc)}": "_x5 3x30"}, "8m",
                     {**out, "type": "uncorrected", "scope": "volatile"}),
            ),
            also_quiet=(
                # The same old count under a new owner's labels is not a new error.
                case({f"mlops_gpu_ecc_errors_total{_labels(ecc)}": "3x60 _x40",
                      f"mlops_gpu_ecc_errors_total{_labels({**ecc, 'job': 'train-b', 'rank': '0'})}": "_x60 3x40"},
                     "65m"),
            ),
        ),
        Alert(
            "GpuRowRemapFailure", "gpu", with_owner(c, f"mlops_gpu_remap_failure{selector(s)} == 1"),
            c.for_critical, "critical",
            f"{where} failed to remap a memory row",
            f"{where} has run out of spare rows or failed a remap: it cannot be trusted and needs an RMA.",
            case({f"mlops_gpu_remap_failure{gl}": "0x3 1x20"}, "10m", out),
            case({f"mlops_gpu_remap_failure{gl}": "0x20"}, "10m"),
        ),
        Alert(
            "GpuRowRemapPending", "gpu", with_owner(c, f"mlops_gpu_remap_pending{selector(s)} == 1"),
            c.for_medium, "warning",
            f"{where} has a row remap pending",
            f"{where} remapped a memory row that takes effect only after a GPU reset; schedule one when the "
            "node is drained.",
            case({f"mlops_gpu_remap_pending{gl}": "0x3 1x30"}, "25m", out),
            case({f"mlops_gpu_remap_pending{gl}": "0x3 1x5 0x25"}, "25m"),
        ),
        Alert(
            "GpuFellOffBus", "gpu", with_owner(c, f"mlops_gpu_lost{selector(s)} == 1"), c.for_critical, "critical",
            f"{where} fell off the bus",
            f"{where} no longer answers NVML (XID 79 class): every job on it is stuck; drain and reboot the node.",
            case({f"mlops_gpu_lost{_labels({**_equalities(s), **inst, 'gpu': '0'})}": "0x3 1x20"}, "10m",
                 {**inst, "gpu": "0", "job": "train-a", "rank": "1", "node": "n1"}),
            case({}, "10m"),
        ),
        Alert(
            "GpuMissing", "gpu",
            with_node(c, f"mlops_gpu_devices{selector(s)} < max_over_time(mlops_gpu_devices{selector(s)}"
                         f"[{c.gpu_missing_window}])"),
            c.for_short, "critical",
            "{{ $labels.node }} sees fewer GPUs than it did",
            f"{{{{ $labels.node }}}} sees fewer GPUs than it did in the last {c.gpu_missing_window}: a GPU was "
            "lost or hidden from the driver.",
            case({f"mlops_gpu_devices{_labels(nodes)}": "8x10 7x20"}, "20m", {**nodes, "node": "n1"}),
            case({f"mlops_gpu_devices{_labels(nodes)}": "8x30"}, "20m"),
        ),
        Alert(
            "GpuPcieLinkDegraded", "gpu",
            with_owner(c, f"mlops_gpu_pcie_link_width{selector(s)} < {on} group_left () "
                          f"mlops_gpu_pcie_link_width_max{selector(s)}"),
            c.for_medium, "warning",
            f"{where} runs its PCIe link below full width",
            f"{where} trained its PCIe link narrower than it supports (bad riser, seating or retimer); host "
            "transfers and GPUDirect traffic slow down.",
            case({f"mlops_gpu_pcie_link_width{gl}": "8x40", f"mlops_gpu_pcie_link_width_max{gl}": "16x40"}, "30m", out),
            case({f"mlops_gpu_pcie_link_width{gl}": "16x40", f"mlops_gpu_pcie_link_width_max{gl}": "16x40"}, "30m"),
        ),
        Alert(
            "GpuPcieReplays", "gpu",
            with_owner(c, f"increase(mlops_gpu_pcie_replays_total{selector(s)}[{w}]) > {_g(c.pcie_replays_threshold)}"),
            c.for_short, "warning",
            f"{where} is replaying PCIe packets",
            f"More than {_num(c.pcie_replays_threshold)} PCIe replays in {w} on {where}: the link is marginal.",
            case({f"mlops_gpu_pcie_replays_total{gl}": "0+50x40"}, "30m", out),
            case({f"mlops_gpu_pcie_replays_total{gl}": "0+5x40"}, "30m"),
        ),
        Alert(
            "GpuNvlinkErrors", "gpu", with_owner(c, f"{NVLINK_ERRORS} > {_g(c.nvlink_errors_threshold)}"),
            c.for_short, "warning",
            f"NVLink of {where} has errors",
            f"More than {_num(c.nvlink_errors_threshold)} NVLink errors in {w} on the links of {where}; collectives "
            "over them retry or fail. `nvidia-smi nvlink -e` (or the sidecar's --gpu.profile=full) says which link.",
            case({f"mlops_gpu_nvlink_errors_total{_labels({**g, 'link': '0', 'type': 'crc'})}": "0+5x40"}, "30m", out),
            case({f"mlops_gpu_nvlink_errors_total{_labels({**g, 'link': '0', 'type': 'crc'})}": "0x40"}, "30m"),
            also_fires=(
                # The default profile's shape: one counter a GPU, the links' errors summed.
                case({f"mlops_gpu_nvlink_errors_total{gl}": "0+5x40"}, "30m", out),
            ),
        ),
        Alert(
            "GpuTemperatureNearSlowdown", "gpu-health",
            with_owner(c, f"{temp} > {on} group_left () ({slow} - {_g(c.temperature_margin_celsius)})"),
            c.for_short, "warning",
            f"{where} is close to its slowdown temperature",
            f"{where} is within {_g(c.temperature_margin_celsius)}°C of the temperature where it slows its clocks; "
            "check airflow and fans.",
            case({f"mlops_gpu_temperature_celsius{gl}": "85x20", slow_in: "87x20"},
                 "15m", out),
            case({f"mlops_gpu_temperature_celsius{gl}": "70x20", slow_in: "87x20"},
                 "15m"),
        ),
        throttle("GpuThermalThrottling", "thermal", c.thermal_throttle_reasons),
        throttle("GpuPowerThrottling", "power", c.power_throttle_reasons),
        Alert(
            "GpuMemoryNearFull", "gpu-health",
            with_owner(c, f"{used} / {on} group_left () {total} > {_g(c.gpu_memory_full_ratio)}"),
            c.for_medium, "warning",
            f"{where} memory is nearly full",
            f"More than {_pct(c.gpu_memory_full_ratio)} of {where}'s memory is in use; the next allocation "
            "spike will OOM.",
            case({f"mlops_gpu_memory_used_bytes{gl}": "79e9x30", f"mlops_gpu_memory_total_bytes{gl}": "80e9x30"},
                 "25m", out),
            case({f"mlops_gpu_memory_used_bytes{gl}": "40e9x30", f"mlops_gpu_memory_total_bytes{gl}": "80e9x30"},
                 "25m"),
        ),
        Alert(
            "GpuAllocatedButIdle", "gpu-health", with_owner(c, f"{idle} and {on} {used} > {_g(c.gpu_allocated_bytes)}"),
            c.for_long, "warning",
            f"{where} is allocated but idle",
            f"{where} holds more than {_num(c.gpu_allocated_bytes)}B of memory but averaged under "
            f"{_pct(c.gpu_idle_utilization)} utilisation over {c.gpu_idle_window}: a hung or forgotten job.",
            case({f"mlops_gpu_utilization_ratio{gl}": "0x90", f"mlops_gpu_memory_used_bytes{gl}": "2e9x90"}, "75m",
                 out),
            case({f"mlops_gpu_utilization_ratio{gl}": "0.5x90", f"mlops_gpu_memory_used_bytes{gl}": "2e9x90"}, "75m"),
        ),
        Alert(
            "GpuHotWhileIdle", "gpu-health",
            with_owner(c, f"{temp} > {_g(c.hot_idle_temperature_celsius)} and {on} {idle}"),
            c.for_medium, "warning",
            f"{where} is hot while idle",
            f"{where} is above {_g(c.hot_idle_temperature_celsius)}°C with almost no work: its cooling is failing.",
            case({f"mlops_gpu_temperature_celsius{gl}": "80x60", f"mlops_gpu_utilization_ratio{gl}": "0x60"}, "50m",
                 out),
            case({f"mlops_gpu_temperature_celsius{gl}": "50x60", f"mlops_gpu_utilization_ratio{gl}": "0x60"}, "50m"),
        ),
    ]  # fmt: skip


# --- node -----------------------------------------------------------------------------------------------


def node_alerts(c: MixinConfig) -> list[Alert]:
    e = c.exporter_selector
    h: Labels = {**_scrape_job(c), **_instance(c)}
    hl = _labels(h)
    ctx = _node_context(c)

    def case(series: dict[str, str], at: str, *expected: Labels) -> Case:
        return _with_context(ctx, series, at, tuple({**lab, "node": "n1"} for lab in expected))

    on = "{{ $labels.node }}"
    rw = c.node_rate_window
    fs_sel = selector(e, c.filesystem_selector)
    fs: Labels = {**h, "path": "/data", "mountpoint": "/data"}
    fsl = _labels(fs)
    ratio = f"mlops_node_filesystem_avail_bytes{fs_sel} / mlops_node_filesystem_size_bytes{fs_sel}"
    dev: Labels = {**h, "device": "eth0"}
    ib: Labels = {**h, "device": "mlx5_0", "port": "1", "type": "symbol"}

    def rate_alert(name: str, metric: str, threshold: float, for_: str, what: str, desc: str,
                   lab: Labels, fire: str, quiet: str, at: str = "30m") -> Alert:  # fmt: skip
        return Alert(
            name, "node", with_node(c, f"rate({metric}{selector(e)}[{rw}]) > {_g(threshold)}"), for_, "warning",
            what, desc,
            case({f"{metric}{_labels(lab)}": fire}, at, lab),
            case({f"{metric}{_labels(lab)}": quiet}, at),
        )  # fmt: skip

    return [
        Alert(
            "NodeFilesystemFillingUp", "node",
            with_node(c, f"({ratio} < {_g(c.filesystem_filling_avail_ratio)}) and "
                         f"predict_linear(mlops_node_filesystem_avail_bytes{fs_sel}[{c.filesystem_predict_window}], "
                         f"{_g(c.filesystem_predict_horizon_seconds)}) < 0"),
            c.for_very_long, "warning",
            f"Filesystem {{{{ $labels.mountpoint }}}} on {on} will be full soon",
            f"At the rate of the last {c.filesystem_predict_window}, {{{{ $labels.mountpoint }}}} on {on} fills "
            f"up within {_secs(c.filesystem_predict_horizon_seconds)}; checkpoints and logs will fail.",
            case({f"mlops_node_filesystem_avail_bytes{fsl}": "140-0.5x80",
                  f"mlops_node_filesystem_size_bytes{fsl}": "1000x80"}, "70m", fs),
            case({f"mlops_node_filesystem_avail_bytes{fsl}": "200x80",
                  f"mlops_node_filesystem_size_bytes{fsl}": "1000x80"}, "70m"),
        ),
        Alert(
            "NodeFilesystemAlmostFull", "node", with_node(c, f"{ratio} < {_g(c.filesystem_full_avail_ratio)}"),
            c.for_long, "critical",
            f"Filesystem {{{{ $labels.mountpoint }}}} on {on} is almost full",
            f"Less than {_pct(c.filesystem_full_avail_ratio)} of {{{{ $labels.mountpoint }}}} on {on} is free.",
            case({f"mlops_node_filesystem_avail_bytes{fsl}": "30x60",
                  f"mlops_node_filesystem_size_bytes{fsl}": "1000x60"}, "45m", fs),
            case({f"mlops_node_filesystem_avail_bytes{fsl}": "100x60",
                  f"mlops_node_filesystem_size_bytes{fsl}": "1000x60"}, "45m"),
        ),
        Alert(
            "NodeMemoryLow", "node",
            with_node(c, f"mlops_node_memory_available_bytes{selector(e)} / mlops_node_memory_total_bytes{selector(e)}"
                         f" < {_g(c.memory_available_ratio)}"),
            c.for_medium, "warning",
            f"{on} is running out of memory",
            f"Less than {_pct(c.memory_available_ratio)} of {on}'s memory is available; data loader workers or "
            "the job will be OOM-killed.",
            case({f"mlops_node_memory_available_bytes{hl}": "1e9x30",
                  f"mlops_node_memory_total_bytes{hl}": "64e9x30"}, "25m", h),
            case({f"mlops_node_memory_available_bytes{hl}": "32e9x30",
                  f"mlops_node_memory_total_bytes{hl}": "64e9x30"}, "25m"),
        ),
        rate_alert("NodeMemoryPressure", "mlops_node_pressure_memory_stalled_seconds_total", c.memory_pressure_ratio,
                   c.for_medium, f"{on} is stalling on memory",
                   f"All tasks on {on} were stalled on memory more than {_pct(c.memory_pressure_ratio)} of the "
                   "time (PSI): it is thrashing.", h, "0+12x40", "0+1x40"),
        rate_alert("NodeIoPressure", "mlops_node_pressure_io_stalled_seconds_total", c.io_pressure_ratio,
                   c.for_medium, f"{on} is stalling on I/O",
                   f"All tasks on {on} were stalled on I/O more than {_pct(c.io_pressure_ratio)} of the time "
                   "(PSI): data loading and checkpoints are slow.", h, "0+30x40", "0+1x40"),
        rate_alert("NodeCpuPressure", "mlops_node_pressure_cpu_waiting_seconds_total", c.cpu_pressure_ratio,
                   c.for_medium, f"{on} has tasks waiting for CPU",
                   f"Some task on {on} waited for a CPU more than {_pct(c.cpu_pressure_ratio)} of the time (PSI): "
                   "too many data loader workers or a noisy neighbour.", h, "0+55x40", "0+10x40"),
        Alert(
            "NodeCpuSaturated", "node",
            with_node(c, f"1 - sum without (mode) (rate(mlops_node_cpu_seconds_total{selector(e, IDLE)}[{rw}])) "
                         f"/ mlops_node_cpus{selector(e)} > {_g(c.cpu_busy_ratio)}"),
            c.for_long, "warning",
            f"{on} CPUs are saturated",
            f"{on}'s CPUs are more than {_pct(c.cpu_busy_ratio)} busy: input pipelines starve the GPUs.",
            case({f'mlops_node_cpu_seconds_total{_labels({**h, "mode": "idle"})}': "0+1x60",
                  f"mlops_node_cpus{hl}": "4x60"}, "45m", h),
            case({f'mlops_node_cpu_seconds_total{_labels({**h, "mode": "idle"})}': "0+180x60",
                  f"mlops_node_cpus{hl}": "4x60"}, "45m"),
        ),
        rate_alert("NodeDiskIoSaturated", "mlops_node_disk_io_time_seconds_total", c.disk_io_busy_ratio,
                   c.for_long, f"Disk {{{{ $labels.device }}}} on {on} is saturated",
                   f"Disk {{{{ $labels.device }}}} on {on} had I/O in flight more than "
                   f"{_pct(c.disk_io_busy_ratio)} of the time.",
                   {**h, "device": "nvme0n1"}, "0+57x60", "0+6x60", "45m"),
        Alert(
            "NodeNetworkErrors", "node",
            with_node(c, f"rate(mlops_node_network_receive_errors_total{selector(e)}[{rw}]) > "
                         f"{_g(c.network_errors_per_second)} or rate(mlops_node_network_transmit_errors_total"
                         f"{selector(e)}[{rw}]) > {_g(c.network_errors_per_second)}"),
            c.for_medium, "warning",
            f"{{{{ $labels.device }}}} on {on} has network errors",
            f"More than {_g(c.network_errors_per_second)} errors/s on {{{{ $labels.device }}}} of {on}: check the "
            "cable, transceiver and switch port.",
            case({f"mlops_node_network_receive_errors_total{_labels(dev)}": "0+120x40",
                  f"mlops_node_network_transmit_errors_total{_labels(dev)}": "0x40"}, "30m", dev),
            case({f"mlops_node_network_receive_errors_total{_labels(dev)}": "0+1x40",
                  f"mlops_node_network_transmit_errors_total{_labels(dev)}": "0x40"}, "30m"),
        ),
        Alert(
            "NodeInfinibandErrors", "node",
            with_node(c, f"increase(mlops_node_infiniband_port_errors_total{selector(e)}[{c.gpu_error_window}]) > "
                         f"{_g(c.infiniband_errors_threshold)}"),
            c.for_short, "warning",
            f"InfiniBand {{{{ $labels.device }}}} port {{{{ $labels.port }}}} on {on} has errors",
            f"More than {_g(c.infiniband_errors_threshold)} {{{{ $labels.type }}}} errors in "
            f"{c.gpu_error_window} on InfiniBand {{{{ $labels.device }}}} port {{{{ $labels.port }}}} of {on}; "
            "NCCL traffic over it retries or times out.",
            case({f"mlops_node_infiniband_port_errors_total{_labels(ib)}": "0+5x40"}, "30m", ib),
            case({f"mlops_node_infiniband_port_errors_total{_labels(ib)}": "0x40"}, "30m"),
        ),
        Alert(
            "NodeClockSkew", "node",
            with_node(c, f"abs(mlops_node_timex_offset_seconds{selector(e)}) > {_g(c.clock_offset_seconds)}"),
            c.for_medium, "warning",
            f"{on}'s clock is off",
            f"{on}'s clock is more than {_g(c.clock_offset_seconds)}s off: cross-node timelines and log replay "
            "misorder events.",
            case({f"mlops_node_timex_offset_seconds{hl}": "0.2x30"}, "25m", h),
            case({f"mlops_node_timex_offset_seconds{hl}": "0.001x30"}, "25m"),
        ),
        Alert(
            "NodeClockNotSynchronising", "node", with_node(c, f"mlops_node_timex_sync_status{selector(e)} == 0"),
            c.for_medium, "warning",
            f"{on}'s clock is not synchronising",
            f"The kernel reports {on}'s clock unsynchronised: check chrony/ntpd.",
            case({f"mlops_node_timex_sync_status{hl}": "0x30"}, "25m", h),
            case({f"mlops_node_timex_sync_status{hl}": "1x30"}, "25m"),
        ),
    ]  # fmt: skip


# --- training -------------------------------------------------------------------------------------------


def stall_threshold(c: MixinConfig) -> str:
    """Seconds without a step after which a job's rank counts as stalled: ``stall_step_multiple`` times the
    job's recent median step time, within [floor, ceiling]; the floor for a job without a median yet."""
    t = c.training_selector
    lo, hi = c.training_stall_floor_seconds, c.training_stall_ceiling_seconds
    return (f"clamp({_g(c.stall_step_multiple)} * max by (job) (mlops_training_step_median_seconds{selector(t)}), "
            f"{_g(lo)}, {_g(hi)}) or on (job) {_g(lo)} * group by (job) (mlops_training_last_step_timestamp_seconds"
            f"{selector(t)})")  # fmt: skip


def stalled_ranks(c: MixinConfig) -> str:
    """Running ranks whose last step is older than their job's stall threshold."""
    last = running(c, f"mlops_training_last_step_timestamp_seconds{selector(c.training_selector)}")
    return f"(time() - ({last}) > on (job) group_left () ({stall_threshold(c)}))"


def training_alerts(c: MixinConfig) -> list[Alert]:
    t = c.training_selector
    inst = _instance(c)
    tr: Labels = {**_equalities(t), "job": "train-a", "rank": "1", "node": "n1", **inst}
    peer: Labels = {**tr, "rank": "0"}
    tl, pl = _labels(tr), _labels(peer)
    job_only = {**_equalities(t), "job": "train-a"}
    who = "Rank {{ $labels.rank }} of job {{ $labels.job }} on {{ $labels.node }}"

    def m(name: str, *extra: str) -> str:
        return f"{name}{selector(t, *extra)}"

    def state(
        lab: Labels, n: int, ended: int | None = None, how: str = "finished", gone: int | None = None
    ) -> dict[str, str]:
        """A rank's three state series for minutes 0..n: running, then ``how`` from minute ``ended``;
        no samples from minute ``gone`` (its sidecar stopped reporting)."""
        out = {}
        for st in ("running", "finished", "failed"):
            vals: list[float | None] = []
            for i in range(n + 1):
                now = "running" if ended is None or i < ended else how
                vals.append(None if gone is not None and i >= gone else float(now == st))
            out[f"mlops_training_rank_state{_labels({**lab, 'state': st})}"] = _runs(vals)
        return out

    def phase(lab: Labels, name: str, activity: str, values: str) -> dict[str, str]:
        return {f"{CURRENT_PHASE}{_labels({**lab, 'phase': name, 'activity': activity})}": values}

    waiting = m(CURRENT_PHASE, 'activity="collective"')
    pause_since = m(CURRENT_PHASE, 'activity="pause"')
    paused = f"time() - {pause_since} < {_g(c.training_pause_max_seconds)}"
    stalled = stalled_ranks(c)
    named = f"({stalled} unless ignoring (phase, activity) {waiting})"
    failed = m("mlops_training_rank_state", 'state="failed"')
    first_failed = (
        f"bottomk by (job) (1, {m('mlops_training_rank_end_timestamp_seconds')} and ignoring (state) ({failed} == 1))"
    )
    # Minutes derived from the thresholds, so overridden thresholds keep the tests valid. Steps stop at 10m.
    floor = _minutes(c.training_stall_floor_seconds)
    stall_at = 10 + floor + 2
    # A job whose recent median step is 30 s: its threshold is the multiple of that, within the bounds.
    slow = min(max(c.stall_step_multiple * 30.0, c.training_stall_floor_seconds), c.training_stall_ceiling_seconds)
    slow_at, slow_quiet_at = 10 + _minutes(slow) + 2, 10 + max(floor + 1, math.floor(slow / 60.0) - 1)
    # Symptoms that start at 10m hold for their window and their `for:` by this minute.
    symptom_at = 10 + _minutes(seconds(c.training_rate_window)) + _minutes(seconds(c.for_training)) + 1
    nan_at = 6 + _minutes(seconds(c.for_training_fault))
    # Stragglers 2x and 1.5x slower than their peers (or as much slower as an overridden score needs).
    slow2, slow3 = max(2.0, round(1 / (0.8 * c.straggler_score), 3)), max(1.5, round(1 / (0.9 * c.straggler_score), 3))
    ckpt_at = _minutes(c.checkpoint_stale_seconds) + _minutes(seconds(c.for_medium)) + 3
    steps_at_10m = "0+60x10 600x40"  # a rank's last-step time: one step a second for 10 minutes, then none
    lost = duration(c.training_retention_seconds)
    ended = m("mlops_training_rank_state", 'state!="running"')
    nonfinite = m("mlops_training_nonfinite_loss_total")
    return [
        Alert(
            "TrainingRankFailed", "training",
            f"({m('mlops_training_steps_total')} and {first_failed}) * ignoring (reason, detail) group_left "
            f"(reason, detail) {m('mlops_training_rank_failure_info')}",
            c.for_training_fault, "critical",
            f"{who} failed",
            f"{who} failed ({{{{ $labels.reason }}}} {{{{ $labels.detail }}}}) in step "
            '{{ printf "%.0f" $value }} (counted from 0: the steps it had completed), the first rank of the '
            "job to fail; ranks stopped after it are not the cause. Its last log lines say why.",
            Case({
                **state(tr, 30, ended=11, how="failed"),
                f"mlops_training_steps_total{tl}": "0+60x10 600x20",
                f"mlops_training_rank_end_timestamp_seconds{tl}": "_x10 601x20",
                f"mlops_training_rank_failure_info{_labels({**tr, 'reason': 'exception', 'detail': 'RuntimeError'})}":
                    "_x10 1x20",
                # The peer the launcher stopped afterwards: failed too, later, and not named.
                **state(peer, 31, ended=12, how="failed"),
                f"mlops_training_steps_total{pl}": "0+60x10 600x20",
                f"mlops_training_rank_end_timestamp_seconds{pl}": "_x11 663x20",
                f"mlops_training_rank_failure_info{_labels({**peer, 'reason': 'signal', 'detail': 'SIGTERM'})}":
                    "_x11 1x20",
            }, "13m", ({**tr, "reason": "exception", "detail": "RuntimeError"},), value=600),
            Case({**state(tr, 30, ended=11), f"mlops_training_steps_total{tl}": "0+60x10 600x20",
                  f"mlops_training_rank_end_timestamp_seconds{tl}": "_x10 601x20"}, "13m"),
        ),
        Alert(
            "TrainingStalled", "training", f"{named} unless on (job) ({paused})", c.for_stall, "critical",
            f"{who} has stopped making progress",
            f"{who} has made no step for longer than {_g(c.stall_step_multiple)} times the job's median step time "
            f"(at least {_secs(c.training_stall_floor_seconds)}, at most {_secs(c.training_stall_ceiling_seconds)}) "
            "and is not waiting for its peers in a collective: it is the rank holding the job up (a hang in its "
            "own code, its data loader or its device). Check its log and a stack dump (py-spy dump).",
            Case({**state(tr, 40), **state(peer, 40),
                  f"mlops_training_last_step_timestamp_seconds{tl}": steps_at_10m,
                  f"mlops_training_last_step_timestamp_seconds{pl}": steps_at_10m,
                  **phase(tr, "step", "work", "0+60x10 600x40"), **phase(peer, "collective", "collective", "600x50")},
                 f"{stall_at}m", (tr,)),
            Case({**state(tr, 40), f"mlops_training_last_step_timestamp_seconds{tl}": "0+60x40"}, f"{stall_at}m"),
            also_fires=(
                # A job with minute-long steps: the threshold is ten medians (capped), not the floor.
                Case({**state(tr, 60), f"mlops_training_last_step_timestamp_seconds{tl}": "0+60x10 600x50",
                      f"mlops_training_step_median_seconds{tl}": "30x60"}, f"{slow_at}m", (tr,)),
            ),
            also_quiet=(
                # A rank that finished keeps its last step time until the sidecar forgets it: no stall.
                Case({**state(tr, 40, ended=11), f"mlops_training_last_step_timestamp_seconds{tl}":
                      steps_at_10m}, f"{stall_at}m"),
                # Rank 0 saves a checkpoint (an expected pause) while rank 1 waits for it.
                Case({**state(tr, 40), **state(peer, 40),
                      f"mlops_training_last_step_timestamp_seconds{tl}": steps_at_10m,
                      f"mlops_training_last_step_timestamp_seconds{pl}": steps_at_10m,
                      **phase(tr, "collective", "collective", "600x50"),
                      **phase(peer, "checkpoint", "pause", "600x50")},
                     f"{stall_at}m"),
                # Slow steps (30 s median) pausing for less than the multiple of their median: not a stall.
                Case({**state(tr, 60), f"mlops_training_last_step_timestamp_seconds{tl}": "0+60x10 600x50",
                      f"mlops_training_step_median_seconds{tl}": "30x60"}, f"{slow_quiet_at}m"),
            ),
        ),
        Alert(
            "TrainingStalledRankMissing", "training",
            f"(count by (job) ({stalled}) unless on (job) {named}) unless on (job) ({paused})",
            c.for_stall, "critical",
            "Job {{ $labels.job }} has stopped making progress",
            "Every rank of job {{ $labels.job }} that reports has made no step for longer than the stall threshold "
            "and waits for its peers in a collective: the rank they wait for does not report (its node or "
            "sidecar is down, it runs where no sidecar is scraped) or all of them wait in mismatched collectives. "
            "Find the rank missing from the job's dashboard.",
            Case({**state(tr, 40), f"mlops_training_last_step_timestamp_seconds{tl}": steps_at_10m,
                  **phase(tr, "collective", "collective", "600x50")}, f"{stall_at}m", (job_only,)),
            Case({**state(tr, 40), **state(peer, 40),
                  f"mlops_training_last_step_timestamp_seconds{tl}": steps_at_10m,
                  f"mlops_training_last_step_timestamp_seconds{pl}": steps_at_10m,
                  **phase(tr, "step", "work", "600x50"), **phase(peer, "collective", "collective", "600x50")},
                 f"{stall_at}m"),
        ),
        Alert(
            "TrainingNodeDown", "training",
            f"last_over_time({m('mlops_training_world_size')}[{lost}]) unless ignoring (state) "
            f"(last_over_time({ended}[{lost}]) == 1) "
            f"and on ({c.instance}) (up{selector(c.exporter_selector)} == 0)",
            c.for_critical, "critical",
            f"{who} is on a node that stopped reporting",
            f"{who} was running when Prometheus lost the sidecar of {{{{ $labels.node }}}}: the node, its network "
            "or the sidecar is down, and the job's other ranks are waiting for this one.",
            Case({**state(tr, 30, gone=11), f"mlops_training_world_size{tl}": "2x10 _x20",
                  f"up{_labels({**_scrape_job(c), **inst})}": "1x10 0x20"}, "15m", (tr,)),
            Case({**state(tr, 30, gone=11), f"mlops_training_world_size{tl}": "2x10 _x20",
                  f"up{_labels({**_scrape_job(c), **inst})}": "1x30"}, "15m"),
            also_quiet=(
                # The rank had finished before the node went down.
                Case({**state(tr, 30, ended=6, gone=11), f"mlops_training_world_size{tl}": "2x10 _x20",
                      f"up{_labels({**_scrape_job(c), **inst})}": "1x10 0x20"}, "15m"),
            ),
        ),
        Alert(
            "TrainingStraggler", "training", f"{STRAGGLER} < {_g(c.straggler_score)}", c.for_straggler, "warning",
            f"{who} is a straggler",
            f"{who} computes slower than the job's other ranks (score below {_g(c.straggler_score)}: their median "
            "step compute time over its own); every rank waits for it at each collective. Check its GPU's "
            "throttling and its node.",
            # Two ranks, one 2x slower: the other rank's median over its own is 0.5.
            Case({**state(tr, 30), **state(peer, 30),
                  f"mlops_training_step_compute_median_seconds{tl}": f"{_g(0.1 * slow2)}x30",
                  f"mlops_training_step_compute_median_seconds{pl}": "0.1x30"}, "10m", (tr,)),
            Case({**state(tr, 30), **state(peer, 30),
                  f"mlops_training_step_compute_median_seconds{tl}": "0.105x30",
                  f"mlops_training_step_compute_median_seconds{pl}": "0.1x30"}, "10m"),
            also_fires=(
                # Three ranks, one 1.5x slower: against the median of all, which it cannot move.
                Case({**state(tr, 30), **state(peer, 30), **state({**tr, "rank": "2"}, 30),
                      f"mlops_training_step_compute_median_seconds{tl}": f"{_g(0.1 * slow3)}x30",
                      f"mlops_training_step_compute_median_seconds{pl}": "0.1x30",
                      f"mlops_training_step_compute_median_seconds{_labels({**tr, 'rank': '2'})}": "0.1x30"},
                     "10m", (tr,)),
                # Two ranks, one 1.5x slower.
                Case({**state(tr, 30), **state(peer, 30),
                      f"mlops_training_step_compute_median_seconds{tl}": f"{_g(0.1 * slow3)}x30",
                      f"mlops_training_step_compute_median_seconds{pl}": "0.1x30"}, "10m", (tr,)),
            ),
            also_quiet=(
                # The job finished: the slow rank's last median stays until the sidecar forgets it.
                Case({**state(tr, 30, ended=4), **state(peer, 30, ended=4),
                      f"mlops_training_step_compute_median_seconds{tl}": "0.2x30",
                      f"mlops_training_step_compute_median_seconds{pl}": "0.1x30"}, "10m"),
            ),
        ),
        Alert(
            "TrainingStepTimeAnomaly", "training",
            running(c, f"{STEP_RECENT} > {_g(c.step_time_anomaly_factor)} * {STEP_BASELINE}"),
            c.for_training, "warning",
            f"{who} steps are much slower than usual",
            f"{who}'s mean step time over {c.training_rate_window} is more than {_g(c.step_time_anomaly_factor)}x "
            f"its mean over the {c.training_baseline_window} before.",
            # Ten minutes of 0.1 s steps, then 1 s steps: a job younger than the baseline window fires too.
            Case({**state(tr, 30), f"{STEP}_count{tl}": "0+60x30", f"{STEP}_sum{tl}": "0+6x10 60+60x20"},
                 f"{symptom_at}m", (tr,)),
            Case({**state(tr, 30), f"{STEP}_count{tl}": "0+60x30", f"{STEP}_sum{tl}": "0+6x30"}, f"{symptom_at}m"),
        ),
        Alert(
            "TrainingThroughputRegression", "training",
            f"{SAMPLES_RECENT} < {_g(c.throughput_drop_ratio)} * avg_over_time({SAMPLES_RECENT}"
            f"[{c.training_baseline_window}] offset {c.training_rate_window}) and {SAMPLES_RECENT} > 0 "
            f"unless on (job) {_rank_ended(c)}",
            c.for_training, "warning",
            "Job {{ $labels.job }} throughput dropped",
            f"Job {{{{ $labels.job }}}} processed fewer than {_pct(c.throughput_drop_ratio)} of the samples/s it "
            f"averaged over the {c.training_baseline_window} before the last {c.training_rate_window}.",
            Case({**state(tr, 30), f"mlops_training_samples_total{tl}": "0+6000x10 60000+2000x20"}, f"{symptom_at}m",
                 (job_only,)),
            Case({**state(tr, 30), f"mlops_training_samples_total{tl}": "0+6000x30"}, f"{symptom_at}m"),
            also_quiet=(
                # The job ended: its ranks finished and their rate fell to 0 on the way.
                Case({**state(tr, 30, ended=11), f"mlops_training_samples_total{tl}": "0+6000x10 60000x20"},
                     f"{symptom_at}m"),
            ),
        ),
        Alert(
            "TrainingLowGoodput", "training", f"{GOODPUT} < {_g(c.goodput_ratio)}", c.for_long, "warning",
            "Job {{ $labels.job }} wastes most of its time",
            f"Less than {_pct(c.goodput_ratio)} of job {{{{ $labels.job }}}}'s rank time over {c.goodput_window} "
            "was productive steps: the rest went to start-up, data waits, checkpoints, restarts or hangs. See "
            "badput by kind on the training dashboard.",
            # Productive 20 s a minute: a third of the rank's time.
            Case({**state(tr, 140), f"mlops_training_goodput_seconds_total{tl}": "0+20x120",
                  f"mlops_training_process_start_time_seconds{tl}": "0x120"}, "100m", (job_only,)),
            Case({**state(tr, 140), f"mlops_training_goodput_seconds_total{tl}": "0+55x120",
                  f"mlops_training_process_start_time_seconds{tl}": "0x120"}, "100m"),
            also_fires=(
                # Hung for the last 40 minutes: the steps it made before do not hide it.
                Case({**state(tr, 140), f"mlops_training_goodput_seconds_total{tl}": "0+55x60 3300x80",
                      f"mlops_training_process_start_time_seconds{tl}": "0x140"}, "130m", (job_only,)),
            ),
            also_quiet=(
                # Ten minutes old: its own history, not the whole window, is the denominator.
                Case({**state(tr, 140), f"mlops_training_goodput_seconds_total{tl}": "_x90 0+55x30",
                      f"mlops_training_process_start_time_seconds{tl}": "_x90 5400x30"}, "100m"),
            ),
        ),
        Alert(
            # A rank younger than the window counts from 0: increase() needs two samples, and a rank that
            # diverges before its first scrape has none at 0 (at a 15 s scrape, a job that NaNs within
            # seconds of its start).
            "TrainingNonFiniteLoss", "training",
            f"increase({nonfinite}[{c.training_rate_window}]) > 0 or ({nonfinite} > 0 and "
            f"time() - {m('mlops_training_process_start_time_seconds')} < {_g(seconds(c.training_rate_window))})",
            c.for_training_fault, "warning",
            f"{who} produced NaN or infinite losses",
            f"{who} recorded non-finite losses: the run is diverging (learning rate, bad batch, overflow).",
            Case({f"mlops_training_nonfinite_loss_total{tl}": "0x5 3x30"}, f"{nan_at}m", (tr,)),
            Case({f"mlops_training_nonfinite_loss_total{tl}": "0x30"}, f"{nan_at}m"),
            also_fires=(
                # It diverged before its first scrape: the counter's first sample is already 3.
                Case({f"mlops_training_nonfinite_loss_total{tl}": "_x5 3x30",
                      f"mlops_training_process_start_time_seconds{tl}": "_x5 290x30"}, "6m", (tr,)),
                # Both ways at once (a young rank whose counter moved after its first scrape): one alert.
                Case({f"mlops_training_nonfinite_loss_total{tl}": "_x4 0 3x30",
                      f"mlops_training_process_start_time_seconds{tl}": "_x4 230x30"}, "6m", (tr,)),
            ),
            also_quiet=(
                # Old non-finite losses, the rank seen again after a scrape gap: nothing new.
                Case({f"mlops_training_nonfinite_loss_total{tl}": "3x5 _x5 3x20",
                      f"mlops_training_process_start_time_seconds{tl}": "0x5 _x5 0x20"}, "12m"),
            ),
        ),
        Alert(
            "TrainingCheckpointStale", "training",
            f"time() - (max by (job) (max_over_time({m('mlops_training_last_checkpoint_timestamp_seconds')}"
            f"[{c.checkpoint_lookback_window}])) or min by (job) (min_over_time("
            f"{m('mlops_training_process_start_time_seconds')}[{c.checkpoint_lookback_window}]))) > "
            f"{_g(c.checkpoint_stale_seconds)} and on (job) group by (job) "
            f"({running(c, m('mlops_training_world_size'))})",
            c.for_medium, "warning",
            "Job {{ $labels.job }} has not checkpointed recently",
            f"Job {{{{ $labels.job }}}}'s last checkpoint (across restarts) is more than "
            f"{_secs(c.checkpoint_stale_seconds)} old, or it has run that long without one: a failure now loses "
            "that much work.",
            Case({**state(tr, ckpt_at + 2), f"mlops_training_world_size{tl}": f"2x{ckpt_at + 2}",
                  f"mlops_training_process_start_time_seconds{tl}": f"0x{ckpt_at + 2}",
                  f"mlops_training_last_checkpoint_timestamp_seconds{pl}": f"0x{ckpt_at + 2}"}, f"{ckpt_at}m",
                 (job_only,)),
            Case({**state(tr, ckpt_at + 2), f"mlops_training_world_size{tl}": f"2x{ckpt_at + 2}",
                  f"mlops_training_process_start_time_seconds{tl}": f"0x{ckpt_at + 2}",
                  f"mlops_training_last_checkpoint_timestamp_seconds{pl}": f"0+60x{ckpt_at + 2}"}, f"{ckpt_at}m"),
            also_fires=(
                # A job that never checkpoints.
                Case({**state(tr, ckpt_at + 2), f"mlops_training_world_size{tl}": f"2x{ckpt_at + 2}",
                      f"mlops_training_process_start_time_seconds{tl}": f"0x{ckpt_at + 2}"}, f"{ckpt_at}m",
                     (job_only,)),
            ),
            also_quiet=(
                # Restarted 10 minutes ago, after a checkpoint 20 minutes ago: the new process has saved
                # nothing yet, the job has.
                Case({**state(tr, ckpt_at + 2), f"mlops_training_world_size{tl}": f"2x{ckpt_at + 2}",
                      f"mlops_training_process_start_time_seconds{tl}":
                          f"0x{ckpt_at - 10} {(ckpt_at - 10) * 60}x12",
                      f"mlops_training_last_checkpoint_timestamp_seconds{pl}":
                          f"0x{ckpt_at - 20} {(ckpt_at - 20) * 60}x10 _x12"}, f"{ckpt_at}m"),
            ),
        ),
        Alert(
            "TrainingDataLoaderBound", "training",
            running(c, f'{PHASE_RATIO}{{phase="data_wait"}} > {_g(c.data_wait_ratio)}', "phase"),
            c.for_training, "warning",
            f"{who} waits on its input pipeline",
            f"{who} spends more than {_pct(c.data_wait_ratio)} of its step time waiting for data: add loader "
            "workers, prefetch, or faster storage.",
            Case({
                **state(tr, 40),
                f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'data_wait'})}": "0+24x40",
                f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'forward'})}": "0+12x40",
                f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'backward'})}": "0+24x40",
            }, f"{symptom_at}m", ({**tr, "phase": "data_wait"},)),
            Case({
                **state(tr, 40),
                f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'data_wait'})}": "0+3x40",
                f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'forward'})}": "0+12x40",
                f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'backward'})}": "0+24x40",
            }, f"{symptom_at}m"),
        ),
    ]  # fmt: skip


# --- the pipeline itself --------------------------------------------------------------------------------


def pipeline_alerts(c: MixinConfig) -> list[Alert]:
    e, sh = c.exporter_selector, c.shipper_selector
    inst = _instance(c)
    h: Labels = {**_scrape_job(c), **inst}
    col: Labels = {**h, "collector": "host"}
    sp: Labels = {**_equalities(sh), **h}
    spf: Labels = {**sp, "file": "/logs/train-a-rank0.jsonl"}
    ctx = _node_context(c)

    def case(series: dict[str, str], at: str, *expected: Labels) -> Case:
        return _with_context(ctx, series, at, tuple({**lab, "node": "n1"} for lab in expected))

    on = "{{ $labels.node }}"
    return [
        Alert(
            "MlopsExporterDown", "pipeline", with_node(c, f"up{selector(e)} == 0"), c.for_short, "critical",
            f"The mlops-obs sidecar on {on} is down",
            f"Prometheus cannot scrape the sidecar on {on}: GPU, host and training metrics from that node are "
            "missing and its other alerts cannot fire.",
            case({f"up{_labels(h)}": "1x5 0x20", f"mlops_exporter_node_info{_labels({**h, 'node': 'n1'})}":
                  "1x5 _x20"}, "15m", h),
            case({f"up{_labels(h)}": "1x20"}, "15m"),
        ),
        Alert(
            "MlopsCollectorFailing", "pipeline", with_node(c, f"mlops_scrape_collector_success{selector(e)} == 0"),
            c.for_medium, "warning",
            f"Collector {{{{ $labels.collector }}}} on {on} is failing",
            f"The {{{{ $labels.collector }}}} collector on {on} has failed (or been abandoned) for a while; its "
            "series are missing. The sidecar's log says why.",
            case({f"mlops_scrape_collector_success{_labels(col)}": "0x30"}, "25m", col),
            case({f"mlops_scrape_collector_success{_labels(col)}": "1x30"}, "25m"),
        ),
        Alert(
            "MlopsCollectorSlow", "pipeline",
            with_node(c, f"mlops_scrape_collector_duration_seconds{selector(e)} > {_g(c.collector_slow_seconds)}"),
            c.for_medium, "warning",
            f"Collector {{{{ $labels.collector }}}} on {on} is slow",
            f"The {{{{ $labels.collector }}}} collector on {on} takes more than {_g(c.collector_slow_seconds)}s "
            "per sample (a hanging NVML call or a huge /proc); its data goes stale.",
            case({f"mlops_scrape_collector_duration_seconds{_labels(col)}": "3x30"}, "25m", col),
            case({f"mlops_scrape_collector_duration_seconds{_labels(col)}": "0.01x30"}, "25m"),
        ),
        Alert(
            "MlopsScrapeSlow", "pipeline",
            with_node(c, f"scrape_duration_seconds{selector(e)} > {_g(c.scrape_slow_seconds)}"),
            c.for_medium, "warning",
            f"Scraping the sidecar on {on} is slow",
            f"Prometheus needs more than {_g(c.scrape_slow_seconds)}s to scrape the sidecar on {on}: too many "
            "series or an overloaded node.",
            case({f"scrape_duration_seconds{_labels(h)}": "2x30"}, "25m", h),
            case({f"scrape_duration_seconds{_labels(h)}": "0.05x30"}, "25m"),
        ),
        Alert(
            "MlopsShipperBehind", "pipeline",
            with_node(c, f"mlops_shipper_lag_bytes{selector(sh)} > {_g(c.shipper_lag_bytes)}"),
            c.for_medium, "warning",
            f"The log shipper on {on} is behind",
            f"More than {_num(c.shipper_lag_bytes)}B of {{{{ $labels.file }}}} on {on} are not shipped yet: the "
            "store is slow or rejecting.",
            case({f"mlops_shipper_lag_bytes{_labels(spf)}": "1e9x30"}, "25m", spf),
            case({f"mlops_shipper_lag_bytes{_labels(spf)}": "1e3x30"}, "25m"),
        ),
        Alert(
            # Lines waiting (lag), not lines read: a shipper blocked on its sink holds one batch and
            # reads nothing more, so its read rate is 0 exactly when this must fire.
            "MlopsShipperNotShipping", "pipeline",
            with_node(c, f"time() - mlops_shipper_last_success_timestamp_seconds{selector(sh)} > "
                         f"{_g(c.shipper_stale_seconds)} and on ({c.instance}) sum by ({c.instance}) "
                         f"(mlops_shipper_lag_bytes{selector(sh)}) > 0"),
            c.for_short, "critical",
            f"The log shipper on {on} delivers nothing",
            f"The shipper on {on} has lines waiting but has not delivered any for more than "
            f"{_g(c.shipper_stale_seconds)}s.",
            case({f"mlops_shipper_last_success_timestamp_seconds{_labels(sp)}": "0x40",
                  f"mlops_shipper_lines_read_total{_labels(sp)}": "5000x40",
                  f"mlops_shipper_lag_bytes{_labels(spf)}": "0+1000x40"}, "30m", sp),
            case({f"mlops_shipper_last_success_timestamp_seconds{_labels(sp)}": "0+60x40",
                  f"mlops_shipper_lag_bytes{_labels(spf)}": "1000x40"}, "30m"),
            also_quiet=(  # nothing written since the last delivery: an idle job, not a stuck shipper
                case({f"mlops_shipper_last_success_timestamp_seconds{_labels(sp)}": "0x40",
                      f"mlops_shipper_lag_bytes{_labels(spf)}": "0x40"}, "30m"),
            ),
        ),
        Alert(
            "MlopsShipperFailing", "pipeline",
            with_node(c, f"mlops_shipper_failing{selector(sh)} == 1"),
            c.for_short, "warning",
            f"The log shipper on {on} is held by an error",
            f"The shipper on {on} cannot deliver or checkpoint (the sink refuses or is unreachable, the store is "
            "damaged, the state directory is not writable) or fails to start; its stats file names the error.",
            case({f"mlops_shipper_failing{_labels(sp)}": "0x5 1x30"}, "20m", sp),
            case({f"mlops_shipper_failing{_labels(sp)}": "0x5 1x3 0x30"}, "20m"),
        ),
        Alert(
            "MlopsShipperDeadLetters", "pipeline",
            with_node(c, f"increase(mlops_shipper_dead_letters_total{selector(sh)}[{c.gpu_error_window}]) > 0"),
            c.for_critical, "warning",
            f"The log shipper on {on} dead-lettered events",
            f"The store rejected events from {on} for good; they are in the dead-letter file, not in the store.",
            case({f"mlops_shipper_dead_letters_total{_labels(sp)}": "0x5 4x30"}, "8m", sp),
            case({f"mlops_shipper_dead_letters_total{_labels(sp)}": "0x30"}, "8m"),
        ),
    ]  # fmt: skip


# --- files ----------------------------------------------------------------------------------------------

# Groups run concurrently, each on its own core, while a group's rules run one after another: the GPU
# alerts are two groups (hardware faults; health: heat, throttling, memory, idleness) and the recording
# rules four (joins, GPU error windows, other GPU aggregates, training), so no one group holds a fleet's
# GPU work. Alerts read the recording rules, which hold the expensive windows.
GROUP_TITLES = {"gpu": "mlops-obs.gpu", "gpu-health": "mlops-obs.gpu-health", "node": "mlops-obs.node",
                "training": "mlops-obs.training", "pipeline": "mlops-obs.pipeline"}  # fmt: skip
RECORDING_GROUP_TITLES = {"joins": "mlops-obs.rules", "gpu-errors": "mlops-obs.gpu-errors.rules",
                          "gpu": "mlops-obs.gpu.rules", "training": "mlops-obs.training.rules"}  # fmt: skip


def _groups(cfg: MixinConfig, titles: dict[str, str], rules: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """(group key, rule) pairs as rule file groups, in ``titles``' order."""
    out = []
    for key, title in titles.items():
        g: dict[str, Any] = {"name": title, "rules": [r for k, r in rules if k == key]}
        if cfg.rule_interval:
            g["interval"] = cfg.rule_interval
        if g["rules"]:
            out.append(g)
    return {"groups": out}


def alert_groups(cfg: MixinConfig) -> dict[str, Any]:
    return _groups(cfg, GROUP_TITLES, [(a.group, a.rule(cfg)) for a in alerts(cfg)])


def recording_groups(cfg: MixinConfig) -> dict[str, Any]:
    return _groups(cfg, RECORDING_GROUP_TITLES, [(r.group, r.rule()) for r in recording_rules(cfg)])


_TEMPLATE = re.compile(r"\{\{\s*(?:\$labels\.(\w+)|printf \"%\.0f\" \$value)\s*\}\}")


def render_annotation(text: str, labels: Labels, value: float | None = None) -> str:
    """Expand ``{{ $labels.x }}`` and ``{{ printf "%.0f" $value }}`` as Prometheus does; a label the alert
    lacks, or a value the case does not give, is a bug in the rule's text."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            if value is None:
                raise ValueError(f"annotation prints $value, but the test case gives none: {text!r}")
            return f"{value:.0f}"
        if name not in labels:
            raise KeyError(f"annotation uses $labels.{name}, which the alert does not carry: {text!r}")
        return labels[name]

    if "$value" in _TEMPLATE.sub("", text):
        raise ValueError(f'annotations may print $value only as {{{{ printf "%.0f" $value }}}}: {text!r}')
    return _TEMPLATE.sub(sub, text)


_SAMPLES = re.compile(r"^(?P<a>[-+]?\d*\.?\d+(?:e[-+]?\d+)?|_)(?:(?P<op>[-+])(?P<b>\d*\.?\d+(?:e[-+]?\d+)?))?"
                      r"(?:x(?P<n>\d+))?$")  # fmt: skip


def _scale_values(values: str, factor: float) -> str:
    """promtool's expanding notation (``0+60x10 600x15 _x3 stale``) with every value times ``factor``."""
    out = []
    for term in values.split():
        m = _SAMPLES.match(term)
        if term == "stale" or (m and m.group("a") == "_"):
            out.append(term)
            continue
        if not m:
            raise ValueError(f"cannot scale sample notation {term!r}")
        s = repr(float(m.group("a")) * factor)
        if m.group("op"):
            s += f"{m.group('op')}{float(m.group('b')) * factor!r}"
        if m.group("n"):
            s += f"x{m.group('n')}"
        out.append(s)
    return " ".join(out)


def is_time_valued(series: str) -> bool:
    """Whether a series' values are seconds (a duration, a seconds counter or a Unix time), which a scaled
    clock scales; counts and ratios it does not."""
    name = series.split("{", 1)[0]
    if name.endswith("_seconds_bucket"):
        raise ValueError(f"{series}: a histogram over time has time-valued bucket bounds; not scalable")
    return name.endswith(("_seconds", "_seconds_total", "_seconds_sum"))


def rule_tests(cfg: MixinConfig, rule_files: list[str], time_scale: float = 1.0) -> dict[str, Any]:
    """promtool test input: for every alert the groups where it fires and where it must stay quiet, and
    for every recording rule with cases what it records (for a GPU rule, the same from either profile).

    The cases are written for ``cfg`` at the shipped time scale; with ``time_scale`` they run against the
    rules of :func:`scaled` ``(cfg, time_scale)``: every interval, evaluation time and time-valued sample
    is multiplied too, so the same cases prove the scaled rules behave exactly as the shipped ones.
    """
    shown = scaled(cfg, time_scale) if time_scale != 1.0 else cfg
    interval = duration(60.0 * time_scale)

    def at(t: str) -> str:
        return duration(seconds(t) * time_scale)

    tests: list[dict[str, Any]] = []
    for a, a_shown in zip(alerts(cfg), alerts(shown), strict=True):
        for case, firing in a.cases():
            if firing and not case.alerts:
                raise ValueError(f"{a.name}: a firing case expects no alert")
            exp = []
            for lab in case.alerts if firing else ():
                full = {**lab, "severity": a.severity, **a.extra_labels}
                ann = {k: render_annotation(v, full, case.value) for k, v in a_shown.annotations(shown).items()}
                exp.append({"exp_labels": full, "exp_annotations": ann})
            tests.append(
                {
                    "interval": interval,
                    "input_series": _input_series(case.series, time_scale),
                    "alert_rule_test": [{"eval_time": at(case.at), "alertname": a.name, "exp_alerts": exp}],
                }
            )
    for r in recording_rules(cfg):
        for rc in r.cases:
            factor = 1.0 / time_scale if rc.per_second else 1.0
            samples = [{"labels": f"{r.record}{lb}" if lb != "{}" else r.record, "value": v * factor}
                       for lb, v in rc.expected.items()]  # fmt: skip
            tests.append(
                {
                    "interval": interval,
                    "input_series": _input_series(rc.series, time_scale),
                    "promql_expr_test": [
                        {
                            "expr": f"{r.record}{_labels(r.labels) if r.labels else ''}",
                            "eval_time": at(rc.at),
                            "exp_samples": samples,
                        }
                    ],
                }
            )
    return {"rule_files": rule_files, "evaluation_interval": interval, "tests": tests}


def _input_series(series: dict[str, str], time_scale: float) -> list[dict[str, str]]:
    """promtool's input series, time-valued ones on the scaled clock. Histogram buckets are counts (the
    recording rules' cases only rate them; their bounds stay labels)."""
    out = []
    for k, v in series.items():
        timed = not k.split("{", 1)[0].endswith("_bucket") and is_time_valued(k)
        out.append({"series": k, "values": _scale_values(v, time_scale) if timed else v})
    return out
