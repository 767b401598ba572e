"""Shared test pieces: an in-process exporter on a free loopback port, ``wait_for``, binary look-ups, and
the CI rule that a missing tool fails the run instead of skipping it.

Under CI (``MLOPS_OBS_CI=1``, exported by ``.ci/run``) a test that skips is a failure: every tool a test
needs is installed by ``scripts/setup.sh``, so a skip there means a broken set-up that would otherwise pass
silently. Only the opt-in real-OpenSearch tests (marked ``opensearch``) and the tests in
:data:`CI_MAY_SKIP` may skip there, each for the reason given.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mlops_obs.children import find_binary

CI = os.environ.get("MLOPS_OBS_CI", "") not in ("", "0")

# Tests that may skip under CI besides the ``opensearch`` ones: node id -> why the skip is legitimate there.
CI_MAY_SKIP: dict[str, str] = {
    "tests/test_gpu_check.py::test_without_a_gpu_it_exits_2_with_one_line": (
        "checks the no-GPU path; on a CI machine with a GPU there is none to check"
    ),
    "tests/test_gpu_collector.py::test_no_nvml_reports_unavailable_once": (
        "checks the no-NVML path; on a CI machine with a working NVML there is none to check"
    ),
}


def wait_for(
    cond: Callable[[], Any], what: str = "the condition", timeout: float = 60.0, interval: float = 0.02
) -> None:
    """Poll ``cond`` until it is true; fail naming ``what`` after ``timeout`` seconds.

    The timeout is generous on purpose: it only bounds a hang, and a busy 2-core machine can take
    seconds to do what takes milliseconds alone. Tests synchronise on the condition, never on a sleep.
    """
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def require_binary(name: str, package: str | None = None) -> str:
    """The path of ``name``; skips when it is missing, and fails under CI, where setup.sh installs it."""
    path = find_binary(name)
    if path is None:
        why = f"{name} binary not installed (apt-get install {package or name}, or bash scripts/setup.sh)"
        if CI:
            pytest.fail(why + "; CI must have it", pytrace=False)
        pytest.skip(why)
    return path


def _ci_allows(item: pytest.Item) -> bool:
    return item.get_closest_marker("opensearch") is not None or item.nodeid.split("[", 1)[0] in CI_MAY_SKIP


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Under CI, a skip (``pytest.skip``, ``skipif``, ``importorskip``) is a failure unless allowed."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail") and not _ci_allows(item):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (MLOPS_OBS_CI=1), where every tool is installed: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """Under CI, a module that skips as a whole (a module-level ``importorskip``) is a failure too."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (MLOPS_OBS_CI=1), where every tool is installed: {reason}"


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Every Prometheus, Alertmanager, exporter or rank a test starts is gone when the session ends:
    a leaked child keeps a port and CPU on the CI machine, and means a missing stop() somewhere."""
    import psutil

    yield
    leaked, names = [], []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "multiprocessing.forkserver" in cmd or "multiprocessing.resource_tracker" in cmd:
                continue  # multiprocessing's own helpers: they exit with the interpreter
            names.append(cmd[:120])
            leaked.append(p)
            p.kill()
        except psutil.Error:
            continue  # exited meanwhile
    assert not leaked, f"test session left child processes running: {names}"


@dataclass
class RealOpenSearch:
    """A cluster at ``MLOPS_OBS_TEST_OPENSEARCH_URL`` and an index prefix of the test's own."""

    url: str
    prefix: str
    client: Any  # opensearchpy.OpenSearch


@pytest.fixture
def real_opensearch() -> Iterator[RealOpenSearch]:
    """The opt-in real-cluster tests' cluster (mark them ``opensearch``): skips without
    ``MLOPS_OBS_TEST_OPENSEARCH_URL``; afterwards deletes whatever the test made under its prefix
    (indices, index template, ISM policy, ingest pipeline), so tests sharing a cluster never meet.

    To check those tests' own code without a cluster, point the variable at the local endpoint:
    ``python -m tests.fake_opensearch`` prints its URL and serves until interrupted."""
    url = os.environ.get("MLOPS_OBS_TEST_OPENSEARCH_URL")
    if not url:
        pytest.skip("set MLOPS_OBS_TEST_OPENSEARCH_URL to run against a real OpenSearch")
    from opensearchpy import OpenSearch

    from mlops_obs.logs.opensearch import setup_names

    prefix = f"mlops-test-{uuid.uuid4().hex[:8]}"
    client = OpenSearch(hosts=[url], verify_certs=False, ssl_show_warn=False)
    yield RealOpenSearch(url, prefix, client)
    template, policy, pipeline = setup_names(prefix)
    for path in (f"/{prefix}-*", f"/_index_template/{template}", f"/_plugins/_ism/policies/{policy}",
                 f"/_ingest/pipeline/{pipeline}"):  # fmt: skip
        try:
            client.transport.perform_request("DELETE", path)
        except Exception:  # not made by this test, or gone already
            pass


@pytest.fixture(scope="session")
def fault_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The reference workload with each fault, under the real stack (``tests/fault_runs.py``): run once
    for the session, read by the fault-to-alert matrix and by the root-cause scorecard."""
    pytest.importorskip("torch", reason="the reference workload needs torch")
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    from tests.fault_runs import run_all

    runs, stop = run_all(tmp_path_factory.mktemp("fault-runs"))
    try:
        yield runs
    finally:
        for fn in stop:
            fn()


@pytest.fixture
def start_exporter() -> Iterator[Callable[..., Any]]:
    """Start ``Exporter``s with the given settings on 127.0.0.1:<free>; all are stopped afterwards."""
    from mlops_obs import collectors
    from mlops_obs.config import resolve
    from mlops_obs.exporter import Exporter, settings

    started: list[Any] = []

    def start(**overrides: Any) -> Any:
        values = {"web.listen-address": "127.0.0.1:0", "sampler.interval": "0.2s"}
        values.update({k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()})
        cfg = resolve(settings(), values, environ={})
        assert collectors.available()
        ex = Exporter(cfg).start()
        started.append(ex)
        return ex

    yield start
    for ex in started:
        ex.stop()
