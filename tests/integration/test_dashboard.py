"""The parity dashboard in a real headless browser (Debian's chromium): the page loads behind its signed
link, the chart renders with data, and a screenshot is taken. Skips when no browser is installed."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from parity_stack import SECRET, ParityStack, parity_stack

from infra.devkit.simulator import FleetSpec, build_fleet, inject_drift, pick_drift_specs
from models.parity import dashboard_token

pytestmark = pytest.mark.integration

H = 3600
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser installed (looked for {', '.join(BROWSERS)}; `apt-get install chromium`)")


def _chromium(browser: str, profile: Path, *args: str, timeout: float = 60) -> str:
    """Run headless chromium once with a fresh profile; its stdout. Stopped by PID (its own group)."""
    argv = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"chromium did not finish in {timeout}s:\n{err.decode(errors='replace')[-2000:]}"
        ) from None
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


@pytest.fixture
def stack(kafka_bootstrap: str, tmp_path: Path) -> Iterator[ParityStack]:
    with parity_stack(kafka_bootstrap, tmp_path) as s:
        yield s


def test_dashboard_renders_the_parity_chart_in_headless_chromium(stack: ParityStack, tmp_path: Path) -> None:
    browser = _browser()
    now = int(time.time())
    fleet = build_fleet(FleetSpec(orgs=6, hours=3, start=(now // H - 4) * H, seed=21, free_orgs=1))
    (spec,) = pick_drift_specs(fleet, ["missing"], seed=2)
    case = inject_drift(fleet, [spec])
    n_scale = stack.publish_fleet(fleet, case.ticks)
    stack.start_worker()
    stack.wait_parity(len(case.ticks), n_scale)
    stack.wait(stack.web_up, 30, "the web server")

    url = f"http://127.0.0.1:{stack.web_port}/dashboard?token={dashboard_token(SECRET.encode(), now + 600)}"
    dom = _chromium(browser, tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom", url)

    # The page loaded through the signed link (token -> cookie -> page) and the script ran.
    assert 'id="chart-svg"' in dom, dom[:2000]
    assert re.search(r'data-rendered="\d+"', dom)
    # The chart has one edge and one cell bar per bucket with data, with their values.
    data_buckets = {b for _, b in case.affected} | {t.ts_ms // 1000 // H * H for t in case.ticks}
    edge_bars = re.findall(r'<rect class="bar edge[^"]*"[^>]*data-value="([0-9.e+-]+)"', dom)
    cell_bars = re.findall(r'<rect class="bar cell[^"]*"[^>]*data-value="([0-9.e+-]+)"', dom)
    assert sum(1 for v in edge_bars if float(v) > 0) == len(data_buckets)
    assert sum(1 for v in cell_bars if float(v) > 0) == len(data_buckets)
    assert re.findall(r'<circle class="flag"', dom)  # the drifted bucket is marked
    assert len(re.findall(r'<circle class="point', dom)) == len(data_buckets)  # aggregate drift per bucket
    # Drift per org and the worst orgs: the drifted org is there, flagged.
    pro = sorted(o.org_id for o in fleet.orgs if o.plan == "pro")
    assert sorted(re.findall(r'<tr class="org-row" data-org="([^"]+)"', dom)) == pro
    assert re.search(rf'class="worst-row"><td>{spec.org_id}</td>', dom)
    assert 'id="clean-hours"' in dom

    shot = tmp_path / "dashboard.png"
    _chromium(
        browser,
        tmp_path / "profile-shot",
        "--virtual-time-budget=5000",
        "--hide-scrollbars",
        "--window-size=1400,1600",
        f"--screenshot={shot}",
        url,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    # Without the link: refused; a forged or expired token: refused.
    assert stack.get("/dashboard").status == 401
    assert stack.get(f"/dashboard?token={dashboard_token(b'wrong', now + 600)}").status == 401
    assert stack.get(f"/dashboard?token={dashboard_token(SECRET.encode(), now - 1)}").status == 401
