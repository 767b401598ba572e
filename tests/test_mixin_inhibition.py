"""The generated inhibitions, in a real Alertmanager: a root cause mutes the symptoms it causes in the same
job (or on the same sidecar), and nothing else.

The alerts posted carry exactly the labels the rules give them: those their promtool cases expect.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlops_obs.children.alertmanager import AlertmanagerProcess, alertmanager_binary
from mlops_obs.mixin import config as mixin_config
from mlops_obs.mixin import rules
from mlops_obs.mixin.alertmanager import alertmanager_config

CFG = mixin_config.MixinConfig()
pytestmark = pytest.mark.timeout(120)


def fired(name: str, **relabel: str | None) -> dict[str, str]:
    """The labels alert ``name`` fires with in its promtool case, changed as given (``None`` removes one)."""
    a = next(a for a in rules.alerts(CFG) if a.name == name)
    labels = {**a.fires.alerts[0], "alertname": name, "severity": a.severity}
    for k, v in relabel.items():
        if v is None:
            labels.pop(k, None)
        else:
            labels[k] = v
    return labels


# (alert, muted?) per scenario; each scenario uses its own job and sidecar, so they cannot interfere.
SCENARIOS: dict[str, list[tuple[dict[str, str], bool]]] = {
    "a rank failed": [
        (fired("TrainingRankFailed", job="crash"), False),
        (fired("TrainingStalledRankMissing", job="crash"), True),
        (fired("TrainingThroughputRegression", job="crash"), True),
        (fired("TrainingStraggler", job="crash", rank="0"), True),
        (fired("TrainingStalledRankMissing", job="crash-other"), False),
    ],
    "an XID on a rank's GPU": [
        (fired("GpuXidCritical", job="xid", instance="x:9477"), False),
        (fired("TrainingStalled", job="xid", rank="0"), True),
        (fired("TrainingStepTimeAnomaly", job="xid", rank="0"), True),
        (fired("TrainingStalled", job="xid-other"), False),
    ],
    "an XID on an unowned GPU": [
        (fired("GpuXidCritical", job=None, rank=None, instance="u:9477"), False),
        (fired("TrainingStraggler", job="unowned", instance="u:9477"), False),
        (fired("TrainingStalledRankMissing", job="unowned"), False),
    ],
    "a node down": [
        (fired("MlopsExporterDown", instance="d:9477"), False),
        (fired("NodeMemoryLow", instance="d:9477"), True),
        (fired("GpuThermalThrottling", instance="d:9477", job="down"), True),
        (fired("TrainingNodeDown", instance="d:9477", job="down"), False),
        (fired("TrainingStalledRankMissing", job="down"), True),
        (fired("NodeMemoryLow", instance="e:9477"), False),
    ],
    "a critical host alert": [
        (fired("NodeFilesystemAlmostFull", instance="f:9477"), False),
        (fired("NodeMemoryLow", instance="f:9477"), True),
        (fired("GpuThermalThrottling", instance="f:9477", job="full"), False),
    ],
}


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertmanagerProcess]:
    if not alertmanager_binary():
        pytest.fail("prometheus-alertmanager not installed (scripts/setup.sh installs it)")
    # A sink nobody listens on: notifications fail and are retried, which does not touch inhibition.
    am = AlertmanagerProcess(Path(tmp_path_factory.mktemp("am")), alertmanager_config(CFG, "http://127.0.0.1:9/x"))
    am.start()
    try:
        yield am
    finally:
        am.stop()


def _post(am: AlertmanagerProcess, alerts: list[dict[str, str]]) -> None:
    now = dt.datetime.now(dt.UTC)
    body = [{"labels": lab, "annotations": {"summary": lab["alertname"]}, "startsAt": now.isoformat(),
             "endsAt": (now + dt.timedelta(hours=1)).isoformat()} for lab in alerts]  # fmt: skip
    req = urllib.request.Request(am.url + "/api/v2/alerts", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_root_causes_mute_their_symptoms(alertmanager: AlertmanagerProcess, scenario: str) -> None:
    cases = SCENARIOS[scenario]
    _post(alertmanager, [lab for lab, _ in cases])
    want = {json.dumps(lab, sort_keys=True): muted for lab, muted in cases}
    deadline = time.monotonic() + 30
    got: dict[str, Any] = {}
    while time.monotonic() < deadline:
        held = {json.dumps(a["labels"], sort_keys=True): a["status"] for a in alertmanager.alerts()}
        got = {k: held[k]["state"] == "suppressed" for k in want if k in held}
        if got == want:
            break
        time.sleep(0.2)
    assert got == want, {k: ("muted" if v else "not muted", "want muted" if want[k] else "want not muted")
                         for k, v in got.items() if want.get(k) != v}  # fmt: skip
