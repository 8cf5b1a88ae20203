"""Top bar: case, solver availability, job status with timer, config save/load, Re-optimise and Cancel."""

from __future__ import annotations

import html
import io

import panel as pn
import param

from app import theme
from app.state import FULL_GRID, GRID_TITLES, OPTIMISATION_GRID, TERMINAL_STATUSES, PlanState
from vmat_core.config import ConfigError, RunConfig, validate_config


def solver_summary() -> tuple[str, str]:
    """(short label, explanation) of the solver an 'auto' run would use, computed once per process."""
    key = "vmat_solver_summary"
    if key in pn.state.cache:
        return pn.state.cache[key]
    try:
        from vmat_core import solvers
        from vmat_core.config import SolverSettings
        from vmat_core.warmstart import choose_mip_solver

        status = solvers.solver_status()
        plan = choose_mip_solver(SolverSettings())  # what a run with solver "auto" will use, and why
        choice = plan.choice
        lines = []
        for name, st in status.items():
            if not st.get("installed"):
                state = "not installed"
            elif not st.get("licensed"):
                state = "installed, no licence"
            else:
                state = "licensed" if name == "MOSEK" else "available"
            detail = str(st.get("detail") or "")
            lines.append(f"{name}: {state}" + (f" ({detail})" if detail else ""))
        names = {"HIGHS": "HiGHS", "SCIP": "SCIP", "MOSEK": "MOSEK"}
        label = f"Solver: {names.get(choice.name, choice.name)}"
        mosek = status.get("MOSEK", {})
        if choice.name.upper() == "MOSEK":
            label += " (licensed)"
        elif mosek.get("installed") and not mosek.get("licensed"):
            label += " · MOSEK unlicensed"
        explanation = f"{plan.reason}\n" + "\n".join(lines)
    except Exception as e:  # noqa: BLE001 - the page stays usable; a run reports its own solver error
        label, explanation = "Solver: unknown", f"solver status unavailable: {e}"
    pn.state.cache[key] = (label, explanation)
    return label, explanation


GRID_HELP = (
    "Which evaluation the DVH, criteria, metrics and viewer show for the displayed run: the optimisation's own "
    "(dose of the down-sampled influence matrix, DVH on the optimisation voxels) or, once computed with "
    "'Full-resolution dose', the dose on every CT dose voxel and original beamlet."
)


def _format_elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60:d}:{s % 60:02d}"


