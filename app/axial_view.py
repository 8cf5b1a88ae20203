"""The axial viewer of the Plan page: CT, dose wash, isodose lines and structure contours on one slice.

One Bokeh figure per viewer is built once and only its data and colour mappers change afterwards: a slice
change sends the new CT and dose slices and the contours of that slice (a few milliseconds of work), and
window/level, threshold and opacity only touch colour mappers, so nothing is re-rendered server-side.

The CT and the dose share one ColumnDataSource (columns ``hu`` and ``dose``), so the hover readout shows both
values of the voxel under the cursor from the data already in the browser.

Dose volumes are cached per ``(case_id, plan id, grid)`` (finished runs never change; a run's optimisation-grid
and full-resolution doses are two entries) and loaded off the request thread when served. Whatever the dose
source becomes, the dose on screen is cleared in the same update, so a dose of another case or run is never
shown, not even while the new one loads.
"""

from __future__ import annotations

import html
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial

import numpy as np
import panel as pn
import param
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    HoverTool,
    LinearColorMapper,
)
from bokeh.palettes import Greys256, RdBu11, Turbo256, interp_palette
from bokeh.plotting import figure
from panel.custom import Child, JSComponent

from app.state import (
    FULL_GRID,
    OPTIMISATION_GRID,
    REFERENCE,
    PlanState,
    normalisation_factor,
    optimisation_grid_label,
    plan_data,
    run_label,
    run_voxel_factors,
)
from app.theme import ACCENT, MUTED
from vmat_core import imaging

log = logging.getLogger(__name__)

TRANSPARENT = "rgba(0, 0, 0, 0)"
# Window (width) and level (centre) in HU of the usual presets.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "Lung": (1500.0, -600.0),
    "Mediastinum": (350.0, 50.0),
    "Bone": (1800.0, 400.0),
}
# Isodose colours by % of Rx, the conventional cold-to-hot order (interpolated between these stops).
_ISODOSE_STOPS = (
    (0.0, (0, 0, 255)), (30.0, (0, 128, 255)), (50.0, (0, 220, 220)), (70.0, (0, 200, 0)),
    (80.0, (255, 230, 0)), (95.0, (255, 140, 0)), (100.0, (255, 0, 0)), (107.0, (255, 0, 255)),
)
# Bokeh's RdBu runs from blue to red, so low (B < A) is blue and high (B > A) red.
DIFF_PALETTE = tuple(interp_palette(RdBu11, 255))
_TYPICAL_WIDTH_PX, _DECORATION_W_PX, _DECORATION_H_PX = 600, 130, 120
MAX_ISODOSE_LEVELS = 12
ISODOSE_PCT_RANGE = (1.0, 200.0)

_DOSE_CACHE_MAX = 4  # the displayed plan and a compared pair, ~36 MB each
_dose_cache: OrderedDict[tuple[str, str, str], PlanDose] = OrderedDict()
_dose_cache_lock = threading.Lock()
_loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="axial-dose")


def isodose_colour(pct: float) -> str:
    """Hex colour of an isodose line at ``pct`` % of Rx."""
    stops = _ISODOSE_STOPS
    if pct <= stops[0][0]:
        rgb = stops[0][1]
    elif pct >= stops[-1][0]:
        rgb = stops[-1][1]
    else:
        i = next(k for k in range(1, len(stops)) if pct <= stops[k][0])
        (p0, c0), (p1, c1) = stops[i - 1], stops[i]
        t = (pct - p0) / (p1 - p0)
        rgb = tuple(round(a + t * (b - a)) for a, b in zip(c0, c1))
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _set(model, **props) -> None:
    """Set only the Bokeh properties that differ: an unchanged value still costs a validation."""
    changed = {k: v for k, v in props.items() if getattr(model, k) != v}
    if changed:
        model.update(**changed)


# ----------------------------------------------------------------------------------------------- dose sources


@dataclass(frozen=True)
class PlanDose:
    """A plan's dose volume (total Gy, CT grid) with what the viewer needs to colour it."""

    case_id: str
    plan_id: str  # a run id or REFERENCE
    dose_gy: np.ndarray
    prescription_gy: float
    max_gy: float
    label: str
    grid: str = OPTIMISATION_GRID  # the grid this volume was computed on (the reference: its shipped dose)
    grid_text: str = ""  # the same for the planner, e.g. 'optimisation-grid dose (6×6×1 CT voxels)'


