"""The dashboards, described with :mod:`mlops_obs.mixin.grafana`'s neutral types.

Thresholds come from :class:`MixinConfig`, the same fields the alerts use. Panel queries filter on the
dashboard variables (``$job``, ``$node``, ``$rank``, ``$gpu``) and use ``$__rate_interval`` so they stay
correct at any scrape interval. Series of a sidecar (host, GPU, the sidecar itself) carry no node name:
their panels join it from the sidecar's ``_info`` series (the recording rule the alerts use), which also
filters them by ``$node``. Counts and shares that would read "no data" when nothing is wrong end in
``or vector(0)``; rank and job counts cover running ranks only.
"""

from __future__ import annotations

from urllib.parse import quote

from mlops_obs.mixin.config import MixinConfig, selector
from mlops_obs.mixin.grafana import Dashboard, Link, Panel, Query, Row, Variable
from mlops_obs.mixin.rules import (
    CLUSTER_GPU_UTIL,
    CURRENT_PHASE,
    ECC_ERRORS,
    GOODPUT,
    JOB_FAILED_RANKS,
    JOB_GPU_UTIL,
    JOB_RANKS,
    NODE_INFO,
    NVLINK_BYTES,
    NVLINK_ERRORS,
    PHASE_RATIO,
    SAMPLES_RECENT,
    STEP_BUCKETS,
    STRAGGLER,
    THROTTLE,
    new_or_increase,
    running,
)

RI = "$__rate_interval"
IDLE, LOAD1 = 'mode="idle"', 'window="1m"'


def _vars(c: MixinConfig) -> list[Variable]:
    t = c.training_selector
    on_node = selector(c.gpu_selector, 'node=~"$node"')  # mlops_gpu_info names its node, as the sidecar does
    return [
        Variable("datasource", "Data source", ""),
        Variable("job", "Job", f"label_values(mlops_training_world_size{selector(t)}, job)"),
        # Training series name their node; sidecars name theirs through the node-name rule (which has no
        # `job`, so it lists every node while no job is picked).
        Variable("node", "Node", f'label_values({{__name__=~"mlops_training_world_size|{NODE_INFO}", job=~"$job"}}, '
                                 "node)"),
        Variable("rank", "Rank", 'label_values(mlops_training_world_size{job=~"$job", node=~"$node"}, rank)'),
        Variable("gpu", "GPU", f"label_values(mlops_gpu_info{on_node}, gpu)"),
    ]  # fmt: skip


def _logs_links(c: MixinConfig) -> tuple[Link, ...]:
    """Open OpenSearch Dashboards' Discover on this rank's (or node's) logs around the visible time range."""
    base = c.opensearch_dashboards_url.rstrip("/")
    when = "_g=(time:(from:'${__from:date:iso}',to:'${__to:date:iso}'))"

    def discover(kuery: str) -> str:
        q = quote(kuery, safe="$:{}._ ")
        return f"{base}/app/discover#/?{when}&_a=(index:'{c.logs_index_pattern}',query:(language:kuery,query:'{q}'))"

    return (
        Link("Logs of this rank", discover('job:"${__field.labels.job}" and rank:${__field.labels.rank}')),
        Link("Logs of this node", discover('node:"${__field.labels.node}"')),
    )


def _ts(c: MixinConfig, *extra: str) -> str:
    return selector(c.training_selector, 'job=~"$job"', 'rank=~"$rank"', 'node=~"$node"', *extra)


def _on_node(c: MixinConfig, expr: str) -> str:
    """Per-sidecar series with their node name, only those of the ``$node`` selection."""
    return f'{expr} * on ({c.instance}) group_left (node) {NODE_INFO}{{node=~"$node"}}'


def _host(c: MixinConfig, *extra: str) -> str:
    return selector(c.exporter_selector, *extra)


def _gpu(c: MixinConfig, *extra: str) -> str:
    return selector(c.gpu_selector, 'gpu=~"$gpu"', *extra)


