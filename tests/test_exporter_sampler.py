"""The background sampler: a hung collector never holds up a scrape, and the text writer is exact."""

from __future__ import annotations

import gzip
import math
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mlops_obs.collectors import Collector, CollectorUnavailable
from mlops_obs.exporter.sampler import Sampler
from mlops_obs.exporter.server import ExporterServer, PieceGzip
from mlops_obs.metrics import format_value, render
from tests.conftest import wait_for

# Generous bounds: these only guard against a hang, they time nothing.
WAIT = 20.0


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **kw: Any) -> None:
        self.events.append((level, event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)


class HangingCollector(Collector):
    """Blocks inside sample() while ``hang`` is set, as an NVML call on a lost GPU does."""

    name = "hanging"

    def __init__(self) -> None:
        super().__init__({})
        self.hang = threading.Event()
        self.release = threading.Event()
        self.inside = threading.Event()

    def sample(self) -> Iterable[Metric]:
        if self.hang.is_set():
            self.inside.set()
            self.release.wait()
        return [GaugeMetricFamily("test_hanging_value", "From the hanging collector.", value=7)]


class SteadyCollector(Collector):
    name = "steady"

    def __init__(self) -> None:
        super().__init__({})
        self.rounds = 0

    def sample(self) -> Iterable[Metric]:
        self.rounds += 1
        return [CounterMetricFamily("test_steady_rounds", "Rounds sampled.", value=self.rounds)]


class FailingCollector(Collector):
    name = "failing"

    def __init__(self, exc: Exception) -> None:
        super().__init__({})
        self.exc = exc

    def sample(self) -> Iterable[Metric]:
        raise self.exc


def parse(body: bytes) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


@pytest.fixture
def served() -> Any:
    """A sampler with a hanging and a steady collector, behind a real HTTP server."""
    hanging, steady = HangingCollector(), SteadyCollector()
    log = RecordingLog()
    sampler = Sampler([hanging, steady], interval=0.05, deadline=0.5, log=log)
    server = ExporterServer(("127.0.0.1", 0), sampler, "/metrics", log=log)
    sampler.start()
    server.start_background()
    yield hanging, steady, sampler, server, log
    hanging.release.set()
    server.shutdown()
    server.server_close()
    sampler.stop()


def scrape(server: ExporterServer) -> dict[str, float]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=WAIT) as r:
        return parse(r.read())


def test_hanging_collector_is_abandoned_and_recovers(served: Any) -> None:
    """While sample() is blocked, scrapes return, show success 0 for it, and still serve the others."""
    hanging, _steady, sampler, server, log = served
    wait_for(lambda: sampler.ready, "first round")
    first = scrape(server)
    assert first["mlops_scrape_collector_success{collector=hanging}"] == 1
    assert first["test_hanging_value"] == 7

    hanging.hang.set()
    scrape(server)  # finds the data stale and asks for a round, which hangs: it waits at most the deadline
    assert hanging.inside.wait(WAIT)
    # The hang is still going on for every scrape below: none of them waited for it.
    wait_for(lambda: scrape(server)["mlops_scrape_collector_success{collector=hanging}"] == 0, "abandonment")
    during = scrape(server)
    assert not hanging.release.is_set()
    assert "test_hanging_value" not in during
    assert during["mlops_scrape_collector_success{collector=steady}"] == 1
    assert during["mlops_scrape_collector_duration_seconds{collector=hanging}"] >= sampler.deadline
    rounds_before = during["test_steady_rounds_total"]
    wait_for(lambda: scrape(server)["test_steady_rounds_total"] > rounds_before, "the steady collector to go on")
    with urllib.request.urlopen(server.url + "/-/healthy", timeout=WAIT) as r:
        assert r.status == 200

    wait_for(lambda: any(e[1].startswith("collector abandoned") for e in log.events), "the watchdog's log line")

    hanging.hang.clear()
    hanging.release.set()
    wait_for(lambda: scrape(server).get("test_hanging_value") == 7, "recovery")
    assert scrape(server)["mlops_scrape_collector_success{collector=hanging}"] == 1
    assert any(e[1] == "collector returned after its deadline" for e in log.events)
    abandoned = [e for e in log.events if e[1].startswith("collector abandoned")]
    assert [e[2]["collector"] for e in abandoned] == ["hanging"]  # once for the whole hang