@dataclass(frozen=True)
class DoseDifference:
    """B − A of two plans, each optionally rescaled (normalisation), computed slice by slice."""

    a: PlanDose
    b: PlanDose
    scale_a: float
    scale_b: float
    max_abs_gy: float
    normalised: bool

    @property
    def prescription_gy(self) -> float:
        return self.a.prescription_gy

    def grid_summary(self) -> str:
        if self.a.grid_text == self.b.grid_text:
            return f"both: {self.a.grid_text}"
        if self.a.grid == self.b.grid == FULL_GRID:  # e.g. the shipped reference dose and a reconstructed one
            return f"both at full resolution (A: {self.a.grid_text}; B: {self.b.grid_text})"
        return (f"mixed grids (A: {self.a.grid_text}; B: {self.b.grid_text}), so the map includes the change "
                "of grid")

    def slice(self, z: int, threshold_gy: float) -> np.ndarray:
        """Δ dose of slice z; NaN where both plans are below the threshold (shown transparent)."""
        da = self.a.dose_gy[z] * np.float32(self.scale_a)
        db = self.b.dose_gy[z] * np.float32(self.scale_b)
        diff = db - da
        diff[np.maximum(da, db) < threshold_gy] = np.nan
        return diff


@dataclass(frozen=True)
class DoseKey:
    """What the viewer should show: one plan, or the difference of two (with their normalisation)."""

    case_id: str
    kind: str  # "plan" | "difference"
    plans: tuple[str, ...]
    normalise_pct: float | None = None  # coverage % when the difference is normalised
    grids: tuple[str, ...] = ()  # the grid of each plan (default: the optimisation grid)

    def grid(self, i: int) -> str:
        return self.grids[i] if i < len(self.grids) else OPTIMISATION_GRID



@lru_cache(maxsize=16)
def protocol_prescription_gy(case_id: str) -> float:
    from vmat_core.config import default_config

    return float(default_config(case_id).prescription_gy)


def _run_prescription(meta: dict, store, run_id: str, case_id: str) -> float:
    value = meta.get("prescription_gy")
    if value is None:
        try:
            value = store.read_config(run_id).get("prescription_gy")
        except (OSError, ValueError):  # a run without a readable config: the protocol's Rx is the fallback
            value = None
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    return value if np.isfinite(value) and value > 0 else protocol_prescription_gy(case_id)


def load_plan_dose(case_id: str, plan_id: str, grid: str = OPTIMISATION_GRID) -> PlanDose:
    """The dose of a run (on ``grid``) or of the case's reference plan, cached per (case_id, plan_id, grid).

    A run without a full-resolution dose gives its optimisation-grid dose (PlanDose.grid says which); the
    reference plan has one dose, the shipped one on the CT grid."""
    if plan_id == REFERENCE:
        grid = FULL_GRID
    key = (case_id, plan_id, grid)
    with _dose_cache_lock:
        hit = _dose_cache.get(key)
        if hit is not None:
            _dose_cache.move_to_end(key)
            return hit
    geom = imaging.ct_geometry(case_id)
    if plan_id == REFERENCE:
        dose = imaging.reference_dose(case_id)
        if dose is None:
            raise LookupError(f"case {case_id} has no reference dose (no DicomFiles/rt_dose*.dcm)")
        rx = protocol_prescription_gy(case_id)
        label = "Reference plan (shipped RT Dose)"
        grid_text = "shipped dose (CT grid)"
    else:
        from vmat_core.store import RunStore

        store = RunStore()
        meta = store.read_metadata(plan_id)
        run_case = meta.get("case_id")
        if run_case not in (None, case_id):
            raise LookupError(f"run {plan_id} belongs to case {run_case}, not {case_id}")
        if grid == FULL_GRID:
            from vmat_core import runner

            full = runner.read_full_dose(plan_id, store=store)
            if full is None:  # not computed: the optimisation grid's dose, cached under its own key
                return load_plan_dose(case_id, plan_id, OPTIMISATION_GRID)
            dose = full["dose_3d_gy"]
            grid_text = "full-resolution dose"
        else:
            dose = store.read_arrays(plan_id, ["dose_3d_gy"])["dose_3d_gy"]
            grid_text = optimisation_grid_label(run_voxel_factors(meta)).replace("optimisation grid",
                                                                                "optimisation-grid dose")
        dose = np.ascontiguousarray(dose, dtype=np.float32)
        dose.setflags(write=False)
        rx = _run_prescription(meta, store, plan_id, case_id)
        label = f"Run {run_label(meta)}"
    geom.check_volume(dose, f"dose of {plan_id}")
    pd_ = PlanDose(case_id, plan_id, dose, rx, float(np.nanmax(dose)) if dose.size else 0.0, label, grid, grid_text)
    with _dose_cache_lock:
        _dose_cache[key] = pd_
        while len(_dose_cache) > _DOSE_CACHE_MAX:
            _dose_cache.popitem(last=False)
    return pd_


def load_dose(key: DoseKey) -> PlanDose | DoseDifference:
    """Resolve a DoseKey (runs in the loader thread when served)."""
    if key.kind == "plan":
        return load_plan_dose(key.case_id, key.plans[0], key.grid(0))
    a, b = (load_plan_dose(key.case_id, p, key.grid(i)) for i, p in enumerate(key.plans))
    scale_a = scale_b = 1.0
    if key.normalise_pct is not None:
        # Each plan is normalised by its own DVH of the same grid as its volume.
        scale_a, scale_b = (
            normalisation_factor(plan_data(key.case_id, p.plan_id, p.grid) or {}, key.normalise_pct) for p in (a, b)
        )
    diff = b.dose_gy * np.float32(scale_b) - a.dose_gy * np.float32(scale_a)
    max_abs = float(np.nanmax(np.abs(diff))) if diff.size else 0.0
    return DoseDifference(a, b, scale_a, scale_b, max_abs, key.normalise_pct is not None)


