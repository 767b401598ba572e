"""The dashboards, described with :mod:`mlops_obs.mixin.grafana`'s neutral types.

Thresholds come from :class:`MixinConfig`, the same fields the alerts use. Panel queries filter on the
dashboard variables (``$job``, ``$node``, ``$rank``, ``$gpu``) and use ``$__rate_interval`` so they stay
correct at any scrape interval.
"""

from __future__ import annotations

from urllib.parse import quote

from mlops_obs.mixin.config import MixinConfig, selector
from mlops_obs.mixin.grafana import Dashboard, Link, Panel, Query, Row, Variable

RI = "$__rate_interval"
VOLATILE, IDLE, LOAD1 = 'scope="volatile"', 'mode="idle"', 'window="1m"'


def _vars(c: MixinConfig) -> list[Variable]:
    n = c.node_label
    t = c.training_selector
    return [
        Variable("datasource", "Data source", ""),
        Variable("job", "Job", f"label_values(mlops_training_world_size{selector(t)}, job)"),
        Variable(
            "node",
            "Node",
            f'label_values({{__name__=~"mlops_training_world_size|mlops_node_cpus", job=~"$job"}}, {n})',
        ),
        Variable("rank", "Rank", f'label_values(mlops_training_world_size{{job=~"$job", {n}=~"$node"}}, rank)'),
        Variable("gpu", "GPU", f'label_values(mlops_gpu_utilization_ratio{{{n}=~"$node"}}, gpu)'),
    ]


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


def _ts(c: MixinConfig) -> str:
    return selector(c.training_selector, 'job=~"$job"', 'rank=~"$rank"', f'{c.node_label}=~"$node"')


def _host(c: MixinConfig, *extra: str) -> str:
    return selector(c.exporter_selector, f'{c.node_label}=~"$node"', *extra)


def _gpu(c: MixinConfig, *extra: str) -> str:
    return selector(c.gpu_selector, f'{c.node_label}=~"$node"', 'gpu=~"$gpu"', *extra)