class TopBar(pn.viewable.Viewer):
    state = param.ClassSelector(class_=PlanState)

    def _job_html(self, job_id, job_status, elapsed_s, progress, job_error, notice):
        parts = []
        if job_id:
            status = job_status or "submitted"
            latest = (progress or {}).get("latest") or {}
            phase = latest.get("phase")
            kind = (
                "fail" if status in ("failed", "error", "lost")
                else "optimal" if status == "done"
                else "run"
            )
            text = f"Job {status}"
            if phase and status not in TERMINAL_STATUSES:
                text += f" · {phase}"
            text += f" · {_format_elapsed(elapsed_s or 0.0)}"
            parts.append(theme.badge(text, kind))
            if job_error:
                parts.append(f'<span class="err">{job_error}</span>')
        else:
            parts.append('<span class="muted">No job running</span>')
        if notice:
            parts.append(f'<span class="muted">{notice}</span>')
        return " ".join(parts)

    def _grid_choice(self) -> bool:
        """Whether what is shown exists on both grids: the reference plan, or a run with its full dose computed."""
        return self.state.show_reference or self.state.full_dose_status == "ready"

    def dose_grid_selector(self):
        """'Dose grid [Full resolution | Optimisation grid] [Full-resolution dose]' and a line saying what is shown.

        The buttons show what the views show (``shown_grid``), not just the planner's wish: without a computed
        full dose they sit on the optimisation grid, disabled, and the line says full resolution is not computed.
        A pick sets ``dose_grid``, which also holds for runs displayed later."""
        state = self.state
        options = {GRID_TITLES[FULL_GRID]: FULL_GRID, GRID_TITLES[OPTIMISATION_GRID]: OPTIMISATION_GRID}
        select = pn.widgets.RadioBoxGroup(
            options=options, value=state.shown_grid, inline=True, width=270, margin=(16, 4, 8, 4),
            css_classes=["dose-grid"],
            disabled=not self._grid_choice(),
        )
        syncing = {"on": False}  # a value set from the state is not the planner's pick

        def from_state(*_):
            syncing["on"] = True
            try:
                select.param.update(value=state.shown_grid, disabled=not self._grid_choice())
            finally:
                syncing["on"] = False

        def to_state(event):
            if not syncing["on"]:
                state.dose_grid = event.new

        state.param.watch(from_state, ["shown_grid", "full_dose_status", "displayed_run_id", "show_reference"])
        select.param.watch(to_state, "value")
        compute = pn.widgets.Button.from_param(
            state.param.full_dose,
            label="Full-resolution dose",
            color="primary",
            variant="outline",
            width=160,
            margin=(10, 4),
            description="Recompute the displayed run's dose on every dose voxel and original beamlet (a background "
                        "job); the views show the optimisation grid's dose meanwhile",
            disabled=pn.bind(lambda run, st: not run or st in ("pending", "ready"),
                             state.param.displayed_run_id, state.param.full_dose_status),
        )
        # Fixed widths: a pane sized by its text overlaps its neighbours in a Row when the text changes.
        note = pn.pane.HTML(
            pn.bind(self._grid_note_html, state.param.shown_grid, state.param.full_dose_status,
                    state.param.displayed_run_id, state.param.show_reference),
            width=380, margin=(8, 4), css_classes=["dose-grid-note", "full-dose-status"],
        )
        label = pn.pane.HTML("<b>Dose grid</b>", width=68, margin=(17, 0, 0, 10), styles={"font-size": "13px"})
        help_icon = pn.widgets.TooltipIcon(value=GRID_HELP, margin=(18, 4, 0, 0), width=20)
        self._grid_select, self._grid_note = select, note
        return pn.Row(label, help_icon, select, compute, note, margin=0, css_classes=["dose-grid-bar"])

    def _grid_note_html(self, shown_grid, status, _run_id, show_reference) -> str:
        text = self.state.grid_note()
        if not text:
            return ""
        colour = (theme.MUTED if show_reference else "#14532D" if shown_grid == FULL_GRID else "#7A4F00" if status == "pending"
                  else "#B3261E" if status.startswith("failed") else theme.MUTED)
        return (f'<div style="font-size:12px;color:{colour};line-height:1.35" title="{html.escape(status)}">'
                f"{html.escape(text)}</div>")

    def _save_config(self) -> io.StringIO:
        cfg = self.state.config
        return io.StringIO(cfg.to_json() if cfg is not None else "{}")

    def _on_file(self, event) -> None:
        data = event.new
        if not data:
            return
        try:
            cfg = RunConfig.from_json(data)
            if cfg.case_id != self.state.case_id:
                if cfg.case_id not in self.state.param.case_id.objects:
                    raise ConfigError("case_id", f"config is for case {cfg.case_id!r}, which is not available")
                self.state.case_id = cfg.case_id
            cfg = validate_config(cfg, self.state.case)
        except ConfigError as e:
            self._load_error.object = f"Load config — {e}"
            self._load_error.visible = True
            return
        self._load_error.visible = False
        self.state.replace_config(cfg)

    def __panel__(self):
        state = self.state
        case_select = pn.widgets.Select.from_param(state.param.case_id, label="", width=230, margin=(10, 10))
        label, explanation = solver_summary()
        solver = pn.pane.HTML(
            f'<span class="badge badge-ref" title="{html.escape(explanation)}">{html.escape(label)} <span class="info-dot">i</span></span>',
            stylesheets=[theme.BADGE_CSS],
            width=230,
            margin=(16, 4),
            css_classes=["solver-status"],
        )
        job = pn.pane.HTML(
            pn.bind(
                self._job_html,
                state.param.job_id,
                state.param.job_status,
                state.param.job_elapsed_s,
                state.param.job_progress,
                state.param.job_error,
                state.param.notice,
            ),
            stylesheets=[theme.BADGE_CSS],
            margin=(16, 4),
            min_width=260,
            css_classes=["job-status"],
        )
        save = pn.widgets.FileDownload(
            callback=self._save_config,
            filename=f"{state.case_id or 'vmat'}_config.json",
            label="Save config",
            color="light",
            width=110,
            margin=(10, 4),
        )

        def _filename(case_id):
            save.filename = f"{case_id or 'vmat'}_config.json"

        state.param.watch(lambda e: _filename(e.new), "case_id")
        upload = pn.widgets.FileInput(accept=".json", multiple=False, width=200, margin=(14, 4),
                                      description="Load a saved config (JSON)")
        upload.param.watch(self._on_file, "value")
        self._load_error = pn.pane.Alert("", alert_type="danger", visible=False, margin=(4, 10))

        reopt = pn.widgets.Button.from_param(
            state.param.reoptimise,
            label="Re-optimise",
            color="primary",
            width=120,
            margin=(10, 4),
            css_classes=["reoptimise"],
            disabled=pn.bind(
                lambda err, status, cfg: bool(err) or cfg is None or status in ("queued", "running", "cancelling"),
                state.param.config_error,
                state.param.job_status,
                state.param.config,
            ),
        )
        cancel = pn.widgets.Button.from_param(
            state.param.cancel_job,
            label="Cancel",
            color="danger",
            width=80,
            margin=(10, 4),
            disabled=pn.bind(
                lambda job_id, status: not job_id or status in TERMINAL_STATUSES,
                state.param.job_id,
                state.param.job_status,
            ),
        )
        blocked = pn.pane.HTML(
            pn.bind(
                lambda err: f'<span title="{err}">⚠ fix the config to submit</span>' if err else "",
                state.param.config_error,
            ),
            styles={"color": "#B3261E", "font-size": "12px"},
            margin=(18, 4),
        )
        # Wraps onto more lines when the window is narrow rather than hiding the action buttons.
        bar = pn.FlexBox(
            pn.Row(case_select, solver, job, margin=0),
            pn.Row(blocked, save, upload, reopt, cancel, margin=0),
            self.dose_grid_selector(),
            flex_wrap="wrap",
            justify_content="space-between",
            align_items="center",
            sizing_mode="stretch_width",
            styles={"background": "white", "border": f"1px solid {theme.BORDER}",
                    "border-bottom": f"3px solid {theme.ACCENT_LIGHT}", "border-radius": "6px"},
            css_classes=["topbar"],
        )
        return pn.Column(bar, self._load_error, sizing_mode="stretch_width")

