"""The Plan page in a real Chromium: edit, re-optimise a tiny plan, watch it run, read the DVH and criteria,
move the slice, load the reference dose and compare two runs. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("pytest_playwright")
from playwright.sync_api import expect

from vmat_core import jobs

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="system Chromium not installed")

ARTIFACTS = Path(__file__).parent / "artifacts"
JOB_TIMEOUT_MS = 150_000


@pytest.fixture()
def served_app(page, case_dir):
    import panel as pn
    from panel.tests.util import serve_component

    from app import main

    pn.state.cache.pop(main._WORKERS_KEY, None)
    page.set_viewport_size({"width": 1600, "height": 2300})  # the whole page in one screenshot
    msgs, _port = serve_component(page, main.create_app)
    yield page, msgs
    pn.state.kill_all_servers()
    jobs.stop_embedded_workers(pn.state.cache.pop(main._WORKERS_KEY, None) or [])



def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _fill(page, css_class: str, value: str) -> None:
    box = page.locator(f".{css_class} input").first
    box.fill(value)
    box.press("Enter")


def _tiny_config(page, beams: str, time_limit: str) -> None:
    _fill(page, "beam-ids", beams)
    _fill(page, "voxel-x", "12")
    _fill(page, "voxel-y", "12")
    _fill(page, "voxel-z", "2")
    _fill(page, "time-limit", time_limit)


def _run_job(page) -> None:
    button = page.locator(".reoptimise button")
    expect(button).to_be_enabled(timeout=10_000)
    button.click()
    # the badge of the previous job says "done" until this one is queued
    expect(page.locator(".job-status")).not_to_contain_text("done", timeout=10_000)
    expect(page.locator(".job-status")).to_contain_text("done", timeout=JOB_TIMEOUT_MS)


def test_plan_page_end_to_end(served_app):
    page, msgs = served_app
    expect(page.locator(".topbar")).to_be_visible(timeout=20_000)
    expect(page.locator(".topbar")).to_contain_text("Solver:")
    _shot(page, "plan_01_loaded")

    # an invalid weight is flagged next to its row and blocks submit; a valid one is accepted
    _fill(page, "weight-CORD_quadratic", "-1")
    expect(page.locator(".objective-row").filter(has_text="must be ≥ 0").first).to_be_visible()
    expect(page.locator(".reoptimise button")).to_be_disabled()
    _fill(page, "weight-CORD_quadratic", "15")
    expect(page.locator(".reoptimise button")).to_be_enabled()

    _tiny_config(page, "0, 36", "10")
    expect(page.locator(".beam-summary")).to_contain_text("2 of 72 control points")
    button = page.locator(".reoptimise button")
    button.click()
    # progress: the console and the chart fill while the job runs
    expect(page.locator(".job-status")).to_contain_text("Job", timeout=10_000)
    expect(page.locator(".solver-console")).not_to_contain_text("no solver output", timeout=JOB_TIMEOUT_MS)
    _shot(page, "plan_02_running")
    expect(page.locator(".job-status")).to_contain_text("done", timeout=JOB_TIMEOUT_MS)

    # the DVH and the criteria of the new run
    expect(page.locator(".dvh-header")).to_contain_text("Run", timeout=20_000)
    expect(page.locator(".dvh-plot canvas").first).to_be_visible()
    rows = page.locator(".criteria-table .tabulator-row")
    expect(rows.first).to_be_visible(timeout=20_000)
    assert rows.count() >= 5
    expect(page.locator(".criteria-header")).to_contain_text("PTV minimum coverage")
    expect(page.locator(".live-status")).to_contain_text(re.compile(r"optimal|gap \d"))  # the run's gap badge
    _shot(page, "plan_03_done")

    # the slice slider changes the image
    viewer = page.locator(".axial-viewer").first
    expect(viewer).to_be_visible()
    before = viewer.screenshot()
    nxt = page.locator(".axial-viewer button", has_text="▶").first
    for _ in range(4):
        nxt.click()
    expect(page.locator(".axial-viewer")).to_be_visible()
    page.wait_for_timeout(0)
    deadline = time.monotonic() + 10
    after = viewer.screenshot()
    while after == before and time.monotonic() < deadline:
        page.wait_for_timeout(200)
        after = viewer.screenshot()
    assert after != before, "moving the slice did not change the axial image"

    # the reference dose
    page.locator("button", has_text="Load prior plan dose").first.click()
    expect(page.locator(".dvh-header")).to_contain_text("Reference plan", timeout=180_000)
    expect(page.locator(".criteria-header")).to_contain_text("Reference plan")
    _shot(page, "plan_04_reference")

    # a second tiny run, then compare it with the first
    _tiny_config(page, "0, 24, 48", "5")
    _run_job(page)
    expect(page.locator(".dvh-header")).to_contain_text("3 beams", timeout=20_000)
    select_a = page.locator(".compare-a select")
    select_b = page.locator(".compare-b select")
    # none, reference, and both runs of this page (other tests of the session may have added runs of the case)
    expect(select_a.locator("option").nth(3)).to_be_attached(timeout=20_000)
    expect(select_a).to_contain_text("3 beams")
    select_a.select_option(index=3)
    select_b.select_option(index=2)
    delta = page.locator(".delta-table .tabulator-row")
    expect(delta.first).to_be_visible(timeout=20_000)
    assert delta.count() >= 4
    expect(page.locator(".compare-header")).to_contain_text("A (solid)")
    _shot(page, "plan_05_compare")
    # Web fonts the template asks a CDN for cannot load offline; any script error would be listed here.
    errors = [m.text for m in msgs if m.type == "error" and "net::ERR_" not in m.text]
    assert not errors, errors