def training_dashboard(c: MixinConfig) -> Dashboard:
    s = _ts(c)
    links = _logs_links(c)
    rk = "{{job}} rank {{rank}}"
    step = "mlops_training_step_duration_seconds"
    return Dashboard(
        uid=f"{c.dashboard_uid_prefix}-training",
        title="mlops-obs / Training job",
        description="Throughput, step time, phases, loss, goodput, stragglers and checkpoints per rank.",
        tags=c.dashboard_tags,
        variables=_vars(c),
        rows=[
            Row("Throughput", (
                Panel("Samples/s per rank", (Query(f"rate(mlops_training_samples_total{s}[{RI}])", rk),),
                      "short", "Samples each rank processes per second; a rank below the others is a straggler.",
                      links=links),
                Panel("Steps/s per rank", (Query(f"rate(mlops_training_steps_total{s}[{RI}])", rk),),
                      "short", "Optimizer steps per second.", links=links),
                Panel("Tokens/s per job", (Query(f"sum by (job) (rate(mlops_training_tokens_total{s}[{RI}]))",
                                                 "{{job}}"),),
                      "short", "Tokens per second for language models (0 where the job does not count tokens)."),
            )),
            Row("Step time", (
                Panel("Step time heatmap", (Query(f"sum by (le) (increase({step}_bucket{s}[{RI}]))", "{{le}}"),),
                      "s", "Distribution of step wall times across the selected ranks.", kind="heatmap",
                      width=12),
                Panel("Mean step time per rank",
                      (Query(f"rate({step}_sum{s}[{RI}]) / rate({step}_count{s}[{RI}])", rk),),
                      "s", "Mean wall time of a step.", width=12, links=links),
                Panel("Phase breakdown", (Query(f"sum by (phase) (rate(mlops_training_phase_seconds_total{s}[{RI}]))"
                                                f" / ignoring (phase) group_left () sum(rate("
                                                f"mlops_training_phase_seconds_total{s}[{RI}]))", "{{phase}}"),),
                      "percentunit", "Share of step time per phase (data wait, forward, backward, optimizer, "
                      "collective); data_wait above the line means an input-bound job.",
                      thresholds=((c.data_wait_ratio, "orange"),), stack=True, width=12, min=0, max=1),
                Panel("Straggler score", (Query(f"mlops_training_straggler_score{s}", rk),),
                      "short", "Typical rank's step time over this rank's (1 = typical).",
                      thresholds=((c.straggler_score, "red"),), width=12, links=links),
            )),
            Row("Model", (
                Panel("Loss", (Query(f"mlops_training_loss{s}", rk),), "short", "Last recorded training loss.",
                      links=links),
                Panel("Gradient norm", (Query(f"mlops_training_grad_norm{s}", rk),), "short",
                      "Last recorded gradient norm; spikes precede divergence."),
                Panel("Non-finite losses", (Query(f"increase(mlops_training_nonfinite_loss_total{s}[{RI}])", rk),),
                      "short", "NaN/Inf losses counted by the SDK.", thresholds=((1, "red"),)),
            )),
            Row("Goodput and checkpoints", (
                Panel("Goodput ratio", (Query(f"sum by (job) (rate(mlops_training_goodput_seconds_total{s}[{RI}])) / "
                                              f"(sum by (job) (rate(mlops_training_goodput_seconds_total{s}[{RI}])) + "
                                              f"sum by (job) (rate(mlops_training_badput_seconds_total{s}[{RI}])))",
                                              "{{job}}"),),
                      "percentunit", "Productive share of wall time.",
                      thresholds=((c.goodput_ratio, "yellow"),), min=0, max=1),
                Panel("Badput by kind", (Query(f"sum by (kind) (rate(mlops_training_badput_seconds_total{s}[{RI}]))",
                                               "{{kind}}"),),
                      "percentunit", "Seconds per second lost to each kind of badput.", stack=True),
                Panel("Time since last checkpoint",
                      (Query(f"time() - mlops_training_last_checkpoint_timestamp_seconds{s}", rk),),
                      "s", "Work a failure would lose now.", thresholds=((c.checkpoint_stale_seconds, "red"),)),
                Panel("Checkpoint duration (p90)",
                      (Query(f"histogram_quantile(0.9, sum by (job, le) (rate("
                             f"mlops_training_checkpoint_duration_seconds_bucket{s}[{RI}])))", "{{job}}"),),
                      "s", "Time to save a checkpoint."),
                Panel("Time since last step", (Query(f"time() - mlops_training_last_step_timestamp_seconds{s}", rk),),
                      "s", "Heartbeat age; the stall alert fires above the line.",
                      thresholds=((c.training_stall_seconds, "red"),), links=links),
                Panel("CUDA memory allocated", (Query(f"mlops_training_cuda_memory_allocated_bytes{s}", rk),),
                      "bytes", "Memory held by tensors (PyTorch allocator)."),
            )),
        ],
    )  # fmt: skip


