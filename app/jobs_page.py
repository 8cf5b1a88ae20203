"""The Jobs page: the queue at a glance (queued, running and finished optimisations), the workers and their
heartbeats, with cancel and retry for the selected job. The tables refresh every two seconds while the page is
open; everything comes from the job client's ledger."""

from __future__ import annotations

import html
import logging
import time
from datetime import UTC, datetime

import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from app import theme
from app.history_page import LINK_CSS, page_template, plan_link

log = logging.getLogger(__name__)

REFRESH_PERIOD_MS = 2000
JOB_LIMIT = 500
ACTIVE = ("queued", "running", "cancelling")
FINISHED = ("cancelled", "done", "failed", "lost")
JOB_COLUMNS = ["job_id", "status", "kind", "case", "worker", "created", "started", "finished", "elapsed_s",
               "phase", "gap_pct", "run", "error"]
WORKER_COLUMNS = ["id", "backend", "host", "pid", "state", "current_job", "last_heartbeat", "heartbeat_age_s",
                  "jobs_done"]
_OK, _BUSY, _WAIT, _WARN, _BAD = (
    "background-color:#D7F0DC;color:#1B5E20", "background-color:#CFE8F6;color:#132456",
    "background-color:#ECEFF3;color:#374151", "background-color:#FCE7B6;color:#7A4F00",
    "background-color:#F8D0CC;color:#8E1B10",
)
STATUS_STYLE = {
    "queued": _WAIT, "running": _BUSY, "cancelling": _WARN, "done": _OK, "cancelled": _WAIT, "failed": _BAD,
    "lost": _BAD, "busy": _BUSY, "idle": _OK, "starting": _WAIT, "dead": _BAD, "stopped": _WAIT,
}


