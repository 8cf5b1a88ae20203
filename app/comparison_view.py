"""Run comparison: pick plans A and B (runs of this case or the reference), overlay their DVHs and tabulate B − A.

Setting A and B also sets ``state.compare_a/compare_b``, from which the axial viewer shows the dose difference.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import panel as pn
import param

from app import theme
from app.criteria_view import DOSE_METRICS, METRIC_TITLES, scale_metrics
from app.dvh_view import dvh_curves, dvh_overlay
from app.state import (
    FULL_GRID,
    REFERENCE,
    PlanState,
    gap_badge_text,
    normalisation_factor,
    pair_note,
    plan_data,
    run_label,
)

NONE_LABEL = "—"
COMPARED_METRICS = {k: METRIC_TITLES[k] for k in (*DOSE_METRICS, "v100_pct")}
TARGET_METRICS = ("mean_gy", "d95_gy", "d98_gy", "d2_gy", "v100_pct", "max_gy")
OAR_METRICS = ("mean_gy", "max_gy", "d2cc_gy")


def verdict(metric: str, is_target: bool, a: float, b: float, prescription_gy: float) -> str:
    """'better', 'worse' or 'same' for B against A: lower OAR dose is better; for targets, closer to the
    prescription (V100 closer to 100 %) is better."""
    if not (np.isfinite(a) and np.isfinite(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-3):
        return "same"
    if is_target:
        goal = 100.0 if metric == "v100_pct" else prescription_gy
        da, db = abs(a - goal), abs(b - goal)
        if math.isclose(da, db, abs_tol=1e-3):
            return "same"
        return "better" if db < da else "worse"
    return "better" if b < a else "worse"


def delta_metrics(metrics_a: pd.DataFrame, metrics_b: pd.DataFrame, prescription_gy: float) -> pd.DataFrame:
    """Long table: structure, metric, A, B, Δ (B − A), verdict — structures present in both plans."""
    rows = []
    if metrics_a.empty or metrics_b.empty:
        return pd.DataFrame(columns=["Structure", "Metric", "A", "B", "Δ (B − A)", "verdict"])
    b_by = {r["structure"]: r for _, r in metrics_b.iterrows()}
    for _, ra in metrics_a.iterrows():
        name = ra["structure"]
        rb = b_by.get(name)
        if rb is None:
            continue
        target = bool(ra.get("is_target", False))
        for metric in TARGET_METRICS if target else OAR_METRICS:
            if metric not in ra or metric not in rb:
                continue
            a, b = float(ra[metric]), float(rb[metric])
            if not (np.isfinite(a) or np.isfinite(b)):
                continue
            rows.append({
                "Structure": name,
                "Metric": COMPARED_METRICS[metric],
                "A": round(a, 2),
                "B": round(b, 2),
                "Δ (B − A)": round(b - a, 2) if np.isfinite(a) and np.isfinite(b) else math.nan,
                "verdict": verdict(metric, target, a, b, prescription_gy),
            })
    return pd.DataFrame(rows, columns=["Structure", "Metric", "A", "B", "Δ (B − A)", "verdict"])


def grid_summary(state: PlanState, plan_a: str, plan_b: str, data_a: dict, data_b: dict) -> str:
    """The sentence a comparison owes the planner about its dose grids (plain text)."""
    mixed = pair_note(data_a, data_b)
    if data_a["grid"] != data_b["grid"]:
        return mixed
    if data_a["grid"] == FULL_GRID:
        return "Both plans at full resolution."
    text = "Both plans on the optimisation grid"
    if state.dose_grid == FULL_GRID:
        # Full resolution was asked for but one plan lacks it: say which, so the planner knows what to compute.
        why = []
        for tag, pid in (("A", plan_a), ("B", plan_b)):
            if pid == REFERENCE:
                why.append(f"the reference plan ({tag}) has optimisation-grid criteria only")
            elif FULL_GRID not in state.grids_available(pid, volumes=False):
                why.append(f"full resolution not computed for {tag}")
        if why:
            text += ": " + "; ".join(why)
    text += "."
    return f"{text} {mixed}" if mixed else text


def _verdict_style(row: pd.Series) -> list[str]:
    colour = {"better": theme.BETTER, "worse": theme.WORSE}.get(row.get("verdict"), "")
    return [f"background-color: {colour}" if colour and col in ("Δ (B − A)", "verdict") else ""
            for col in row.index]


class ComparisonView(pn.viewable.Viewer):
    state = param.ClassSelector(class_=PlanState)

    def _options(self, case_id, runs_version) -> dict[str, str | None]:
        s = self.state
        opts: dict[str, str | None] = {NONE_LABEL: None}
        if s.case is not None and s.case.has_reference_dose:
            opts["Reference plan (shipped dose)"] = REFERENCE
        df = s.case_runs()
        if not df.empty and "run_id" in df:
            for _, r in df.iterrows():
                meta = r.to_dict()
                label = run_label(meta)
                if label in opts:
                    label = f"{label} ({str(meta['run_id'])[-6:]})"
                opts[label] = str(meta["run_id"])
        return opts

    def _selectors(self):
        s = self.state
        a = pn.widgets.Select(label="Plan A (solid)", options={NONE_LABEL: None}, width=330, margin=(2, 8),
                              css_classes=["compare-a"])
        b = pn.widgets.Select(label="Plan B (dashed)", options={NONE_LABEL: None}, width=330, margin=(2, 8),
                              css_classes=["compare-b"])

        busy = {"on": False}

        def refresh(*_):
            opts = self._options(s.case_id, s.runs_version)
            busy["on"] = True
            try:
                for w, cur in ((a, s.compare_a), (b, s.compare_b)):
                    w.options = opts
                    w.value = cur if cur in opts.values() else None
            finally:
                busy["on"] = False

        refresh()
        s.param.watch(refresh, ["runs_version", "case_id"])

        def push(*_):
            if not busy["on"]:
                s.param.update(compare_a=a.value, compare_b=b.value)

        a.param.watch(push, "value")
        b.param.watch(push, "value")

        def pull(*_):
            busy["on"] = True
            try:
                if s.compare_a in a.options.values():
                    a.value = s.compare_a
                if s.compare_b in b.options.values():
                    b.value = s.compare_b
            finally:
                busy["on"] = False

        s.param.watch(pull, ["compare_a", "compare_b"])
        swap = pn.widgets.Button(label="⇄ swap", color="light", width=70, margin=(22, 4))
        swap.on_click(lambda _: s.param.update(compare_a=s.compare_b, compare_b=s.compare_a))
        return pn.Row(a, swap, b, margin=0)

    def _render(self, case_id, plan_a, plan_b, visible, colours, normalise, coverage, _dose_grid=None,
                _full_dose_status=None):
        if not plan_a or not plan_b:
            return pn.pane.HTML('<div class="muted" style="padding:8px">Pick two plans to compare (runs of this '
                                'case or the reference plan).</div>', stylesheets=[theme.BADGE_CSS])
        grid_a, grid_b = self.state.pair_grids(plan_a, plan_b)
        da, db = plan_data(case_id, plan_a, grid_a), plan_data(case_id, plan_b, grid_b)
        if da is None or db is None:
            return pn.pane.HTML('<span class="err">A plan could not be read.</span>', stylesheets=[theme.BADGE_CSS])
        sa = normalisation_factor(da, coverage) if normalise else 1.0
        sb = normalisation_factor(db, coverage) if normalise else 1.0
        curves = dvh_curves(da["dvh"], visible, colours, sa, "solid", " (A)")
        curves += dvh_curves(db["dvh"], visible, colours, sb, "dashed", " (B)")
        overlay = dvh_overlay(curves, da["prescription_gy"], height=360)
        pres = da["prescription_gy"]
        ma = scale_metrics(da["metrics"], da["dvh"], sa, pres)
        mb = scale_metrics(db["metrics"], db["dvh"], sb, db["prescription_gy"])
        delta = delta_metrics(ma, mb, pres)
        table = pn.widgets.Tabulator(delta, show_index=False, disabled=True, layout="fit_data_stretch",
                                     sizing_mode="stretch_width", max_height=360,
                                     css_classes=["delta-table"])
        table.style.apply(_verdict_style, axis=1)

        def describe(tag, pid, data, scale):
            badge = "reference plan" if pid == REFERENCE else gap_badge_text(data["metadata"])
            label = "Reference plan" if pid == REFERENCE else data["label"]
            out = f"<b>{tag}</b> {html.escape(label)}{theme.gap_badge(badge)}"
            out += theme.grid_badge(data["grid_label"], data["grid"] == FULL_GRID)
            if normalise:
                out += theme.badge(f"normalised to PTV V100 = {coverage:g}% (×{scale:.3f})", "norm")
            return out

        summary = grid_summary(self.state, plan_a, plan_b, da, db)
        alike = da["grid"] == db["grid"] and not pair_note(da, db)
        summary_html = (f"<div class='{'muted' if alike else 'err'} grid-summary' style='font-size:12px'>"
                        f"Dose grid: {html.escape(summary)}</div>")
        header = pn.pane.HTML(
            f"<div>{describe('A (solid):', plan_a, da, sa)}</div><div>{describe('B (dashed):', plan_b, db, sb)}</div>"
            f"{summary_html}"
            "<div class='muted' style='font-size:11px'>Δ = B − A; green: B better (lower OAR dose, target closer "
            "to the prescription), red: B worse.</div>",
            stylesheets=[theme.BADGE_CSS],
            margin=(0, 8),
            css_classes=["compare-header"],
        )
        return pn.Column(
            header,
            pn.Row(pn.pane.HoloViews(overlay, sizing_mode="stretch_width", height=360, linked_axes=False), table,
                   sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )

    def __panel__(self):
        s = self.state
        body = pn.panel(
            pn.bind(self._render, s.param.case_id, s.param.compare_a, s.param.compare_b,
                    s.param.visible_structures, s.param.structure_colors, s.param.normalise,
                    s.param.normalise_coverage_pct, s.param.dose_grid, s.param.full_dose_status),
            loading_indicator=True,
            sizing_mode="stretch_width",
        )
        return pn.Column(pn.pane.HTML("<b>Compare plans</b>", margin=(6, 8)), self._selectors(), body,
                         sizing_mode="stretch_width")