def gpu_dashboard(c: MixinConfig) -> Dashboard:
    gl = "{{" + c.node_label + "}} GPU {{gpu}}"
    n = c.node_label

    def q(metric: str, *extra: str) -> tuple[Query, ...]:
        return (Query(f"{metric}{_gpu(c, *extra)}", gl),)

    def rate(metric: str, by: str = "") -> tuple[Query, ...]:
        inner = f"rate({metric}{_gpu(c)}[{RI}])"
        legend = gl + (f" {{{{{by}}}}}" if by else "")
        return (Query(f"sum by ({n}, gpu{', ' + by if by else ''}) ({inner})", legend),)

    return Dashboard(
        uid=f"{c.dashboard_uid_prefix}-gpu",
        title="mlops-obs / GPU health",
        description="Utilisation, memory, power, temperatures against limits, throttling, XID, ECC, remapping, "
        "PCIe and NVLink per GPU.",
        tags=c.dashboard_tags,
        variables=_vars(c),
        rows=[
            Row("Utilisation and memory", (
                Panel("GPU utilisation", q("mlops_gpu_utilization_ratio"), "percentunit",
                      "Fraction of time a kernel ran; below the line the GPU counts as idle.",
                      thresholds=((c.gpu_idle_utilization, "blue"),), min=0, max=1),
                Panel("SM / tensor activity", (Query(f"mlops_gpu_sm_active_ratio{_gpu(c)}", gl + " SM"),
                                               Query(f"mlops_gpu_tensor_active_ratio{_gpu(c)}", gl + " tensor")),
                      "percentunit", "Profiling ratios (Hopper+ GPM): how busy the SMs and tensor cores really are.",
                      min=0, max=1),
                Panel("Memory used", (Query(f"mlops_gpu_memory_used_bytes{_gpu(c)} / on ({n}, gpu) group_left () "
                                            f"mlops_gpu_memory_total_bytes{_gpu(c)}", gl),),
                      "percentunit", "Used over total device memory.",
                      thresholds=((c.gpu_memory_full_ratio, "red"),), min=0, max=1),
            )),
            Row("Power and temperature", (
                Panel("Power", (Query(f"mlops_gpu_power_usage_watts{_gpu(c)}", gl),
                                Query(f"mlops_gpu_power_limit_watts{_gpu(c)}", gl + " limit")),
                      "watt", "Board power against its enforced limit."),
                Panel("Temperature", (Query(f"mlops_gpu_temperature_celsius{_gpu(c)}", gl),
                                      Query(f"mlops_gpu_slowdown_temperature_celsius{_gpu(c)}", gl + " slowdown"),
                                      Query(f"mlops_gpu_memory_temperature_celsius{_gpu(c)}", gl + " memory")),
                      "celsius", "Core and memory temperature against the slowdown limit.",
                      thresholds=((c.hot_idle_temperature_celsius, "orange"),)),
                Panel("Throttling", rate("mlops_gpu_throttle_seconds_total", "reason"), "percentunit",
                      "Fraction of time clocks were held down, by reason.", thresholds=((c.throttle_ratio, "red"),)),
            )),
            Row("Errors", (
                Panel("XID errors", (Query(f"sum by ({n}, gpu, xid) (increase(mlops_gpu_xid_errors_total{_gpu(c)}"
                                           f"[{c.gpu_error_window}]))", gl + " XID {{xid}}"),),
                      "short", "XIDs by code over the alert window.", thresholds=((1, "red"),)),
                Panel("ECC errors", (Query(f"sum by ({n}, gpu, type) (increase(mlops_gpu_ecc_errors_total"
                                           f"{_gpu(c, VOLATILE)}[{c.gpu_error_window}]))",
                                           gl + " {{type}}"),),
                      "short", "Volatile corrected and uncorrected ECC errors.", thresholds=((1, "red"),)),
                Panel("Remapped rows", (Query(f"mlops_gpu_remapped_rows_total{_gpu(c)}", gl + " {{type}}"),
                                        Query(f"mlops_gpu_remap_pending{_gpu(c)}", gl + " pending"),
                                        Query(f"mlops_gpu_remap_failure{_gpu(c)}", gl + " failure")),
                      "short", "Rows remapped so far, a pending remap (needs reset), a failed remap (RMA).",
                      thresholds=((1, "red"),)),
                Panel("GPU lost", q("mlops_gpu_lost"), "bool", "1 when the GPU fell off the bus.",
                      thresholds=((1, "red"),)),
            )),
            Row("Interconnect", (
                Panel("PCIe link width", (Query(f"mlops_gpu_pcie_link_width{_gpu(c)}", gl),
                                          Query(f"mlops_gpu_pcie_link_width_max{_gpu(c)}", gl + " max")),
                      "short", "Current link width against the maximum."),
                Panel("PCIe replays", (Query(f"increase(mlops_gpu_pcie_replays_total{_gpu(c)}"
                                             f"[{c.gpu_error_window}])", gl),),
                      "short", "PCIe replays over the alert window.",
                      thresholds=((c.pcie_replays_threshold, "red"),)),
                Panel("PCIe throughput", tuple(
                    # The byte counters where the driver has them, else the sampled rate older drivers give.
                    Query(f"rate(mlops_gpu_pcie_{d}_bytes_total{_gpu(c)}[{RI}]) "
                          f"or mlops_gpu_pcie_{d}_bytes_per_second{_gpu(c)}", gl + f" {short}")
                    for d, short in (("transmit", "tx"), ("receive", "rx"))),
                      "Bps", "Host <-> device traffic."),
                Panel("NVLink traffic", rate("mlops_gpu_nvlink_transmit_bytes_total"), "Bps",
                      "NVLink bytes sent per second (all links)."),
                Panel("NVLink errors", (Query(f"sum by ({n}, gpu, link) (increase(mlops_gpu_nvlink_errors_total"
                                              f"{_gpu(c)}[{c.gpu_error_window}]))", gl + " link {{link}}"),),
                      "short", "NVLink errors over the alert window.",
                      thresholds=((c.nvlink_errors_threshold, "red"),)),
            )),
        ],
    )  # fmt: skip


