"""The ``--html`` report, opened in headless Chromium: the verdict is in the DOM, the screenshot is not
blank, and the page loads nothing from anywhere (no script, no link, no image source)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "rca"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: run scripts/setup.sh (Debian package chromium)")
    return path


def browse(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
           "--window-size=1000,1600", *mode, page.as_uri()]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=120)


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and raw RGB(A) rows of an 8-bit RGB/RGBA PNG (the five PNG row filters undone)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


@pytest.mark.parametrize(("bundle", "job", "verdict", "plot"), [
    ("scrash.tar.gz", "scrash", "fault", "Step rate per rank"),  # with Prometheus series
    ("stallj.tar.gz", "stallj", "fault", "Step reached per rank (from the step lines)"),  # logs only
])  # fmt: skip
def test_report_renders_in_chromium(tmp_path: Path, bundle: str, job: str, verdict: str, plot: str) -> None:
    page = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "mlops_obs", "rca", "--bundle", str(FIXTURES / bundle), "--job", job,
                        "--html", str(page)], capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode == 1 and f"report: {page}" in r.stdout, r.stderr
    html = page.read_text()
    # Self-contained: nothing to fetch (the only URL is SVG's namespace name, which is never loaded).
    assert not re.search(r"<script|<link|<img|<iframe|\ssrc=|\shref=|@import|url\(", html, re.I)
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {"http://www.w3.org/2000/svg"}

    dom = browse(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout.decode()
    assert f'data-verdict="{verdict}"' in text and 'id="root-summary"' in text
    summary = re.search(r'id="root-summary">([^<]+)<', text)
    assert summary and r.stdout.splitlines()[1].strip() == summary.group(1).replace("&amp;", "&")
    assert plot in text and "Timeline around the incident" in text

    shot = tmp_path / "shot.png"
    s = browse(page, tmp_path / "profile", f"--screenshot={shot}")
    assert s.returncode == 0 and shot.exists(), s.stderr[-2000:]
    width, height, rows = png_pixels(shot.read_bytes())
    assert (width, height) == (1000, 1600)
    step = len(rows[0]) // width
    inked = sum(1 for row in rows for i in range(0, len(row), step) if min(row[i : i + 3]) < 200)
    assert inked > 0.02 * width * height, inked  # text, tables and plots, not a blank page
    red = sum(1 for row in rows[:120] for i in range(0, len(row), step)
              if row[i] > 150 and row[i + 1] < 80 and row[i + 2] < 80)  # fmt: skip
    assert red > 200  # the verdict badge at the top
