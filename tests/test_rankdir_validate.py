"""Snapshot validation as properties: any JSON in any field never raises out of the rank directory or the
collectors reading it, and what the SDK writes always comes through to the families whole."""

from __future__ import annotations

import math
import tempfile
import typing
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from mlops_obs import rankdir
from mlops_obs.collectors import training
from mlops_obs.collectors.gpu_process import RankIndex
from mlops_obs.collectors.process import read_rank_processes
from mlops_obs.instrument import TrainingMonitor
from mlops_obs.metrics import render
from mlops_obs.rankdir import RankDirectory, validate

FIELDS = sorted(typing.get_type_hints(rankdir.Snapshot))


def test_every_snapshot_field_has_a_rule() -> None:
    """A field added to the schema must get its rule in ``validate.FIELDS`` (and the rules name no field
    the schema lacks): what the collectors may assume is decided field by field."""
    assert sorted(validate.FIELDS) == FIELDS


def test_reasons_are_bounded_label_values() -> None:
    for reason in (*validate.REASONS, *validate.DROP_REASONS):
        assert reason.isidentifier() and reason.islower()
    assert len(set(validate.REASONS)) == len(validate.REASONS)


def test_a_checked_snapshot_is_the_same_object_when_nothing_was_dropped(tmp_path: Path) -> None:
    """The parse cache hands the very same object out again, so the training collector can tell an
    unchanged round by identity; checking must not copy a good snapshot."""
    with TrainingMonitor("j", 0, 1, tmp_path, flush_interval=60) as m, m.step(samples=1):
        pass
    snap = rankdir.read(tmp_path / rankdir.file_name("j", 0))
    assert snap is not None
    assert validate.check(snap).snapshot is snap


# --- any JSON anywhere ---------------------------------------------------------------------------------------

long_names = st.sampled_from(["x" * 257, "é" * 300])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "nan", "inf", "-inf", "1"])
    | long_names
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=8) | long_names, inner, max_size=6),
    max_leaves=20,
)
# Plausible values too, so that examples get past the first field and reach the collectors.
good_values: dict[str, st.SearchStrategy[Any]] = {
    "v": st.just(rankdir.SCHEMA_VERSION),
    "job": st.text(max_size=20) | long_names,
    "node": st.text(max_size=20),
    "rank": st.integers(0, 16),
    "world_size": st.integers(1, 16),
    "pid": st.integers(1, 2**22),
    "closed": st.booleans(),
    "step_buckets": st.lists(st.integers(0, 10**6), min_size=17, max_size=17),
    "checkpoint_buckets": st.lists(st.integers(0, 10**6), min_size=13, max_size=13),
    # (the cap of 128 a map is exercised in test_rankdir_hostile: drawing that many here is slow)
    "phase_seconds": st.dictionaries(st.text(max_size=8) | long_names, st.floats(-1, 1e6), max_size=8),
    "badput_seconds": st.dictionaries(st.text(max_size=8) | long_names, st.floats(-1, 1e6), max_size=5),
    "gauges": st.dictionaries(
        st.sampled_from(sorted(training.GAUGES)), st.floats(allow_nan=False) | st.sampled_from(["nan", "inf"])
    ),
    "recent_step_median": st.none() | st.floats(-1.0, 10.0),
}
field_value = {f: good_values.get(f, st.floats(0, 1e12) | st.integers(0, 10**12)) | json_values for f in FIELDS}
snapshots = st.fixed_dictionaries({}, optional={**field_value, "extra": json_values})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(snapshots | json_values, min_size=1, max_size=6))
def test_any_json_in_any_field_never_raises_out_of_the_readers(docs: list[Any]) -> None:
    """Whatever the files hold, the directory returns checked snapshots or counts a skip, and the
    training families, the process collector's reading and GPU attribution all work on the result:
    every counter finite and non-negative, every label value within its cap, the text parseable."""
    with tempfile.TemporaryDirectory() as d:
        for i, doc in enumerate(docs):
            (Path(d) / f"f{i}{rankdir.SUFFIX}").write_bytes(orjson.dumps(doc))
        ranks = RankDirectory(d, retention=None)
        snaps = ranks.snapshots()
        assert len(snaps) + sum(ranks.errors.values()) == len(docs)
        text = render(training.families(snaps)).decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                assert all(len(v) <= validate.MAX_LABEL_LENGTH for v in s.labels.values())
                if fam.type in ("counter", "histogram"):
                    assert math.isfinite(s.value) and s.value >= 0, s
        read_rank_processes(snaps, Path("/proc"), btime=0.0)
        index = RankIndex(ranks)
        index.lookup([1, 2, 3])
        for snap in snaps:
            training.lifecycle(snap)
            training.current_phase(snap)


# --- what the SDK writes comes through ------------------------------------------------------------------------

# NUL is left out: the SDK cannot time a phase whose name holds one (its phase class is named after it).
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1,
                max_size=40)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    job=names,
    node=names,
    rank=st.integers(0, 1023),
    steps=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 10**12), st.lists(names, max_size=3)), max_size=12),
    loss=st.floats(allow_nan=True, allow_infinity=True),
    lr=st.floats(min_value=0, max_value=10),
    checkpoint=st.booleans(),
)
def test_what_the_sdk_writes_round_trips_to_the_families(
    job: str,
    node: str,
    rank: int,
    steps: list[tuple[int, int, list[str]]],
    loss: float,
    lr: float,
    checkpoint: bool,
) -> None:
    """A snapshot the SDK wrote is never refused or trimmed, and its figures are the families' values."""
    with tempfile.TemporaryDirectory() as d:
        m = TrainingMonitor(job, rank, rank + 1, d, node=node, flush_interval=60)
        for samples, tokens, phases in steps:
            with m.step(samples=samples, tokens=tokens):
                for p in phases:
                    with m.phase(p):
                        pass
                m.record(loss=loss, lr=lr)
        if checkpoint:
            with m.checkpoint():
                pass
        m.close()
        ranks = RankDirectory(d, retention=None)
        (snap,) = ranks.snapshots()
        assert ranks.errors == {} and ranks.dropped == {}
        text = render(training.families([snap])).decode()
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    lb = (("job", job), ("node", node), ("rank", str(rank)))
    assert values[("mlops_training_steps_total", lb)] == len(steps)
    assert values[("mlops_training_samples_total", lb)] == float(sum(s for s, _, _ in steps))
    assert values[("mlops_training_tokens_total", lb)] == float(sum(t for _, t, _ in steps))
    phases = {dict(k[1])["phase"] for k in values if k[0] == "mlops_training_phase_seconds_total"}
    assert phases >= {p for _, _, ps in steps for p in ps}  # and the phases every monitor declares
    if steps:
        got = values[("mlops_training_loss", lb)]
        assert got == loss or (math.isnan(got) and math.isnan(loss))
        assert values[("mlops_training_learning_rate", lb)] == lr
        assert values[("mlops_training_nonfinite_loss_total", lb)] == (0 if math.isfinite(loss) else len(steps))


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0, True), (2**53, True), (2**53 + 1, False), (-1, False), (1.5, True), (True, False), ("1", False),
     (float("nan"), False), (float("inf"), False)],
)  # fmt: skip
def test_the_counter_rule(value: Any, ok: bool) -> None:
    try:
        validate.counter(value)
    except validate.Invalid:
        assert not ok
    else:
        assert ok