def node_dashboard(c: MixinConfig) -> Dashboard:
    n = c.node_label
    nl = "{{" + n + "}}"
    h = _host(c)
    return Dashboard(
        uid=f"{c.dashboard_uid_prefix}-node",
        title="mlops-obs / Node",
        description="CPU, memory, PSI, disks, network and InfiniBand of the training nodes.",
        tags=c.dashboard_tags,
        variables=_vars(c),
        rows=[
            Row("CPU and memory", (
                Panel("CPU busy", (Query(f"1 - sum by ({n}) (rate(mlops_node_cpu_seconds_total"
                                         f"{_host(c, IDLE)}[{RI}])) / sum by ({n}) (mlops_node_cpus{h})",
                                         nl),),
                      "percentunit", "Non-idle CPU share.", thresholds=((c.cpu_busy_ratio, "red"),), min=0, max=1),
                Panel("Load", (Query(f"mlops_node_load{_host(c, LOAD1)} / on ({n}) "
                                     f"group_left () mlops_node_cpus{h}", nl),),
                      "short", "1-minute load per CPU.", thresholds=((1, "orange"),)),
                Panel("Memory available", (Query(f"mlops_node_memory_available_bytes{h} / "
                                                 f"mlops_node_memory_total_bytes{h}", nl),),
                      "percentunit", "Available over total memory.",
                      thresholds=((c.memory_available_ratio, "red"),), min=0, max=1),
            )),
            Row("Pressure (PSI)", (
                Panel("CPU waiting", (Query(f"rate(mlops_node_pressure_cpu_waiting_seconds_total{h}[{RI}])", nl),),
                      "percentunit", "Time some task waited for a CPU.",
                      thresholds=((c.cpu_pressure_ratio, "red"),)),
                Panel("Memory stalled", (Query(f"rate(mlops_node_pressure_memory_stalled_seconds_total{h}[{RI}])",
                                               nl),),
                      "percentunit", "Time all tasks stalled on memory.",
                      thresholds=((c.memory_pressure_ratio, "red"),)),
                Panel("I/O stalled", (Query(f"rate(mlops_node_pressure_io_stalled_seconds_total{h}[{RI}])", nl),),
                      "percentunit", "Time all tasks stalled on I/O.", thresholds=((c.io_pressure_ratio, "red"),)),
            )),
            Row("Disks and filesystems", (
                Panel("Disk busy", (Query(f"rate(mlops_node_disk_io_time_seconds_total{h}[{RI}])",
                                          nl + " {{device}}"),),
                      "percentunit", "Time with I/O in flight.", thresholds=((c.disk_io_busy_ratio, "red"),)),
                Panel("Disk throughput", (Query(f"rate(mlops_node_disk_read_bytes_total{h}[{RI}])",
                                                nl + " {{device}} read"),
                                          Query(f"rate(mlops_node_disk_written_bytes_total{h}[{RI}])",
                                                nl + " {{device}} write")),
                      "Bps", "Bytes read and written."),
                Panel("Filesystem free", (Query(f"mlops_node_filesystem_avail_bytes{_host(c, c.filesystem_selector)}"
                                                f" / mlops_node_filesystem_size_bytes"
                                                f"{_host(c, c.filesystem_selector)}", nl + " {{mountpoint}}"),),
                      "percentunit", "Free share per filesystem.",
                      thresholds=((c.filesystem_full_avail_ratio, "red"),
                                  (c.filesystem_filling_avail_ratio, "yellow")), min=0, max=1),
            )),
            Row("Network", (
                Panel("Network throughput", (Query(f"rate(mlops_node_network_receive_bytes_total{h}[{RI}])",
                                                   nl + " {{device}} rx"),
                                             Query(f"rate(mlops_node_network_transmit_bytes_total{h}[{RI}])",
                                                   nl + " {{device}} tx")),
                      "Bps", "Ethernet bytes per second."),
                Panel("Network errors", (Query(f"rate(mlops_node_network_receive_errors_total{h}[{RI}]) + "
                                               f"rate(mlops_node_network_transmit_errors_total{h}[{RI}])",
                                               nl + " {{device}}"),),
                      "short", "Receive + transmit errors per second.",
                      thresholds=((c.network_errors_per_second, "red"),)),
                Panel("InfiniBand throughput", (Query(f"rate(mlops_node_infiniband_port_receive_bytes_total{h}[{RI}])",
                                                      nl + " {{device}}:{{port}} rx"),
                                                Query(f"rate(mlops_node_infiniband_port_transmit_bytes_total{h}"
                                                      f"[{RI}])", nl + " {{device}}:{{port}} tx")),
                      "Bps", "InfiniBand port bytes per second."),
                Panel("InfiniBand errors", (Query(f"increase(mlops_node_infiniband_port_errors_total{h}"
                                                  f"[{c.gpu_error_window}])", nl + " {{device}}:{{port}} {{type}}"),),
                      "short", "Port errors over the alert window.",
                      thresholds=((c.infiniband_errors_threshold, "red"),)),
                Panel("Clock offset", (Query(f"mlops_node_timex_offset_seconds{h}", nl),), "s",
                      "Offset from the NTP reference.", thresholds=((c.clock_offset_seconds, "red"),)),
            )),
        ],
    )  # fmt: skip


