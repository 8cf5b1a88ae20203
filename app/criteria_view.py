"""Centre, below the DVH: PTV coverage, per-structure metrics and the clinical criteria with pass/fail colours."""

from __future__ import annotations

import html
import math
import re

import numpy as np
import pandas as pd
import panel as pn
import param

from app import theme
from app.dvh_view import NORMALISE_TOOLTIP, plan_title
from app.state import (
    FULL_GRID,
    OPTIMISATION_GRID,
    REFERENCE,
    PlanState,
    gap_badge_text,
    normalisation_factor,
    plan_data,
)

DOSE_METRICS = ("mean_gy", "max_gy", "d2cc_gy", "d95_gy", "d98_gy", "d2_gy")
METRIC_TITLES = {
    "structure": "Structure",
    "volume_cc": "Volume (cc)",
    "mean_gy": "Mean (Gy)",
    "max_gy": "Max (Gy)",
    "d2cc_gy": "D2cc (Gy)",
    "d95_gy": "D95 (Gy)",
    "d98_gy": "D98 (Gy)",
    "d2_gy": "D2 (Gy)",
    "v100_pct": "V100 (%)",
}
CRITERIA_COLUMNS = ["Structure", "Criterion", "Limit", "Goal", "Value", "Status"]
STATUS_LABELS = {"pass": "pass", "goal_missed": "goal missed", "fail": "fail", "not_evaluated": "not evaluated"}
_V_LABEL = re.compile(r"V\(([-+0-9.eE]+)Gy\)")


def volume_at_dose(dvh: pd.DataFrame, structure: str, dose_gy: float) -> float:
    part = dvh[dvh["structure"] == structure]
    if part.empty:
        return math.nan
    d = part["dose_gy"].to_numpy(dtype=float)
    v = part["volume_pct"].to_numpy(dtype=float)
    order = np.argsort(d, kind="stable")
    d, v = d[order], v[order]
    if dose_gy > d.max():
        return 0.0
    if dose_gy < d.min():
        return float(v.max())
    return float(np.interp(dose_gy, d, v))


def criterion_status(bound: str, value: float, limit: float, goal: float) -> str:
    if value is None or not np.isfinite(value) or (not np.isfinite(limit) and not np.isfinite(goal)):
        return "not_evaluated"
    if bound == "min":
        return "pass" if value >= limit else "fail"
    ok_limit = not np.isfinite(limit) or value <= limit + 1e-9
    ok_goal = not np.isfinite(goal) or value <= goal + 1e-9
    return "pass" if ok_limit and ok_goal else ("goal_missed" if ok_limit else "fail")


def scale_metrics(metrics: pd.DataFrame, dvh: pd.DataFrame, scale: float, prescription_gy: float) -> pd.DataFrame:
    """Metrics of the plan with every dose multiplied by ``scale`` (V100 read off the scaled DVH)."""
    out = metrics.copy()
    if scale == 1.0 or out.empty:
        return out
    for col in DOSE_METRICS:
        if col in out:
            out[col] = out[col].astype(float) * scale
    if "v100_pct" in out:
        out["v100_pct"] = [
            volume_at_dose(dvh, s, prescription_gy / scale) if np.isfinite(v) else v
            for s, v in zip(out["structure"], out["v100_pct"].astype(float), strict=True)
        ]
    return out


def scale_criteria(criteria: pd.DataFrame, dvh: pd.DataFrame, metrics: pd.DataFrame, scale: float) -> pd.DataFrame:
    """Criteria re-evaluated for a dose scaled by ``scale``: Gy-valued rows multiply; volume rows V(d) are read
    off the DVH at d / scale; statuses are recomputed against the unchanged limits and goals."""
    out = criteria.copy()
    if scale == 1.0 or out.empty:
        return out
    volumes = dict(zip(metrics["structure"], metrics["volume_cc"], strict=False)) if not metrics.empty else {}
    values, statuses = [], []
    for _, row in out.iterrows():
        value = float(row["value"]) if row["value"] is not None else math.nan
        unit = row.get("unit", "")
        if unit == "Gy":
            value *= scale
        elif unit in ("%", "cc"):
            m = _V_LABEL.fullmatch(str(row["criterion"]))
            if m:
                pct = volume_at_dose(dvh, row["structure"], float(m.group(1)) / scale)
                value = pct if unit == "%" else pct * float(volumes.get(row["structure"], math.nan)) / 100.0
        values.append(value)
        if row.get("status") == "not_evaluated":
            statuses.append("not_evaluated")
        else:
            statuses.append(criterion_status(str(row.get("bound", "max")), value, float(row["limit"]),
                                             float(row["goal"])))
    out["value"] = values
    out["status"] = statuses
    return out


