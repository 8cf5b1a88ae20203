"""Centre: the DVH overlay of the shown plan (a run or the reference), one colour per structure."""

from __future__ import annotations

import html
import math
from functools import partial

import holoviews as hv
import holoviews.plotting.bokeh  # registers the Bokeh options the views use
import numpy as np
import pandas as pd
import panel as pn
import param

from app import theme
from app.state import FULL_GRID, OPTIMISATION_GRID, REFERENCE, PlanState, gap_badge_text, plan_data

NORMALISE_TOOLTIP = (
    "Comparison only: every dose of the plan (DVH dose axis, metrics) is multiplied by one factor so that the "
    "chosen percentage of the PTV receives the prescription. Criteria are re-evaluated by simple scaling of "
    "their dose-valued rows (Gy); volume-valued rows are read off the scaled DVH. The plan itself is unchanged."
)
DVH_HOVER = [("structure", "@structure"), ("dose", "@dose_gy{0.00} Gy"), ("volume", "@volume_pct{0.0} %")]


def plan_title(plan_id: str | None, data: dict | None) -> str:
    if plan_id is None or data is None:
        return ""
    if plan_id == REFERENCE:
        return "Reference plan (shipped dose)"
    return f"Run {data['label']}"


def dvh_curves(
    dvh: pd.DataFrame,
    visible: list[str],
    colours: dict[str, str],
    scale: float = 1.0,
    line_dash: str = "solid",
    suffix: str = "",
) -> list[hv.Curve]:
    """One hv.Curve per visible structure (case order kept), dose multiplied by ``scale``."""
    curves = []
    if dvh is None or dvh.empty:
        return curves
    groups = dict(tuple(dvh.groupby("structure", sort=False)))
    for name in visible:
        part = groups.get(name)
        if part is None or part.empty:
            continue
        df = pd.DataFrame({
            "dose_gy": part["dose_gy"].to_numpy(dtype=float) * scale,
            "volume_pct": part["volume_pct"].to_numpy(dtype=float),
            "structure": name + suffix,
        })
        curve = _curve(df, name + suffix, {name + suffix: colours.get(name, "#777777")}, line_dash)
        curves.append(curve)
    return curves


def dvh_overlay(curves: list, prescription_gy: float | None, title: str = "", height: int = 340) -> hv.Overlay:
    elements = list(curves)
    if prescription_gy and np.isfinite(prescription_gy):
        elements.append(hv.VLine(prescription_gy).opts(color="#999999", line_dash="dotted", line_width=1))
    overlay = hv.Overlay(elements) if elements else hv.Overlay([hv.Curve([])])
    return overlay.opts(
        xlabel="Dose (Gy)",
        ylabel="Volume (%)",
        ylim=(0, 102),
        title=title,
        legend_position="right",
        legend_opts={"click_policy": "hide", "label_text_font_size": "10px", "label_height": 12,
                     "glyph_height": 12, "spacing": 0, "padding": 4},
        responsive=True,
        height=height,
        show_grid=True,
        toolbar="above",
        active_tools=["pan", "wheel_zoom"],
    )


def dvh_frames(case_id: str, plan_id: str | None, visible: list[str], normalise: bool,
               coverage_pct: float, grid: str = OPTIMISATION_GRID) -> dict:
    """What the DVH shows for a plan: {'frames': {structure: DataFrame}, 'prescription_gy', 'scale',
    'header' (HTML), 'grid'}; no frames when there is no plan. Pure function of its arguments (``grid``: the
    evaluation asked for; 'grid' is the one given, the optimisation grid when no full dose exists)."""
    from app.state import normalisation_factor

    empty = {"frames": {}, "prescription_gy": math.nan, "scale": 1.0, "header": "", "grid": None}
    if plan_id is None:
        return empty
    data = plan_data(case_id, plan_id, grid)
    if data is None:
        return {**empty, "header": f'<span class="err">Plan {html.escape(plan_id)} could not be read.</span>'}
    scale = normalisation_factor(data, coverage_pct) if normalise else 1.0
    dvh = data["dvh"]
    frames = {}
    if not dvh.empty:
        for name, part in dvh.groupby("structure", sort=False):
            if name in visible:
                frames[name] = pd.DataFrame({
                    "dose_gy": part["dose_gy"].to_numpy(dtype=float) * scale,
                    "volume_pct": part["volume_pct"].to_numpy(dtype=float),
                    "structure": name,
                })
    header = f"<b>{html.escape(plan_title(plan_id, data))}</b>"
    header += theme.gap_badge(gap_badge_text(data["metadata"]) if plan_id != REFERENCE else "reference plan")
    header += theme.grid_badge(data["grid_label"], data["grid"] == FULL_GRID)
    if normalise:
        header += theme.badge(f"normalised to PTV V100 = {coverage_pct:g}% (×{scale:.3f})", "norm")
    return {"frames": frames, "prescription_gy": data["prescription_gy"], "scale": scale, "header": header,
            "grid": data["grid"]}


def build_dvh(case_id: str, plan_id: str | None, visible: list[str], colours: dict[str, str],
              normalise: bool, coverage_pct: float, grid: str = OPTIMISATION_GRID):
    """(overlay or None, header HTML) of a plan, as a standalone HoloViews overlay."""
    shown = dvh_frames(case_id, plan_id, visible, normalise, coverage_pct, grid)
    if not shown["frames"]:
        return None, shown["header"]
    curves = [_curve(shown["frames"][n], n, colours) for n in visible if n in shown["frames"]]
    return dvh_overlay(curves, shown["prescription_gy"]), shown["header"]


