"""Live optimisation: incumbent objective and best bound against time, the gap, the timer and the solver log.

While a job runs the chart follows the job's progress (the page polls it once a second); otherwise it shows the
stored progress trace of the displayed run, so the convergence of any plan can be looked at again.
"""

from __future__ import annotations

import contextlib
import html
import math

import holoviews as hv
import holoviews.plotting.bokeh  # registers the Bokeh options the views use
import numpy as np
import pandas as pd
import panel as pn
import param

from app import theme
from app.state import FINISHED_STATUSES, READ_ERRORS, REFERENCE, PlanState, gap_badge_text, plan_data, run_store

TRACE_COLUMNS = ["elapsed_s", "incumbent", "bound", "gap"]
LOG_TAIL_LINES = 300


def progress_frame(events: list[dict]) -> pd.DataFrame:
    """Solver progress events (those carrying an incumbent or bound) as a frame sorted by time."""
    rows = []
    for e in events or []:
        inc, bnd = e.get("incumbent"), e.get("bound")
        if inc is None and bnd is None:
            continue
        t = e.get("solver_elapsed_s", e.get("elapsed_s"))
        if t is None:
            continue
        rows.append({
            "elapsed_s": float(t),
            "incumbent": _num(inc),
            "bound": _num(bnd),
            "gap": _num(e.get("gap")),
        })
    df = pd.DataFrame(rows, columns=TRACE_COLUMNS)
    return df.sort_values("elapsed_s", kind="stable").reset_index(drop=True)


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def trace_plot(data: pd.DataFrame) -> hv.Overlay:
    """Incumbent (solid) and bound (dashed) against solver time; log y when every value is positive."""
    df = data
    title = "" if not df.empty else df.attrs.get("empty_message", "")
    inc = df.dropna(subset=["incumbent"])
    bnd = df.dropna(subset=["bound"])
    values = np.concatenate([inc["incumbent"].to_numpy(), bnd["bound"].to_numpy()])
    logy = bool(values.size and np.all(values > 0) and values.max() / max(values.min(), 1e-300) > 20)
    inc_curve = hv.Curve(inc, "elapsed_s", ["incumbent", "gap"], label="incumbent").opts(
        color=theme.ACCENT, line_width=2, interpolation="steps-post", tools=["hover"])
    bnd_curve = hv.Curve(bnd, "elapsed_s", ["bound", "gap"], label="best bound").opts(
        color=theme.ACCENT_LIGHT, line_width=2, line_dash="dashed", interpolation="steps-post", tools=["hover"])
    inc_pts = hv.Scatter(inc, "elapsed_s", ["incumbent", "gap"]).opts(color=theme.ACCENT, size=6)
    bnd_pts = hv.Scatter(bnd, "elapsed_s", ["bound", "gap"]).opts(color=theme.ACCENT_LIGHT, size=6, marker="square")
    band = pd.DataFrame({"elapsed_s": [], "value": []})
    if values.size and not logy:
        lo, hi = float(values.min()), float(values.max())
        # Incumbent and bound equal (an optimal plan): invisible points widen the axis to a readable band
        # around the value instead of 1e-12 ticks (data, not a fixed ylim, so the next frame rescales).
        if hi - lo <= 1e-6 * max(abs(hi), 1.0):
            half = 0.05 * max(abs(hi), 1.0)
            t = float(df["elapsed_s"].iloc[0])
            band = pd.DataFrame({"elapsed_s": [t, t], "value": [lo - half, hi + half]})
    band_pts = hv.Scatter(band, "elapsed_s", "value").opts(alpha=0, size=1)
    layers = [el.opts(framewise=True) for el in (inc_curve, bnd_curve, inc_pts, bnd_pts, band_pts)]
    return hv.Overlay(layers).opts(
        xlabel="Solver time (s)", ylabel="Objective", logy=logy, responsive=True, height=230, title=title,
        legend_position="top_left", show_grid=True, toolbar=None, yformatter="%.4g",
    )


def _clock(seconds: float | None) -> str:
    t = int(seconds or 0)
    return f"{t // 60}:{t % 60:02d}"


def gap_text(gap: float | None) -> str:
    if gap is None or not np.isfinite(gap):
        return "gap –"
    return f"gap {100 * gap:.1f} %"