def test_hung_first_round_still_becomes_ready() -> None:
    """A collector hung from the start does not keep /-/ready at 503 past its deadline."""
    hanging = HangingCollector()
    hanging.hang.set()
    sampler = Sampler([hanging, SteadyCollector()], interval=0.05, deadline=0.2, log=RecordingLog())
    sampler.start()
    try:
        assert hanging.inside.wait(WAIT)
        wait_for(lambda: sampler.ready, "readiness")
        body = parse(sampler.scrape())
        assert body["mlops_scrape_collector_success{collector=hanging}"] == 0
        assert "test_steady_rounds_total" in body
    finally:
        hanging.release.set()
        sampler.stop()


def test_failing_and_unavailable_collectors_are_logged_once() -> None:
    """An exception or CollectorUnavailable marks only that collector, logged once, not every round."""
    log = RecordingLog()
    broken = FailingCollector(RuntimeError("boom"))
    absent = FailingCollector(CollectorUnavailable("NVML is not available"))
    absent.name = "absent"  # type: ignore[misc]
    sampler = Sampler([broken, absent, SteadyCollector()], interval=1.0, deadline=5.0, log=log)
    for _ in range(3):
        for c in sampler.collectors:
            sampler.sample_once(c)
    body = parse(sampler.scrape())
    assert body["mlops_scrape_collector_success{collector=failing}"] == 0
    assert body["mlops_scrape_collector_success{collector=absent}"] == 0
    assert body["test_steady_rounds_total"] == 3
    assert [e[0] for e in log.events] == ["error", "warning"]
    assert log.events[0][2]["error"] == "RuntimeError: boom"


class DyingCollector(Collector):
    """Raises a BaseException (``SystemExit``, as ``sys.exit()`` in a library would) while ``dying``: no
    ``except Exception`` catches it, so it ends the sampling thread's loop."""

    name = "dying"

    def __init__(self) -> None:
        super().__init__({})
        self.dying = threading.Event()
        self.dying.set()

    def sample(self) -> Iterable[Metric]:
        if self.dying.is_set():
            raise SystemExit(3)
        return [GaugeMetricFamily("test_dying_value", "From the collector that died.", value=1)]


class FailingLog(RecordingLog):
    """A logger whose error() raises: the failure report itself escapes the round."""

    def error(self, event: str, **kw: Any) -> None:
        super().error(event, **kw)
        raise RuntimeError("log sink gone")


def test_a_sampling_thread_that_dies_is_reported_restarted_and_recovers() -> None:
    """A BaseException out of a round kills the loop, never silently: success 0 at once, a restart
    counted, the loop started again with a doubling pause; once the collector works again, success is
    1 and restarts stop. The other collectors never notice."""
    log = RecordingLog()
    dying, steady = DyingCollector(), SteadyCollector()
    sampler = Sampler([dying, steady], interval=0.05, deadline=5.0, log=log)
    sampler.start()
    try:
        restarts = "mlops_scrape_collector_restarts_total{collector=dying}"
        wait_for(lambda: parse(sampler.scrape()).get(restarts, 0) >= 4, "four restarts")
        body = parse(sampler.scrape())
        assert body["mlops_scrape_collector_success{collector=dying}"] == 0
        assert body["mlops_scrape_collector_success{collector=steady}"] == 1
        assert body["mlops_scrape_collector_restarts_total{collector=steady}"] == 0
        died = [e[2] for e in log.events if e[1] == "sampler thread died; starting it again"]
        assert died[0]["error"] == "SystemExit: 3" and died[0]["collector"] == "dying"
        assert [d["restart_in"] for d in died[:4]] == [0.05, 0.1, 0.2, 0.4]  # the backoff doubles
        dying.dying.clear()
        wait_for(lambda: parse(sampler.scrape()).get("test_dying_value") == 1, "recovery")
        after = parse(sampler.scrape())
        assert after["mlops_scrape_collector_success{collector=dying}"] == 1
        rounds = steady.rounds
        wait_for(lambda: sampler.scrape() and steady.rounds >= rounds + 3, "three more rounds")
        assert parse(sampler.scrape())[restarts] == after[restarts]  # no death since
    finally:
        dying.dying.clear()
        sampler.stop()