def coverage_summary(metrics: pd.DataFrame, criteria: pd.DataFrame) -> str:
    """'PTV V100 = 95.3 % · D95 = 60.1 Gy' coloured by the coverage criterion."""
    if metrics.empty:
        return ""
    ptv = metrics[metrics["structure"].astype(str).str.upper() == "PTV"]
    if ptv.empty:
        return ""
    r = ptv.iloc[0]
    status = "not_evaluated"
    if not criteria.empty:
        cov = criteria[(criteria["structure"] == r["structure"]) & (criteria.get("bound") == "min")]
        if not cov.empty:
            status = str(cov.iloc[0]["status"])
            limit = float(cov.iloc[0]["limit"])
        else:
            limit = math.nan
    else:
        limit = math.nan
    bg, fg = theme.STATUS_COLOURS.get(status, "#EEE"), theme.STATUS_TEXT.get(status, "#333")
    need = f" (minimum {limit:g} %)" if np.isfinite(limit) else ""
    return (
        f'<span style="background:{bg};color:{fg};padding:2px 8px;border-radius:4px;font-size:13px">'
        f"PTV minimum coverage: V100 = {float(r['v100_pct']):.1f} %{need} · D95 = {float(r['d95_gy']):.2f} Gy · "
        f"D98 = {float(r['d98_gy']):.2f} Gy</span>"
    )


def _status_style(row: pd.Series) -> list[str]:
    status = {v: k for k, v in STATUS_LABELS.items()}.get(row.get("Status", ""), "")
    bg = theme.STATUS_COLOURS.get(status, "")
    fg = theme.STATUS_TEXT.get(status, "")
    return [f"background-color: {bg}; color: {fg}" if bg else "" for _ in row]


def _quantity(value: float, unit: str, bound: str | None = None) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    sign = {"max": "≤ ", "min": "≥ "}.get(bound or "", "")
    return f"{sign}{value:.2f} {unit}".strip()


def criteria_frame(criteria: pd.DataFrame) -> pd.DataFrame:
    """The criteria as the planner reads them: '≤ 69.00 Gy', values with units, readable statuses."""
    if criteria.empty:
        return pd.DataFrame(columns=CRITERIA_COLUMNS)
    rows = []
    for _, r in criteria.iterrows():
        unit, bound = str(r.get("unit", "")), str(r.get("bound", "max"))
        rows.append({
            "Structure": r["structure"],
            "Criterion": r["criterion"],
            "Limit": _quantity(float(r["limit"]), unit, bound),
            "Goal": _quantity(float(r["goal"]), unit, bound),
            "Value": _quantity(float(r["value"]), unit),
            "Status": STATUS_LABELS.get(str(r["status"]), str(r["status"])),
        })
    return pd.DataFrame(rows, columns=CRITERIA_COLUMNS)


def metrics_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    if metrics.empty:
        return pd.DataFrame(columns=list(METRIC_TITLES.values()))
    df = metrics[[c for c in METRIC_TITLES if c in metrics]].copy()
    for col in df.columns:
        if col != "structure":
            df[col] = df[col].astype(float).round(2)
    return df.rename(columns=METRIC_TITLES)


def plan_tables(case_id: str, plan_id: str, normalise: bool, coverage_pct: float,
                grid: str = OPTIMISATION_GRID) -> dict | None:
    """Metrics and criteria of a plan on ``grid``, scaled when normalising: {'metrics', 'criteria', 'scale',
    'data'} (data['grid'] is the grid given)."""
    data = plan_data(case_id, plan_id, grid)
    if data is None:
        return None
    scale = normalisation_factor(data, coverage_pct) if normalise else 1.0
    metrics = scale_metrics(data["metrics"], data["dvh"], scale, data["prescription_gy"])
    criteria = scale_criteria(data["criteria"], data["dvh"], data["metrics"], scale)
    return {"metrics": metrics, "criteria": criteria, "scale": scale, "data": data}