def _live(c: MixinConfig, *extra: str) -> str:
    """One series per running rank (of the dashboard's selection with ``extra``)."""
    return running(c, f"mlops_training_world_size{_ts(c, *extra)}")


def training_dashboard(c: MixinConfig) -> Dashboard:
    s = _ts(c)
    links = _logs_links(c)
    rk = "{{job}} rank {{rank}}"
    step = "mlops_training_step_duration_seconds"
    ranks_per_job = f"count by (job) ({_live(c)})"
    lookback = c.checkpoint_lookback_window
    jobs, data_wait = selector('job=~"$job"'), _ts(c, 'phase="data_wait"')
    return Dashboard(
        uid=f"{c.dashboard_uid_prefix}-training",
        title="mlops-obs / Training job",
        description="Rank lifecycle, throughput, step time, phases, loss, goodput, stragglers, checkpoints and the "
        "ranks' own processes.",
        tags=c.dashboard_tags,
        variables=_vars(c),
        rows=[
            Row("Ranks", (
                Panel("Ranks by state", (Query(f"count by (state) (mlops_training_rank_state{s} == 1)", "{{state}}"),),
                      "short", "Ranks running, finished cleanly, and failed (exception, signal, non-zero exit or "
                      "vanished), until the sidecar forgets them.", kind="stat", width=6),
                Panel("Failed ranks", (Query(f"mlops_training_rank_failure_info{s}",
                                             rk + ": {{reason}} {{detail}}"),),
                      "short", "Ranks that failed and why: exception type, signal, exit code, or vanished (killed "
                      "without a word: SIGKILL, OOM killer).", thresholds=((1, "red"),), width=6, links=links),
                Panel("Time in current phase",
                      (Query(f"time() - {CURRENT_PHASE}{s}", rk + " {{phase}} ({{activity}})"),),
                      "s", "How long each rank has been in the phase it is in now. In a hang the ranks waiting "
                      "in a collective all show the same growing time; the rank that is not waiting is the one "
                      "holding them up.", thresholds=((c.training_stall_floor_seconds, "red"),), width=12,
                      links=links),
            )),
            Row("Throughput", (
                Panel("Samples/s per rank", (Query(f"rate(mlops_training_samples_total{s}[{RI}])", rk),),
                      "short", "Samples each rank processes per second; a rank below the others is a straggler.",
                      links=links),
                Panel("Steps/s per rank", (Query(f"rate(mlops_training_steps_total{s}[{RI}])", rk),),
                      "short", "Optimizer steps per second.", links=links),
                Panel("Tokens/s per job", (Query(f"sum by (job) (rate(mlops_training_tokens_total{s}[{RI}]))",
                                                 "{{job}}"),),
                      "short", "Tokens per second for language models (0 where the job does not count tokens)."),
                Panel("MFU", (Query(f"mlops_training_mfu_ratio{s}", rk),), "percentunit",
                      "Model FLOPs utilisation over the last flush interval (where the job gives its FLOPs).",
                      min=0, max=1),
                Panel("Failed steps", (Query(f"increase(mlops_training_failed_steps_total{s}[{RI}])", rk),),
                      "short", "Steps that raised an exception.", thresholds=((1, "red"),)),
            )),
            Row("Step time", (
                Panel("Step time heatmap", (Query(f"sum by (le) ({STEP_BUCKETS}{jobs})", "{{le}}"),),
                      "s", f"Distribution of step wall times across the selected jobs' ranks (steps a second "
                      f"over {c.training_rate_window}, recording rule).", kind="heatmap", width=12),
                Panel("Mean step time per rank",
                      (Query(f"rate({step}_sum{s}[{RI}]) / rate({step}_count{s}[{RI}])", rk),),
                      "s", "Mean wall time of a step.", width=12, links=links),
                Panel("Phase breakdown", (Query(f"sum by (job, phase) (rate(mlops_training_phase_seconds_total{s}"
                                                f"[{RI}])) / ignoring (phase) group_left () sum by (job) (rate("
                                                f"mlops_training_phase_seconds_total{s}[{RI}]))",
                                                "{{job}} {{phase}}"),),
                      "percentunit", "Share of each job's step time per phase (data wait, forward, backward, "
                      "optimizer, collective); data_wait above the line means an input-bound job.",
                      thresholds=((c.data_wait_ratio, "orange"),), stack=True, width=12, min=0, max=1),
                Panel("Data wait per rank", (Query(f"{PHASE_RATIO}{data_wait}", rk),),
                      "percentunit", "Share of each rank's step time waiting for its input pipeline (the recording "
                      "rule the data-bound alert reads).", thresholds=((c.data_wait_ratio, "red"),), width=12,
                      min=0, max=1),
                Panel("Straggler score", (Query(f"{STRAGGLER}{s}", rk),),
                      "short", "The other ranks' median step compute time over this rank's (1 = typical), "
                      "across every sidecar of the job.", thresholds=((c.straggler_score, "red"),), width=12,
                      links=links),
                Panel("Median step compute time",
                      (Query(f"mlops_training_step_compute_median_seconds{s}", rk + " compute"),
                       Query(f"mlops_training_step_median_seconds{s}", rk + " wall")),
                      "s", "Median over each rank's recent steps: compute (wall time less collective waits, what "
                      "the straggler score compares) and wall time (what the stall threshold multiplies).",
                      width=12, links=links),
            )),
            Row("Model", (
                Panel("Loss", (Query(f"mlops_training_loss{s}", rk),), "short", "Last recorded training loss.",
                      links=links),
                Panel("Gradient norm", (Query(f"mlops_training_grad_norm{s}", rk),), "short",
                      "Last recorded gradient norm; spikes precede divergence."),
                Panel("Learning rate", (Query(f"mlops_training_learning_rate{s}", rk),), "short",
                      "Last recorded learning rate."),
                Panel("Non-finite losses", (Query(f"increase(mlops_training_nonfinite_loss_total{s}[{RI}])", rk),),
                      "short", "NaN/Inf losses counted by the SDK.", thresholds=((1, "red"),)),
            )),
            Row("Goodput and checkpoints", (
                Panel("Time by kind", (
                    Query(f"sum by (job) (rate(mlops_training_goodput_seconds_total{s}[{RI}])) / {ranks_per_job}",
                          "{{job}} productive"),
                    Query(f"sum by (job, kind) (rate(mlops_training_badput_seconds_total{s}[{RI}])) / on (job) "
                          f"group_left () {ranks_per_job}", "{{job}} {{kind}}"),
                    Query(f"clamp_min(1 - (sum by (job) (rate(mlops_training_goodput_seconds_total{s}[{RI}])) + "
                          f"(sum by (job) (rate(mlops_training_badput_seconds_total{s}[{RI}])) or "
                          f"0 * {ranks_per_job})) / {ranks_per_job}, 0)", "{{job}} hung or unaccounted"),
                ), "percentunit", "Each job's rank time by kind, stacked to 1: productive steps, each kind of "
                   "badput (start-up, data loading, checkpoint saves, ...), and the rest, which is time no step "
                   "or phase accounted for: hung or idle.", stack=True, width=12, min=0, max=1),
                Panel("Goodput per job", (Query(f"{GOODPUT}{jobs}", "{{job}}"),),
                      "percentunit", f"Productive share of the running ranks' time over {c.goodput_window} (the "
                      "recording rule the low-goodput alert reads).", thresholds=((c.goodput_ratio, "yellow"),),
                      width=12, min=0, max=1),
                Panel("Time since last checkpoint",
                      (Query(f"time() - (max by (job) (max_over_time(mlops_training_last_checkpoint_timestamp_seconds"
                             f"{s}[{lookback}])) or min by (job) (min_over_time("
                             f"mlops_training_process_start_time_seconds{s}[{lookback}]))) and on (job) "
                             f"{ranks_per_job}", "{{job}}"),),
                      "s", "Work a failure would lose now: the age of the job's last checkpoint across restarts, "
                      "or how long it has run without one.", thresholds=((c.checkpoint_stale_seconds, "red"),)),
                Panel("Checkpoint duration (p90)",
                      (Query(f"histogram_quantile(0.9, sum by (job, le) (rate("
                             f"mlops_training_checkpoint_duration_seconds_bucket{s}[{RI}])))", "{{job}}"),),
                      "s", "Time to save a checkpoint."),
                Panel("Time since last step", (Query(f"time() - mlops_training_last_step_timestamp_seconds{s}", rk),),
                      "s", "Heartbeat age; the stall alert fires above the job's threshold (at least the line).",
                      thresholds=((c.training_stall_floor_seconds, "red"),), links=links),
                Panel("CUDA memory allocated", (Query(f"mlops_training_cuda_memory_allocated_bytes{s}", rk),),
                      "bytes", "Memory held by tensors (PyTorch allocator)."),
            )),
            Row("Rank processes", (
                Panel("Process CPU", (Query(f'rate(mlops_process_cpu_seconds_total{{job=~"$job", rank=~"$rank"}}'
                                            f"[{RI}])", rk),),
                      "percentunit", "CPU each rank's process uses (1 = one core); data loader workers count "
                      "where they are threads.", width=12),
                Panel("Process memory", (Query('mlops_process_resident_memory_bytes{job=~"$job", rank=~"$rank"}',
                                               rk),),
                      "bytes", "Resident memory of each rank's process; steady growth is a leak.", width=12),
            )),
        ],
    )  # fmt: skip