class LiveView(pn.viewable.Viewer):
    state = param.ClassSelector(class_=PlanState)

    def _stored_trace(self, case_id: str | None, run_id: str | None) -> tuple[pd.DataFrame, list[str]]:
        key = (case_id, run_id)
        if key in self._trace_cache:
            return self._trace_cache[key]
        df, log = pd.DataFrame(columns=TRACE_COLUMNS), []
        if run_id and run_id != REFERENCE:
            store = run_store()
            # A run without a trace or log just shows an empty chart or console.
            with contextlib.suppress(READ_ERRORS):
                df = store.read_table(run_id, "progress")
            with contextlib.suppress(READ_ERRORS):
                log = store.read_text(run_id, "solver").splitlines()[-LOG_TAIL_LINES:]
        df = df.reindex(columns=TRACE_COLUMNS).astype(float) if not df.empty else pd.DataFrame(
            columns=TRACE_COLUMNS, dtype=float)
        if df.empty and run_id and run_id != REFERENCE:
            # Solved before the first progress report (at the root node): the final values are the trace.
            data = plan_data(case_id, run_id) if case_id else None
            meta = data["metadata"] if data else {}
            if meta.get("objective") is not None:
                df = pd.DataFrame([{
                    "elapsed_s": _num(meta.get("solve_time_s")) if meta.get("solve_time_s") is not None else 0.0,
                    "incumbent": _num(meta.get("objective")),
                    "bound": _num(meta.get("bound")),
                    "gap": _num(meta.get("gap")),
                }], columns=TRACE_COLUMNS)
        self._trace_cache[key] = (df, log)
        return df, log

    def _update(self, *_):
        s = self.state
        # A finished job's trace and log are in its run folder; a failed or cancelled one has only the ledger.
        live = bool(s.job_id) and s.job_status not in FINISHED_STATUSES
        if live:
            df = progress_frame(s.job_progress.get("events") or [])
            log = list(s.job_progress.get("log") or [])[-LOG_TAIL_LINES:]
            source = f"job {s.job_id[:12]} · {s.job_status or 'submitted'}"
        else:
            df, log = self._stored_trace(s.case_id, s.displayed_run_id)
            source = "stored trace of the displayed run" if s.displayed_run_id else "no run yet"
        if df.empty:
            df = df.copy()
            df.attrs["empty_message"] = (
                "waiting for the solver's first incumbent or bound…" if live
                else "no optimisation yet: press Re-optimise" if not s.displayed_run_id
                else "this run recorded no solver progress"
            )
        last = self._pipe.data
        if not (isinstance(last, pd.DataFrame) and last.shape == df.shape and last.equals(df)
                and last.attrs == df.attrs):
            self._pipe.send(df)
        if live:
            gap = df["gap"].dropna().iloc[-1] if df["gap"].notna().any() else None
            phase = (s.job_progress.get("latest") or {}).get("phase", "")
            badges = [
                theme.badge(gap_text(gap), "gap" if gap is None or gap > 1e-4 else "optimal"),
                theme.badge(f"{_clock(s.job_elapsed_s)} elapsed", "run"),
            ]
            if phase:
                badges.append(theme.badge(html.escape(str(phase)), "run"))
        else:
            meta = {}
            if s.displayed_run_id and s.case_id:
                data = plan_data(s.case_id, s.displayed_run_id)
                meta = data["metadata"] if data else {}
            badges = [theme.gap_badge(gap_badge_text(meta))] if meta else []
            if meta.get("solve_time_s") is not None:
                badges.append(theme.badge(f"solve {float(meta['solve_time_s']):.1f} s", "run"))
            if meta.get("t_total_s") is not None:
                badges.append(theme.badge(f"total {_clock(float(meta['t_total_s']))}", "run"))
        self._status.object = (
            "<b>Optimisation</b> " + "".join(badges)
            + f' <span class="muted" style="font-size:11px">{html.escape(source)} · gap = (incumbent − bound) / '
            '|incumbent|; solver logs may divide by the bound instead</span>'
        )
        text = "\n".join(log) if log else "(no solver output yet)"
        if text != self._console_text:
            # A new child (not new text in the old one) is what makes the scrolling column follow the tail.
            self._console_text = text
            self._console.objects = [self._console_pane(text)]
            # Scrolled to the end (the browser clamps the position); a changed value makes it act every time.
            self._scroll_ticks += 1
            self._console.scroll_position = 10_000_000 + self._scroll_ticks

    @staticmethod
    def _console_pane(text: str) -> pn.pane.Str:
        return pn.pane.Str(
            text,
            styles={"font-family": "ui-monospace, Menlo, Consolas, monospace", "font-size": "11px",
                    "color": "#E2E8F0", "white-space": "pre"},
            sizing_mode="stretch_width",
            margin=0,
            css_classes=["solver-console"],
        )

    def __panel__(self):
        self._trace_cache: dict = {}
        self._pipe = hv.streams.Pipe(data=pd.DataFrame(columns=TRACE_COLUMNS, dtype=float))
        dmap = hv.DynamicMap(trace_plot, streams=[self._pipe])
        self._status = pn.pane.HTML("", stylesheets=[theme.BADGE_CSS], margin=(4, 8), sizing_mode="stretch_width",
                                    css_classes=["live-status"])
        self._console_text = ""
        self._scroll_ticks = 0
        console = pn.Column(
            self._console_pane(""),
            scroll=True,
            auto_scroll_limit=100_000,
            height=230,
            sizing_mode="stretch_width",
            styles={"background": "#0F172A", "border-radius": "4px", "padding": "4px 8px"},
            css_classes=["console-box"],
        )
        self._console = console
        s = self.state
        s.param.watch(self._update, ["job_progress", "job_status", "displayed_run_id", "case_id",
                                     "job_elapsed_s"])
        self._update()
        return pn.Column(
            self._status,
            pn.Row(pn.pane.HoloViews(dmap, sizing_mode="stretch_width", height=240), console,
                   sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )

