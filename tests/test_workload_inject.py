"""``--inject`` parsing: every mistake is one line naming the spec and what is wrong."""

from __future__ import annotations

import pytest

from mlops_obs.commands.workload import WORKLOAD_SETTINGS
from mlops_obs.config import ConfigError, resolve
from mlops_obs.workload.faults import Fault, FaultError, Injector, parse_fault, parse_inject
from mlops_obs.workload.launcher import check_faults


def test_valid_specs_round_trip() -> None:
    assert parse_fault("stall:rank=1,step=50") == Fault("stall", 1, step=50)
    assert parse_fault(" straggler:rank=2,factor=3 ") == Fault("straggler", 2, factor=3.0)
    assert parse_fault("stall:rank=0,step=3,seconds=2.5").seconds == 2.5
    for spec in ("nan:rank=3,step=10", "crash:rank=0,step=0", "slow-data:rank=1,factor=2.5", "oom:rank=1,step=4",
                 "straggler:rank=2,factor=3", "stall:rank=1,step=5,seconds=2"):  # fmt: skip
        assert str(parse_fault(spec)) == spec


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("", "expected KIND:key=value"),
        ("explode:rank=1", "unknown fault kind 'explode'"),
        ("stall:rank=1", "stall needs step="),
        ("straggler:step=1", "straggler takes rank, factor, not 'step'"),
        ("crash:rank=one,step=1", "rank must be an integer, got 'one'"),
        ("crash:rank=-1,step=1", "rank must be >= 0"),
        ("straggler:rank=1,factor=0.5", "factor must be >= 1"),
        ("straggler:rank=1,factor=abc", "factor must be a number"),
        ("nan:rank=1,rank=2,step=1", "rank given twice"),
        ("nan:rank=1,step", "expected key=value, got 'step'"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, why: str) -> None:
    with pytest.raises(FaultError) as e:
        parse_fault(spec)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_setting_from_flags_env_and_yaml_list() -> None:
    assert parse_inject(["stall:rank=1,step=5", "straggler:rank=2,factor=3"]) == [
        "stall:rank=1,step=5",
        "straggler:rank=2,factor=3",
    ]
    cfg = resolve(WORKLOAD_SETTINGS, {}, environ={"MLOPS_OBS_INJECT": "stall:rank=1,step=5; crash:rank=0,step=2"})
    assert cfg["inject"] == ["stall:rank=1,step=5", "crash:rank=0,step=2"]
    with pytest.raises(ConfigError, match=r"^inject: 'bogus': unknown fault kind .* \(from MLOPS_OBS_INJECT\)$"):
        resolve(WORKLOAD_SETTINGS, {}, environ={"MLOPS_OBS_INJECT": "bogus"})


def test_run_level_checks() -> None:
    base = {s.key: s.default for s in WORKLOAD_SETTINGS} | {"world-size": 2, "steps": 10, "device": "cpu"}
    assert check_faults(base | {"inject": ["stall:rank=1,step=9"]}) == [Fault("stall", 1, step=9)]
    for inject, why in [
        (["stall:rank=2,step=1"], "rank 2 does not exist with --world-size=2"),
        (["crash:rank=0,step=10"], "step 10 is never reached with --steps=10"),
        (["oom:rank=0,step=1"], "needs a GPU; this run trains on CPU"),
        (["slow-data:rank=0,factor=2", "slow-data:rank=0,factor=3"], "more than one slow-data fault for rank 0"),
    ]:
        with pytest.raises(ConfigError, match=why):
            check_faults(base | {"inject": inject})


def test_injector_applies_only_to_its_rank() -> None:
    faults = [parse_fault(s) for s in ("nan:rank=1,step=3", "straggler:rank=1,factor=4", "slow-data:rank=0,factor=3")]
    r0, r1 = Injector(faults, 0), Injector(faults, 1)
    assert not r0.nan_from(100) and r1.nan_from(3) and not r1.nan_from(2)
    assert r1.straggler_delay(0.01) == pytest.approx(0.03) and r0.straggler_delay(0.01) == 0
    assert r0.slow_data_delay(0.0) == pytest.approx(0.002)  # 3x of the 1 ms floor
    assert not Injector(faults, 2).any and r0.any and r1.any