_EMPTY = pd.DataFrame({"dose_gy": np.array([], dtype=float), "volume_pct": np.array([], dtype=float),
                       "structure": np.array([], dtype=object)})


def _curve(frame: pd.DataFrame, name: str, colours: dict[str, str], line_dash: str = "solid") -> hv.Curve:
    return hv.Curve(frame, kdims=["dose_gy"], vdims=["volume_pct", "structure"], label=name).opts(
        color=colours.get(name, "#777777"), line_dash=line_dash, line_width=2, tools=["hover"],
        hover_tooltips=DVH_HOVER, muted_alpha=0.1)


def _live_overlay(names: tuple[str, ...], colours: dict[str, str], data: dict | None) -> hv.Overlay:
    """The DynamicMap's frame: always the same curves (one per visible structure), so a new plan only
    replaces their data in the browser instead of rebuilding the figure."""
    data = data or {}
    frames = data.get("frames", {})
    rx = data.get("prescription_gy", math.nan)
    # framewise: each new plan sets the axes (the dose range differs between plans and normalisations).
    curves = [_curve(frames.get(n, _EMPTY), n, colours).opts(framewise=True) for n in names]
    rx_line = hv.VLine(rx if np.isfinite(rx) else 0.0).opts(
        color="#999999", line_dash="dotted", line_width=1, alpha=1.0 if np.isfinite(rx) else 0.0)
    return dvh_overlay(curves + [rx_line], None).opts(framewise=True)


class DVHView(pn.viewable.Viewer):
    """The DVH of the shown plan. The figure is built once per (case, visible structures, colours); a new run,
    the reference or a normalisation only sends new curve data (the Bokeh figure is updated in place)."""

    state = param.ClassSelector(class_=PlanState)

    def _placeholder(self) -> str:
        if self.state.job_active:
            msg = "Optimising… the DVH appears when the run finishes."
        else:
            msg = ("No plan yet for this case: set the objectives and press <b>Re-optimise</b>, or load the "
                   "reference dose.")
        return f'<div class="muted" style="padding:60px 10px;text-align:center">{msg}</div>'

    def current(self) -> dict:
        s = self.state
        return dvh_frames(s.case_id, s.shown_plan_id, list(s.visible_structures), s.normalise,
                          s.normalise_coverage_pct, s.grid_for(s.shown_plan_id))

    def _push(self, *_) -> None:
        shown = self.current()
        with pn.io.hold():
            self._header.object = shown["header"] or self._placeholder()
            if self._pipe is not None:
                self._pipe.send(shown)
            # No plan: the message alone, not empty axes (the figure stays built for the next plan).
            self._figure_pane.visible = bool(shown["frames"])

    def _figure(self, case_id, visible, colours):
        names = tuple(visible)
        self._pipe = hv.streams.Pipe(data=self.current())
        dmap = hv.DynamicMap(partial(_live_overlay, names, dict(colours)), streams=[self._pipe])
        return pn.pane.HoloViews(dmap, sizing_mode="stretch_width", height=340, linked_axes=False,
                                 css_classes=["dvh-plot"])

    def controls(self):
        state = self.state
        toggle = pn.widgets.Checkbox.from_param(state.param.normalise, label="Normalise: PTV V100 =", width=165,
                                                margin=(12, 2, 0, 8), css_classes=["normalise-toggle"])
        coverage = pn.widgets.FloatInput.from_param(state.param.normalise_coverage_pct, label="", width=70,
                                                    margin=(6, 2), disabled=pn.bind(lambda n: not n,
                                                                                   state.param.normalise))
        return pn.Row(
            toggle,
            coverage,
            pn.pane.HTML("%", margin=(12, 2), styles={"font-size": "12px"}, width=14),
            pn.widgets.TooltipIcon(value=NORMALISE_TOOLTIP, margin=(10, 4)),
            margin=0,
            width=300,
        )

    def __panel__(self):
        s = self.state
        self._pipe = None
        self._header = pn.pane.HTML("", stylesheets=[theme.BADGE_CSS], margin=(0, 8), css_classes=["dvh-header"],
                                    sizing_mode="stretch_width")
        figure = pn.panel(pn.bind(self._figure, s.param.case_id, s.param.visible_structures,
                                  s.param.structure_colors), sizing_mode="stretch_width", min_height=340)
        # Visibility and loading go on a plain container: Panel 1.10 fails to pass layout changes on to a
        # plot pane (its stylesheets do not validate).
        figure = pn.Column(figure, sizing_mode="stretch_width", loading=s.param.loading, margin=0)
        self._figure_pane = figure
        # After the figure (watchers run in registration order), so a rebuilt figure gets the data at once.
        s.param.watch(self._push, ["case_id", "displayed_run_id", "show_reference", "visible_structures",
                                   "normalise", "normalise_coverage_pct", "job_status", "shown_grid"])
        self._push()
        return pn.Column(
            pn.Row(pn.pane.HTML("<b>Dose–volume histogram</b>", margin=(10, 8)), pn.layout.HSpacer(),
                   self.controls(), margin=0),
            self._header,
            figure,
            sizing_mode="stretch_width",
        )