def test_an_exception_escaping_a_round_is_a_restart_not_a_silent_death() -> None:
    """A collector fails and the logger reporting it raises too: the exception escapes the round, and the
    thread is started again (and reported in the metrics) instead of leaving a stale success behind."""
    log = FailingLog()
    broken = FailingCollector(RuntimeError("boom"))
    sampler = Sampler([broken, SteadyCollector()], interval=0.05, deadline=5.0, log=log)
    sampler.start()
    try:
        wait_for(
            lambda: parse(sampler.scrape()).get("mlops_scrape_collector_restarts_total{collector=failing}", 0) >= 2,
            "restarts",
        )
        body = parse(sampler.scrape())
        assert body["mlops_scrape_collector_success{collector=failing}"] == 0
        assert body["mlops_scrape_collector_success{collector=steady}"] == 1
    finally:
        sampler.stop()


def test_a_thread_that_is_gone_is_never_reported_as_success() -> None:
    """Even a thread gone without its supervisor noticing (the last line of defence) shows as failed: a
    scrape checks that every collector's thread is alive."""
    steady = SteadyCollector()
    sampler = Sampler([steady], interval=0.05, deadline=5.0, log=RecordingLog())
    sampler.start()
    try:
        wait_for(lambda: sampler.ready, "first round")
        assert parse(sampler.scrape())["mlops_scrape_collector_success{collector=steady}"] == 1
        gone = threading.Thread(target=lambda: None)
        gone.start()
        gone.join()
        sampler._threads["steady"] = gone  # what a thread killed outside Python would look like
        assert parse(sampler.scrape())["mlops_scrape_collector_success{collector=steady}"] == 0
    finally:
        sampler.stop()


def test_unchanged_scrape_is_the_same_bytes_and_self_metrics_present() -> None:
    """Back-to-back scrapes with no new round reuse the body; the exporter reports its own CPU and RSS."""
    steady = SteadyCollector()
    sampler = Sampler([steady], interval=1.0, deadline=5.0, log=RecordingLog(), static=b"# static\n")
    sampler.sample_once(steady)
    a, b = sampler.scrape(), sampler.scrape()
    assert a is b
    sampler.sample_once(steady)
    c = sampler.scrape()
    assert c is not a and parse(c)["test_steady_rounds_total"] == 2
    body = parse(c)
    assert body["mlops_exporter_cpu_seconds_total"] > 0
    assert body["mlops_exporter_resident_memory_bytes"] > 1024 * 1024
    assert c.endswith(b"# static\n")


# --- the text writer ----------------------------------------------------------------------------------


def families() -> list[Metric]:
    c = CounterMetricFamily("t_requests", "Requests with a \\ backslash\nand newline.", labels=["path", "code"])
    c.add_metric(['/a"quoted"', "200"], 12)
    c.add_metric(["back\\slash\nnewline", "500"], 1.5e16)
    g = GaugeMetricFamily("t_temperature_celsius", "Temperature.", labels=["gpu"])
    g.add_metric(["0"], 41.25)
    g.add_metric(["1"], float("nan"))
    g.add_metric(["2"], float("inf"))
    g.add_metric(["3"], float("-inf"))
    g.add_metric(["4"], -0.000123)
    g.add_metric(["5"], 3.0, timestamp=1700000000.5)
    h = HistogramMetricFamily("t_step_seconds", "Step time.", labels=["rank"])
    h.add_metric(["0"], [("0.1", 2.0), ("1.0", 5.0), ("+Inf", 6.0)], 3.5)
    s = SummaryMetricFamily("t_latency_seconds", "Latency.", count_value=4, sum_value=0.8)
    i = InfoMetricFamily("t_build", "Build.", value={"version": "1.2.3", "commit": "abc"})
    plain = GaugeMetricFamily("t_devices", "Devices.", value=8)
    empty = GaugeMetricFamily("t_empty", "A family with no series.", labels=["x"])
    return [c, g, h, s, i, plain, empty]


