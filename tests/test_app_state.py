"""PlanState and the Plan page's views, driven through their parameters (no server, no browser).

The module runs in a data directory of its own holding two cases (hard-linked copies of the synthetic case), so
a case switch can be checked, and starts one real embedded worker, so a real job runs through the real ledger.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import panel as pn
import pytest

from vmat_core import jobs, paths
from vmat_core.phantom import CASE_ID

SECOND_CASE = "Lung_Synth_Patient_2"
TINY = {"beam_ids": [0, 36], "voxel_down_sample_factors": [12, 12, 2], "time_limit_s": 10.0}
JOB_TIMEOUT_S = 150.0


def _link_copy(src: Path, dst: Path) -> None:
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:  # another filesystem: a real copy
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


@pytest.fixture(scope="module")
def two_cases(case_dir, tmp_path_factory):
    """A data directory with two cases, made current for the module; embedded worker started lazily."""
    root = tmp_path_factory.mktemp("app-state-data")
    (root / "portpy").mkdir()
    _link_copy(case_dir, root / "portpy" / CASE_ID)
    _link_copy(case_dir, root / "portpy" / SECOND_CASE)
    old = os.environ.get(paths.DATA_DIR_ENV)
    os.environ[paths.DATA_DIR_ENV] = str(root)
    jobs.reset_job_clients()
    _clear_plan_cache()
    yield root
    jobs.reset_job_clients()
    _clear_plan_cache()
    if old is None:
        os.environ.pop(paths.DATA_DIR_ENV, None)
    else:
        os.environ[paths.DATA_DIR_ENV] = old


def _clear_plan_cache():
    from app import state as state_mod

    state_mod._PLAN_CACHE.clear()


@pytest.fixture(scope="module")
def worker(two_cases):
    pids = jobs.start_embedded_workers(1)
    yield pids
    jobs.stop_embedded_workers(pids)


@pytest.fixture(autouse=True)
def _reset_panel_state():
    yield
    pn.state.kill_all_servers()
    pn.state.cache.clear()


def _tiny(state):
    from app.objectives_panel import ObjectivesPanel  # noqa: F401  (the panel's own edit path is used below)

    cfg = state.config
    cfg.beam_ids = list(TINY["beam_ids"])
    cfg.voxel_down_sample_factors = list(TINY["voxel_down_sample_factors"])
    cfg.solver.time_limit_s = TINY["time_limit_s"]
    assert state.replace_config(cfg), state.config_error


def _wait_for_job(state) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = state.poll_job()
    while status not in ("done", "failed", "cancelled", "lost"):
        assert time.monotonic() < deadline, f"job {state.job_id} still {status} after {JOB_TIMEOUT_S} s"
        time.sleep(0.5)
        status = state.poll_job()
    return status


@pytest.fixture(scope="module")
def finished_run(two_cases, worker):
    """A real tiny optimisation of the first case submitted through the state; (state, run_id)."""
    from app.state import PlanState

    state = PlanState(case_id=CASE_ID)
    assert state.displayed_run_id is None  # fresh data directory: no runs yet
    _tiny(state)
    state.param.trigger("reoptimise")
    assert state.job_id, state.config_error
    progress_seen = []
    state.param.watch(lambda e: progress_seen.append(e.new), "job_progress")
    status = _wait_for_job(state)
    assert status == "done", f"job ended {status}: {state.job_error}"
    record = jobs.get_job_client().status(state.job_id)
    return state, record.run_id, progress_seen


def test_job_completion_becomes_the_displayed_run(finished_run):
    state, run_id, progress_seen = finished_run
    assert run_id
    assert state.displayed_run_id == run_id
    assert state.job_status == "done"
    # progress arrived through the state's own polling, with solver points for the live chart
    assert progress_seen and any(p.get("events") for p in progress_seen)
    from app.live_view import progress_frame

    frame = progress_frame(state.job_progress["events"])
    assert not frame.empty and frame["incumbent"].notna().any()
    from app.dvh_view import build_dvh

    overlay, header = build_dvh(state.case_id, run_id, state.visible_structures, state.structure_colors,
                                False, 95.0)
    labels = {el.label for el in overlay if el.label}
    assert "PTV" in labels and "CORD" in labels
    assert "gap" in header or "optimal" in header


def test_full_resolution_dose_is_pending_until_its_job_lands(finished_run):
    from vmat_core import runner

    state, run_id, _ = finished_run
    state.displayed_run_id = run_id
    assert state.full_dose_status == ""
    state.param.trigger("full_dose")
    assert state.full_dose_status == "pending"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while state.poll_full_dose() == "pending":
        assert time.monotonic() < deadline, "full-resolution dose still pending"
        time.sleep(0.5)
    assert state.full_dose_status == "ready", state.full_dose_status
    full = runner.reconstruct_full_dose(run_id)  # now a cache read
    assert state.displayed_run_id == run_id
    assert full["dose_3d_gy"].shape == state.case.ct_shape_zyx
    assert {"PTV", "CORD"} <= set(full["dvh"]["structure"])
    # a second request is answered from the cache, no new job
    state.displayed_run_id = None
    state.displayed_run_id = run_id
    assert state.full_dose_status == "ready"


def test_new_case_defaults(two_cases):
    from app.state import PlanState
    from vmat_core import imaging
    from vmat_core.config import default_config

    state = PlanState(case_id=SECOND_CASE)
    assert state.case.case_id == SECOND_CASE
    assert state.config.to_dict() == default_config(SECOND_CASE).to_dict()
    assert state.config_error == ""
    assert "PTV" in state.visible_structures and "CORD" in state.visible_structures
    assert not any(s.upper().startswith("RIND") for s in state.visible_structures)
    assert state.structure_colors["PTV"] == "#D62728"
    assert state.structure_colors["CORD"] != state.structure_colors["PTV"]
    ptv = imaging.structure_masks(SECOND_CASE, ["PTV"])["PTV"]
    zs = np.flatnonzero(ptv.any(axis=(1, 2)))
    assert abs(state.slice_index - (zs[0] + zs[-1]) / 2) <= 0.5
    assert ptv[state.slice_index].any()


def test_case_switch_resets_dependent_views_at_once(finished_run):
    from app.criteria_view import CriteriaView
    from app.dvh_view import DVHView
    from app.state import PlanState

    _, run_id, _ = finished_run
    state = PlanState(case_id=CASE_ID)
    assert state.displayed_run_id == run_id  # the most recent finished run of the case
    state.normalise = True
    edited = state.config
    edited.objectives[3].weight = 55.0
    state.set_config(edited)
    dvh, crit = DVHView(state=state), CriteriaView(state=state)
    dvh.__panel__()
    crit.__panel__()
    assert set(dvh._pipe.data["frames"]) >= {"PTV", "CORD"}  # the run's curves are on the plot
    assert len(crit._criteria.value) >= 5 and "PTV minimum coverage" in crit._header.object
    assert run_id[-6:] in dvh._header.object or "Run" in dvh._header.object

    seen = []

    def check(*events):
        # Whatever changed first, every dependent value already belongs to the new case.
        seen.extend(e.name for e in events)
        assert state.case_id == SECOND_CASE
        assert state.displayed_run_id is None
        assert state.config.case_id == SECOND_CASE
        assert state.case.case_id == SECOND_CASE

    state.param.watch(check, ["case_id", "displayed_run_id", "config", "case", "visible_structures",
                              "slice_index"])
    revision = state.config_revision
    state.case_id = SECOND_CASE
    assert "case_id" in seen and "displayed_run_id" in seen and "config" in seen
    assert state.config.objectives[3].weight != 55.0  # the new case's defaults, not the edit
    assert state.config_revision == revision + 1
    assert state.compare_a is None and state.compare_b is None
    assert dvh._pipe.data["frames"] == {}  # no curve of the old case's run survives the switch
    assert "No plan yet" in dvh._header.object
    assert crit._criteria.value.empty and crit._metrics.value.empty
    assert "No plan" in crit._header.object


def test_invalid_weight_sets_config_error_and_blocks_submit(two_cases):
    from app.objectives_panel import ObjectivesPanel
    from app.state import PlanState

    state = PlanState(case_id=CASE_ID)
    panel = ObjectivesPanel(state=state)
    panel.__panel__()
    panel._rebuild(state.config_revision)
    before = len(jobs.get_job_client().list_jobs())
    weight = panel.weight_inputs["CORD/quadratic"]
    weight.value = -1.0
    assert state.config_error.startswith("objectives[3:CORD/quadratic].weight:"), state.config_error
    assert "≥ 0" in state.config_error
    assert state.config_error_field == "objectives[3:CORD/quadratic].weight"
    state.param.trigger("reoptimise")
    assert state.job_id is None
    assert len(jobs.get_job_client().list_jobs()) == before
    # the row shows the message next to itself
    assert "must be ≥ 0" in panel.row_errors["CORD/quadratic"].object
    # a valid value clears the error
    weight.value = 12.0
    assert state.config_error == ""
    assert state.config.objectives[3].weight == 12.0


def test_normalisation_scales_the_dvh(finished_run):
    from app.criteria_view import plan_tables
    from app.dvh_view import build_dvh
    from app.state import plan_data
    from vmat_core.evaluation import coverage_scale

    state, run_id, _ = finished_run
    data = plan_data(CASE_ID, run_id)
    factor = coverage_scale(data["dvh"], data["prescription_gy"], 90.0)
    assert factor > 0 and not np.isclose(factor, 1.0)
    plain, _ = build_dvh(CASE_ID, run_id, ["PTV", "CORD"], state.structure_colors, False, 90.0)
    scaled, header = build_dvh(CASE_ID, run_id, ["PTV", "CORD"], state.structure_colors, True, 90.0)
    assert "normalised to PTV V100 = 90%" in header

    def curve(overlay, label):
        return next(el for el in overlay if el.label == label)

    for name in ("PTV", "CORD"):
        np.testing.assert_allclose(curve(scaled, name).dimension_values("dose_gy"),
                                   curve(plain, name).dimension_values("dose_gy") * factor)
        np.testing.assert_allclose(curve(scaled, name).dimension_values("volume_pct"),
                                   curve(plain, name).dimension_values("volume_pct"))
    tables = plan_tables(CASE_ID, run_id, True, 90.0)
    ptv = tables["metrics"].set_index("structure").loc["PTV"]
    assert ptv["v100_pct"] == pytest.approx(90.0, abs=0.5)  # the chosen coverage, by construction
    orig = data["metrics"].set_index("structure").loc["CORD"]
    assert tables["metrics"].set_index("structure").loc["CORD", "max_gy"] == pytest.approx(orig["max_gy"] * factor)
    crit = tables["criteria"]
    gy_rows = crit[crit["unit"] == "Gy"]
    assert isinstance(gy_rows, pd.DataFrame) and not gy_rows.empty
    np.testing.assert_allclose(gy_rows["value"].to_numpy(),
                               data["criteria"].loc[gy_rows.index, "value"].to_numpy() * factor)


def test_save_and_load_config_round_trip(two_cases):
    import json
    from types import SimpleNamespace

    from app.state import PlanState
    from app.topbar import TopBar

    state = PlanState(case_id=CASE_ID)
    bar = TopBar(state=state)
    bar.__panel__()
    edited = state.config
    edited.objectives[3].weight = 33.0
    edited.beam_ids = [0, 36]
    assert state.replace_config(edited)
    saved = bar._save_config().getvalue()
    state.reset_config()
    assert state.config.objectives[3].weight != 33.0
    revision = state.config_revision
    bar._on_file(SimpleNamespace(new=saved.encode()))
    assert state.config.objectives[3].weight == 33.0 and state.config.beam_ids == [0, 36]
    assert state.config_revision > revision  # the editors rebuild from the loaded file
    assert not bar._load_error.visible

    bad = json.loads(saved)
    bad["objectives"][3]["weight"] = -1
    bar._on_file(SimpleNamespace(new=json.dumps(bad).encode()))
    assert bar._load_error.visible
    assert "objectives[3:CORD/quadratic].weight" in bar._load_error.object
    assert state.config.objectives[3].weight == 33.0  # a refused file changes nothing
    bar._on_file(SimpleNamespace(new=b"{not json"))
    assert "not valid JSON" in bar._load_error.object


def test_links_from_other_pages_open_the_run_and_comparison(finished_run):
    from app.state import PlanState

    _, run_id, _ = finished_run
    state = PlanState(case_id=SECOND_CASE)  # the run belongs to the first case: the link switches case
    state.open_from_url({"run": [run_id.encode()]})
    assert state.case_id == CASE_ID and state.displayed_run_id == run_id
    state.open_from_url({"compare_a": [b"reference"], "compare_b": [run_id.encode()]})
    assert (state.compare_a, state.compare_b) == ("reference", run_id)
    before = (state.case_id, state.displayed_run_id)
    state.open_from_url({"run": [b"../../etc/passwd"]})
    assert "No run" in state.notice and (state.case_id, state.displayed_run_id) == before


def test_prescription_pane_and_offline_fetch(two_cases):
    from app.prescription_view import PrescriptionView, prescription_html
    from app.state import PlanState
    from vmat_core import cases

    state = PlanState(case_id=CASE_ID)
    text = prescription_html(state.config)
    assert "60 Gy in 30 fractions" in text and "Lung_2Gy_30Fx" in text
    view = PrescriptionView(state=state, patient_id="Lung_Patient_6")
    view.__panel__()
    before = set(cases.list_case_ids())
    view.param.trigger("fetch")
    deadline = time.monotonic() + 60
    while not view.fetch_message.startswith(("Fetch failed", "Lung_Patient_6 is ready")):
        assert time.monotonic() < deadline, view.fetch_message
        time.sleep(0.2)
    # no hub here: a clear failure, and no half-downloaded case appears
    assert view.fetch_message.startswith("Fetch failed"), view.fetch_message
    assert set(cases.list_case_ids()) == before


# ---------------------------------------------------------------------------------------- dose grid

THIRD_CASE = "Lung_Synth_Patient_3"


@pytest.fixture(scope="module")
def grid_runs(two_cases, case_dir):
    """Two tiny runs of a third case, written by the real runner in this process: (run_x, run_y).

    The case is these tests' own, so the other tests' "latest run of the case" and "no runs yet" still hold."""
    from vmat_core import runner
    from vmat_core.config import default_config

    _link_copy(case_dir, two_cases / "portpy" / THIRD_CASE)
    run_ids = []
    for beams in ([0, 36], [0, 24, 48]):
        cfg = default_config(THIRD_CASE)
        cfg.beam_ids = beams
        cfg.voxel_down_sample_factors = list(TINY["voxel_down_sample_factors"])
        cfg.solver.time_limit_s = TINY["time_limit_s"]
        run_ids.append(runner.run_vmat_global_optimal(cfg).run_id)
    return tuple(run_ids)


def _structure_dvh(dvh: pd.DataFrame, name: str) -> pd.DataFrame:
    return dvh[dvh["structure"] == name].reset_index(drop=True)


def test_full_resolution_evaluation_replaces_the_optimisation_grid_once_computed(grid_runs):
    from app import axial_view
    from app import state as state_mod
    from app.axial_view import AxialViewer
    from app.criteria_view import CriteriaView, criteria_frame, metrics_frame
    from app.dvh_view import DVHView
    from app.state import FULL_GRID, OPTIMISATION_GRID, PlanState, plan_data
    from app.topbar import TopBar
    from vmat_core import runner
    from vmat_core.store import RunStore

    run_x, _ = grid_runs
    state = PlanState(case_id=THIRD_CASE)
    state.displayed_run_id = run_x
    dvh, crit, bar = DVHView(state=state), CriteriaView(state=state), TopBar(state=state)
    for view in (dvh, crit, bar):
        view.__panel__()
    axial = AxialViewer(state=state)
    z = state.slice_index

    # Not computed yet: the optimisation grid, and the selector and headers say so.
    assert runner.read_full_dose(run_x) is None
    assert state.full_dose_status == ""
    assert state.dose_grid == FULL_GRID and state.shown_grid == OPTIMISATION_GRID
    assert bar._grid_select.value == OPTIMISATION_GRID and bar._grid_select.disabled
    assert "not computed" in bar._grid_note.object
    assert "optimisation grid (12×12×2 CT voxels)" in dvh._header.object
    assert "optimisation grid (12×12×2 CT voxels)" in crit._header.object
    opt = plan_data(THIRD_CASE, run_x, OPTIMISATION_GRID)
    opt_dose = RunStore().read_arrays(run_x, ["dose_3d_gy"])["dose_3d_gy"]
    np.testing.assert_array_equal(axial.current_images()["dose"], opt_dose[z])
    assert "optimisation-grid dose (12×12×2 CT voxels)" in axial.status

    # Computed for real; the page's next poll notices it and every view switches without a reload.
    full = runner.reconstruct_full_dose(run_x)
    assert runner.read_full_dose(run_x, with_dose=False).keys() == {"dvh", "metrics", "criteria"}
    state.poll()
    assert state.full_dose_status == "ready" and state.shown_grid == FULL_GRID
    for name in ("PTV", "CORD"):
        shown = dvh._pipe.data["frames"][name]
        expected, before = _structure_dvh(full["dvh"], name), _structure_dvh(opt["dvh"], name)
        np.testing.assert_allclose(shown["dose_gy"], expected["dose_gy"])
        np.testing.assert_allclose(shown["volume_pct"], expected["volume_pct"])
        assert len(before) != len(expected) or not np.allclose(before["volume_pct"], expected["volume_pct"])
    assert "full resolution" in dvh._header.object and "optimisation grid" not in dvh._header.object
    assert "full resolution" in crit._header.object
    pd.testing.assert_frame_equal(crit._criteria.value.reset_index(drop=True), criteria_frame(full["criteria"]))
    pd.testing.assert_frame_equal(crit._metrics.value.reset_index(drop=True), metrics_frame(full["metrics"]))
    assert not crit._metrics.value.equals(metrics_frame(opt["metrics"]))
    np.testing.assert_array_equal(axial.current_images()["dose"], full["dose_3d_gy"][z])
    assert not np.array_equal(full["dose_3d_gy"], opt_dose)
    assert "full-resolution dose" in axial.status
    assert bar._grid_select.value == FULL_GRID and not bar._grid_select.disabled
    assert "full resolution" in bar._grid_note.object

    # The planner switches back to the optimisation grid (the selector's own path), and forward again.
    bar._grid_select.value = OPTIMISATION_GRID
    assert state.dose_grid == OPTIMISATION_GRID and state.shown_grid == OPTIMISATION_GRID
    np.testing.assert_allclose(dvh._pipe.data["frames"]["PTV"]["volume_pct"],
                               _structure_dvh(opt["dvh"], "PTV")["volume_pct"])
    pd.testing.assert_frame_equal(crit._metrics.value.reset_index(drop=True), metrics_frame(opt["metrics"]))
    np.testing.assert_array_equal(axial.current_images()["dose"], opt_dose[z])
    assert "optimisation grid" in dvh._header.object and "available" in bar._grid_note.object
    state.dose_grid = FULL_GRID
    np.testing.assert_array_equal(axial.current_images()["dose"], full["dose_3d_gy"][z])
    assert bar._grid_select.value == FULL_GRID

    # Both evaluations are cached side by side, each under its own key.
    assert plan_data(THIRD_CASE, run_x, FULL_GRID)["grid"] == FULL_GRID
    assert plan_data(THIRD_CASE, run_x, OPTIMISATION_GRID)["dvh"].equals(opt["dvh"])
    assert {(THIRD_CASE, run_x, FULL_GRID), (THIRD_CASE, run_x, OPTIMISATION_GRID)} <= set(state_mod._PLAN_CACHE)
    assert {(THIRD_CASE, run_x, FULL_GRID), (THIRD_CASE, run_x, OPTIMISATION_GRID)} <= set(axial_view._dose_cache)


def test_comparison_puts_both_plans_on_one_grid(grid_runs):
    from app.axial_view import AxialViewer
    from app.comparison_view import ComparisonView
    from app.state import FULL_GRID, OPTIMISATION_GRID, REFERENCE, PlanState, plan_data
    from vmat_core import runner
    from vmat_core.store import RunStore

    run_x, run_y = grid_runs
    full_x = runner.reconstruct_full_dose(run_x)  # a cache read when the test above ran first
    assert runner.read_full_dose(run_y) is None
    state = PlanState(case_id=THIRD_CASE)
    state.param.update(displayed_run_id=run_x, compare_a=run_x, compare_b=run_y)
    view = ComparisonView(state=state)

    def render():
        out = view._render(THIRD_CASE, run_x, run_y, ["PTV", "CORD"], state.structure_colors, False, 95.0)
        header, row = out.objects
        return header.object, row.objects[1].value

    def a_values(metrics):
        return round(float(metrics.set_index("structure").loc["PTV", "mean_gy"]), 2)

    # B has no full dose: both on the optimisation grid, and the header says why
    header, delta = render()
    assert "Both plans on the optimisation grid: full resolution not computed for B." in header
    mean_a = delta[(delta["Structure"] == "PTV") & (delta["Metric"] == "Mean (Gy)")]["A"].iloc[0]
    assert mean_a == a_values(plan_data(THIRD_CASE, run_x, OPTIMISATION_GRID)["metrics"])
    assert state.pair_grids(run_x, run_y, volumes=True) == (OPTIMISATION_GRID, OPTIMISATION_GRID)
    axial = AxialViewer(state=state)
    axial.show_difference = True
    z = state.slice_index
    opt_x, opt_y = (RunStore().read_arrays(r, ["dose_3d_gy"])["dose_3d_gy"] for r in (run_x, run_y))
    expected = opt_y[z] - opt_x[z]
    expected[np.maximum(opt_x[z], opt_y[z]) < state.dose_threshold_pct / 100 * 60.0] = np.nan
    np.testing.assert_allclose(axial.current_images()["dose"], expected, atol=1e-4)
    assert "both: optimisation-grid dose (12×12×2 CT voxels)" in axial.status

    # B computed too: both at full resolution
    full_y = runner.reconstruct_full_dose(run_y)
    header, delta = render()
    assert "Both plans at full resolution" in header
    mean_a = delta[(delta["Structure"] == "PTV") & (delta["Metric"] == "Mean (Gy)")]["A"].iloc[0]
    assert mean_a == a_values(full_x["metrics"])
    state.param.trigger("full_dose_status")  # what the page's poll does when a dose job lands
    fx, fy = full_x["dose_3d_gy"][z], full_y["dose_3d_gy"][z]
    expected = fy - fx
    expected[np.maximum(fx, fy) < state.dose_threshold_pct / 100 * 60.0] = np.nan
    np.testing.assert_allclose(axial.current_images()["dose"], expected, atol=1e-4)
    assert "both: full-resolution dose" in axial.status

    # The reference plan's tables exist on both grids; its volume is the shipped (CT-grid) dose.
    assert state.pair_grids(REFERENCE, run_x) == (FULL_GRID, FULL_GRID)
    assert state.pair_grids(REFERENCE, run_x, volumes=True) == (FULL_GRID, FULL_GRID)
    ref_full, ref_opt = (plan_data(THIRD_CASE, REFERENCE, g) for g in (FULL_GRID, OPTIMISATION_GRID))
    assert ref_full["grid"] == FULL_GRID and ref_opt["grid"] == OPTIMISATION_GRID
    assert len(ref_full["dvh"]) and not ref_full["dvh"].equals(ref_opt["dvh"])
    ptv = [round(float(d["metrics"].set_index("structure").loc["PTV", "d95_gy"]), 1) for d in (ref_full, ref_opt)]
    assert abs(ptv[0] - ptv[1]) < 3, ptv
    state.show_reference = True
    assert state.shown_grid == FULL_GRID and "every dose voxel" in state.grid_note()
    state.dose_grid = OPTIMISATION_GRID
    assert state.shown_grid == OPTIMISATION_GRID and "optimisation grid" in state.grid_note()
    state.show_reference = False
    state.dose_grid = OPTIMISATION_GRID
    assert state.pair_grids(run_x, run_y) == (OPTIMISATION_GRID, OPTIMISATION_GRID)
    header, _ = render()
    assert "Both plans on the optimisation grid." in header
