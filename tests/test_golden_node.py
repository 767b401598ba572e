"""The reference node's whole ``/metrics`` body, byte for byte against the committed golden file."""

from __future__ import annotations

import difflib
from pathlib import Path

from tests.golden_node import GOLDEN, node_metrics


def test_full_node_scrape_matches_the_golden_file(tmp_path: Path) -> None:
    """8 fake GPUs + host fixtures + process + 8 ranks, three rounds: the same text in the same order as
    the file (written by ``tests/golden_node.py``); clock-dependent values are masked on both sides."""
    got = node_metrics(tmp_path)
    want = GOLDEN.read_text()
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "golden", "now", n=1))
        raise AssertionError(f"/metrics differs from {GOLDEN.name}:\n{diff[:6000]}")
