"""Shared fixtures: an in-process exporter on a free loopback port, and binary look-ups that skip clearly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mlops_obs.prometheus_server import find_binary


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


def require_binary(name: str) -> str:
    path = find_binary(name)
    if path is None:
        pytest.skip(f"{name} binary not installed (apt-get install {name}); CI installs it")
    return path


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