class CriteriaView(pn.viewable.Viewer):
    """Coverage line, criteria and metrics of the shown plan. The tables are built once and get new values
    when the plan changes (no plan: emptied at once, never left showing another plan's rows)."""

    state = param.ClassSelector(class_=PlanState)

    def contents(self) -> dict:
        """{'header': HTML, 'criteria': DataFrame, 'metrics': DataFrame, 'note': str} for the shown plan."""
        s = self.state
        plan_id = s.shown_plan_id
        empty = {"criteria": criteria_frame(pd.DataFrame()), "metrics": metrics_frame(pd.DataFrame()), "note": ""}
        if plan_id is None:
            return {**empty, "header": '<div class="muted" style="padding:4px 0">No plan to evaluate yet.</div>'}
        tables = plan_tables(s.case_id, plan_id, s.normalise, s.normalise_coverage_pct, s.grid_for(plan_id))
        if tables is None:
            return {**empty, "header": f'<span class="err">Plan {html.escape(plan_id)} could not be read.</span>'}
        data = tables["data"]
        head = f"<b>Criteria · {html.escape(plan_title(plan_id, data))}</b>"
        head += theme.gap_badge(gap_badge_text(data["metadata"]) if plan_id != REFERENCE else "reference plan")
        head += theme.grid_badge(data["grid_label"], data["grid"] == FULL_GRID)
        if s.normalise:
            head += theme.badge(f"normalised to PTV V100 = {s.normalise_coverage_pct:g}% "
                                f"(×{tables['scale']:.3f})", "norm")
        crit = tables["criteria"]
        counts = crit["status"].value_counts().to_dict() if not crit.empty else {}
        summary = " · ".join(
            f"{counts.get(k, 0)} {label}" for k, label in (("pass", "pass"), ("goal_missed", "goal missed"),
                                                         ("fail", "fail"))
        )
        header = (f"{head}<div style='margin-top:4px'>{coverage_summary(tables['metrics'], crit)}</div>"
                  f"<div class='muted' style='font-size:12px;margin-top:2px'>Criteria: {summary}</div>")
        return {"header": header, "criteria": criteria_frame(crit), "metrics": metrics_frame(tables["metrics"]),
                "note": NORMALISE_TOOLTIP if s.normalise else ""}

    def _update(self, *_) -> None:
        c = self.contents()
        with pn.io.hold():
            self._header.object = c["header"]
            self._criteria.value = c["criteria"]
            self._metrics.value = c["metrics"]
            self._note.object = f'<div class="muted" style="font-size:11px">{html.escape(c["note"])}</div>'
            self._note.visible = bool(c["note"])
            self._tabs.visible = not c["criteria"].empty or not c["metrics"].empty

    def __panel__(self):
        s = self.state
        self._header = pn.pane.HTML("", stylesheets=[theme.BADGE_CSS], margin=(0, 8), css_classes=["criteria-header"],
                                    sizing_mode="stretch_width")
        table = {"show_index": False, "disabled": True, "layout": "fit_data_stretch",
                 "sizing_mode": "stretch_width", "max_height": 300}
        self._criteria = pn.widgets.Tabulator(criteria_frame(pd.DataFrame()), css_classes=["criteria-table"],
                                              **table)
        self._criteria.style.apply(_status_style, axis=1)
        self._metrics = pn.widgets.Tabulator(metrics_frame(pd.DataFrame()), css_classes=["metrics-table"], **table)
        self._note = pn.pane.HTML("", stylesheets=[theme.BADGE_CSS], margin=(0, 8), visible=False)
        self._tabs = pn.Tabs(("Clinical criteria", self._criteria), ("Metrics", self._metrics), dynamic=False,
                             sizing_mode="stretch_width")
        s.param.watch(self._update, ["case_id", "displayed_run_id", "show_reference", "normalise",
                                     "normalise_coverage_pct", "shown_grid"])
        self._update()
        return pn.Column(self._header, self._tabs, self._note, sizing_mode="stretch_width")
