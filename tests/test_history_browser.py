"""The History and Jobs pages in a real Chromium, served beside the Plan page: filter the grid, open a run in the
Plan page and read its DVH; cancel a queued job. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import re
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

pytest.importorskip("pytest_playwright")
from playwright.sync_api import expect

from vmat_core import paths

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="system Chromium not installed")

ARTIFACTS = Path(__file__).parent / "artifacts"
TINY = ["beam_ids=12,30", "voxel_down_sample_factors=12,12,2", "solver.time_limit_s=20"]
JOB_TIMEOUT_MS = 150_000
N_OTHER = 120  # rows of another case, so the grid has pages and the filter something to remove


@pytest.fixture(scope="module")
def history_data(tmp_path_factory, case_dir):
    """A data directory of its own: one real run, a newer run of the same case with three beams (so the Plan
    page's default, the newest run, is not the one the test opens) and rows of another case."""
    from vmat_core.config import apply_overrides, default_config
    from vmat_core.runner import run_vmat_global_optimal
    from vmat_core.store import RunStore, new_run_id

    data = tmp_path_factory.mktemp("history-data")
    (data / "portpy").symlink_to(case_dir.parent, target_is_directory=True)
    store = RunStore(data / "runs")
    mp = pytest.MonkeyPatch()
    mp.setenv(paths.DATA_DIR_ENV, str(data))
    cfg = apply_overrides(default_config(), TINY)
    real = run_vmat_global_optimal(cfg, store=store)

    newer = dict(real.metadata)
    newer.update(created_at=real.metadata["created_at"] + timedelta(hours=1), beam_ids=[12, 30, 48], n_beams=3,
                 status="time_limit", gap=0.08)
    newer_id = new_run_id("three-beams", newer["created_at"])
    store.write_run(newer_id, config=cfg.to_dict(), metadata=newer, arrays=store.read_arrays(real.run_id),
                    tables={name: store.read_table(real.run_id, name)
                            for name in ("dvh", "metrics", "criteria", "progress")})
    for i in range(N_OTHER):
        md = {k: v for k, v in real.metadata.items() if not k.startswith(("PTV", "CORD"))}
        md.update(created_at=real.metadata["created_at"] - timedelta(minutes=i + 1), case_id="Lung_Synth_Patient_2",
                  solver="SCIP", gap=0.002 * i, status="optimal" if i < 3 else "time_limit",
                  objective=1000.0 + 10 * i, bound=(1000.0 + 10 * i) * (1 - 0.002 * i),
                  PTV_d95_gy=50 + (i % 20) / 2, CORD_max_gy=30 + (i * 7 % 30) / 2, w_CORD_quadratic=float(i % 5))
        store.write_run(new_run_id(f"other-{i}", md["created_at"]), config={"i": i}, metadata=md)
    yield data, real.run_id, newer_id
    mp.undo()


@pytest.fixture()
def served(page, history_data):
    import panel as pn
    from panel.tests.util import serve_component

    from app import main, state
    from app.history_page import create_history_page
    from app.jobs_page import create_jobs_page
    from vmat_core import jobs

    data, _, _ = history_data
    mp = pytest.MonkeyPatch()
    mp.setenv(paths.DATA_DIR_ENV, str(data))
    jobs.reset_job_clients()
    state._PLAN_CACHE.clear()
    # No embedded workers: this test reads runs and queues a job it then cancels.
    mp.setitem(pn.state.cache, main._WORKERS_KEY, [])
    page.set_viewport_size({"width": 1500, "height": 1400})
    pages = {"/": main.create_app, "/history": create_history_page, "/jobs": create_jobs_page}
    msgs, port = serve_component(page, pages, suffix="/history")
    yield page, msgs, port
    pn.state.kill_all_servers()
    jobs.reset_job_clients()
    state._PLAN_CACHE.clear()
    mp.undo()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _errors(msgs) -> list[str]:
    # Web fonts the template asks a CDN for cannot load offline; any script error would be listed here.
    return [m.text for m in msgs if m.type == "error" and "net::ERR_" not in m.text]


def test_filter_the_history_and_open_a_run_in_the_plan_page(served, history_data) -> None:
    page, msgs, _port = served
    _, real_id, newer_id = history_data
    total = N_OTHER + 2
    status = page.locator(".history-status")
    expect(status).to_contain_text(f"{total} of {total} runs", timeout=30_000)
    rows = page.locator(".runs-grid .tabulator-row")
    expect(rows.first).to_contain_text(newer_id, timeout=20_000)
    # pages of 50 from DuckDB: the pager knows there are three
    pager = page.locator(".runs-grid .tabulator-page[data-page]")
    expect(page.locator(".runs-grid .tabulator-page[data-page='3']")).to_be_visible()
    expect(page.locator(".runs-grid .tabulator-page[data-page='4']")).to_have_count(0)
    assert pager.count() >= 3
    expect(page.locator(".parameter-space canvas").first).to_be_visible(timeout=30_000)
    _shot(page, "history_01_loaded")

    # sorting by a column is done by DuckDB over all runs, not within the page
    from vmat_core.store import RunStore

    lowest = RunStore().list_runs(order_by="objective ASC", limit=1)["run_id"].iloc[0]
    page.locator(".runs-grid .tabulator-col[tabulator-field='objective'] .tabulator-col-title").click()
    expect(rows.first).to_contain_text(lowest, timeout=20_000)

    # the pager asks the server for the next page
    page.locator(".runs-grid .tabulator-page[data-page='3']").click()
    expect(rows).to_have_count(total - 100, timeout=20_000)
    expect(rows.first).to_contain_text("Lung_Synth_Patient_2")

    # a header filter: only the runs of the first case remain (typing "patient_" first matches every run)
    case_filter = page.locator(".runs-grid .tabulator-col[tabulator-field='case_id'] input")
    case_filter.press_sequentially("patient_1")  # typed: Tabulator's header filter listens to key strokes
    expect(status).to_contain_text(f"2 of {total} runs", timeout=20_000)
    expect(rows).to_have_count(2, timeout=20_000)

    # the SQL box narrows further; a refused filter is explained beside the box and changes nothing
    box = page.locator(".where-box textarea")
    box.fill("n_beams = 2; DROP TABLE runs")
    page.locator(".apply-where button").click()
    expect(page.locator(".where-error")).to_contain_text("';' is not allowed", timeout=20_000)
    expect(rows).to_have_count(2)
    box.fill("n_beams = 2")
    page.locator(".apply-where button").click()
    expect(status).to_contain_text(f"1 of {total} runs matching", timeout=20_000)
    expect(page.locator(".where-error")).to_have_count(0)
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(real_id)

    rows.first.locator(".tabulator-row-handle input, input[type='checkbox']").first.click()
    link = page.locator("a.open-run")
    expect(link).to_be_visible(timeout=20_000)
    expect(link).to_have_attribute("href", f"./?run={real_id}")
    _shot(page, "history_02_filtered")
    assert not _errors(msgs), _errors(msgs)

    # the link leads to the Plan page, which draws a DVH
    link.click()
    page.wait_for_url(f"**/?run={real_id}", timeout=20_000)
    expect(page.locator(".dvh-header")).to_contain_text("Run", timeout=60_000)
    expect(page.locator(".dvh-plot canvas").first).to_be_visible(timeout=30_000)
    _shot(page, "history_03_opened_in_plan")


def test_the_plan_page_shows_the_run_named_in_its_url(served, history_data) -> None:
    page, _msgs, port = served
    _, real_id, _newer_id = history_data
    page.goto(f"http://127.0.0.1:{port}/?run={real_id}")
    header = page.locator(".dvh-header")
    expect(header).to_contain_text("Run", timeout=60_000)
    # the opened run has two beams; the Plan page's default (the newest run of the case) has three
    expect(header).to_contain_text("2 beams", timeout=30_000)
    expect(page.locator(".dvh-plot canvas").first).to_be_visible(timeout=30_000)
    _shot(page, "history_04_plan_shows_run")



def test_jobs_page_cancels_retries_and_follows_a_worker(served) -> None:
    page, msgs, port = served
    from vmat_core import jobs
    from vmat_core.config import apply_overrides, default_config

    client = jobs.get_job_client()
    queued = client.submit(apply_overrides(default_config(), [*TINY, "CORD/quadratic.weight=11"]))
    page.goto(f"http://127.0.0.1:{port}/jobs")
    row = page.locator(".jobs-table .tabulator-row", has_text=queued)
    expect(row).to_be_visible(timeout=30_000)
    expect(row).to_contain_text("queued")
    expect(page.locator(".no-workers")).to_be_visible()

    # no worker yet: the queued job is cancelled at once
    row.click()
    cancel = page.locator(".cancel-job button")
    expect(cancel).to_be_enabled(timeout=10_000)
    cancel.click()
    expect(page.locator(".jobs-message")).to_contain_text(f"Job {queued} is now cancelled", timeout=20_000)
    expect(row).to_contain_text("cancelled", timeout=20_000)
    _shot(page, "jobs_01_cancelled")

    # a worker starts: it appears with its heartbeat, and a retried job runs to a run on the next refreshes
    pids = jobs.start_embedded_workers(1)
    try:
        worker_row = page.locator(".workers-table .tabulator-row").first
        expect(worker_row).to_contain_text(re.compile(r"idle|busy"), timeout=60_000)
        expect(page.locator(".no-workers")).to_have_count(0)
        retry = page.locator(".retry-job button")
        expect(retry).to_be_enabled()
        retry.click()
        expect(page.locator(".jobs-message")).to_contain_text(f"Job {queued} submitted again as", timeout=20_000)
        new_id = page.locator(".jobs-message").inner_text().rsplit(" as ", 1)[1].rstrip(".")
        new_row = page.locator(".jobs-table .tabulator-row", has_text=new_id)
        # A tiny job on a warm worker can start and finish between two refreshes of the page (every 2 s).
        expect(new_row).to_contain_text(re.compile(r"running|done"), timeout=60_000)
        _shot(page, "jobs_02_running")
        expect(new_row).to_contain_text("done", timeout=JOB_TIMEOUT_MS)
        run_link = new_row.locator("a")
        expect(run_link).to_have_attribute("href", re.compile(r"^\./\?run=\d{8}T\d{6}Z-[0-9a-f]{10}$"))
        run_id = run_link.inner_text()
        assert client.status(new_id).run_id == run_id
        expect(worker_row).to_contain_text("idle", timeout=30_000)
        _shot(page, "jobs_03_done")
    finally:
        jobs.stop_embedded_workers(pids)
    assert not _errors(msgs), _errors(msgs)
