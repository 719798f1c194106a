"""The parity dashboard in a real browser: Debian's Chromium driven by Playwright (never a downloaded browser).

The reconciliation panel: empty with a shadow worker; with made-up data, the windows that differ with their
labels and likely causes, the invoice lines, a narrow screen that never scrolls sideways.

With a worker: the page loads behind its signed link, the chart renders with data, hovering a bucket names its
flagged org, clicking it lists the bucket's orgs, a worst-org row picks its row in the drift table, and at
420 px wide nothing scrolls sideways. Without a worker (the page served from its own files with made-up data):
one huge drift does not flatten the drift chart, buckets without data are gaps, a long list of flagged orgs is
named on hover.

Skips when no Chromium is installed, unless EDGEBILL_TEST_REQUIRE_BROWSER=1 (CI sets it): then it fails.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from parity_stack import SECRET, ParityStack, parity_stack
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.devkit.simulator import FleetSpec, build_fleet, inject_drift, pick_drift_specs
from models.parity import dashboard_token
from streams.web import dashboard_html

pytestmark = pytest.mark.integration

H = 3600
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class _BrowserEnv(BaseSettings):
    """``EDGEBILL_TEST_CHROMIUM`` (where the browser is) and ``EDGEBILL_TEST_REQUIRE_BROWSER`` (fail, not skip)."""

    model_config = SettingsConfigDict(env_prefix="EDGEBILL_TEST_", frozen=True, extra="ignore")

    chromium: Path = Path("/usr/bin/chromium")
    require_browser: bool = False


def _chromium() -> str:
    env = _BrowserEnv()
    if env.chromium.is_file() and os.access(env.chromium, os.X_OK):
        return str(env.chromium)
    why = f"no Chromium at {env.chromium} (`apt-get install -y chromium`; .ci/run installs it)"
    if env.require_browser:
        pytest.fail(f"{why}; EDGEBILL_TEST_REQUIRE_BROWSER=1, so the browser tests fail instead of skipping")
    pytest.skip(why)


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    """One Chromium for the module. Playwright's sync API holds an event loop on this thread while it runs, so
    a test asks for its stack (which publishes with ``asyncio.run``) before this fixture."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def _page(browser: Any, width: int = 1400, height: int = 1600) -> Any:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(20_000)
    return page


def _rendered(page: Any) -> None:
    page.wait_for_selector("body[data-rendered]", state="attached")


def _no_sideways_scroll(page: Any) -> dict[str, int]:
    sizes: dict[str, int] = page.evaluate(
        """() => ({inner: window.innerWidth, doc: document.documentElement.scrollWidth,
                   body: document.body.scrollWidth,
                   widest: Math.max(...[...document.querySelectorAll('main > section, header')]
                                    .map(e => Math.ceil(e.getBoundingClientRect().right)))})"""
    )
    assert sizes["doc"] <= sizes["inner"] and sizes["body"] <= sizes["inner"], sizes
    assert sizes["widest"] <= sizes["inner"], sizes
    return sizes


# --------------------------------------------------------------------------------------- with a worker