def clear_dose_cache() -> None:
    with _dose_cache_lock:
        _dose_cache.clear()


# ------------------------------------------------------------------------------------------ wheel / keyboard


class SliceScroller(JSComponent):
    """Wraps the figure: mouse wheel and ↑/↓ (PageUp/PageDown: 5) step through slices when over/focused.

    Wheel steps are summed in the browser and sent at most every 40 ms, so fast scrolling costs one slice
    change per message rather than one per wheel notch.
    """

    object = Child()

    _esm = """
    export function render({ model, el }) {
      el.tabIndex = 0
      el.style.outline = "none"
      el.title = "Mouse wheel or ↑/↓: change slice"
      el.append(model.get_child("object"))
      let pending = 0
      let timer = null
      const flush = () => { timer = null; if (pending !== 0) { model.send_msg({ delta: pending }); pending = 0 } }
      const step = (n) => { pending += n; if (timer === null) { timer = setTimeout(flush, 40) } }
      el.addEventListener("wheel", (e) => {
        if (e.ctrlKey || e.metaKey) { return }  // leave browser zoom alone
        e.preventDefault(); e.stopPropagation()
        if (e.deltaY !== 0) { step(e.deltaY > 0 ? -1 : 1) }
      }, { capture: true, passive: false })
      el.addEventListener("pointerdown", () => el.focus({ preventScroll: true }), { capture: true })
      el.addEventListener("keydown", (e) => {
        const steps = { ArrowUp: 1, ArrowDown: -1, PageUp: 5, PageDown: -5 }
        if (e.key in steps) { e.preventDefault(); step(steps[e.key]) }
      })
    }
    """

    def __init__(self, on_delta, **params):
        super().__init__(**params)
        self._on_delta = on_delta

    def _handle_msg(self, msg) -> None:
        try:
            delta = int(msg.get("delta", 0))
        except (TypeError, ValueError, AttributeError):
            return
        if delta:
            self._on_delta(delta)


# ----------------------------------------------------------------------------------------------------- viewer


@dataclass
class _Shown:
    """Tokens of what each layer currently shows, so an update touches only the layers that changed."""

    ct: tuple | None = None
    dose: tuple | None = None
    contours: tuple | None = None
    isodose: tuple | None = None
    extras: dict = field(default_factory=dict)