def utc_text(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _first_line(text: str | None, limit: int = 160) -> str:
    """The message of an error, not its traceback: the last non-empty line is what was raised."""
    if not text:
        return ""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def jobs_frame(records: list) -> pd.DataFrame:
    """One row per job (newest first, as listed), in planner units."""
    rows = []
    for r in records:
        progress = r.progress or {}
        gap = progress.get("gap")
        rows.append({
            "job_id": r.job_id,
            "status": r.status,
            "kind": r.kind,
            "case": r.case_id,
            "worker": r.worker_id or (f"(for {r.target_worker})" if r.target_worker else ""),
            "created": utc_text(r.created_at),
            "started": utc_text(r.started_at),
            "finished": utc_text(r.finished_at),
            "elapsed_s": float(r.elapsed_s) if r.elapsed_s is not None else float("nan"),
            "phase": str(progress.get("phase") or ""),
            "gap_pct": 100.0 * float(gap) if isinstance(gap, (int, float)) else float("nan"),
            "run": (f'<a href="{html.escape(plan_link(r.run_id))}" target="_self">{html.escape(r.run_id)}</a>'
                    if r.run_id else ""),
            "error": _first_line(r.error),
        })
    return _fixed_dtypes(pd.DataFrame(rows, columns=JOB_COLUMNS), ("elapsed_s", "gap_pct"))


def workers_frame(workers: list[dict], now: float | None = None) -> pd.DataFrame:
    now = time.time() if now is None else now
    rows = []
    for w in workers:
        beat = w.get("last_heartbeat")
        rows.append({
            "id": str(w.get("id", "")),
            "backend": str(w.get("backend", "")),
            "host": str(w.get("host") or ""),
            "pid": str(w.get("pid") or ""),
            "state": str(w.get("state", "")),
            "current_job": str(w.get("current_job") or ""),
            "last_heartbeat": utc_text(beat),
            "heartbeat_age_s": max(now - float(beat), 0.0) if isinstance(beat, (int, float)) else float("nan"),
            "jobs_done": str(w.get("jobs_done", "")) if w.get("jobs_done") is not None else "",
        })
    return _fixed_dtypes(pd.DataFrame(rows, columns=WORKER_COLUMNS), ("heartbeat_age_s",))


def _fixed_dtypes(df: pd.DataFrame, numeric: tuple[str, ...]) -> pd.DataFrame:
    """Text as object and numbers as float64 whatever the rows: a dtype change (e.g. from an empty table) makes
    the browser rebuild the table's header, clearing a header filter being typed."""
    return df.astype({c: ("float64" if c in numeric else object) for c in df.columns})


def _status_style(value) -> str:
    return STATUS_STYLE.get(str(value), "")


class JobsPage(pn.viewable.Viewer):
    """Jobs and workers of the job client (the process's own by default), refreshed by :meth:`refresh`."""

    selected_job_id = param.String(default=None, allow_None=True)
    selected_status = param.String(default="")
    cancel = param.Event(doc="Cancel the selected job (queued: at once; running: its worker stops it).")
    retry = param.Event(doc="Submit the selected finished job's configuration again.")
    message = param.String(default="", doc="What the last action did, or why it could not.")
    message_error = param.Boolean(default=False)
    counts = param.Dict(default={}, doc="Number of jobs per status.")
    backend = param.String(default="")
    live_workers = param.Integer(default=0, doc="Workers that are neither dead nor stopped.")

    def __init__(self, client=None, **params):
        super().__init__(**params)
        if client is None:
            from vmat_core.jobs import get_job_client

            client = get_job_client()
        self.client = client
        self.jobs_table = pn.widgets.Tabulator(
            jobs_frame([]), show_index=False, disabled=True, selectable=1, pagination="local", page_size=25,
            layout="fit_data_table", sizing_mode="stretch_width", height=400, css_classes=["jobs-table"],
            formatters={"run": {"type": "html"}, "elapsed_s": NumberFormatter(format="0", nan_format=""),
                        "gap_pct": NumberFormatter(format="0.00", nan_format="")},
            titles={"job_id": "job", "elapsed_s": "elapsed (s)", "gap_pct": "gap (%)", "run": "run (open in Plan)"},
            header_filters={"status": {"type": "input", "func": "like", "placeholder": "status"},
                            "case": {"type": "input", "func": "like", "placeholder": "case"}},
        )
        self.jobs_table.style.map(_status_style, subset=["status"])
        self.workers_table = pn.widgets.Tabulator(
            workers_frame([]), show_index=False, disabled=True, selectable=False, layout="fit_data_table",
            sizing_mode="stretch_width", height=180, css_classes=["workers-table"],
            formatters={"heartbeat_age_s": NumberFormatter(format="0.0", nan_format="")},
            titles={"current_job": "current job", "last_heartbeat": "last heartbeat (UTC)",
                    "heartbeat_age_s": "age (s)", "jobs_done": "jobs done"},
        )
        self.workers_table.style.map(_status_style, subset=["state"])
        self.jobs_table.param.watch(self._on_selection, "selection")
        self.refresh()

    # ------------------------------------------------------------------------------------------ reading

    def refresh(self) -> None:
        """Read jobs and workers once (the page calls this every two seconds)."""
        try:
            records = self.client.list_jobs(limit=JOB_LIMIT)
            workers = self.client.workers()
        except Exception as exc:  # noqa: BLE001 - a busy ledger or a vanished scheduler must not stop the poller
            log.warning("job list unavailable: %s", exc)
            self.param.update(message=f"Jobs unavailable: {exc}", message_error=True)
            return
        jobs = jobs_frame(records)
        workers_df = workers_frame(workers)
        with pn.io.hold():
            if not jobs.equals(self.jobs_table.value):
                # Keep the planner's selection on the same job when rows move (a new job goes on top).
                selected = self.selected_job_id
                self.jobs_table.value = jobs
                if selected is not None:
                    rows = jobs.index[jobs["job_id"] == selected].tolist()
                    self.jobs_table.selection = rows[:1]
            if not workers_df.equals(self.workers_table.value):
                self.workers_table.value = workers_df
            counts = jobs["status"].value_counts().to_dict() if not jobs.empty else {}
            live = sum(1 for w in workers if w.get("state") not in ("dead", "stopped"))
            self.param.update(counts={k: int(v) for k, v in counts.items()},
                              backend=getattr(self.client, "backend", ""), live_workers=live)
            self._sync_selected_status()

    def _on_selection(self, event) -> None:
        value = self.jobs_table.value
        rows = [i for i in event.new if 0 <= i < len(value)]
        self.selected_job_id = str(value["job_id"].iloc[rows[0]]) if rows else None
        self._sync_selected_status()

    def _sync_selected_status(self) -> None:
        value = self.jobs_table.value
        status = ""
        if self.selected_job_id is not None and not value.empty:
            match = value[value["job_id"] == self.selected_job_id]
            status = str(match["status"].iloc[0]) if not match.empty else ""
        if status != self.selected_status:
            self.selected_status = status

    # ------------------------------------------------------------------------------------------ actions

    @param.depends("cancel", watch=True)
    def _on_cancel(self) -> None:
        job_id = self.selected_job_id
        if not job_id:
            return
        try:
            rec = self.client.cancel(job_id)
        except Exception as exc:  # noqa: BLE001 - the ledger's refusal is the planner's message
            self.param.update(message=f"Cancel {job_id}: {exc}", message_error=True)
            return
        self.param.update(message=f"Job {job_id} is now {rec.status}.", message_error=False)
        self.refresh()

    @param.depends("retry", watch=True)
    def _on_retry(self) -> None:
        job_id = self.selected_job_id
        if not job_id:
            return
        try:
            new_id = self.client.retry(job_id)
        except Exception as exc:  # noqa: BLE001 - e.g. still running, or its config no longer validates
            self.param.update(message=f"Retry {job_id}: {exc}", message_error=True)
            return
        self.param.update(message=f"Job {job_id} submitted again as {new_id}.", message_error=False)
        self.refresh()

    # ------------------------------------------------------------------------------------------- layout

    def _summary_html(self, counts: dict, backend: str, message: str, is_error: bool, live_workers: int) -> str:
        order = [*ACTIVE, *FINISHED]
        parts = [f"<b>{counts[s]}</b> {s}" for s in order if counts.get(s)]
        text = " · ".join(parts) if parts else "No jobs yet."
        out = f'<span class="muted jobs-summary">{text} · backend: {html.escape(backend or "?")}</span>'
        if not live_workers:
            out += ('<div class="err no-workers">No live worker: queued jobs wait until one starts '
                    "(<code>vmat-planner worker</code>, or serve the app with <code>--workers 1</code>).</div>")
        if message:
            css = "err" if is_error else "muted"
            out += f'<div class="{css} jobs-message">{html.escape(message)}</div>'
        return out

    def __panel__(self):
        cancel = pn.widgets.Button.from_param(
            self.param.cancel, name="Cancel job", color="danger", width=120, css_classes=["cancel-job"],
            disabled=pn.bind(lambda s: s not in ("queued", "running"), self.param.selected_status))
        retry = pn.widgets.Button.from_param(
            self.param.retry, name="Retry", width=100, css_classes=["retry-job"],
            disabled=pn.bind(lambda s: s not in FINISHED, self.param.selected_status))
        selected = pn.pane.HTML(pn.bind(lambda j, s: (f"Selected: <code>{html.escape(j)}</code> ({s})" if j else
                                                      '<span class="muted">Select a job to cancel or retry it.'
                                                      "</span>"), self.param.selected_job_id,
                                        self.param.selected_status), stylesheets=[LINK_CSS], margin=(12, 8))
        summary = pn.pane.HTML(pn.bind(self._summary_html, self.param.counts, self.param.backend,
                                       self.param.message, self.param.message_error, self.param.live_workers),
                               stylesheets=[LINK_CSS],
                               sizing_mode="stretch_width", margin=(8, 8))
        card = {"sizing_mode": "stretch_width", "margin": (4, 6),
                "styles": {"background": "white", "border": f"1px solid {theme.BORDER}", "border-radius": "6px"}}
        return pn.Column(
            pn.Column(pn.pane.HTML("<b>Jobs</b> <span class='muted'>(newest first; refreshed every 2 s)</span>",
                                   stylesheets=[LINK_CSS], margin=(8, 8)),
                      summary, self.jobs_table, pn.Row(cancel, retry, selected), **card),
            pn.Column(pn.pane.HTML("<b>Workers</b> <span class='muted'>(embedded processes and Dask workers, with "
                                   "their last heartbeat)</span>", stylesheets=[LINK_CSS], margin=(8, 8)),
                      self.workers_table, **card),
            sizing_mode="stretch_width",
        )


def create_jobs_page(client=None):
    """The Jobs page for one browser session; it polls the ledger only while the session is open."""
    pn.extension("tabulator", sizing_mode="stretch_width", raw_css=[theme.RAW_CSS], notifications=False)
    page = JobsPage(client=client)
    if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        cb = pn.state.add_periodic_callback(page.refresh, period=REFRESH_PERIOD_MS)
        pn.state.on_session_destroyed(lambda _ctx: cb.stop())
    return page_template("Jobs", "Jobs", [page])
