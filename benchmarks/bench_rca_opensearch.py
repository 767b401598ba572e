#!/usr/bin/env python3
"""``rca`` against OpenSearch: how many requests and bytes the verdict costs, against reading the job's
events in full, for the 64-rank job of ``bench_rca.py`` at several sizes, in one run.

Reproduce with::

    .venv/bin/python benchmarks/bench_rca_opensearch.py                     # 25k and 100k events
    .venv/bin/python benchmarks/bench_rca_opensearch.py --events 200000 --url http://localhost:9200

Without ``--url`` the events go into ``tests/fake_opensearch.py`` (no cluster runs here), which
answers the same requests with the documented semantics; requests and bytes are properties of the
client's queries, not of the server's speed, so they carry over (times do not, and are not reported).
The events are shipped by the real shipper into the daily indices, as ``ship --opensearch`` does.

Measured per size: (1) ``SourceFacts(OpenSearchSource)``, what ``rca --opensearch`` runs: two
aggregations (per-rank facts, each rank's last 64 steps), filtered pages for the errors, the ranks'
tails, alerts/launcher/stack events and the incident window; (2) the baseline, the same analysis over
every event of the job read through the same source (pages of 10,000 through a point in time). Both
verdicts must agree. Bytes are the JSON of the request and response bodies.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_rca import JOB, write_job
from mlops_obs.logs.opensearch import OpenSearchSettings, OpenSearchSink, OpenSearchSource
from mlops_obs.logs.shipper import Shipper, ShipperOptions
from mlops_obs.logs.source import EventQuery
from mlops_obs.rca.sources import EventStream, SourceFacts
from mlops_obs.rca.verdict import analyse


def run(events: int, url: str | None, prefix: str) -> dict[str, object]:
    fake = None
    if url is None:
        from tests.fake_opensearch import FakeOpenSearch

        fake = FakeOpenSearch().start()
        url = fake.url
    try:
        with tempfile.TemporaryDirectory(prefix="bench-rca-os-") as d:
            logs = Path(d) / "logs"
            logs.mkdir()
            write_job(logs, events)
            settings = OpenSearchSettings(
                url=url, state_dir=Path(d) / "state", index_prefix=prefix, verify=False, timeout_s=900.0
            )  # the fake is slow at scale; bytes are what counts
            sink = OpenSearchSink(settings)
            sh = Shipper(ShipperOptions(sources=[str(logs / "*")], state_dir=Path(d) / "ship"), sink)
            sh.run(once=True)
            sh.close()
            sink.send([], threading.Event())
        if fake is None:
            sink.client.indices.refresh(index=f"{prefix}-*")
        fast = OpenSearchSource(settings)
        report, _ = analyse(SourceFacts(fast, url), JOB)
        full = OpenSearchSource(settings, page_size=10000)
        baseline, _ = analyse(EventStream(lambda: full.events(EventQuery(job=JOB)), url), JOB)
        assert report.to_json() == baseline.to_json(), "the two verdicts differ"
        assert report.root is not None and report.root.rank == 37, report.root
        return {"events": events, "rca_requests": fast.requests, "rca_bytes": fast.bytes_out + fast.bytes_in,
                "full_requests": full.requests, "full_bytes": full.bytes_out + full.bytes_in}  # fmt: skip
    finally:
        if fake is not None:
            fake.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, action="append", help="job size (repeatable; default 25000 and 100000)")
    ap.add_argument("--url", help="a real OpenSearch (its indices mlops-bench-*, deleted afterwards)")
    args = ap.parse_args()
    sizes = args.events or [25_000, 100_000]
    print(f"{'events':>9} {'rca req':>8} {'rca bytes':>12} {'full req':>9} {'full bytes':>12} {'bytes ratio':>11}")
    for n in sizes:
        r = run(n, args.url, f"mlops-bench-{n}")
        ratio = int(r["full_bytes"]) / max(1, int(r["rca_bytes"]))  # type: ignore[call-overload]
        print(f"{n:>9} {r['rca_requests']:>8} {r['rca_bytes']:>12,} {r['full_requests']:>9} "
              f"{r['full_bytes']:>12,} {ratio:>10.1f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