def gpu_dashboard(c: MixinConfig) -> Dashboard:
    gl = "{{node}} GPU {{gpu}}"
    n, w = c.instance, c.gpu_error_window

    def q(metric: str, legend: str = gl, *extra: str) -> Query:
        return Query(_on_node(c, f"{metric}{_gpu(c, *extra)}"), legend)

    def events(metric: str, identity: str, by: str, *extra: str) -> str:
        return _on_node(c, f"sum by ({n}, gpu, {by}) {new_or_increase(c, f'{metric}{_gpu(c, *extra)}', identity)}")

    return Dashboard(
        uid=f"{c.dashboard_uid_prefix}-gpu",
        title="mlops-obs / GPU health",
        description="Utilisation, memory, power, temperatures against limits, throttling, XID, ECC, remapping, "
        "PCIe and NVLink per GPU.",
        tags=c.dashboard_tags,
        variables=_vars(c),
        rows=[
            Row("Utilisation and memory", (
                Panel("GPU utilisation", (q("mlops_gpu_utilization_ratio"),), "percentunit",
                      "Fraction of time a kernel ran; below the line the GPU counts as idle.",
                      thresholds=((c.gpu_idle_utilization, "blue"),), min=0, max=1),
                Panel("SM / tensor activity", (q("mlops_gpu_sm_active_ratio", gl + " SM"),
                                               q("mlops_gpu_tensor_active_ratio", gl + " tensor")),
                      "percentunit", "Profiling ratios (Hopper+ GPM): how busy the SMs and tensor cores really are.",
                      min=0, max=1),
                Panel("Memory used", (Query(_on_node(c, f"mlops_gpu_memory_used_bytes{_gpu(c)} / on ({n}, gpu) "
                                                        f"group_left () mlops_gpu_memory_total_bytes{_gpu(c)}"), gl),),
                      "percentunit", "Used over total device memory.",
                      thresholds=((c.gpu_memory_full_ratio, "red"),), min=0, max=1),
            )),
            Row("Power and temperature", (
                Panel("Power", (q("mlops_gpu_power_usage_watts"), q("mlops_gpu_power_limit_watts", gl + " limit")),
                      "watt", "Board power against its enforced limit."),
                Panel("Temperature", (q("mlops_gpu_temperature_celsius"),
                                      q("mlops_gpu_slowdown_temperature_celsius", gl + " slowdown"),
                                      q("mlops_gpu_memory_temperature_celsius", gl + " memory")),
                      "celsius", "Core and memory temperature against the slowdown limit.",
                      thresholds=((c.hot_idle_temperature_celsius, "orange"),)),
                Panel("Throttling", (Query(_on_node(c, f"{THROTTLE}{_gpu(c)}"), gl + " {{class}}"),), "percentunit",
                      f"Fraction of time clocks were held down over {c.node_rate_window}, by class of reason (the "
                      "recording rule the throttle alerts read).", thresholds=((c.throttle_ratio, "red"),)),
            )),
            Row("Errors", (
                Panel("XID errors", (Query(events("mlops_gpu_xid_errors_total", "gpu, xid", "xid"),
                                           gl + " XID {{xid}}"),),
                      "short", f"XIDs by code over the last {w}, the first of a code included (its counter "
                      "appears at 1).", thresholds=((1, "red"),)),
                Panel("ECC errors", (Query(_on_node(c, f"sum by ({n}, gpu, type) ({ECC_ERRORS}{_gpu(c)})"),
                                           gl + " {{type}}"),),
                      "short", f"Volatile corrected and uncorrected ECC errors over the last {w}, counting what a "
                      "GPU already had when its series appeared.", thresholds=((1, "red"),)),
                Panel("Remapped rows", (q("mlops_gpu_remapped_rows_total", gl + " {{type}}"),
                                        q("mlops_gpu_remap_pending", gl + " pending"),
                                        q("mlops_gpu_remap_failure", gl + " failure")),
                      "short", "Rows remapped so far, a pending remap (needs reset), a failed remap (RMA).",
                      thresholds=((1, "red"),)),
                Panel("GPU lost", (q("mlops_gpu_lost"),), "bool", "1 when the GPU fell off the bus.",
                      thresholds=((1, "red"),)),
            )),
            Row("Interconnect", (
                Panel("PCIe link width", (q("mlops_gpu_pcie_link_width"), q("mlops_gpu_pcie_link_width_max",
                                                                            gl + " max")),
                      "short", "Current link width against the maximum."),
                Panel("PCIe replays", (Query(_on_node(c, f"increase(mlops_gpu_pcie_replays_total{_gpu(c)}[{w}])"),
                                             gl),),
                      "short", "PCIe replays over the alert window.",
                      thresholds=((c.pcie_replays_threshold, "red"),)),
                Panel("PCIe throughput", tuple(
                    # The byte counters where the driver has them, else the sampled rate older drivers give.
                    Query(_on_node(c, f"(rate(mlops_gpu_pcie_{d}_bytes_total{_gpu(c)}[{RI}]) "
                                      f"or mlops_gpu_pcie_{d}_bytes_per_second{_gpu(c)})"), gl + f" {short}")
                    for d, short in (("transmit", "tx"), ("receive", "rx"))),
                      "Bps", "Host <-> device traffic."),
                Panel("NVLink traffic", tuple(
                    Query(_on_node(c, f"{NVLINK_BYTES[d]}{_gpu(c)}"), gl + f" {short}")
                    for d, short in (("transmit", "tx"), ("receive", "rx"))),
                      "Bps", f"NVLink bytes per second over {c.node_rate_window}, sent and received (all links)."),
                Panel("NVLink errors", (Query(_on_node(c, f"{NVLINK_ERRORS}{_gpu(c)}"), gl),),
                      "short", "NVLink errors of all links over the alert window (per link: the sidecar's "
                      "--gpu.profile=full, or nvidia-smi nvlink -e on the node).",
                      thresholds=((c.nvlink_errors_threshold, "red"),)),
            )),
        ],
    )  # fmt: skip