@pytest.fixture(scope="module")
def drifted(chromium: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A worker with a fleet whose one org lost a sandbox's ticks for an hour; (stack, fleet, case, spec)."""
    with parity_stack(kafka_bootstrap, tmp_path_factory.mktemp("dashboard")) as stack:
        now = int(time.time())
        fleet = build_fleet(FleetSpec(orgs=6, hours=3, start=(now // H - 4) * H, seed=21, free_orgs=1))
        (spec,) = pick_drift_specs(fleet, ["missing"], seed=2)
        case = inject_drift(fleet, [spec])
        n_scale = stack.publish_fleet(fleet, case.ticks)
        stack.start_worker()
        stack.wait_parity(len(case.ticks), n_scale)
        stack.wait(stack.web_up, 30, "the web server")
        yield stack, fleet, case, spec


def _url(stack: ParityStack) -> str:
    return (
        f"http://127.0.0.1:{stack.web_port}/dashboard?token={dashboard_token(SECRET.encode(), int(time.time()) + 600)}"
    )


def test_dashboard_renders_the_parity_chart_in_headless_chromium(drifted: Any, browser: Any, tmp_path: Path) -> None:
    stack, fleet, case, spec = drifted
    now = int(time.time())
    page = _page(browser)
    page.goto(_url(stack))
    _rendered(page)
    dom = page.content()
    # The page loaded through the signed link (token -> cookie -> page) and the script ran.
    assert page.url.endswith("/dashboard")  # the token left the address bar
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
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    page.context.close()

    # Without the link: refused; a forged or expired token: refused.
    assert stack.get("/dashboard").status == 401
    assert stack.get(f"/dashboard?token={dashboard_token(b'wrong', now + 600)}").status == 401
    assert stack.get(f"/dashboard?token={dashboard_token(SECRET.encode(), now - 1)}").status == 401


def test_hover_names_the_flagged_org_and_click_lists_the_bucket(drifted: Any, browser: Any) -> None:
    stack, _fleet, case, spec = drifted
    (org, bucket) = sorted(case.affected)[0]
    page = _page(browser)
    page.goto(_url(stack))
    _rendered(page)
    tip = page.locator("#tip")
    assert tip.is_hidden()

    flagged = page.locator(f'#chart-svg g.bucket[data-start="{bucket}"]')
    assert flagged.locator("circle.flag").count() == 1
    flagged.hover()
    tip.wait_for(state="visible")
    assert f"orgs flagged: {org}" in tip.inner_text()
    page.mouse.move(2, 2)
    tip.wait_for(state="hidden")
    page.locator(f'#drift-svg circle.point[data-start="{bucket}"]').hover()
    assert org in tip.inner_text()

    flagged.click()
    detail = page.locator("#bucket-detail")
    detail.wait_for(state="visible")
    rows = page.locator("#bucket-orgs tr.bucket-org")
    assert rows.first.get_attribute("data-org") == org  # flagged first
    assert rows.first.locator("td").last.inner_text() != "ok"
    assert page.locator(f'#orgs th.sel[data-start="{bucket}"]').count() == 1
    assert page.locator(f'#chart-svg g.bucket.selected[data-start="{bucket}"]').count() == 1
    page.locator("#bucket-detail-close").click()
    detail.wait_for(state="hidden")
    assert page.locator("#orgs th.sel").count() == 0

    page.locator("#worst tr.worst-row", has_text=spec.org_id).first.click()
    picked = page.locator("#orgs tr.org-row.picked")
    picked.wait_for(state="visible")
    assert picked.get_attribute("data-org") == spec.org_id
    detail.wait_for(state="visible")
    page.context.close()


def test_dashboard_at_420_px_never_scrolls_sideways(drifted: Any, browser: Any, tmp_path: Path) -> None:
    stack, _fleet, case, _spec = drifted
    page = _page(browser, width=420, height=900)
    page.goto(_url(stack))
    _rendered(page)
    _no_sideways_scroll(page)
    chart = page.locator("#chart-svg").bounding_box()
    assert chart is not None and chart["x"] >= 0 and chart["x"] + chart["width"] <= 420
    # Wide tables scroll inside their own box, not the page.
    assert page.evaluate("document.querySelector('#orgs').closest('.scroll').clientWidth") <= 420
    # Tap-sized interactions still work on the narrow page.
    (_org, bucket) = sorted(case.affected)[0]
    page.locator(f'#chart-svg g.bucket[data-start="{bucket}"]').click()
    page.locator("#bucket-detail").wait_for(state="visible")
    _no_sideways_scroll(page)
    page.screenshot(path=str(tmp_path / "dashboard-420.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 900})  # and back: the charts follow the width
    page.wait_for_function("() => document.querySelector('#chart-svg').getAttribute('width') > 1000")
    page.context.close()


# --------------------------------------------------------------------------- the page alone, made-up data

ORIGIN = "http://dashboard.test"


def _bucket(i: int, drift: float, orgs: int = 4, flagged_orgs: tuple[str, ...] = ()) -> dict[str, Any]:
    start = 1_781_560_800 + i * H
    cell = 1000.0 if orgs else 0.0
    return {
        "start": start,
        "label": time.strftime("%m-%d %H:%M", time.gmtime(start)),
        "edge": round(cell * (1 + drift), 3) if orgs else 0.0,
        "cell": cell,
        "drift": drift if orgs else 0.0,
        "orgs": orgs,
        "flagged": len(flagged_orgs),
        "flagged_orgs": list(flagged_orgs[:20]),
        "settled": True,
    }


def _data(buckets: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "now_ms": (buckets[-1]["start"] + H) * 1000,
        "refreshed_ms": None,
        "watermark_ms": None,
        "bucket_seconds": H,
        "tolerance": "0.02",
        "gate": {"clean_hours": 0, "open": False, "required_hours": 72, "last_flagged": None},
        "buckets": buckets,
        "orgs": [],
        "worst": [],
        "lag": [],
        "alerts": [],
    }


def _serve(browser: Any, data: dict[str, Any], width: int = 1200) -> Any:
    """The dashboard's own HTML, script and style with ``data`` embedded, from a made-up origin (no network)."""
    static = resources.files("streams") / "static"
    files = {
        "/dashboard": ("text/html", dashboard_html(data).encode()),
        "/dashboard/app.js": ("application/javascript", (static / "app.js").read_bytes()),
        "/dashboard/app.css": ("text/css", (static / "app.css").read_bytes()),
    }
    page = _page(browser, width=width, height=900)

    def answer(route: Any) -> None:
        path = route.request.url.removeprefix(ORIGIN).split("?")[0]
        if path in files:
            ctype, body = files[path]
            route.fulfill(status=200, content_type=ctype, body=body)
        else:
            route.fulfill(status=404, body=b"")

    page.route(f"{ORIGIN}/**", answer)
    page.goto(f"{ORIGIN}/dashboard")
    _rendered(page)
    return page


def _cys(page: Any, selector: str) -> list[float]:
    return [float(c) for c in page.eval_on_selector_all(selector, "els => els.map(e => e.getAttribute('cy'))")]


def test_one_outlier_does_not_flatten_the_drift_chart(browser: Any) -> None:
    drifts = [0.012, -0.008, 0.015, -0.011, 9.0, 0.005, -0.014, 0.01]  # one bucket at +900 %
    page = _serve(
        browser, _data([_bucket(i, d, flagged_orgs=("org_x",) if d > 1 else ()) for i, d in enumerate(drifts)])
    )
    outlier = page.locator("#drift-svg circle.point.clipped")
    assert outlier.count() == 1 and outlier.get_attribute("data-drift") == "9"
    assert page.locator("#drift-svg path.clip-mark").count() == 1
    assert "1 bucket off the scale" in page.locator("#drift-note").inner_text()
    # The axis follows the other buckets (never tighter than twice the tolerance): the tolerance band fills half
    # the chart and the largest ordinary drift (1.5 %, under the 2 % tolerance) sits well off the zero line;
    # scaled to the outlier it would be a fraction of a pixel from it.
    axis = float(page.locator("#drift-svg line.axis").get_attribute("y1") or 0)
    half = axis - 12  # the chart's top margin
    tol = [
        float(y) for y in page.eval_on_selector_all("#drift-svg line.tol", "els => els.map(e => e.getAttribute('y1'))")
    ]
    assert sorted(round(abs(y - axis) / half, 2) for y in tol) == [0.5, 0.5]
    normal = _cys(page, "#drift-svg circle.point:not(.clipped)")
    assert len(normal) == 7
    assert max(abs(y - axis) for y in normal) / half == pytest.approx(0.015 / 0.04, abs=0.01)
    # Its value is not lost: the tooltip has it.
    outlier.hover()
    assert "+900.00%" in page.locator("#tip").inner_text()
    page.context.close()


def test_small_drifts_are_not_clipped(browser: Any) -> None:
    drifts = [0.012, -0.008, 0.03, -0.011]  # the largest is not an outlier: nothing is clipped
    page = _serve(browser, _data([_bucket(i, d) for i, d in enumerate(drifts)]))
    assert page.locator("#drift-svg circle.point.clipped").count() == 0
    assert page.locator("#drift-note").inner_text() == ""
    page.context.close()


def test_buckets_without_data_are_gaps_in_the_line(browser: Any) -> None:
    buckets = [_bucket(0, 0.01), _bucket(1, 0.02), _bucket(2, 0.0, orgs=0), _bucket(3, 0.0, orgs=0)]
    buckets += [_bucket(4, -0.01), _bucket(5, 0.005), _bucket(6, 0.0, orgs=0), _bucket(7, 0.01)]
    page = _serve(browser, _data(buckets))
    assert page.locator("#drift-svg circle.point").count() == 5  # no point where there is no data
    assert page.locator("#drift-svg rect.gap").count() == 3
    # Two lines (0-1 and 4-5); bucket 7 stands alone after the last gap.
    lines = page.eval_on_selector_all("#drift-svg polyline.line", "els => els.map(e => e.getAttribute('points'))")
    assert [len(pts.split()) for pts in lines] == [2, 2]
    page.locator(f'#chart-svg g.bucket[data-start="{buckets[2]["start"]}"]').hover()
    assert "no data in this bucket" in page.locator("#tip").inner_text()
    page.context.close()


def test_hover_names_many_flagged_orgs_and_counts_the_rest(browser: Any) -> None:
    names = tuple(f"org_{i:02d}" for i in range(25))
    b = _bucket(0, 0.3, orgs=30, flagged_orgs=names)
    b["flagged"] = 25
    page = _serve(browser, _data([b, _bucket(1, 0.01)]), width=420)
    _no_sideways_scroll(page)
    page.locator(f'#chart-svg g.bucket[data-start="{b["start"]}"]').hover()
    tip = page.locator("#tip")
    text = tip.inner_text()
    assert "25 of 30 orgs flagged: org_00, org_01" in text and "org_19 and 5 more" in text
    box = tip.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 420  # stays on the narrow screen
    page.context.close()


def test_reconciliation_panel_with_a_worker_says_nothing_was_compared(drifted: Any, browser: Any) -> None:
    stack, _fleet, _case, _spec = drifted  # a shadow worker: nothing is sent, so nothing is reconciled
    page = _page(browser)
    page.goto(_url(stack))
    _rendered(page)
    panel = page.locator("#reconcile-panel")
    assert panel.is_visible()
    assert "no reconciliation yet" in page.locator("#reconcile-summary").inner_text()
    assert page.locator("#reconcile tr.recon-row").count() == 0
    page.context.close()


def _reconcile(differences: int = 2) -> dict[str, Any]:
    day = 1_781_481_600
    rows = [
        {
            "org_id": "org_short",
            "customer": "cus_1",
            "meter": "sandbox_compute_sandbox_overage",
            "window_start": day,
            "grouping": "day",
            "label": "short",
            "ledger": "1234.567891",
            "stripe": "1000.25",
            "streak": 2,
            "causes": [
                {
                    "cause": "missing_at_stripe",
                    "value": "200",
                    "rows": 1,
                    "explains": "sent, but Stripe does not hold it",
                },
                {"cause": "rejected_after_send", "value": "34.317891", "rows": 1, "explains": "refused after the send"},
            ],
        },
        {
            "org_id": "org_meter_" + "x" * 40,
            "customer": "cus_2",
            "meter": "sandbox_compute_sandbox_4gb",
            "window_start": day,
            "grouping": "day",
            "label": "meter_misconfigured",
            "ledger": "3600",
            "stripe": "3600",
            "streak": 1,
            "causes": [{"cause": "meter_misconfigured", "value": "0", "rows": 0, "explains": "the meter is inactive"}],
        },
    ][:differences]
    return {
        "last_run": {
            "id": 7,
            "started_ms": (day + 2 * 86400) * 1000,
            "finished_ms": (day + 2 * 86400) * 1000 + 4000,
            "window_lo": day - 5 * 86400,
            "window_hi": day + 2 * 86400,
            "grouping": "day",
            "compared": 12,
            "differences": len(rows),
            "unsettled": 3,
            "requests": 17,
            "throttled": 1,
            "invoice_lines": 9,
            "invoice_differences": 1,
            "error": None,
        },
        "by_label": {"ok": 12 - len(rows), "short": 1, "meter_misconfigured": len(rows) - 1},
        "differences": rows,
        "alerts": [
            {
                "id": "stripe_reconcile:day:1:m:abc:6",
                "org_id": "org_short",
                "meter": "m",
                "window_start": day,
                "label": "short",
                "published": True,
            }
        ],
        "invoices": [
            {
                "org_id": "org_short",
                "subscription": "sub_1",
                "price": "price_1",
                "meter": "sandbox_compute_sandbox_overage",
                "period_start": day - 10 * 86400,
                "period_end": day + 20 * 86400,
                "stripe": "1000.25",
                "ledger": "1234.567891",
                "pending": "0",
                "label": "short",
                "detail": "",
                "checked_ms": (day + 2 * 86400) * 1000,
            }
        ],
        "repairs": 1,
        "newest_compared": day + 86400 + 14 * 3600,
        "recent_repairs": [
            {
                "id": 1,
                "row": "org_over:1781557200:sandbox_compute_sandbox_overage:r1",
                "action": "credit",
                "new_row": None,
                "value": "-7.5",
                "cause": "stripe_holds_more",
                "hour": day + 86400 + 13 * 3600,
                "window": None,
                "excess": "7.5",
                "by": "ops@host",
                "reason": "another sender billed it",
                "created_ms": (day + 2 * 86400) * 1000,
            }
        ],
    }


def test_reconciliation_panel_lists_differences_causes_and_invoices(browser: Any) -> None:
    data = _data([_bucket(i, 0.01) for i in range(4)])
    data["reconcile"] = _reconcile()
    page = _serve(browser, data)
    summary = page.locator("#reconcile-summary")
    assert "bad" in (summary.get_attribute("class") or "")
    assert page.locator("#reconcile-differences").inner_text() == "2"
    text = summary.inner_text()
    assert "of 12 compared" in text and "3 not settled yet" in text and "17 Stripe request(s), 1 throttled" in text
    rows = page.locator("#reconcile tr.recon-row")
    assert rows.count() == 2
    short = page.locator('#reconcile tr.recon-row[data-label="short"]')
    cells = short.locator("td")
    assert cells.nth(0).inner_text() == "2026-06-15"
    assert cells.nth(3).inner_text() == "1234.567891" and cells.nth(4).inner_text() == "1000.25"
    assert cells.nth(5).inner_text() == "short" and cells.nth(6).inner_text() == "2"
    causes = short.locator("td.cause div")
    assert causes.nth(0).inner_text() == "missing at stripe 200 (1 row)"
    assert causes.nth(0).get_attribute("title") == "sent, but Stripe does not hold it"
    assert page.locator('#reconcile tr.recon-row[data-label="meter_misconfigured"] td.label').inner_text() == (
        "meter misconfigured"
    )
    inv = page.locator("#invoices tr.invoice-row")
    assert inv.count() == 1 and inv.locator("td.label").inner_text() == "short"
    # The newest window compared, so a stale reconciliation is visible; the repairs, with who and why.
    assert page.locator("#reconcile-newest").inner_text().endswith("2026-06-16T14:00:00Z")
    credit = page.locator('#repairs tr.repair-row[data-action="credit"] td')
    assert credit.nth(1).inner_text() == "credit" and credit.nth(3).inner_text() == "2026-06-16 13:00"
    assert credit.nth(4).inner_text() == "-7.5" and credit.nth(5).inner_text() == "ops@host: another sender billed it"
    page.context.close()
    # On a narrow screen the panel's tables scroll in their own box; the page never does.
    page = _serve(browser, data, width=420)
    _no_sideways_scroll(page)
    assert page.evaluate("document.querySelector('#reconcile').closest('.scroll').clientWidth") <= 420
    page.context.close()
    # A clean run reads clean.
    data["reconcile"] = _reconcile(differences=0)
    data["reconcile"]["last_run"]["invoice_differences"] = 0
    page = _serve(browser, data)
    assert "ok" in (page.locator("#reconcile-summary").get_attribute("class") or "").split()
    assert "every compared window matches Stripe" in page.locator("#reconcile").inner_text()
    page.context.close()
    # A run that compared nothing never reads clean.
    data["reconcile"]["last_run"]["compared"] = 0
    page = _serve(browser, data)
    summary = page.locator("#reconcile-summary")
    assert "bad" in (summary.get_attribute("class") or "").split()
    assert "compared NOTHING" in summary.inner_text() and "3 window(s) not settled yet" in summary.inner_text()
    page.context.close()


def test_a_missing_browser_fails_when_required(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEBILL_TEST_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("EDGEBILL_TEST_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="EDGEBILL_TEST_REQUIRE_BROWSER=1"):
        _chromium()
    monkeypatch.setenv("EDGEBILL_TEST_REQUIRE_BROWSER", "0")
    with pytest.raises(pytest.skip.Exception, match="no Chromium at"):
        _chromium()