def pipeline_dashboard(c: MixinConfig) -> Dashboard:
    n = c.node_label
    nl = "{{" + n + "}}"
    h = _host(c)
    sh = selector(c.shipper_selector, f'{n}=~"$node"')
    return Dashboard(
        uid=f"{c.dashboard_uid_prefix}-pipeline",
        title="mlops-obs / Exporter and shipper",
        description="The observability pipeline itself: sidecar health, collectors, scrape cost, log shipping.",
        tags=c.dashboard_tags,
        variables=_vars(c),
        rows=[
            Row("Exporter", (
                Panel("Sidecars up", (Query(f"up{h}", nl),), "bool", "1 when Prometheus scrapes the sidecar.",
                      thresholds=((1, "green"),)),
                Panel("Collector success", (Query(f"mlops_scrape_collector_success{h}", nl + " {{collector}}"),),
                      "bool", "0: failing, abandoned or unavailable on this node."),
                Panel("Collector duration", (Query(f"mlops_scrape_collector_duration_seconds{h}",
                                                   nl + " {{collector}}"),),
                      "s", "Time each collector's last sample took (off the scrape path).",
                      thresholds=((c.collector_slow_seconds, "red"),)),
                Panel("Scrape duration", (Query(f"scrape_duration_seconds{h}", nl),), "s",
                      "How long Prometheus' scrape of the sidecar took.",
                      thresholds=((c.scrape_slow_seconds, "red"),)),
                Panel("Exporter CPU", (Query(f"rate(mlops_exporter_cpu_seconds_total{h}[{RI}])", nl),
                                       Query(f"rate(mlops_scrape_collector_cpu_seconds_total{h}[{RI}])",
                                             nl + " {{collector}}")),
                      "percentunit", "CPU the sidecar itself uses, and the share of each collector's rounds."),
                Panel("Exporter memory", (Query(f"mlops_exporter_resident_memory_bytes{h}", nl),), "bytes",
                      "Resident memory of the sidecar."),
            )),
            Row("Shipper", (
                Panel("Lines read / events shipped", (Query(f"rate(mlops_shipper_lines_read_total{sh}[{RI}])",
                                                            nl + " read"),
                                                      Query(f"rate(mlops_shipper_events_shipped_total{sh}[{RI}])",
                                                            nl + " shipped")),
                      "short", "Per second."),
                Panel("Shipper lag", (Query(f"mlops_shipper_lag_bytes{sh}", nl + " {{file}}"),), "bytes",
                      "Bytes written but not shipped.", thresholds=((c.shipper_lag_bytes, "red"),)),
                Panel("Retries and dead letters", (Query(f"increase(mlops_shipper_retries_total{sh}[{RI}])",
                                                         nl + " retries"),
                                                   Query(f"increase(mlops_shipper_dead_letters_total{sh}[{RI}])",
                                                         nl + " dead letters")),
                      "short", "Deliveries retried and events given up on.", thresholds=((1, "red"),)),
            )),
        ],
    )  # fmt: skip