def node_dashboard(c: MixinConfig) -> Dashboard:
    n = c.instance
    nl = "{{node}}"
    h = _host(c)

    def by_node(expr: str, legend: str = nl) -> tuple[Query, ...]:
        return (Query(_on_node(c, expr), legend),)

    return Dashboard(
        uid=f"{c.dashboard_uid_prefix}-node",
        title="mlops-obs / Node",
        description="CPU, memory, PSI, disks, network and InfiniBand of the training nodes.",
        tags=c.dashboard_tags,
        variables=_vars(c),
        rows=[
            Row("CPU and memory", (
                Panel("CPU busy", by_node(f"(1 - sum by ({n}) (rate(mlops_node_cpu_seconds_total{_host(c, IDLE)}"
                                          f"[{RI}])) / sum by ({n}) (mlops_node_cpus{h}))"),
                      "percentunit", "Non-idle CPU share.", thresholds=((c.cpu_busy_ratio, "red"),), min=0, max=1),
                Panel("Load", by_node(f"(mlops_node_load{_host(c, LOAD1)} / on ({n}) group_left () "
                                      f"mlops_node_cpus{h})"),
                      "short", "1-minute load per CPU.", thresholds=((1, "orange"),)),
                Panel("Memory available", by_node(f"(mlops_node_memory_available_bytes{h} / "
                                                  f"mlops_node_memory_total_bytes{h})"),
                      "percentunit", "Available over total memory.",
                      thresholds=((c.memory_available_ratio, "red"),), min=0, max=1),
            )),
            Row("Pressure (PSI)", (
                Panel("CPU waiting", by_node(f"rate(mlops_node_pressure_cpu_waiting_seconds_total{h}[{RI}])"),
                      "percentunit", "Time some task waited for a CPU.",
                      thresholds=((c.cpu_pressure_ratio, "red"),)),
                Panel("Memory stalled", by_node(f"rate(mlops_node_pressure_memory_stalled_seconds_total{h}[{RI}])"),
                      "percentunit", "Time all tasks stalled on memory.",
                      thresholds=((c.memory_pressure_ratio, "red"),)),
                Panel("I/O stalled", by_node(f"rate(mlops_node_pressure_io_stalled_seconds_total{h}[{RI}])"),
                      "percentunit", "Time all tasks stalled on I/O.", thresholds=((c.io_pressure_ratio, "red"),)),
            )),
            Row("Disks and filesystems", (
                Panel("Disk busy", by_node(f"rate(mlops_node_disk_io_time_seconds_total{h}[{RI}])",
                                           nl + " {{device}}"),
                      "percentunit", "Time with I/O in flight.", thresholds=((c.disk_io_busy_ratio, "red"),)),
                Panel("Disk throughput", (*by_node(f"rate(mlops_node_disk_read_bytes_total{h}[{RI}])",
                                                   nl + " {{device}} read"),
                                          *by_node(f"rate(mlops_node_disk_written_bytes_total{h}[{RI}])",
                                                   nl + " {{device}} write")),
                      "Bps", "Bytes read and written."),
                Panel("Filesystem free", by_node(f"(mlops_node_filesystem_avail_bytes{_host(c, c.filesystem_selector)}"
                                                 f" / mlops_node_filesystem_size_bytes"
                                                 f"{_host(c, c.filesystem_selector)})", nl + " {{mountpoint}}"),
                      "percentunit", "Free share per filesystem.",
                      thresholds=((c.filesystem_full_avail_ratio, "red"),
                                  (c.filesystem_filling_avail_ratio, "yellow")), min=0, max=1),
            )),
            Row("Network", (
                Panel("Network throughput", (*by_node(f"rate(mlops_node_network_receive_bytes_total{h}[{RI}])",
                                                      nl + " {{device}} rx"),
                                             *by_node(f"rate(mlops_node_network_transmit_bytes_total{h}[{RI}])",
                                                      nl + " {{device}} tx")),
                      "Bps", "Ethernet bytes per second."),
                Panel("Network errors", by_node(f"(rate(mlops_node_network_receive_errors_total{h}[{RI}]) + "
                                                f"rate(mlops_node_network_transmit_errors_total{h}[{RI}]))",
                                                nl + " {{device}}"),
                      "short", "Receive + transmit errors per second.",
                      thresholds=((c.network_errors_per_second, "red"),)),
                Panel("InfiniBand throughput", (
                    *by_node(f"rate(mlops_node_infiniband_port_receive_bytes_total{h}[{RI}])",
                             nl + " {{device}}:{{port}} rx"),
                    *by_node(f"rate(mlops_node_infiniband_port_transmit_bytes_total{h}[{RI}])",
                             nl + " {{device}}:{{port}} tx")),
                      "Bps", "InfiniBand port bytes per second."),
                Panel("InfiniBand errors", by_node(f"increase(mlops_node_infiniband_port_errors_total{h}"
                                                   f"[{c.gpu_error_window}])", nl + " {{device}}:{{port}} {{type}}"),
                      "short", "Port errors over the alert window.",
                      thresholds=((c.infiniband_errors_threshold, "red"),)),
                Panel("Clock offset", by_node(f"mlops_node_timex_offset_seconds{h}"), "s",
                      "Offset from the NTP reference.", thresholds=((c.clock_offset_seconds, "red"),)),
            )),
        ],
    )  # fmt: skip


