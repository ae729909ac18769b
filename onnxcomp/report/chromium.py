"""Open a report in headless Chromium: its rendered DOM, its console messages, a screenshot.

Used by the tests and benchmarks/bench_report.py to check that a page opens cleanly in a real
browser, and to make the screenshot in docs/. Nothing here is needed to write a report.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from onnxcomp.errors import OnnxcompError

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# No network, no first-run work, no background services: the page is all that loads.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
)


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, else None."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclasses.dataclass
class PageRun:
    dom: str  # the DOM after loading (with --dump-dom), else ""
    console: list[str]  # the page's console messages (script errors, failed loads, ...)
    seconds: float  # wall time of the browser process


def open_page(
    page: str | os.PathLike,
    *,
    screenshot: str | os.PathLike | None = None,
    window: tuple[int, int] = (1200, 2000),
    timeout: float = 120.0,
) -> PageRun:
    """Load ``page`` in headless Chromium; dump its DOM, or write a PNG ``screenshot``."""
    browser = find_chromium()
    if browser is None:
        raise OnnxcompError(f"no Chromium found (looked for {', '.join(NAMES)} on PATH)")
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="onnxcomp-chromium-") as profile:
        args = [
            browser,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={window[0]},{window[1]}",
        ]
        args += [f"--screenshot={Path(screenshot).resolve()}"] if screenshot else ["--dump-dom"]
        started = time.perf_counter()
        done = subprocess.run(
            [*args, url], capture_output=True, text=True, timeout=timeout, errors="replace"
        )
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise OnnxcompError(f"chromium exited with {done.returncode}: {tail[0]}")
    console = [
        line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line
    ]
    return PageRun("" if screenshot else done.stdout, console, seconds)