class AxialViewer(pn.viewable.Viewer):
    """Axial CT slice with dose wash, isodose lines and structure contours, driven by a PlanState."""

    state = param.ClassSelector(class_=PlanState)

    show_difference = param.Boolean(default=False, label="Difference B − A",
                                    doc="Show B − A of the compared plans (needs compare_a and compare_b).")
    show_wash = param.Boolean(default=True, label="Colour wash")
    show_isodose = param.Boolean(default=True, label="Isodose lines")
    isodose_unit = param.Selector(default="% Rx", objects=["% Rx", "Gy"], label="Isodose unit")
    isodose_text = param.String(default="", label="Isodose levels",
                                doc="Comma-separated isodose levels in isodose_unit.")
    isodose_error = param.String(default="")
    status = param.String(default="", doc="What the dose layer shows (or why it is empty).")
    dose_loading = param.Boolean(default=False)

    def __init__(self, **params):
        super().__init__(**params)
        if self.state is None:
            raise ValueError("state: AxialViewer needs a PlanState")
        self._shown = _Shown()
        self._case_id: str | None = None
        self._hu: np.ndarray | None = None
        self._geom: imaging.CtGeometry | None = None
        self._dose_key: DoseKey | None = None  # what the dose layer should show
        self._dose: PlanDose | DoseDifference | None = None  # loaded data for _dose_key (None while loading)
        self._pending: Future | None = None
        self._iso_cache: OrderedDict[tuple, tuple] = OrderedDict()
        self._layout = None
        self._setting_text = False
        self._build_figure()
        # One watcher for every input, so a batch (a new case comes with its run, slice and structures)
        # is applied in one consistent update instead of layer by layer.
        self.state.param.watch(self._on_state, [
            "case_id", "displayed_run_id", "show_reference", "compare_a", "compare_b", "normalise", "shown_grid",
            "dose_grid", "full_dose_status",
            "normalise_coverage_pct", "slice_index", "show_dose", "show_contours", "dose_threshold_pct",
            "dose_opacity", "isodose_levels_pct", "ct_window", "ct_level", "visible_structures",
            "structure_colors",
        ])
        self.param.watch(self._on_state, ["show_difference", "show_wash", "show_isodose"])
        self.param.watch(self._on_isodose_unit, ["isodose_unit"])
        self.param.watch(self._on_isodose_text, ["isodose_text"])
        self.refresh()

    # ------------------------------------------------------------------------------------------ figure

    def _build_figure(self) -> None:
        self._ct_mapper = LinearColorMapper(palette=Greys256, low=-1000, high=400)
        self._dose_mapper = LinearColorMapper(palette=Turbo256, low=6.0, high=66.0,
                                              low_color=TRANSPARENT, nan_color=TRANSPARENT)
        self._diff_mapper = LinearColorMapper(palette=DIFF_PALETTE, low=-1.0, high=1.0, nan_color=TRANSPARENT)
        empty = np.full((1, 1), np.nan, dtype=np.float32)
        self._image_source = ColumnDataSource(data={
            "hu": [np.zeros((1, 1), dtype=np.int16)], "dose": [empty],
            "x": [0.0], "y": [0.0], "dw": [1.0], "dh": [1.0],
        })
        self._contour_source = ColumnDataSource(data={"xs": [], "ys": [], "color": [], "name": [], "width": []})
        self._iso_source = ColumnDataSource(data={"xs": [], "ys": [], "color": [], "name": []})

        fig = figure(
            tools="pan,box_zoom,reset,save", toolbar_location="above", match_aspect=True, aspect_scale=1,
            sizing_mode="scale_width", aspect_ratio=1.3, min_width=320, x_axis_label="x (mm)",
            y_axis_label="y (mm)", background_fill_color="black", border_fill_color="white",
            output_backend="canvas",
        )
        fig.grid.visible = False
        fig.toolbar.logo = None
        ct = fig.image(image="hu", x="x", y="y", dw="dw", dh="dh", source=self._image_source,
                       color_mapper=self._ct_mapper, level="image")
        # The plan dose and the difference map are two glyphs over the same column, each with its own colour
        # mapper: BokehJS does not re-colour an image whose glyph is given another mapper.
        dose = fig.image(image="dose", x="x", y="y", dw="dw", dh="dh", source=self._image_source,
                         color_mapper=self._dose_mapper, level="image", global_alpha=0.5)
        diff = fig.image(image="dose", x="x", y="y", dw="dw", dh="dh", source=self._image_source,
                         color_mapper=self._diff_mapper, level="image", global_alpha=0.5, visible=False)
        contours = fig.multi_line(xs="xs", ys="ys", line_color="color", line_width="width", line_alpha=0.95,
                                  source=self._contour_source)
        iso = fig.multi_line(xs="xs", ys="ys", line_color="color", line_width=2, line_alpha=1.0,
                             source=self._iso_source)
        # Ranges follow the CT image only (contours never move the view) and y grows downwards, as in DICOM:
        # anterior at the top of the screen.
        for rng in (fig.x_range, fig.y_range):
            rng.renderers = [ct]
            rng.range_padding = 0
        fig.y_range.flipped = True
        self._hover = HoverTool(renderers=[ct], tooltips=self._tooltips(False))
        fig.add_tools(self._hover)
        self._colorbar = ColorBar(color_mapper=self._dose_mapper, title="Gy", width=10, padding=4,
                                  label_standoff=4, visible=False)
        self._diff_colorbar = ColorBar(color_mapper=self._diff_mapper, title="Δ Gy (B − A)", width=10, padding=4,
                                       label_standoff=4, visible=False)
        fig.add_layout(self._colorbar, "right")
        fig.add_layout(self._diff_colorbar, "right")
        self._fig, self._ct_r, self._contour_r, self._iso_r = fig, ct, contours, iso
        self._dose_r, self._diff_r = dose, diff

    @staticmethod
    def _tooltips(difference: bool) -> list[tuple[str, str]]:
        dose = ("Δ dose (B − A)", "@dose{+0.00} Gy") if difference else ("dose", "@dose{0.00} Gy")
        return [("x, y", "$x{0.0}, $y{0.0} mm"), ("HU", "@hu{0}"), dose]

    @property
    def figure(self):
        return self._fig

    # ------------------------------------------------------------------------------------------ panel

    def __panel__(self):
        if self._layout is None:
            self._layout = self._build_layout()
        return self._layout

    def _build_layout(self):
        s = self.state
        slider = pn.widgets.IntSlider.from_param(
            s.param.slice_index, label="Slice", start=0, end=max(self._nz() - 1, 1), sizing_mode="stretch_width",
            margin=(5, 5),
        )

        def sync_end(*_):
            slider.end = max(self._nz() - 1, 1)

        s.param.watch(sync_end, ["case_id"])
        prev = pn.widgets.Button(label="◀", width=34, margin=(5, 2), description="Previous slice (−1)")
        nxt = pn.widgets.Button(label="▶", width=34, margin=(5, 2), description="Next slice (+1)")
        prev.on_click(lambda _e: self.step_slice(-1))
        nxt.on_click(lambda _e: self.step_slice(+1))

        toggles = pn.Row(
            pn.widgets.Checkbox.from_param(s.param.show_dose, label="Dose", margin=(4, 8)),
            pn.widgets.Checkbox.from_param(self.param.show_wash, margin=(4, 8)),
            pn.widgets.Checkbox.from_param(self.param.show_isodose, margin=(4, 8)),
            pn.widgets.Checkbox.from_param(s.param.show_contours, label="Contours", margin=(4, 8)),
            pn.widgets.Checkbox.from_param(
                self.param.show_difference, margin=(4, 8),
                disabled=pn.bind(lambda a, b: not (a and b), s.param.compare_a, s.param.compare_b)),
            sizing_mode="stretch_width",
        )
        reference = pn.Row(
            pn.widgets.Button.from_param(s.param.load_reference, label="Load prior plan dose",
                                         color="primary", variant="outline", margin=(4, 5),
                                         disabled=pn.bind(self._no_reference, s.param.case_id),
                                         description="Show the case's shipped reference dose; runs nothing"),
            # Showing the prior plan is switched on by the Load button (the state evaluates it first); the box
            # only switches it off again.
            pn.widgets.Checkbox.from_param(s.param.show_reference, label="Showing prior plan", margin=(10, 8),
                                           disabled=pn.bind(lambda shown: not shown, s.param.show_reference)),
        )
        status = pn.pane.HTML(pn.bind(self._status_html, self.param.status, self.param.dose_loading),
                              sizing_mode="stretch_width", margin=(0, 5))

        presets = pn.Row(*[self._preset_button(n) for n in CT_PRESETS], margin=(0, 0))
        display = pn.Card(
            pn.Row(pn.widgets.FloatSlider.from_param(s.param.ct_window, label="Window (HU)", step=10),
                   pn.widgets.FloatSlider.from_param(s.param.ct_level, label="Level (HU)", step=10)),
            presets,
            pn.Row(pn.widgets.FloatSlider.from_param(s.param.dose_threshold_pct, label="Wash from (% Rx)",
                                                     step=1),
                   pn.widgets.FloatSlider.from_param(s.param.dose_opacity, label="Wash opacity", step=0.05)),
            pn.Row(pn.widgets.TextInput.from_param(self.param.isodose_text, placeholder="50, 80, 95, 100, 105"),
                   pn.widgets.RadioButtonGroup.from_param(self.param.isodose_unit, color="light",
                                                          margin=(28, 5), width=110)),
            pn.pane.HTML(pn.bind(lambda e: f'<span style="color:#B3261E;font-size:12px">{html.escape(e)}</span>' if e else "",
                                 self.param.isodose_error), margin=(0, 10)),
            pn.widgets.MultiChoice.from_param(s.param.visible_structures, label="Structures",
                                              options=pn.bind(self._structure_options, s.param.case_id)),
            title="Display settings: window/level, dose wash, isodose levels, structures", collapsed=True,
            sizing_mode="stretch_width", header_background="#E3F2FA", header_color="#0B3D5C", margin=(5, 5),
        )
        legend = pn.pane.HTML(
            pn.bind(self._legend_html, s.param.visible_structures, s.param.structure_colors,
                    s.param.isodose_levels_pct, s.param.show_contours, s.param.show_dose,
                    self.param.show_isodose, self.param.status),
            sizing_mode="stretch_width", margin=(0, 5),
        )
        plot = pn.pane.Bokeh(self._fig, sizing_mode="scale_width")
        scroller = SliceScroller(self.step_slice, object=plot, sizing_mode="stretch_width",
                                 loading=self.dose_loading)
        # The spinner goes on the wrapper: toggling `loading` on a Bokeh pane inside a themed template makes
        # Panel copy the figure's stylesheet objects into the pane's string-only `stylesheets` (TypeError).
        self.param.watch(lambda e: setattr(scroller, "loading", e.new), ["dose_loading"])
        return pn.Column(
            status,
            pn.Row(prev, slider, nxt, sizing_mode="stretch_width"),
            scroller,
            legend,
            toggles,
            reference,
            display,
            sizing_mode="stretch_width",
        )

    def _preset_button(self, name: str):
        window, level = CT_PRESETS[name]
        b = pn.widgets.Button(label=name, color="primary", variant="outline", margin=(2, 4),
                              description=f"Window {window:g} HU, level {level:g} HU")
        b.on_click(lambda _e: self.state.param.update(ct_window=window, ct_level=level))
        return b

    def _nz(self) -> int:
        return self._geom.nz if self._geom is not None else 1

    def _no_reference(self, _case_id=None) -> bool:
        case = self.state.case
        return case is None or not case.has_reference_dose

    def _structure_options(self, _case_id=None) -> list[str]:
        case = self.state.case
        return list(case.structure_names) if case is not None else []

    @staticmethod
    def _status_html(status: str, loading: bool) -> str:
        style = f"font-size:13px;color:{MUTED if loading else ACCENT};min-height:18px"
        return f'<div style="{style}">{html.escape(status or "")}</div>'

    def _legend_html(self, visible, colours, levels, show_contours, show_dose, show_isodose, _status) -> str:
        items = []
        if show_contours:
            for name in visible or []:
                c = html.escape((colours or {}).get(name, "#999999"))
                items.append(f'<span style="white-space:nowrap;margin-right:10px">'
                             f'<span style="display:inline-block;width:14px;height:3px;background:{c};'
                             f'vertical-align:middle;margin-right:4px"></span>{html.escape(name)}</span>')
        iso = []
        difference = isinstance(self._dose, DoseDifference)
        if show_dose and show_isodose and not difference:
            rx = self._prescription_gy()
            for pct in sorted(levels or [], reverse=True):
                c = isodose_colour(pct)
                iso.append(f'<span style="white-space:nowrap;margin-right:10px">'
                           f'<span style="display:inline-block;width:14px;height:3px;background:{c};'
                           f'vertical-align:middle;margin-right:4px"></span>{pct:g}% ({pct * rx / 100:.1f} Gy)'
                           f'</span>')
        rows = []
        if items:
            rows.append(f'<div><b style="color:{MUTED}">Structures</b> {"".join(items)}</div>')
        if iso:
            rows.append(f'<div><b style="color:{MUTED}">Isodose (Rx {rx:g} Gy)</b> {"".join(iso)}</div>')
        elif difference and show_dose:
            rows.append(f'<div style="color:{MUTED}">Difference map: red where B gives more dose than A, '
                        'blue where less; isodose lines are hidden.</div>')
        return f'<div style="font-size:12px;line-height:1.7">{"".join(rows)}</div>'

    # ----------------------------------------------------------------------------------------- actions

    def step_slice(self, delta: int) -> None:
        """Move the slice by ``delta`` (clamped to the CT)."""
        nz = self._nz()
        self.state.slice_index = int(min(max(self.state.slice_index + int(delta), 0), nz - 1))

    def _on_isodose_unit(self, *_):
        self._set_isodose_text()

    def _set_isodose_text(self) -> None:
        levels = sorted(self.state.isodose_levels_pct)
        if self.isodose_unit == "Gy":
            rx = self._prescription_gy()
            text = ", ".join(f"{p * rx / 100:.4g}" for p in levels)
        else:
            text = ", ".join(f"{p:g}" for p in levels)
        if text != self.isodose_text:
            self._setting_text = True
            try:
                self.isodose_text = text
            finally:
                self._setting_text = False

    def _on_isodose_text(self, event) -> None:
        if self._setting_text:
            return
        try:
            levels = self.parse_isodose_levels(event.new, self.isodose_unit, self._prescription_gy())
        except ValueError as e:
            self.isodose_error = str(e)
            return
        self.isodose_error = ""
        self.state.isodose_levels_pct = levels

    @staticmethod
    def parse_isodose_levels(text: str, unit: str, prescription_gy: float) -> list[float]:
        """Comma/space-separated levels in % Rx or Gy → sorted unique % of Rx; ValueError names the problem."""
        lo, hi = ISODOSE_PCT_RANGE
        parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
        if len(parts) > MAX_ISODOSE_LEVELS:
            raise ValueError(f"isodose levels: at most {MAX_ISODOSE_LEVELS} levels, got {len(parts)}")
        out = []
        for p in parts:
            try:
                v = float(p.strip().rstrip("%").removesuffix("Gy").removesuffix("gy"))
            except ValueError:
                raise ValueError(f"isodose levels: {p.strip()!r} is not a number; enter values separated by "
                                 f"commas in {unit}") from None
            pct = v / prescription_gy * 100.0 if unit == "Gy" else v
            if not (np.isfinite(pct) and lo <= pct <= hi):
                allowed = (f"{lo * prescription_gy / 100:g}–{hi * prescription_gy / 100:g} Gy" if unit == "Gy"
                           else f"{lo:g}–{hi:g} % of Rx")
                raise ValueError(f"isodose levels: {p.strip()} {unit} is outside {allowed}")
            out.append(round(pct, 3))
        return sorted(set(out))

    # ----------------------------------------------------------------------------------------- updates

    def _on_state(self, *events) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Bring every layer in line with the state; layers whose inputs did not change are left alone."""
        with pn.io.hold():
            self._sync_case()
            self._sync_dose_source()
            self._render()
        self._set_isodose_text()

    def _sync_case(self) -> None:
        cid = self.state.case_id
        if cid == self._case_id:
            return
        self._case_id = cid
        self._iso_cache.clear()
        self._shown = _Shown()
        if not cid:
            self._hu, self._geom = None, None
            return
        self._hu, self._geom = imaging.ct_volume(cid)
        x0, y0, x1, y1 = self._geom.extent_xy_mm()
        # The figure scales with the column's width; its aspect ratio is the slice's, corrected for the axes,
        # title and colour bar around the frame (sized for a ~600 px wide figure), so little space is wasted.
        frame_w = _TYPICAL_WIDTH_PX - _DECORATION_W_PX
        _set(self._fig, aspect_ratio=_TYPICAL_WIDTH_PX / (frame_w * (y1 - y0) / (x1 - x0) + _DECORATION_H_PX))
        self._image_source.data = {
            "hu": [np.zeros((1, 1), dtype=np.int16)], "dose": [np.full((1, 1), np.nan, np.float32)],
            "x": [x0], "y": [y0], "dw": [x1 - x0], "dh": [y1 - y0],
        }

    def _wanted_dose_key(self) -> DoseKey | None:
        s = self.state
        if not s.case_id:
            return None
        if self.show_difference and s.compare_a and s.compare_b:
            pct = float(s.normalise_coverage_pct) if s.normalise else None
            grids = s.pair_grids(s.compare_a, s.compare_b, volumes=True)
            return DoseKey(s.case_id, "difference", (s.compare_a, s.compare_b), pct, grids)
        if s.show_reference:
            return DoseKey(s.case_id, "plan", (REFERENCE,), grids=(FULL_GRID,))
        if s.displayed_run_id:
            return DoseKey(s.case_id, "plan", (s.displayed_run_id,), grids=(s.shown_grid,))
        return None

    def _sync_dose_source(self) -> None:
        key = self._wanted_dose_key()
        if key == self._dose_key:
            if key is None:
                self.status = self._empty_status()
            return
        # Clear first, in this same update: the old dose must never be on screen with the new source.
        self._dose_key, self._dose = key, None
        self._shown.dose = self._shown.isodose = None
        self._iso_cache.clear()
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if key is None:
            self.param.update(dose_loading=False, status=self._empty_status())
            return
        what = "difference B − A" if key.kind == "difference" else (
            "prior plan dose" if key.plans[0] == REFERENCE else f"run {key.plans[0]}")
        self.param.update(dose_loading=True, status=f"Loading {what} …")
        self._render()  # the cleared dose layer goes out before any loading starts
        doc = pn.state.curdoc
        if doc is not None and doc.session_context is not None:
            fut = _loader.submit(load_dose, key)
            self._pending = fut

            def done(f: Future) -> None:
                try:
                    doc.add_next_tick_callback(partial(self._loaded_in_doc, doc, key, f))
                except Exception as e:  # noqa: BLE001 - the session closed while loading
                    log.debug("axial viewer: session gone before the dose arrived: %s", e)

            fut.add_done_callback(done)
        else:  # no server session (tests, notebooks without a kernel loop): load now
            try:
                self._apply_loaded(key, load_dose(key), None)
            except Exception as e:  # noqa: BLE001 - shown to the user, not raised into param
                self._apply_loaded(key, None, e)

    def _loaded_in_doc(self, doc, key: DoseKey, fut: Future) -> None:
        from panel.io.state import set_curdoc

        if fut.cancelled():
            return
        with set_curdoc(doc):
            exc = fut.exception()
            self._apply_loaded(key, None if exc else fut.result(), exc)

    def _apply_loaded(self, key: DoseKey, dose, exc: BaseException | None) -> None:
        if key != self._dose_key:  # the source changed while this was loading: drop it
            return
        self._pending = None
        with pn.io.hold():
            if exc is not None:
                log.warning("axial viewer: cannot load %s: %s", key, exc)
                self._dose = None
                self.param.update(dose_loading=False, status=f"No dose: {exc}")
            else:
                self._dose = dose
                self.param.update(dose_loading=False, status=self._dose_status(dose))
            self._render()
            self._set_isodose_text()

    def _empty_status(self) -> str:
        if not self.state.case_id:
            return "No case selected."
        if self.show_difference and not (self.state.compare_a and self.state.compare_b):
            return "Choose plans A and B to see their difference."
        return "No dose to show: run an optimisation, pick a run, or load the prior plan dose."

    def _dose_status(self, dose) -> str:
        if isinstance(dose, DoseDifference):
            norm = " · normalised" if dose.normalised else ""
            return (f"Difference B − A: {dose.b.label} minus {dose.a.label} · {dose.grid_summary()} · "
                    f"max |Δ| {dose.max_abs_gy:.1f} Gy{norm}")
        grid = f" · {dose.grid_text}" if dose.grid_text and dose.plan_id != REFERENCE else ""
        return f"{dose.label}{grid} · Rx {dose.prescription_gy:g} Gy · max {dose.max_gy:.1f} Gy"

    def _prescription_gy(self) -> float:
        if self._dose is not None:
            return float(self._dose.prescription_gy)
        cfg = self.state.config
        if cfg is not None and cfg.case_id == self.state.case_id:
            return float(cfg.prescription_gy)
        return protocol_prescription_gy(self.state.case_id) if self.state.case_id else 60.0

    def _z(self) -> int | None:
        if self._geom is None:
            return None
        return int(min(max(self.state.slice_index, 0), self._geom.nz - 1))

    def _render(self) -> None:
        s, z, geom = self.state, self._z(), self._geom
        if z is None:
            self._contour_source.data = {"xs": [], "ys": [], "color": [], "name": [], "width": []}
            self._iso_source.data = {"xs": [], "ys": [], "color": [], "name": []}
            return
        rx = self._prescription_gy()
        difference = isinstance(self._dose, DoseDifference)
        threshold_gy = s.dose_threshold_pct / 100.0 * rx
        data = {}

        ct_token = (self._case_id, z)
        if self._shown.ct != ct_token:
            data["hu"] = [self._hu[z]]
            self._shown.ct = ct_token
        dose_token = (self._dose_key, z, id(self._dose), threshold_gy if difference else None)
        if self._shown.dose != dose_token:
            data["dose"] = [self._dose_slice(z, threshold_gy)]
            self._shown.dose = dose_token
        if data:
            self._image_source.data.update(data)  # one event: CT and dose arrive together

        # colour mappers, visibility and title: property changes only, no data sent
        half = s.ct_window / 2.0
        _set(self._ct_mapper, low=s.ct_level - half, high=s.ct_level + half)
        has_dose = self._dose is not None
        if difference:
            m = max(self._dose.max_abs_gy, 0.5)
            _set(self._diff_mapper, low=-m, high=m)
        elif has_dose:
            _set(self._dose_mapper, low=threshold_gy, high=max(self._dose.max_gy, threshold_gy + 1e-3))
        wash = bool(s.show_dose and self.show_wash and has_dose)
        for r in (self._dose_r, self._diff_r):
            _set(r.glyph, global_alpha=float(s.dose_opacity))
        _set(self._dose_r, visible=wash and not difference)
        _set(self._diff_r, visible=wash and difference)
        # a threshold above the plan's maximum leaves nothing to colour, so no colour bar either
        _set(self._colorbar, visible=wash and not difference and threshold_gy < self._dose.max_gy)
        _set(self._diff_colorbar, visible=wash and difference)
        if self._shown.extras.get("tooltips") != difference:
            self._hover.tooltips = self._tooltips(difference)
            self._shown.extras["tooltips"] = difference
        _set(self._fig.title, text=f"Slice {z} of 0–{geom.nz - 1} · z = {geom.z_mm[z]:.1f} mm")

        _set(self._contour_r, visible=bool(s.show_contours))
        if s.show_contours:
            visible = tuple(n for n in s.visible_structures if n in self._structure_options())
            colours = tuple((s.structure_colors or {}).get(n, "#FFFFFF") for n in visible)
            token = (self._case_id, z, visible, colours)
            if self._shown.contours != token:
                self._contour_source.data = self._contour_data(z, visible, colours)
                self._shown.contours = token

        iso_on = bool(s.show_dose and self.show_isodose and has_dose and not difference)
        _set(self._iso_r, visible=iso_on)
        if iso_on:
            levels = tuple(sorted(s.isodose_levels_pct))
            token = (self._dose_key, id(self._dose), z, levels, rx)
            if self._shown.isodose != token:
                self._iso_source.data = self._isodose_data(z, levels, rx)
                self._shown.isodose = token

    def _dose_slice(self, z: int, threshold_gy: float) -> np.ndarray:
        if self._dose is None:
            return np.full(self._geom.shape_zyx[1:], np.nan, dtype=np.float32)
        if isinstance(self._dose, DoseDifference):
            return self._dose.slice(z, threshold_gy)
        return self._dose.dose_gy[z]

    def _contour_data(self, z: int, names: tuple[str, ...], colours: tuple[str, ...]) -> dict:
        xs, ys, cs, ns, ws = [], [], [], [], []
        lines = imaging.slice_contours_many(self._case_id, names, z)
        for name, colour in zip(names, colours):
            for line in lines[name]:
                xs.append(line[:, 0])
                ys.append(line[:, 1])
                cs.append(colour)
                ns.append(name)
                ws.append(2.5 if name.upper().startswith(("PTV", "GTV", "CTV")) else 1.5)
        return {"xs": xs, "ys": ys, "color": cs, "name": ns, "width": ws}

    def _isodose_data(self, z: int, levels_pct: tuple[float, ...], rx: float) -> dict:
        key = (self._dose_key, z, levels_pct, rx)
        hit = self._iso_cache.get(key)
        if hit is None:
            levels_gy = {round(p * rx / 100.0, 6): p for p in levels_pct}
            lines = imaging.isodose_contours(self._dose.dose_gy[z], list(levels_gy), self._geom)
            xs, ys, cs, ns = [], [], [], []
            for gy, segs in lines.items():
                pct = levels_gy[gy]
                for line in segs:
                    xs.append(line[:, 0])
                    ys.append(line[:, 1])
                    cs.append(isodose_colour(pct))
                    ns.append(f"{pct:g}%")
            hit = (xs, ys, cs, ns)
            self._iso_cache[key] = hit
            while len(self._iso_cache) > 256:
                self._iso_cache.popitem(last=False)
        xs, ys, cs, ns = hit
        return {"xs": list(xs), "ys": list(ys), "color": list(cs), "name": list(ns)}

    # ------------------------------------------------------------------------------------------- tests

    def current_images(self) -> dict[str, np.ndarray]:
        """The CT and dose slices the figure holds now (what the browser shows)."""
        return {"hu": self._image_source.data["hu"][0], "dose": self._image_source.data["dose"][0]}