def overview_dashboard(c: MixinConfig) -> Dashboard:
    t = c.training_selector
    h = selector(c.exporter_selector)
    return Dashboard(
        uid=f"{c.dashboard_uid_prefix}-overview",
        title="mlops-obs / Cluster overview",
        description="Jobs, nodes, GPUs and firing alerts across the cluster.",
        tags=c.dashboard_tags,
        variables=_vars(c),
        rows=[
            Row("Cluster", (
                Panel("Training jobs", (Query(f"count(count by (job) (mlops_training_world_size{selector(t)}))"),),
                      "short", "Jobs with live ranks.", kind="stat", width=4, height=4),
                Panel("Ranks", (Query(f"count(mlops_training_world_size{selector(t)})"),), "short",
                      "Live ranks.", kind="stat", width=4, height=4),
                Panel("Nodes up", (Query(f"sum(up{h})"),), "short", "Sidecars Prometheus can scrape.",
                      kind="stat", width=4, height=4),
                Panel("Nodes down", (Query(f"count(up{h} == 0) or vector(0)"),), "short",
                      "Sidecars Prometheus cannot scrape.", thresholds=((1, "red"),), kind="stat", width=4, height=4),
                Panel("GPUs", (Query(f"sum(mlops_gpu_devices{selector(c.gpu_selector)}) or vector(0)"),), "short",
                      "GPUs visible to the sidecars.", kind="stat", width=4, height=4),
                Panel("Critical alerts", (Query('count(ALERTS{alertstate="firing", severity="critical"}) '
                                                "or vector(0)"),),
                      "short", "Firing critical alerts.", thresholds=((1, "red"),), kind="stat", width=4, height=4),
            )),
            Row("Jobs", (
                Panel("Samples/s per job", (Query(f"sum by (job) (rate(mlops_training_samples_total"
                                                  f"{selector(t)}[{RI}]))", "{{job}}"),),
                      "short", "Training throughput by job.", width=12),
                Panel("Goodput per job", (Query("job:mlops_training_goodput:ratio_rate", "{{job}}"),), "percentunit",
                      "Productive share of wall time (recording rule).", thresholds=((c.goodput_ratio, "yellow"),),
                      width=12, min=0, max=1),
                Panel("Mean GPU utilisation", (Query(f"avg(mlops_gpu_utilization_ratio{selector(c.gpu_selector)})",
                                                     "all GPUs"),),
                      "percentunit", "Average across every GPU.",
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
