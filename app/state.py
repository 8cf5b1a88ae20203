"""``PlanState``: the one shared state of the Plan page.

Every panel reads and writes these parameters and nothing else. Data flows one way (case → config → job → run
store → views); the state submits jobs and polls them, the views only read runs.

Invariant: a change of ``case_id`` or ``displayed_run_id`` updates every dependent parameter in one batch
(``param.update``), so a view never sees the new case with the old run, and views key whatever they cache by
``(case_id, run_id, grid)``: a run has an optimisation-grid evaluation and, once reconstructed, a full-resolution
one (``dose_grid`` is the planner's choice, ``shown_grid`` what the displayed run is shown on).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd
import param

from vmat_core import cases
from vmat_core.cases import CaseInfo
from vmat_core.config import ConfigError, RunConfig, default_config, validate_config
from vmat_core.jobs import JobError
from vmat_core.store import CorruptRun

log = logging.getLogger(__name__)

REFERENCE = "reference"
# A run has two evaluations: the optimisation's own (dose of the down-sampled influence matrix, DVH on the
# optimisation voxels) and, once reconstructed, the full-resolution one (every dose voxel, every beamlet).
FULL_GRID = "full"
OPTIMISATION_GRID = "optimisation"
GRID_TITLES = {FULL_GRID: "Full resolution", OPTIMISATION_GRID: "Optimisation grid"}
# The reference plan's tables come from runner.reference_plan: the shipped dose sampled at the optimisation voxels
# of these factors, and at every dose voxel (full resolution); its volume in the viewer is the shipped dose itself.
REFERENCE_VOXEL_FACTORS = (6, 6, 1)
FINISHED_STATUSES = ("done",)  # the job produced a run
TERMINAL_STATUSES = ("cancelled", "done", "failed", "lost")  # vmat_core.jobs.TERMINAL_STATES

# A fixed colour per structure name, so a structure looks the same in every view, run and session.
STRUCTURE_PALETTE: dict[str, str] = {
    "PTV": "#D62728",
    "CTV": "#FF7F0E",
    "GTV": "#8B0000",
    "CORD": "#E6B800",
    "ESOPHAGUS": "#8C564B",
    "HEART": "#D61FBF",
    "LUNG_L": "#1F77B4",
    "LUNG_R": "#2CA02C",
    "LUNGS_NOT_GTV": "#17BECF",
    "SKIN": "#9E9E9E",
    "BODY": "#7F7F7F",
    "RIND_0": "#BCBD22",
    "RIND_1": "#C5B0D5",
    "RIND_2": "#9EDAE5",
    "RIND_3": "#F7B6D2",
    "RIND_4": "#DBDB8D",
}
_SPARE_COLOURS = ("#9467BD", "#17BECF", "#BCBD22", "#E377C2", "#AEC7E8", "#FFBB78", "#98DF8A", "#C49C94")


def structure_colour(name: str) -> str:
    """The palette colour of ``name``; unknown names get a stable spare colour (same name → same colour)."""
    upper = name.upper()
    if upper in STRUCTURE_PALETTE:
        return STRUCTURE_PALETTE[upper]
    for prefix in ("PTV", "GTV", "CTV"):
        if upper.startswith(prefix):
            return STRUCTURE_PALETTE[prefix]
    return _SPARE_COLOURS[sum(upper.encode()) % len(_SPARE_COLOURS)]


def is_main_structure(name: str) -> bool:
    """Targets and organs at risk; not optimisation helpers (rinds), BODY/SKIN outlines or couch."""
    upper = name.upper()
    return not upper.startswith(("RIND", "SKIN", "BODY", "COUCH", "OPT", "RING", "DOSE"))


def _initial_case_id() -> str | None:
    ids = cases.list_case_ids()
    if cases.DEFAULT_CASE_ID in ids:
        return cases.DEFAULT_CASE_ID
    return ids[0] if ids else None


def job_client():
    """The process-wide job client (created by ``vmat_core.jobs``, one per process)."""
    from vmat_core import jobs

    return jobs.get_job_client()


def run_store():
    from vmat_core.store import RunStore

    return RunStore()


class PlanState(param.Parameterized):
    """Shared state of the Plan page (parameter names are a contract between the page's panels)."""

    case_id = param.Selector(default=None, objects=[], allow_None=True, doc="The case being planned.")
    case = param.ClassSelector(class_=CaseInfo, default=None, allow_None=True, constant=True,
                               doc="Derived from case_id.")

    config = param.ClassSelector(class_=RunConfig, default=None, allow_None=True,
                                 doc="The configuration the next Re-optimise submits.")
    config_error = param.String(default="", doc="'field: message' of the first invalid input; '' when valid.")
    config_error_field = param.String(default="", doc="The field path of config_error (e.g. objectives[3:…].weight).")
    config_revision = param.Integer(default=0, doc="Bumped when config is replaced wholesale (case change, load, "
                                                   "reset), so editors rebuild their widgets from it.")

    job_id = param.String(default=None, allow_None=True)
    job_status = param.String(default="", doc="Status of job_id: queued, running, cancelling, done, failed, cancelled, lost.")
    job_progress = param.Dict(default={}, doc="Latest progress of job_id from the job client.")
    job_error = param.String(default="")
    job_started_at = param.Number(default=None, allow_None=True, doc="time.time() when the job was submitted.")
    job_elapsed_s = param.Number(default=0.0, bounds=(0, None))

    displayed_run_id = param.String(default=None, allow_None=True, doc="The run the views show (None: none).")
    compare_a = param.String(default=None, allow_None=True, doc="A run id or 'reference'.")
    compare_b = param.String(default=None, allow_None=True, doc="A run id or 'reference'.")
    show_reference = param.Boolean(default=False, doc="The viewer shows the case's shipped reference dose.")
    runs_version = param.Integer(default=0, doc="Bumped whenever the list of runs of this case may have changed.")

    visible_structures = param.List(default=[], item_type=str)
    structure_colors = param.Dict(default={})

    slice_index = param.Integer(default=0, bounds=(0, None), doc="CT z index shown in the axial viewer.")
    show_dose = param.Boolean(default=True)
    show_contours = param.Boolean(default=True)
    dose_threshold_pct = param.Number(default=10.0, bounds=(0, 150),
                                      doc="% of Rx below which the dose wash is transparent.")
    dose_opacity = param.Number(default=0.5, bounds=(0, 1))
    isodose_levels_pct = param.List(default=[50.0, 80.0, 95.0, 100.0, 105.0], item_type=(int, float))
    ct_window = param.Number(default=1400.0, bounds=(1, 5000), doc="CT display window width in HU.")
    ct_level = param.Number(default=-300.0, bounds=(-1500, 3000), doc="CT display window centre in HU.")

    normalise = param.Boolean(default=False, doc="Rescale plans so normalise_coverage_pct % of PTV gets Rx.")
    normalise_coverage_pct = param.Number(default=95.0, bounds=(50, 100), step=0.5)

    reoptimise = param.Event(doc="Submit config as a new job (blocked while config_error is set).")
    cancel_job = param.Event()
    load_reference = param.Event(doc="Show the case's reference dose.")

    full_dose = param.Event(doc="Queue the full-resolution dose reconstruction of the displayed run.")
    full_dose_status = param.String(default="", doc="Full-resolution dose of displayed_run_id: '' (not asked), "
                                                    "'pending', 'ready' or 'failed: <reason>'.")
    dose_grid = param.Selector(default=FULL_GRID, objects=[FULL_GRID, OPTIMISATION_GRID],
                               doc="The evaluation the planner asks for: a run's full-resolution dose when it has "
                                   "been computed (else its optimisation grid), or always the optimisation grid.")
    shown_grid = param.Selector(default=OPTIMISATION_GRID, objects=[FULL_GRID, OPTIMISATION_GRID], constant=True,
                                doc="Derived from dose_grid and full_dose_status: the grid on which the DVH, "
                                    "criteria and viewer show displayed_run_id.")

    loading = param.Boolean(default=False)
    notice = param.String(default="", doc="A message for the planner (e.g. why the reference cannot be shown).")

    def __init__(self, **params: Any) -> None:
        ids = cases.list_case_ids()
        self.param.case_id.objects = ids
        params.setdefault("case_id", _initial_case_id())
        super().__init__(**params)
        self._on_case_change()

    # ---------------------------------------------------------------------------------------------- case

    @param.depends("case_id", watch=True)
    def _on_case_change(self) -> None:
        """New case: defaults, colours, latest finished run and PTV slice, set in one batch."""
        cid = self.case_id
        info = cases.case_info(cid) if cid else None
        structures = list(info.structure_names) if info else []
        updates: dict[str, Any] = dict(  # noqa: C408 - parameter names as keywords
            config=default_config(cid) if cid else None,
            config_error="",
            config_error_field="",
            displayed_run_id=latest_finished_run(cid) if cid else None,
            compare_a=None,
            compare_b=None,
            show_reference=False,
            visible_structures=[s for s in structures if is_main_structure(s)],
            structure_colors={s: structure_colour(s) for s in structures},
            slice_index=ptv_centre_slice(info) if info else 0,
            runs_version=self.runs_version + 1,
            config_revision=self.config_revision + 1,
            notice="",
            loading=False,
        )
        self._reference_future = None
        if info is not None:
            self.param.slice_index.bounds = (0, max(info.ct_shape_zyx[0] - 1, 0))
        with param.edit_constant(self):
            self.param.update(case=info, **updates)

    # ---------------------------------------------------------------------------------------------- config

    def set_config(self, cfg: RunConfig) -> bool:
        """Validate ``cfg`` against the case and store it; invalid input sets config_error (the config is kept
        so the editor shows what was typed). Returns True when valid."""
        try:
            validate_config(cfg, self.case)
        except ConfigError as e:
            self.param.update(config=cfg, config_error=str(e), config_error_field=e.field)
            return False
        self.param.update(config=cfg, config_error="", config_error_field="")
        return True

    def replace_config(self, cfg: RunConfig) -> bool:
        """Set a whole new config (loaded file, reset) and have the editors rebuild from it."""
        ok = self.set_config(cfg)
        self.config_revision += 1
        return ok

    def reset_config(self) -> None:
        if self.case_id:
            self.replace_config(default_config(self.case_id))

    # ---------------------------------------------------------------------------------------------- jobs

    @param.depends("reoptimise", watch=True)
    def _on_reoptimise(self) -> None:
        self.submit()

    def submit(self) -> str | None:
        """Submit the current config as a job; None (and nothing submitted) when the config is invalid."""
        if self.config is None:
            self.config_error = "config: no case selected"
            return None
        if self.config_error:
            return None
        if self.job_active:
            return None
        try:
            cfg = validate_config(self.config, self.case)
        except ConfigError as e:
            self.param.update(config_error=str(e), config_error_field=e.field)
            return None
        job_id = job_client().submit(cfg)
        self.param.update(job_id=job_id, job_status="queued", job_progress={}, job_error="",
                          job_started_at=time.time(), job_elapsed_s=0.0)
        return job_id

    @param.depends("cancel_job", watch=True)
    def _on_cancel(self) -> None:
        if self.job_id and self.job_status not in TERMINAL_STATUSES:
            job_client().cancel(self.job_id)
            self.poll_job()

    def poll_job(self) -> str:
        """Read the job's status and progress once (the page calls this periodically). When the job has
        finished with a run, that run becomes the displayed run. Returns the status."""
        if not self.job_id:
            return self.job_status
        client = job_client()
        try:
            record = client.status(self.job_id)
            progress = client.progress(self.job_id) or {}
        except (JobError, OSError) as e:  # a vanished ledger entry must not kill the page's poller
            log.warning("polling job %s failed: %s", self.job_id, e)
            return self.job_status
        status = str(getattr(record, "status", "") or progress.get("status", ""))
        updates: dict[str, Any] = {}
        if progress != self.job_progress:
            updates["job_progress"] = progress
        if status != self.job_status:
            updates["job_status"] = status
        # The worker's own start/finish times (0 while queued): queueing is not optimisation time.
        elapsed = float(getattr(record, "elapsed_s", None) or 0.0)
        if abs(elapsed - self.job_elapsed_s) >= 0.5 or (status in TERMINAL_STATUSES and elapsed != self.job_elapsed_s):
            updates["job_elapsed_s"] = max(elapsed, 0.0)
        if status in TERMINAL_STATUSES:
            err = getattr(record, "error", None)
            if err:
                updates["job_error"] = str(err).strip().splitlines()[-1][:500] if str(err).strip() else ""
            run_id = getattr(record, "run_id", None)
            if run_id and run_id != self.displayed_run_id and record_case(record) in (None, self.case_id):
                updates["displayed_run_id"] = run_id
                updates["show_reference"] = False
            if status != self.job_status or run_id:
                updates["runs_version"] = self.runs_version + 1
        if updates:
            self.param.update(**updates)
        return status

    @property
    def job_active(self) -> bool:
        return bool(self.job_id) and self.job_status not in TERMINAL_STATUSES

    # ---------------------------------------------------------------------------------------------- reference

    @param.depends("load_reference", watch=True)
    def _on_load_reference(self) -> None:
        """Evaluate the reference plan off the event loop; ``poll`` shows it once ready."""
        if self.case is None:
            return
        if not self.case.has_reference_dose:
            self.notice = f"Case {self.case_id} ships no reference dose."
            return
        if all((self.case_id, REFERENCE, g) in _PLAN_CACHE for g in (OPTIMISATION_GRID, FULL_GRID)):
            self.param.update(show_reference=True, notice="")
            return
        self.param.update(loading=True, notice="Loading the reference plan…")
        self._reference_future = _executor().submit(plan_data, self.case_id, REFERENCE)
        self._reference_case = self.case_id

    def _check_reference(self) -> None:
        fut = self._reference_future
        if fut is None or not fut.done():
            return
        self._reference_future = None
        if self._reference_case != self.case_id:
            return
        try:
            data = fut.result()
        except Exception as e:  # noqa: BLE001 - whatever stops the evaluation is the planner's message
            self.param.update(loading=False, notice=f"Reference plan unavailable: {e}")
            return
        if data is None:
            self.param.update(loading=False, notice="Reference plan unavailable.")
        else:
            self.param.update(loading=False, show_reference=True, notice="", runs_version=self.runs_version + 1)

    def poll(self) -> None:
        """One tick of the page's periodic callback: the job, and background loads, sent to the browser as one
        batch of changes."""
        from panel.io import hold

        with hold():
            self._check_reference()
            self.poll_job()
            self.poll_full_dose()

    # ---------------------------------------------------------------------------------- full-resolution dose
    # The optimisation and its views use the down-sampled matrix (the notebook's own evaluation). Recomputing the
    # dose on every dose voxel and original beamlet takes tens of seconds (the full case must be loaded), so it is
    # a job of its own, asked for on demand; the run shows "pending" until it lands in the dose cache.

    @param.depends("displayed_run_id", watch=True)
    def _on_displayed_run(self) -> None:
        self._full_dose_job = None
        # The file's name hashes the run's fluence; found once here, a poll only has to stat it.
        self._full_dose_file = _full_dose_file(self.displayed_run_id)
        ready = self._full_dose_file is not None and self._full_dose_file.is_file()
        self.full_dose_status = "ready" if ready else ""

    @staticmethod
    def _full_dose_cached(run_id: str | None) -> bool:
        path = _full_dose_file(run_id)
        return path is not None and path.is_file()

    @param.depends("dose_grid", "full_dose_status", "show_reference", watch=True)
    def _sync_shown_grid(self) -> None:
        if self.show_reference:  # the reference plan has both evaluations
            grid = self.dose_grid
        else:
            grid = FULL_GRID if self.dose_grid == FULL_GRID and self.full_dose_status == "ready" else OPTIMISATION_GRID
        if grid != self.shown_grid:
            with param.edit_constant(self):
                self.shown_grid = grid

    def grid_for(self, plan_id: str | None) -> str:
        """The grid of the tables (DVH, metrics, criteria) shown for ``plan_id`` on its own."""
        if plan_id is None:
            return OPTIMISATION_GRID
        if plan_id == REFERENCE:
            return self.dose_grid
        if plan_id == self.displayed_run_id:
            return self.shown_grid
        return FULL_GRID if self.dose_grid == FULL_GRID and self._full_dose_cached(plan_id) else OPTIMISATION_GRID

    def grids_available(self, plan_id: str, volumes: bool) -> set[str]:
        """The grids ``plan_id`` can be shown on: its tables' (``volumes`` False) or its dose volume's."""
        if plan_id == REFERENCE:
            # Its volume is the shipped dose (CT grid); its tables exist on both grids.
            return {FULL_GRID} if volumes else {OPTIMISATION_GRID, FULL_GRID}
        has_full = self.full_dose_status == "ready" if plan_id == self.displayed_run_id else (
            self._full_dose_cached(plan_id))
        return {OPTIMISATION_GRID, FULL_GRID} if has_full else {OPTIMISATION_GRID}

    def pair_grids(self, plan_a: str, plan_b: str, *, volumes: bool = False) -> tuple[str, str]:
        """Grids on which plans A and B are compared: the planner's dose_grid when both have it, else a grid both
        have (so a comparison is like for like whenever it can be), else each plan's own (mixed: the views say
        so). ``volumes``: for the viewer's dose volumes rather than for the DVH and criteria."""
        have_a, have_b = self.grids_available(plan_a, volumes), self.grids_available(plan_b, volumes)
        common = have_a & have_b
        if self.dose_grid in common:
            return self.dose_grid, self.dose_grid
        if common:
            grid = min(common)  # only one grid can be common when the preferred one is not
            return grid, grid

        def own(have: set[str]) -> str:
            return self.dose_grid if self.dose_grid in have else next(iter(have))

        return own(have_a), own(have_b)

    def grid_note(self) -> str:
        """One line for the planner: which evaluation the displayed run's views show, and why."""
        if self.show_reference:
            if self.dose_grid == FULL_GRID:
                return "Reference plan shown: DVH and criteria on every dose voxel, the shipped dose in the viewer."
            factors = "×".join(map(str, REFERENCE_VOXEL_FACTORS))
            return (f"Reference plan shown: DVH and criteria on the {factors} optimisation grid, the shipped dose "
                    "in the viewer.")
        if not self.displayed_run_id:
            return ""
        status = self.full_dose_status
        if self.shown_grid == FULL_GRID:
            return "DVH, criteria and dose at full resolution (every CT dose voxel and beamlet)."
        if status == "ready":
            return "Optimisation-grid evaluation shown; the full-resolution dose is available."
        if status == "pending":
            return "Full-resolution dose pending: the views show the optimisation grid meanwhile."
        if status.startswith("failed"):
            return f"Full-resolution dose {status}; the views show the optimisation grid."
        return "Full resolution not computed for this run: the views show the optimisation grid."

    @param.depends("full_dose", watch=True)
    def _on_full_dose(self) -> None:
        run_id = self.displayed_run_id
        if not run_id or self.full_dose_status in ("pending", "ready"):
            return
        if self._full_dose_cached(run_id):
            self.full_dose_status = "ready"
            return
        try:
            self._full_dose_job = job_client().submit_dose(run_id)
        except Exception as e:  # noqa: BLE001 - shown to the planner instead of breaking the page
            self.full_dose_status = f"failed: {e}"
            return
        self.full_dose_status = "pending"

    def poll_full_dose(self) -> str:
        """Follow the dose job of the displayed run; returns the new status."""
        job = getattr(self, "_full_dose_job", None)
        if self.full_dose_status == "" and self.displayed_run_id:
            # Computed elsewhere (another session, the CLI): shown as soon as it lands, without a page reload.
            path = getattr(self, "_full_dose_file", None)
            if path is not None and path.is_file():
                self.full_dose_status = "ready"
            return self.full_dose_status
        if self.full_dose_status != "pending" or not job:
            return self.full_dose_status
        rec = job_client().status(job)
        if rec.status == "done":
            # The planner asked for it: show it, even if they had switched to the optimisation grid meanwhile.
            self.param.update(full_dose_status="ready", dose_grid=FULL_GRID)
        elif rec.status in ("failed", "lost", "cancelled"):
            reason = (rec.error or rec.status).strip().splitlines()
            self.full_dose_status = f"failed: {reason[-1] if reason else rec.status}"
        return self.full_dose_status

    @property
    def shown_plan_id(self) -> str | None:
        """The plan the DVH, criteria and viewer show: the reference when asked for, else the displayed run."""
        return REFERENCE if self.show_reference else self.displayed_run_id

    # ---------------------------------------------------------------------------------------------- links

    def open_from_url(self, args: dict[str, list[bytes]] | None) -> None:
        """Follow a link from another page: ``?run=<id>`` displays that run (switching to its case),
        ``?compare_a=<id|reference>&compare_b=…`` preselects a comparison. Unknown ids leave a notice."""
        def arg(name: str) -> str | None:
            values = (args or {}).get(name) or []
            raw = values[0] if values else None
            return raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else raw

        run, a, b = arg("run"), arg("compare_a"), arg("compare_b")
        wanted = [r for r in (run, a, b) if r]
        if not wanted:
            return
        cases_of = {}
        for rid in wanted:
            if rid == REFERENCE:
                continue
            meta = _run_metadata(rid)
            if meta is None:
                self.notice = f"No run {rid[:40]!r} in this data directory."
                return
            cases_of[rid] = meta.get("case_id")
        target = next((c for c in cases_of.values() if c), None)
        if target and target != self.case_id:
            if target not in self.param.case_id.objects:
                self.notice = f"The linked run belongs to case {target!r}, which is not available here."
                return
            self.case_id = target
        if any(c not in (None, self.case_id) for c in cases_of.values()):
            self.notice = "The linked runs belong to different cases; only runs of one case can be compared."
            return
        updates: dict[str, Any] = {}
        if run:
            updates.update(displayed_run_id=run, show_reference=False)
        if a or b:
            updates.update(compare_a=a, compare_b=b)
        self.param.update(**updates)

    # ---------------------------------------------------------------------------------------------- runs

    def case_runs(self) -> pd.DataFrame:
        """Runs of the current case, newest first (empty when there are none)."""
        if not self.case_id:
            return pd.DataFrame()
        return runs_of_case(self.case_id)

    def normalisation_scale(self, plan_id: str | None) -> float:
        """The dose factor that gives the plan normalise_coverage_pct % PTV coverage at Rx; 1 when off."""
        if not self.normalise or plan_id is None or not self.case_id:
            return 1.0
        data = plan_data(self.case_id, plan_id, self.grid_for(plan_id))
        if data is None:
            return 1.0
        return normalisation_factor(data, self.normalise_coverage_pct)

    def normalisation_label(self) -> str:
        return f"normalised to PTV V100 = {self.normalise_coverage_pct:g}%" if self.normalise else ""


_EXECUTOR = None


def _executor():
    from concurrent.futures import ThreadPoolExecutor

    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmat-plan-loader")
    return _EXECUTOR


def record_case(record) -> str | None:
    cfg = getattr(record, "config", None)
    if isinstance(cfg, dict):
        return cfg.get("case_id")
    return getattr(record, "case_id", None)


# --------------------------------------------------------------------------------------------------------------
# Reading plans: runs and the reference plan, cached by (case_id, plan id)


def runs_of_case(case_id: str) -> pd.DataFrame:
    store = run_store()
    try:
        return store.list_runs("case_id = ?", params=[case_id], order_by="created_at DESC")
    except (ValueError, OSError) as e:  # an empty store has no columns to filter on yet
        log.debug("listing runs failed: %s", e)
        return pd.DataFrame()


def _run_metadata(run_id: str) -> dict | None:
    from vmat_core.store import is_run_id

    if not is_run_id(run_id):
        return None
    try:
        return run_store().read_metadata(run_id)
    except READ_ERRORS:
        return None


def latest_finished_run(case_id: str) -> str | None:
    df = runs_of_case(case_id)
    if df.empty or "run_id" not in df:
        return None
    if "status" in df:
        ok = df[~df["status"].astype(str).str.lower().isin(("error", "no_solution", "infeasible"))]
        df = ok if not ok.empty else df
    return str(df["run_id"].iloc[0])


def ptv_centre_slice(info: CaseInfo) -> int:
    """The z index at the centre of the PTV (middle of the CT when no mask can be read)."""
    nz = info.ct_shape_zyx[0]
    try:
        from vmat_core import imaging

        target = next((s for s in info.structure_names if s.upper() == "PTV"), None)
        target = target or next((s for s in info.structure_names if s.upper().startswith(("PTV", "GTV"))), None)
        if target:
            mask = imaging.structure_masks(info.case_id, [target])[target]
            zs = np.flatnonzero(mask.any(axis=(1, 2)))
            if zs.size:
                return round((zs[0] + zs[-1]) / 2)
    except (ValueError, KeyError, OSError) as e:  # an unreadable mask: the CT centre is a fair default
        log.debug("PTV centre slice unavailable: %s", e)
    return nz // 2


READ_ERRORS = (KeyError, ValueError, OSError, CorruptRun)
_PLAN_CACHE: dict[tuple[str, str, str], dict] = {}
_PLAN_CACHE_MAX = 24


_FULL_DOSE_FILES: dict[tuple[str, str], Any] = {}


def _full_dose_file(run_id: str | None):
    """Where the run's full-resolution dose is (or would be) stored; None when the run cannot have one.

    The name hashes the run's fluence (a read of the run's arrays), and a finished run's fluence never changes,
    so it is remembered per (data directory, run): the viewer asks on every slice step when comparing."""
    if not run_id or run_id == REFERENCE:
        return None
    from vmat_core import paths, runner

    key = (str(paths.cache_dir()), run_id)
    hit = _FULL_DOSE_FILES.get(key)
    if hit is not None:
        return hit
    try:
        path = runner.full_dose_path(run_id, run_store())
    except READ_ERRORS:
        return None
    if len(_FULL_DOSE_FILES) > 512:
        _FULL_DOSE_FILES.clear()
    _FULL_DOSE_FILES[key] = path
    return path


def optimisation_grid_label(factors) -> str:
    """'optimisation grid (6×6×1 CT voxels)'; without known factors just 'optimisation grid'."""
    try:
        fx = [int(f) for f in factors]
    except (TypeError, ValueError):
        fx = []
    return f"optimisation grid ({'×'.join(map(str, fx))} CT voxels)" if len(fx) == 3 else "optimisation grid"


def run_voxel_factors(meta: dict) -> tuple[int, ...] | None:
    try:
        return tuple(int(meta[k]) for k in ("voxel_ds_x", "voxel_ds_y", "voxel_ds_z"))
    except (KeyError, TypeError, ValueError):
        return None


def plan_data(case_id: str, plan_id: str, grid: str = OPTIMISATION_GRID) -> dict | None:
    """Tables of a run or of the reference plan: {'dvh', 'metrics', 'criteria', 'metadata', 'prescription_gy',
    'label', 'grid', 'grid_label', 'voxel_factors'}; None when unavailable.

    ``grid`` FULL_GRID asks for the run's full-resolution evaluation; a run without one gets its optimisation-grid
    tables, and 'grid' says which was given. The reference plan has both. Cached per (case_id, plan_id, grid):
    finished runs never change, and a plan's two evaluations are never confused."""
    key = (case_id, plan_id, grid)
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        return hit
    if plan_id == REFERENCE:
        # One read of the reference's evaluation gives both grids; both go into the cache together.
        both = _reference_plan_data(case_id)
        for g, d in both.items():
            _cache_plan((case_id, REFERENCE, g), d)
        return both[grid]
    if grid == FULL_GRID:
        data = _full_plan_data(case_id, plan_id)
        if data is None:  # not computed (yet): not cached under the full grid, so it shows once it lands
            return plan_data(case_id, plan_id, OPTIMISATION_GRID)
    else:
        store = run_store()
        try:
            meta = store.read_metadata(plan_id)
        except READ_ERRORS as e:
            log.warning("run %s unreadable: %s", plan_id, e)
            return None
        if meta.get("case_id") not in (None, case_id):
            return None
        tables = {}
        for name in ("dvh", "metrics", "criteria"):
            try:
                tables[name] = store.read_table(plan_id, name)
            except READ_ERRORS as e:
                log.warning("run %s has no %s table: %s", plan_id, name, e)
                tables[name] = pd.DataFrame()
        pres = meta.get("prescription_gy")
        if pres is None:
            try:
                pres = store.read_config(plan_id).get("prescription_gy")
            except READ_ERRORS:
                pres = None
        factors = run_voxel_factors(meta)
        data = {**tables, "metadata": meta, "prescription_gy": float(pres) if pres else float("nan"),
                "label": run_label(meta, with_badge=False), "grid": OPTIMISATION_GRID,
                "grid_label": optimisation_grid_label(factors), "voxel_factors": factors}
    _cache_plan(key, data)
    return data


def _cache_plan(key: tuple[str, str, str], data: dict) -> None:
    if key not in _PLAN_CACHE and len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = data


def _reference_plan_data(case_id: str) -> dict[str, dict]:
    """The reference plan's tables on both grids, from one evaluation (minutes of work the first time)."""
    from vmat_core import runner

    ref = runner.reference_plan(case_id, voxel_down_sample_factors=REFERENCE_VOXEL_FACTORS)
    opt = {
        "dvh": ref["dvh"],
        "metrics": ref["metrics"],
        "criteria": ref["criteria"],
        "metadata": {"status": "reference"},
        "prescription_gy": float(ref["prescription_gy"]),
        "label": "Reference plan",
        "grid": OPTIMISATION_GRID,
        "grid_label": optimisation_grid_label(REFERENCE_VOXEL_FACTORS),
        "voxel_factors": REFERENCE_VOXEL_FACTORS,
    }
    full = {**opt, **ref["full"], "grid": FULL_GRID, "grid_label": "full resolution (CT grid)"}
    return {OPTIMISATION_GRID: opt, FULL_GRID: full}


def _full_plan_data(case_id: str, run_id: str) -> dict | None:
    """The run's full-resolution tables with its own metadata and prescription; None when not computed."""
    from vmat_core import runner

    base = plan_data(case_id, run_id, OPTIMISATION_GRID)
    if base is None:
        return None
    full = runner.read_full_dose(run_id, store=run_store(), with_dose=False)
    if full is None:
        return None
    return {**base, "dvh": full["dvh"], "metrics": full["metrics"], "criteria": full["criteria"],
            "grid": FULL_GRID, "grid_label": "full resolution (CT grid)"}


def pair_note(data_a: dict, data_b: dict) -> str:
    """What a comparison must say about its grids: '' when A and B are evaluated alike."""
    ga, gb = data_a.get("grid"), data_b.get("grid")
    if ga != gb:
        return (f"Mixed dose grids: A on the {data_a.get('grid_label', ga)}, B on the {data_b.get('grid_label', gb)}; "
                "differences include the change of grid.")
    fa, fb = data_a.get("voxel_factors"), data_b.get("voxel_factors")
    if ga == OPTIMISATION_GRID and fa and fb and tuple(fa) != tuple(fb):
        return (f"Different optimisation grids: A {'×'.join(map(str, fa))}, B {'×'.join(map(str, fb))} CT voxels "
                "per optimisation voxel; differences include the change of grid.")
    return ""


def normalisation_factor(data: dict, coverage_pct: float) -> float:
    from vmat_core.evaluation import coverage_scale

    try:
        return float(coverage_scale(data["dvh"], data["prescription_gy"], coverage_pct))
    except (ValueError, KeyError) as e:
        log.info("normalisation unavailable: %s", e)
        return 1.0


_STOP_REASONS = {"time_limit": "time limit", "gap_limit": "gap limit", "cancelled": "cancelled"}


def gap_badge_text(meta: dict) -> str:
    """'optimal', 'gap 12.3 % (time limit)' … from a run's metadata."""
    if not meta:
        return ""
    status = str(meta.get("status", "") or "").lower()
    if status == "reference":
        return "reference plan"
    if status == "optimal":
        return "optimal"
    gap = meta.get("gap")
    why = _STOP_REASONS.get(status, status.replace("_", " "))
    if gap is None or not _finite(gap):
        return why or "gap unknown"
    return f"gap {100 * float(gap):.1f} %" + (f" ({why})" if why else "")


def _finite(v) -> bool:
    try:
        return bool(np.isfinite(float(v)))
    except (TypeError, ValueError):
        return False


def run_label(meta: dict, with_badge: bool = True) -> str:
    """'2026-11-26 17:11 · 3 beams · HIGHS · gap 2.1 % (time limit)' (the badge part only when asked)."""
    rid = str(meta.get("run_id", "?"))
    when = str(meta.get("created_at", ""))[:16].replace("T", " ")
    nb = meta.get("n_beams")
    parts = [when or rid[:12]]
    if nb:
        parts.append(f"{nb} beams")
    solver = meta.get("solver")
    if solver:
        parts.append(str(solver))
    badge = gap_badge_text(meta) if with_badge else ""
    if badge:
        parts.append(badge)
    return " · ".join(parts)