def pipeline_dashboard(c: MixinConfig) -> Dashboard:
    nl = "{{node}}"
    h = _host(c)
    sh = selector(c.shipper_selector)

    def by_node(expr: str, legend: str = nl) -> Query:
        return Query(_on_node(c, expr), legend)

    return Dashboard(
        uid=f"{c.dashboard_uid_prefix}-pipeline",
        title="mlops-obs / Exporter and shipper",
        description="The observability pipeline itself: sidecar health, collectors, scrape cost, log shipping.",
        tags=c.dashboard_tags,
        variables=_vars(c),
        rows=[
            Row("Exporter", (
                Panel("Sidecars up", (by_node(f"up{h}", nl + " {{instance}}"),), "bool",
                      "1 when Prometheus scrapes the sidecar.", thresholds=((1, "green"),)),
                Panel("Collector success", (by_node(f"mlops_scrape_collector_success{h}", nl + " {{collector}}"),),
                      "bool", "0: failing, abandoned or unavailable on this node."),
                Panel("Collector duration", (by_node(f"mlops_scrape_collector_duration_seconds{h}",
                                                     nl + " {{collector}}"),),
                      "s", "Time each collector's last sample took (off the scrape path).",
                      thresholds=((c.collector_slow_seconds, "red"),)),
                Panel("Scrape duration", (by_node(f"scrape_duration_seconds{h}"),), "s",
                      "How long Prometheus' scrape of the sidecar took.",
                      thresholds=((c.scrape_slow_seconds, "red"),)),
                Panel("Exporter CPU", (by_node(f"rate(mlops_exporter_cpu_seconds_total{h}[{RI}])"),
                                       by_node(f"rate(mlops_scrape_collector_cpu_seconds_total{h}[{RI}])",
                                               nl + " {{collector}}")),
                      "percentunit", "CPU the sidecar itself uses, and the share of each collector's rounds."),
                Panel("Exporter memory", (by_node(f"mlops_exporter_resident_memory_bytes{h}"),), "bytes",
                      "Resident memory of the sidecar."),
            )),
            Row("Shipper", (
                Panel("Lines read / events shipped", (by_node(f"rate(mlops_shipper_lines_read_total{sh}[{RI}])",
                                                              nl + " read"),
                                                      by_node(f"rate(mlops_shipper_events_shipped_total{sh}[{RI}])",
                                                              nl + " shipped")),
                      "short", "Per second."),
                Panel("Shipper lag", (by_node(f"mlops_shipper_lag_bytes{sh}", nl + " {{file}}"),), "bytes",
                      "Bytes written but not shipped.", thresholds=((c.shipper_lag_bytes, "red"),)),
                Panel("Retries and dead letters", (by_node(f"increase(mlops_shipper_retries_total{sh}[{RI}])",
                                                           nl + " retries"),
                                                   by_node(f"increase(mlops_shipper_dead_letters_total{sh}[{RI}])",
                                                           nl + " dead letters")),
                      "short", "Deliveries retried and events given up on.", thresholds=((1, "red"),)),
            )),
        ],
    )  # fmt: skip