class _Reg:
    def collect(self) -> list[Metric]:
        return families()


def _normalised(text: str) -> list[tuple[str, str, str, tuple[tuple[str, str], ...], str]]:
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            v = "nan" if math.isnan(s.value) else repr(float(s.value))
            out.append((fam.name, fam.type, s.name, tuple(sorted(s.labels.items())), v + f"@{s.timestamp}"))
    return sorted(out)


def test_render_matches_prometheus_client() -> None:
    """Our writer is a drop-in for generate_latest: the same bytes, hence the same parsed families."""
    ours = render(families())
    assert ours == generate_latest(_Reg())  # type: ignore[arg-type]
    assert ours == render(families())  # again, now from the label and header caches
    assert _normalised(ours.decode()) == _normalised(generate_latest(_Reg()).decode())  # type: ignore[arg-type]
    assert "# TYPE t_requests_total counter" in ours.decode()
    assert "# TYPE t_build_info gauge" in ours.decode()


def test_render_matches_on_real_collector_output() -> None:
    """Byte-identical on the host collector's real families too (labels sorted, values as Go prints them)."""
    from mlops_obs.collectors import host

    fams = host.families(host.read_host({"host.filesystem-paths": ["/"]}), per_cpu=True)

    class Reg:
        def collect(self) -> list[Metric]:
            return fams

    assert render(fams) == generate_latest(Reg())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1.0"),
        (0.5, "0.5"),
        (1e20, "1e+20"),
        (-3.0, "-3.0"),
        (12345678.0, "1.2345678e+07"),
        (float("inf"), "+Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    from prometheus_client.utils import floatToGoString

    assert format_value(value) == text == floatToGoString(value)


def test_render_reuse_never_serves_old_values() -> None:
    """The per-family render cache is keyed on the samples: a changed value renders anew, equal to
    prometheus_client's output every time."""
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.exposition import generate_latest

    from mlops_obs.metrics import render as fast_render

    class _Reg:
        def __init__(self, fams: list[Any]) -> None:
            self.fams = fams

        def collect(self) -> list[Any]:
            return self.fams

    for value in (1.0, 1.0, 2.5, 1.0, float("nan")):
        fam = GaugeMetricFamily("mlops_test_value", "A value.", labels=["gpu"])
        fam.add_metric(["0"], value)
        fam.add_metric(["1"], 7.0)
        assert fast_render([fam]) == generate_latest(_Reg([fam]))  # type: ignore[arg-type]


class BigCollector(Collector):
    """Enough text that the server compresses it; ``bump`` changes one value so the text changes."""

    name = "big"

    def __init__(self) -> None:
        super().__init__({})
        self.value = 0

    def sample(self) -> Iterable[Metric]:
        g = GaugeMetricFamily("test_big_value", "Many series.", labels=["i"])
        for i in range(500):
            g.add_metric([str(i)], float(i + self.value))
        return [g]


def test_gzip_scrape_decodes_to_the_plain_body_as_pieces_change() -> None:
    """The gzip body (compressed piece by piece, only changed pieces again) is one valid gzip member
    whose content is exactly the plain body, round after round, whichever piece changed."""
    big, steady = BigCollector(), SteadyCollector()
    sampler = Sampler([big, steady], interval=1.0, deadline=5.0, log=RecordingLog(), static=b"# static\n")
    server = ExporterServer(("127.0.0.1", 0), sampler, "/metrics", log=RecordingLog())
    server.start_background()
    try:
        for step in range(5):
            if step != 2:
                sampler.sample_once(steady)  # the small piece and the per-scrape lines change
            if step in (1, 4):
                big.value += 1  # the big piece changes too
                sampler.sample_once(big)
            if step == 0:
                sampler.sample_once(big)
            plain = sampler.scrape() + server.reloads.text  # the server adds its reload-status series
            req = urllib.request.Request(server.url + "/metrics", headers={"Accept-Encoding": "gzip"})
            with urllib.request.urlopen(req, timeout=WAIT) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                z = r.read()
            d = zlib.decompressobj(31)  # strict: a single member, consumed to its end, trailer checked
            assert d.decompress(z) == plain and d.eof and d.unused_data == b""
            assert gzip.decompress(z) == plain
            assert parse(plain)["test_big_value{i=0}"] == big.value
    finally:
        server.shutdown()
        server.server_close()
    pg = PieceGzip()
    pieces = (b"a" * 3000, b"", b"b\n" * 10, b"tail\n")
    for p in (pieces, (pieces[0], b"c" * 10, pieces[3]), (b"x", *pieces)):
        assert gzip.decompress(pg.compress(p)) == b"".join(p)


class BusyCollector(SteadyCollector):
    """Burns a known amount of its own thread's CPU each round."""

    name = "busy"

    def sample(self) -> Iterable[Metric]:
        end = time.thread_time() + 0.02
        while time.thread_time() < end:
            pass
        return super().sample()


def test_collector_cpu_seconds_counts_each_collectors_own_rounds() -> None:
    """mlops_scrape_collector_cpu_seconds_total is each collector's thread CPU, so the busy one is charged
    its 20 ms a round and the idle one next to it almost nothing."""
    busy, steady = BusyCollector(), SteadyCollector()
    sampler = Sampler([busy, steady], interval=1.0, deadline=5.0, log=RecordingLog())
    for _ in range(3):
        sampler.sample_once(busy)
        sampler.sample_once(steady)
    body = parse(sampler.scrape())
    assert body["mlops_scrape_collector_cpu_seconds_total{collector=busy}"] >= 0.06
    assert body["mlops_scrape_collector_cpu_seconds_total{collector=steady}"] < 0.03


# --- cadence from demand ------------------------------------------------------------------------------


def test_scrape_clock_learns_the_interval_robustly() -> None:
    """The median gap, at least the floor: a stray scrape or one late scrape does not move it; after
    IDLE_AFTER missed scrapes none is expected any more."""
    from mlops_obs.exporter.sampler import IDLE_AFTER, ScrapeClock

    clock = ScrapeClock(floor=1.0)
    assert clock.next_expected(0.0) is None
    for t in (0.0, 15.0, 30.0, 30.2, 45.0, 61.0, 75.0):  # a curl at 30.2, a late scrape at 61
        clock.arrive(t)
    assert clock.interval == pytest.approx(14.9)  # gaps 15, 15, 0.2, 14.8, 16, 14
    assert clock.next_expected(75.0) == 75.0 + clock.interval
    assert clock.next_expected(75.0 + IDLE_AFTER * clock.interval + 0.1) is None
    fast = ScrapeClock(floor=1.0)
    for t in (0.0, 0.01, 0.02, 0.03):
        fast.arrive(t)
    assert fast.interval == 1.0  # never sampled more often than --sampler.interval


def test_nothing_scrapes_nothing_samples() -> None:
    """After its first round a collector waits with no timeout while no scrape is expected: the only
    periodic wake-up of an idle sidecar is the housekeeping thread."""
    steady = SteadyCollector()
    sampler = Sampler([steady], interval=0.05, deadline=5.0, log=RecordingLog())
    sampler.start()
    try:
        wait_for(lambda: sampler.ready, "first round")
        with sampler._cond:
            assert sampler._due(sampler.states["steady"], time.monotonic()) is None
        assert steady.rounds == 1
    finally:
        sampler.stop()


def test_a_scrape_of_stale_data_waits_for_a_fresh_round() -> None:
    """A scrape that finds data older than the budget asks for a round and serves its result."""
    steady = SteadyCollector()
    sampler = Sampler([steady], interval=0.05, deadline=5.0, log=RecordingLog())
    sampler.start()
    try:
        wait_for(lambda: sampler.ready, "first round")
        for expected in (2, 3):
            with sampler._cond:
                sampler.states["steady"].started_at -= 3600.0  # as if the last round ran an hour ago
            assert parse(sampler.scrape())["test_steady_rounds_total"] == expected
        assert parse(sampler.scrape())["test_steady_rounds_total"] == 3  # fresh: no round asked for
    finally:
        sampler.stop()


def test_a_round_runs_ahead_of_the_expected_scrape_and_the_cadence_is_published() -> None:
    """With a learned interval, the next round starts by itself a lead ahead of the next expected scrape
    (no scrape asks for it), and the cadence goes to ``on_cadence`` in Unix time."""
    steady = SteadyCollector()
    published: list[tuple[float | None, float | None, float]] = []
    ran = threading.Event()
    sampler = Sampler([steady], interval=0.05, deadline=5.0, log=RecordingLog(),
                      on_cadence=lambda *a: published.append(a))  # fmt: skip
    sampler.start()
    try:
        wait_for(lambda: sampler.ready, "first round")
        now = time.monotonic()
        with sampler._cond:  # scrapes every 0.5 s so far, the last one just now
            for k in (-3, -2, -1, 0):
                sampler.clock.arrive(now + 0.5 * k)
            state = sampler.states["steady"]
            state.started_at = now - 0.01  # this scrape's round has just run
            due = sampler._due(state, now)
            sampler._cond.notify_all()
        assert due is not None and abs(due - (now + 0.5 - sampler.lead())) < 1e-6
        rounds = steady.rounds
        original = steady.sample

        def sample() -> Iterable[Metric]:
            ran.set()
            return original()

        steady.sample = sample  # type: ignore[method-assign]
        assert ran.wait(WAIT)
        assert steady.rounds >= rounds
        sampler.scrape()
        interval, next_scrape, lead = published[-1]
        assert interval == 0.5 and next_scrape is not None and lead == sampler.lead()
        assert abs(next_scrape - time.time()) < 5.0
    finally:
        sampler.stop()


def test_a_scrape_never_waits_past_a_quarter_of_the_scrape_interval() -> None:
    """A slow round must not make Prometheus time the scrape out (its timeout is at most its interval):
    a scrape waits for rounds at most the deadline and a quarter of the learned interval, then serves what
    it has."""
    hanging = HangingCollector()
    sampler = Sampler([hanging], interval=0.01, deadline=5.0, log=RecordingLog())
    assert sampler.scrape_wait() == 0.25  # no interval learned yet
    sampler.start()
    try:
        wait_for(lambda: sampler.ready, "first round")
        for t in (0.0, 0.2, 0.4):
            sampler.clock.arrive(time.monotonic() - 0.4 + t)
        assert sampler.scrape_wait() == pytest.approx(0.05, abs=1e-3)
        hanging.hang.set()
        with sampler._cond:
            sampler.states["hanging"].started_at -= 3600.0
        body = parse(sampler.scrape())  # asks for a round, which hangs; returns with the old data
        assert hanging.inside.wait(WAIT)
        assert body["test_hanging_value"] == 7
    finally:
        hanging.release.set()
        sampler.stop()


def test_the_next_round_aims_past_the_scrape_the_last_one_ran_ahead_of() -> None:
    """A round's end recomputes the lead from its duration; a lead that shrank must not bring the scrape
    that round was for back into the schedule (a wake-up, or with a long lead a second round, for it)."""
    steady = SteadyCollector()
    sampler = Sampler([steady], interval=0.05, deadline=5.0, log=RecordingLog())
    now = time.monotonic()
    with sampler._cond:
        for k in (-3, -2, -1):
            sampler.clock.arrive(now + 0.5 * k)  # scrapes every 0.5 s; the next one is expected at `now`
        state = sampler.states["steady"]
        state.duration = 0.01
        lead = sampler.lead()
        state.started_at = now - lead  # this scrape's round started on time ...
        state.aimed = now
        state.duration = 0.009  # ... and took a little less than the one before: the lead shrank
        assert sampler.lead() < lead
        due = sampler._due(state, now - lead + 0.009)
        assert due is not None and due == pytest.approx(now + 0.5 - sampler.lead())
        sampler.clock.arrive(now + 0.003)  # the scrape comes, a little late: the grid moves with it
        due = sampler._due(state, now + 0.004)
        assert due is not None and due == pytest.approx(now + 0.503 - sampler.lead())


class OverlapCollector(Collector):
    """Records how many rounds of its kind are inside ``sample`` at once."""

    def __init__(self, name: str, shared: dict[str, int], lock: threading.Lock) -> None:
        super().__init__({})
        self.name = name  # type: ignore[misc]
        self.shared, self.lock = shared, lock
        self.rounds = 0

    def sample(self) -> Iterable[Metric]:
        with self.lock:
            self.shared["inside"] += 1
            self.shared["most"] = max(self.shared["most"], self.shared["inside"])
        time.sleep(0.002)  # a syscall that releases the GIL: where interleaved rounds would meet
        with self.lock:
            self.shared["inside"] -= 1
        self.rounds += 1
        return []


def test_rounds_of_different_collectors_run_one_after_another() -> None:
    """The baton: collectors due together take turns, so no two rounds interleave (but their first)."""
    shared = {"inside": 0, "most": 0}
    lock = threading.Lock()
    cs = [OverlapCollector(f"c{i}", shared, lock) for i in range(4)]
    sampler = Sampler(list(cs), interval=0.01, deadline=5.0, log=RecordingLog())
    sampler.start()
    try:
        wait_for(lambda: sampler.ready, "first rounds")  # these run side by side: ready sooner
        with lock:
            shared["most"] = 0
        for _ in range(3):  # each scrape finds the data stale and asks every collector for a round at once
            with sampler._cond:
                for s in sampler.states.values():
                    s.started_at -= 3600.0
            sampler.scrape()
        assert all(c.rounds >= 2 for c in cs)
        assert shared["most"] == 1
    finally:
        sampler.stop()


def test_a_hung_round_holding_the_baton_delays_the_others_by_the_baton_wait_only() -> None:
    """A collector that hangs inside its round keeps the baton; the others run anyway once they waited
    ``baton_wait()``, and keep being served."""
    hanging, steady = HangingCollector(), SteadyCollector()
    sampler = Sampler([hanging, steady], interval=0.01, deadline=0.4, log=RecordingLog())
    assert sampler.baton_wait() == pytest.approx(0.1)
    sampler.start()
    try:
        wait_for(lambda: sampler.ready, "first rounds")
        hanging.hang.set()
        with sampler._cond:
            sampler.states["hanging"].started_at -= 3600.0
            sampler.states["hanging"].wanted = True
            sampler._cond.notify_all()
        assert hanging.inside.wait(WAIT)  # it holds the baton now, and does not give it back
        assert not sampler._baton.acquire(blocking=False)
        before = steady.rounds
        with sampler._cond:
            sampler.states["steady"].started_at -= 3600.0
        body = parse(sampler.scrape())  # steady's round waits out the baton, runs, and is served
        wait_for(lambda: steady.rounds > before, "steady's round past the hung one")
        body = parse(sampler.scrape())
        assert body["test_steady_rounds_total"] >= before + 1
        assert body["mlops_scrape_collector_success{collector=steady}"] == 1
    finally:
        hanging.release.set()
        sampler.stop()