def overview_dashboard(c: MixinConfig) -> Dashboard:
    """The fleet view: every query reads recording rules or one series a node, so it stays fast at
    thousands of nodes (docs/scale.md)."""
    h = selector(c.exporter_selector)
    return Dashboard(
        uid=f"{c.dashboard_uid_prefix}-overview",
        title="mlops-obs / Cluster overview",
        description="Jobs, nodes, GPUs and firing alerts across the cluster.",
        tags=c.dashboard_tags,
        variables=_vars(c),
        rows=[
            Row("Cluster", (
                Panel("Training jobs", (Query(f"count({JOB_RANKS}) or vector(0)"),),
                      "short", "Jobs with running ranks (finished and failed ones are left out).", kind="stat",
                      width=3, height=4),
                Panel("Ranks", (Query(f"sum({JOB_RANKS}) or vector(0)"),), "short",
                      "Running ranks.", kind="stat", width=3, height=4),
                Panel("Failed ranks", (Query(f"sum({JOB_FAILED_RANKS}) or vector(0)"),),
                      "short", "Ranks that failed, until their sidecar forgets them.", thresholds=((1, "red"),),
                      kind="stat", width=3, height=4),
                Panel("Nodes", (Query(f"count(count by (node) ({NODE_INFO})) or vector(0)"),), "short",
                      "Nodes with a sidecar Prometheus knows.", kind="stat", width=3, height=4),
                Panel("Sidecars down", (Query(f"count(up{h} == 0) or vector(0)"),), "short",
                      "Sidecars Prometheus cannot scrape.", thresholds=((1, "red"),), kind="stat", width=4, height=4),
                Panel("GPUs", (Query(f"sum(mlops_gpu_devices{selector(c.gpu_selector)}) or vector(0)"),), "short",
                      "GPUs visible to the sidecars.", kind="stat", width=4, height=4),
                Panel("Critical alerts", (Query('count(ALERTS{alertstate="firing", severity="critical"}) '
                                                "or vector(0)"),),
                      "short", "Firing critical alerts.", thresholds=((1, "red"),), kind="stat", width=4, height=4),
            )),
            Row("Jobs", (
                Panel("Samples/s per job", (Query(SAMPLES_RECENT, "{{job}}"),),
                      "short", f"Training throughput by job over {c.training_rate_window} (recording rule).",
                      width=12),
                Panel("Goodput per job", (Query(GOODPUT, "{{job}}"),), "percentunit",
                      f"Productive share of the running ranks' time over {c.goodput_window} (recording rule).",
                      thresholds=((c.goodput_ratio, "yellow"),), width=12, min=0, max=1),
                Panel("Mean GPU utilisation", (Query(CLUSTER_GPU_UTIL, "all GPUs"), Query(JOB_GPU_UTIL, "{{job}}")),
                      "percentunit", "Average across every GPU, and across each job's GPUs (recording rules).",
                      thresholds=((c.gpu_idle_utilization, "blue"),), width=12, min=0, max=1),
                Panel("Firing alerts", (Query('sum by (alertname, severity) (ALERTS{alertstate="firing"})',
                                              "{{alertname}} ({{severity}})"),),
                      "short", "Alerts firing now, by name.", thresholds=((1, "red"),), width=12),
            )),
        ],
    )  # fmt: skip


def dashboards(c: MixinConfig) -> dict[str, Dashboard]:
    """File stem -> dashboard."""
    return {
        "overview": overview_dashboard(c),
        "training": training_dashboard(c),
        "gpu": gpu_dashboard(c),
        "node": node_dashboard(c),
        "pipeline": pipeline_dashboard(c),
    }
