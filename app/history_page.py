"""The History page: every stored run in one grid, queried page by page with DuckDB, and a parameter-space plot.

The grid never holds more than the page on screen: its page, sort order and header filters become a
``RunStore.list_runs(where, order_by, limit, offset)`` query, and the store counts the matching runs for the pager.
A free SQL ``WHERE`` box narrows both the grid and the plot; the store's ``validate_where`` refuses anything but an
expression over the runs' columns, and the refusal is shown beside the box.
"""

from __future__ import annotations

import html
import io
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar
from urllib.parse import urlencode

import holoviews as hv
import holoviews.plotting.bokeh  # registers the Bokeh options used below
import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from app import theme
from vmat_core.store import QueryError, RunStore, validate_where

log = logging.getLogger(__name__)

PAGE_SIZE = 50
PLAN_PAGE_URL = "./"  # the Plan page, relative to /history and /jobs
DEFAULT_ORDER = "created_at DESC"
DEFAULT_GAP_THRESHOLD_PCT = 5.0
DEFAULT_X, DEFAULT_Y = "PTV_d95_gy", "CORD_max_gy"
NO_COLOUR = "(none)"
KEY_METRICS = (
    "PTV_d95_gy", "PTV_v100_pct", "PTV_max_gy", "CORD_max_gy", "ESOPHAGUS_mean_gy", "HEART_mean_gy",
    "LUNGS_NOT_GTV_mean_gy",
)
NUMERIC_TYPES = ("DOUBLE", "FLOAT", "REAL", "BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT", "UBIGINT",
                 "UINTEGER", "USMALLINT", "UTINYINT", "DECIMAL")
# The store reports a column that is NULL in every run as type "NULL"; it may become numeric later.
PROVEN_STATUSES = ("optimal",)

_METRIC_SUFFIXES = {
    "_mean_gy": "mean (Gy)", "_max_gy": "max (Gy)", "_d95_gy": "D95 (Gy)", "_d98_gy": "D98 (Gy)",
    "_d2_gy": "D2 (Gy)", "_d2cc_gy": "D2cc (Gy)", "_v100_pct": "V100 (%)",
}
_TITLES = {
    "run_id": "run id", "created": "created (UTC)", "case_id": "case", "beams": "beams", "n_beams": "n beams",
    "voxel_ds": "voxel ds (x×y×z)", "beamlet_ds": "beamlet ds", "solver": "solver", "time_limit_s": "time limit (s)",
    "mip_gap_requested_pct": "gap limit (%)", "status": "status", "objective": "objective", "bound": "bound",
    "gap_pct": "gap (%)", "solve_time_s": "solve (s)", "criteria_passed": "criteria passed",
    "criteria_failed": "criteria failed", "gap": "gap (fraction)", "t_total_s": "total time (s)",
}


def column_title(name: str) -> str:
    """A planner's heading for a store column: ``PTV_d95_gy`` → ``PTV D95 (Gy)``, ``w_CORD_quadratic`` → ``w CORD
    quadratic``."""
    if name in _TITLES:
        return _TITLES[name]
    for suffix, text in _METRIC_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return f"{name[: -len(suffix)]} {text}"
    if name.startswith("w_"):
        return "w " + name[2:].replace("_", " ")
    if name.endswith("_s"):
        return name[:-2].replace("_", " ") + " (s)"
    return name.replace("_", " ")


# ------------------------------------------------------------------------------------------ grid columns


@dataclass(frozen=True)
class GridColumn:
    """One grid column: how it is read from the store, shown, filtered and sorted.

    ``filter_sql`` is the SQL of the shown value (``{c}`` stands for the quoted source column) so that a header
    filter selects in DuckDB exactly the rows the browser's own filter of the same value would keep.
    """

    field: str
    sources: tuple[str, ...]
    kind: str  # "text" | "number"
    filter_func: str  # Tabulator header-filter function: like, =, <=, >=
    filter_sql: str = "{c}"
    sort: tuple[str, ...] = ()
    scale: float = 1.0
    number_format: str = "0.[00]"

    @property
    def title(self) -> str:
        return column_title(self.field)

    def order_columns(self) -> tuple[str, ...]:
        return self.sort or self.sources


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _number_column(name: str, func: str, fmt: str = "0.[00]", scale: float = 1.0, field: str | None = None,
                   sql: str = "{c}") -> GridColumn:
    return GridColumn(field or name, (name,), "number", func, sql, (name,), scale, fmt)


# Columns the runner writes for every run, in the order a planner scans them.
def _base_columns() -> list[GridColumn]:
    like = "like"
    return [
        GridColumn("case_id", ("case_id",), "text", like, "lower(CAST({c} AS VARCHAR))"),
        GridColumn("created", ("created_at",), "text", like, "strftime({c}, '%Y-%m-%d %H:%M')"),
        GridColumn("beams", ("beam_ids",), "text", like, "array_to_string({c}, ',')", ("n_beams", "beam_ids")),
        _number_column("n_beams", "=", "0"),
        GridColumn("voxel_ds", ("voxel_ds_x", "voxel_ds_y", "voxel_ds_z"), "text", like,
                   "concat_ws('×', \"voxel_ds_x\", \"voxel_ds_y\", \"voxel_ds_z\")"),
        _number_column("beamlet_ds", "=", "0"),
        GridColumn("solver", ("solver",), "text", like, "lower(CAST({c} AS VARCHAR))"),
        _number_column("time_limit_s", "<=", "0.[0]"),
        _number_column("mip_gap_requested", "<=", "0.[000]", 100.0, "mip_gap_requested_pct", "({c} * 100)"),
        GridColumn("status", ("status",), "text", like, "lower(CAST({c} AS VARCHAR))"),
        _number_column("objective", "<=", "0.[0000]"),
        _number_column("gap", "<=", "0.00", 100.0, "gap_pct", "({c} * 100)"),
        _number_column("solve_time_s", "<=", "0.0"),
    ]


def _metric_column(name: str) -> GridColumn:
    # Target coverage should be high, everything else low: the header filter is a lower or an upper bound.
    better_high = name.endswith(("_d95_gy", "_d98_gy", "_v100_pct")) or name == "criteria_passed"
    fmt = "0" if name.startswith("criteria_") else "0.0" if name.endswith("_pct") else "0.00"
    return _number_column(name, ">=" if better_high else "<=", fmt)


def grid_columns(store_columns: dict[str, str], extra: list[str] | tuple[str, ...] = ()) -> list[GridColumn]:
    """The grid's columns for a store with ``store_columns`` (name → DuckDB type): the runner's columns that exist,
    the key metrics, criteria counts, every objective weight (``w_*``), ``extra`` columns, and the run id last."""
    have = set(store_columns)
    out = [c for c in _base_columns() if set(c.sources) <= have]
    names = [m for m in KEY_METRICS if m in have] + [c for c in ("criteria_passed", "criteria_failed") if c in have]
    out += [_metric_column(m) for m in names]
    out += [_number_column(w, "=", "0.[###]") for w in sorted(c for c in have if c.startswith("w_"))]
    shown = {s for c in out for s in c.sources} | {c.field for c in out} | {"run_id"}
    for name in extra:
        if name in have and name not in shown:
            if is_numeric(store_columns[name]):
                out.append(_metric_column(name))
            else:
                out.append(GridColumn(name, (name,), "text", "like", "lower(CAST({c} AS VARCHAR))"))
            shown.add(name)
    if "run_id" in have:
        out.append(GridColumn("run_id", ("run_id",), "text", "like"))
    return out


def is_numeric(duckdb_type: str) -> bool:
    return duckdb_type.upper().split("(")[0] in NUMERIC_TYPES


def header_filter_specs(columns: list[GridColumn]) -> dict[str, dict]:
    specs = {}
    for c in columns:
        if c.kind == "number":
            placeholder = {"<=": "≤", ">=": "≥", "=": "="}[c.filter_func]
            specs[c.field] = {"type": "number", "func": c.filter_func, "placeholder": placeholder}
        else:
            specs[c.field] = {"type": "input", "func": "like", "placeholder": "contains"}
    return specs


def filters_sql(filters: list[dict], columns: list[GridColumn]) -> tuple[str | None, list, list[str]]:
    """(SQL, parameters, problems) for the grid's header filters; a filter whose value does not fit its column is
    left out and named in ``problems``."""
    by_field = {c.field: c for c in columns}
    parts: list[str] = []
    params: list = []
    problems: list[str] = []
    for f in filters or []:
        col = by_field.get(f.get("field"))
        value = f.get("value")
        if isinstance(value, list):
            value = value[0] if len(value) == 1 else None
        if col is None or value is None or (isinstance(value, str) and not value.strip()):
            continue
        expr = col.filter_sql.format(c=_q(col.sources[0]))
        if col.kind == "number":
            try:
                number = float(value)
            except (TypeError, ValueError):
                problems.append(f"{col.title}: {value!r} is not a number")
                continue
            if not math.isfinite(number):
                problems.append(f"{col.title}: {value!r} is not a finite number")
                continue
            parts.append(f"{expr} {col.filter_func} ?")
            params.append(number)
        else:
            parts.append(f"contains(lower({expr}), lower(?))")
            params.append(str(value))
    return (" AND ".join(parts) or None), params, problems


def order_sql(sorters: list[dict], columns: list[GridColumn]) -> str:
    """``list_runs`` order for the grid's sorters (first sorter first), newest first when unsorted."""
    by_field = {c.field: c for c in columns}
    items: list[str] = []
    for s in sorters or []:
        col = by_field.get(s.get("field"))
        if col is None:
            continue
        direction = "DESC" if s.get("dir") == "desc" else "ASC"
        items += [f"{name} {direction}" for name in col.order_columns()]
    return ", ".join(items) if items else DEFAULT_ORDER


def combine_where(*parts: str | None) -> str | None:
    present = [p for p in parts if p]
    if not present:
        return None
    return " AND ".join(f"({p})" for p in present)


def _fmt_ds(row: pd.Series) -> str:
    vals = [row.get(k) for k in ("voxel_ds_x", "voxel_ds_y", "voxel_ds_z")]
    return "×".join(str(int(v)) for v in vals if v is not None and not pd.isna(v))


def _fmt_beams(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return ",".join(str(int(b)) for b in value if b is not None)


def display_frame(raw: pd.DataFrame, columns: list[GridColumn]) -> pd.DataFrame:
    """The grid's rows from store rows: one column per GridColumn, shown values (percentages, joined lists).

    Every column keeps one dtype whatever the rows (text: object, numbers: float64), even for an empty page:
    a dtype change makes the browser rebuild the grid's header, which clears the header filter being typed.
    """
    out: dict[str, pd.Series] = {}
    n = len(raw)
    for c in columns:
        src = c.sources[0]
        if c.kind == "number":
            out[c.field] = pd.Series(pd.to_numeric(raw[src], errors="coerce").to_numpy(dtype="float64") * c.scale,
                                     dtype="float64")
            continue
        if c.field == "created":
            ts = pd.to_datetime(raw[src], utc=True) if n else []
            text = [t.strftime("%Y-%m-%d %H:%M") if not pd.isna(t) else "" for t in ts]
        elif c.field == "beams":
            text = [_fmt_beams(v) for v in raw[src]]
        elif c.field == "voxel_ds":
            text = [_fmt_ds(r) for _, r in raw.iterrows()]
        else:
            text = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in raw[src]]
        out[c.field] = pd.Series(text, dtype=object)
    return pd.DataFrame(out, columns=[c.field for c in columns], index=pd.RangeIndex(n))


def source_columns(columns: list[GridColumn]) -> list[str]:
    return list(dict.fromkeys(s for c in columns for s in c.sources))


# ------------------------------------------------------------------------------------------------ the grid


class RunsGrid(pn.widgets.Tabulator):
    """A Tabulator with remote pagination whose ``value`` holds only the page on screen.

    ``fetch(page, page_size, sorters, filters) -> (page rows, total rows)`` is asked for the rows whenever the
    browser (or Python) changes the page, the sort order or a header filter; ``row_count`` sizes the pager.
    """

    row_count = param.Integer(default=0, bounds=(0, None), doc="Rows matching the query (all pages).")

    _rename: ClassVar[dict] = {**pn.widgets.Tabulator._rename, "row_count": None}  # not a browser property
    _QUERY_PARAMS: ClassVar[tuple[str, ...]] = ("page", "page_size", "sorters", "filters")

    def __init__(self, fetch, **params):
        self._fetch = fetch
        self._fetching = False
        params.setdefault("pagination", "remote")
        params.setdefault("page_size", PAGE_SIZE)
        super().__init__(**params)

    @property
    def _length(self):
        if self.pagination == "remote":
            return self.row_count
        return super()._length

    def _get_data(self):
        if self.pagination != "remote" or self.value is None:
            return super()._get_data()
        # value is already the filtered, sorted page: no pandas filtering, sorting or slicing on top.
        return self._process_df_and_convert_to_cds(self.value)

    @contextmanager
    def _as_first_page(self):
        """The base class locates a page's rows at (page − 1) × page_size inside ``value``; here the page starts
        at row 0, so those look-ups run as if on page 1 (without telling the browser)."""
        page = self.page
        with param.parameterized.discard_events(self):
            self.page = 1
        try:
            yield
        finally:
            with param.parameterized.discard_events(self):
                self.page = page

    def _map_indexes(self, *args, **kwargs):
        with self._as_first_page():
            return super()._map_indexes(*args, **kwargs)

    def _update_selected(self, *events, **kwargs):
        with self._as_first_page():
            return super()._update_selected(*events, **kwargs)

    def _process_event(self, event):
        with self._as_first_page():
            return super()._process_event(event)

    def _update_cds(self, *events):
        names = {e.name for e in events}
        if self._fetch is None or self._fetching or not names & set(self._QUERY_PARAMS):
            return super()._update_cds(*events)
        if "filters" in names and self.page != 1:
            self.page = 1  # a new filter starts on its first page; that change fetches
            return None
        self.refresh()
        return None

    def refresh(self) -> None:
        """Ask ``fetch`` for the current page again (e.g. after the query behind it changed)."""
        if self._fetching:
            return
        self._fetching = True
        try:
            size = self.page_size or PAGE_SIZE
            rows, total = self._fetch(self.page, size, list(self.sorters), list(self.filters))
            n_pages = max(math.ceil(total / size), 1)
            if self.page > n_pages:
                rows, total = self._fetch(n_pages, size, list(self.sorters), list(self.filters))
            with pn.io.hold():
                self.row_count = total
                self._update_max_page()
                if self.page > n_pages:
                    with param.parameterized.discard_events(self):
                        self.page = n_pages
                    self.param.trigger("page")
                self.value = rows
        finally:
            self._fetching = False


# ------------------------------------------------------------------------------------ parameter-space plot


def scatter_columns(x: str, y: str, colour: str | None) -> list[str]:
    wanted = ["run_id", x, y, "gap", "status", "objective", "bound"]
    if colour:
        wanted.append(colour)
    return list(dict.fromkeys(wanted))


def proven_mask(df: pd.DataFrame, gap_threshold_pct: float) -> np.ndarray:
    """Runs whose optimum is established within the threshold: status optimal, or a known gap ≤ threshold."""
    gap = pd.to_numeric(df.get("gap"), errors="coerce").to_numpy(dtype=float) if "gap" in df else np.full(len(df), np.nan)
    status = df["status"].astype(str).str.lower().to_numpy() if "status" in df else np.full(len(df), "")
    return np.isin(status, PROVEN_STATUSES) | (np.isfinite(gap) & (gap * 100 <= gap_threshold_pct + 1e-12))


def parameter_space_plot(df: pd.DataFrame, x: str, y: str, colour: str | None, gap_threshold_pct: float,
                         height: int = 420) -> hv.Overlay:
    """Runs as points at (x, y), coloured by ``colour``; runs not proven within ``gap_threshold_pct`` are hollow,
    and when an axis is the objective they also show the interval from their objective to their bound."""
    data = df.copy()
    for name in {x, y, *([colour] if colour else []), "gap", "objective", "bound"}:
        if name in data:
            data[name] = pd.to_numeric(data[name], errors="coerce").astype(float)
    data["gap_pct"] = data["gap"] * 100 if "gap" in data else np.nan
    data = data[np.isfinite(data[x]) & np.isfinite(data[y])] if len(data) else data
    proven = proven_mask(data, gap_threshold_pct)
    thr = f"{gap_threshold_pct:g} %"
    ycol = y
    if y == x:  # a point cloud on the diagonal still needs two distinct dimensions
        ycol = f"{y}__y"
        data[ycol] = data[y]
    colour_col = colour if colour and colour not in (x, y) else None
    kdims = [hv.Dimension(x, label=column_title(x)), hv.Dimension(ycol, label=column_title(y))]
    vdims = ["run_id", "gap_pct"] + ([hv.Dimension(colour_col, label=column_title(colour_col))] if colour_col else [])
    tooltips = [("run", "@run_id"), (column_title(x), f"@{{{x}}}{{0.00}}"), (column_title(y), f"@{{{ycol}}}{{0.00}}")]
    if colour_col:
        tooltips.append((column_title(colour_col), f"@{{{colour_col}}}{{0.[000]}}"))
    tooltips.append(("gap", "@gap_pct{0.00} %"))
    common = {"size": 8, "tools": ["hover", "tap"], "hover_tooltips": tooltips, "nonselection_alpha": 1.0}
    colour_dim = None if not colour else hv.dim(colour_col or (x if colour == x else ycol))
    style: dict = {}
    if colour:
        values = data[colour].to_numpy(dtype=float) if len(data) else np.array([])
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        style = {"cmap": "viridis", "clim": (lo, hi)}
    filled = hv.Points(data[proven], kdims=kdims, vdims=vdims, label=f"proven (gap ≤ {thr})").opts(
        color=colour_dim if colour else theme.ACCENT, line_color="#333333", line_width=0.5, **style, **common)
    hollow = hv.Points(data[~proven], kdims=kdims, vdims=vdims, label=f"not proven optimal (gap > {thr})").opts(
        fill_alpha=0.0, line_color=colour_dim if colour else "#B3261E", line_width=1.6, **style, **common)
    layers: list = []
    if "objective" in (x, y) and "bound" in data and len(data):
        open_runs = data[~proven & np.isfinite(data["bound"]) & np.isfinite(data["objective"])]
        if y == "objective":
            seg = (open_runs[x], open_runs["objective"], open_runs[x], open_runs["bound"])
        else:
            seg = (open_runs["objective"], open_runs[y], open_runs["bound"], open_runs[y])
        if len(open_runs):
            segments = hv.Segments(pd.DataFrame({"x0": seg[0], "y0": seg[1], "x1": seg[2], "y1": seg[3]}),
                                   kdims=["x0", "y0", "x1", "y1"], label="objective … bound (not proven)")
            layers.append(segments.opts(color="#9AA4B2", line_width=1.5, alpha=0.8))
    # An empty layer would leave a blank legend entry (its glyph takes its colour from the first point).
    points = [p for p in (filled, hollow) if len(p)] or [filled]
    if colour:
        points[0] = points[0].opts(colorbar=True, clabel=column_title(colour))
    layers += points
    return hv.Overlay(layers).opts(
        xlabel=column_title(x), ylabel=column_title(y), responsive=True, height=height, show_grid=True,
        legend_position="top_left", toolbar="above", active_tools=["wheel_zoom"],
        title=f"{len(data)} run{'s' if len(data) != 1 else ''} · hollow: not proven optimal (gap > {thr})",
    )


def nearest_run(df: pd.DataFrame, x: str, y: str, px: float, py: float, max_distance: float = 0.05) -> str | None:
    """The run nearest to the point (px, py), distances measured in fractions of each axis' span; None when no
    run is within ``max_distance``."""
    if df is None or df.empty or px is None or py is None:
        return None
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    if not ok.any():
        return None
    span_x = np.ptp(xs[ok]) or 1.0
    span_y = np.ptp(ys[ok]) or 1.0
    dist = np.hypot((xs - px) / span_x, (ys - py) / span_y)
    dist[~ok] = np.inf
    i = int(np.argmin(dist))
    return str(df["run_id"].iloc[i]) if dist[i] <= max_distance else None


# ------------------------------------------------------------------------------------------------- links


def plan_link(run_id: str) -> str:
    return PLAN_PAGE_URL + "?" + urlencode({"run": run_id})


def compare_link(run_a: str, run_b: str) -> str:
    return PLAN_PAGE_URL + "?" + urlencode({"compare_a": run_a, "compare_b": run_b})


def _anchor(href: str, text: str, css: str) -> str:
    return f'<a class="{css}" href="{html.escape(href)}" target="_self">{html.escape(text)}</a>'


LINK_CSS = f"""
a.action {{ display:inline-block; padding:5px 12px; border-radius:4px; background:{theme.ACCENT}; color:white;
           text-decoration:none; font-size:13px; margin-right:6px; white-space:nowrap; }}
a.action:hover {{ background:{theme.ACCENT_LIGHT}; color:{theme.ACCENT}; }}
.muted {{ color:{theme.MUTED}; font-size:13px; }}
.err {{ color:#B3261E; font-size:13px; white-space:pre-wrap; }}
code {{ font-size:12px; }}
"""


# ---------------------------------------------------------------------------------------------- the page


class HistoryPage(pn.viewable.Viewer):
    """All runs: a DuckDB-paged grid with header filters, a SQL filter box, actions on the selection, and the
    parameter-space plot. ``store`` defaults to the data directory's run store."""

    sql_where = param.String(default="", doc="The SQL WHERE box as typed.")
    apply_where = param.Event(doc="Check sql_where and, when accepted, filter the grid and the plot with it.")
    clear_where = param.Event()
    refresh = param.Event(doc="Read the store again (new runs).")
    where_applied = param.String(default=None, allow_None=True, doc="The accepted filter (None: all runs).")
    where_error = param.String(default="", doc="Why the typed filter was refused ('' when accepted).")
    filter_notice = param.String(default="", doc="Header filters that could not be used, and why.")
    total_runs = param.Integer(default=0, doc="Runs in the store.")
    matching_runs = param.Integer(default=0, doc="Runs matching the filter box and header filters.")
    extra_columns = param.ListSelector(default=[], objects=[], doc="More store columns to show in the grid.")
    selected_run_ids = param.List(default=[], item_type=str)
    compare_a = param.String(default=None, allow_None=True)
    compare_b = param.String(default=None, allow_None=True)
    set_a = param.Event(doc="The first selected run becomes A.")
    set_b = param.Event(doc="The first selected run becomes B.")
    x_column = param.Selector(default=None, objects=[], allow_None=True)
    y_column = param.Selector(default=None, objects=[], allow_None=True)
    colour_column = param.Selector(default=NO_COLOUR, objects=[NO_COLOUR])
    gap_threshold_pct = param.Number(default=DEFAULT_GAP_THRESHOLD_PCT, bounds=(0, 100), step=0.5,
                                     doc="Runs whose gap is above this are drawn as not proven optimal.")
    tapped_run_id = param.String(default=None, allow_None=True, doc="The run last clicked in the plot.")
    query_version = param.Integer(default=0, doc="Bumped whenever the set of matching runs may have changed.")

    def __init__(self, store: RunStore | None = None, **params):
        self.store = store or RunStore()
        self._store_columns: dict[str, str] = {}
        self._columns: list[GridColumn] = []
        self._colour_chosen = False
        self._last_query: tuple | None = None  # (where, params, run count) of the last page, to spot new ones
        self._scatter_df = pd.DataFrame()
        super().__init__(**params)
        self.grid = RunsGrid(
            self._fetch_page,
            value=pd.DataFrame(),
            pagination="remote",
            page_size=PAGE_SIZE,
            selectable="checkbox",
            show_index=False,
            disabled=True,
            layout="fit_data_table",
            sizing_mode="stretch_width",
            height=520,
            css_classes=["runs-grid"],
            configuration={"columnDefaults": {"headerSort": True}},
        )
        self.grid.param.watch(self._on_selection, "selection")
        self._read_columns()
        self.grid.refresh()

    # ---------------------------------------------------------------------------------------- columns

    def _read_columns(self) -> None:
        try:
            self._store_columns = self.store.columns()
        except QueryError as exc:
            log.warning("run store columns unavailable: %s", exc)
            self._store_columns = {}
        numeric = [c for c, t in self._store_columns.items() if is_numeric(t)]
        numeric_sorted = sorted(numeric, key=lambda c: (not c.startswith(("PTV", "CORD", "objective", "gap")), c))
        # Selector objects as {heading: column}: the widgets show planners' headings, the params hold names.
        titles = [column_title(c) for c in numeric_sorted]
        labelled = {(t if titles.count(t) == 1 else f"{t} ({c})"): c for t, c in zip(titles, numeric_sorted, strict=True)}
        self.param.x_column.objects = labelled
        self.param.y_column.objects = labelled
        self.param.colour_column.objects = {NO_COLOUR: NO_COLOUR, **labelled}
        base = {s for c in grid_columns(self._store_columns) for s in c.sources}
        self.param.extra_columns.objects = sorted(c for c in self._store_columns if c not in base)
        updates: dict = {}
        extra = [c for c in self.extra_columns if c in self._store_columns]
        if extra != self.extra_columns:
            updates["extra_columns"] = extra
        if self.x_column not in numeric:
            updates["x_column"] = DEFAULT_X if DEFAULT_X in numeric else (numeric_sorted[0] if numeric_sorted else None)
        if self.y_column not in numeric:
            updates["y_column"] = DEFAULT_Y if DEFAULT_Y in numeric else (
                numeric_sorted[1] if len(numeric_sorted) > 1 else updates.get("x_column", self.x_column))
        if self.colour_column != NO_COLOUR and self.colour_column not in numeric:
            updates["colour_column"] = NO_COLOUR
        if not self._colour_chosen and numeric:
            # First look at a store: colour by an objective weight, the usual question being "what did it do?".
            weights = sorted(c for c in numeric if c.startswith("w_"))
            updates["colour_column"] = "w_CORD_quadratic" if "w_CORD_quadratic" in numeric else (
                weights[0] if weights else NO_COLOUR)
            self._colour_chosen = True
        if updates:
            self.param.update(**updates)
        self._set_grid_columns()

    def _set_grid_columns(self) -> None:
        self._columns = grid_columns(self._store_columns, self.extra_columns)
        formatters = {c.field: NumberFormatter(format=c.number_format, nan_format="", null_format="",
                                               text_align="right")
                      for c in self._columns if c.kind == "number"}
        with param.parameterized.discard_events(self.grid):
            self.grid.param.update(
                titles={c.field: c.title for c in self._columns},
                header_filters=header_filter_specs(self._columns),
                formatters=formatters,
                frozen_columns=["case_id", "created"] if len(self._columns) > 2 else [],
            )

    @param.depends("extra_columns", watch=True)
    def _on_extra_columns(self) -> None:
        self._set_grid_columns()
        self.grid.refresh()

    # ------------------------------------------------------------------------------------------ queries

    def current_where(self) -> tuple[str | None, list]:
        """The WHERE of the grid and the plot: the accepted SQL box and the header filters, with parameters."""
        header_sql, params, _ = filters_sql(list(self.grid.filters), self._columns)
        return combine_where(self.where_applied, header_sql), params

    def _fetch_page(self, page: int, page_size: int, sorters: list, filters: list) -> tuple[pd.DataFrame, int]:
        header_sql, params, problems = filters_sql(filters, self._columns)
        where = combine_where(self.where_applied, header_sql)
        order = order_sql(sorters, self._columns)
        empty = display_frame(pd.DataFrame({s: [] for s in source_columns(self._columns)}), self._columns)
        if not self._columns:
            self.param.update(total_runs=0, matching_runs=0, filter_notice="")
            return empty, 0
        try:
            total = self.store.count_runs(where, params=params or None)
            raw = self.store.list_runs(where, columns=source_columns(self._columns), order_by=order,
                                       limit=page_size, offset=(page - 1) * page_size, params=params or None)
            all_runs = self.store.count_runs() if where else total
        except QueryError as exc:
            self.param.update(filter_notice=f"Filter not applied: {_strip_prefix(exc)}")
            return empty, 0
        key = (where, tuple(params), all_runs)
        changed = key != self._last_query
        self._last_query = key
        self.param.update(total_runs=all_runs, matching_runs=total, filter_notice="; ".join(problems),
                          **({"query_version": self.query_version + 1} if changed else {}))
        return display_frame(raw, self._columns), total

    @param.depends("apply_where", watch=True)
    def _on_apply_where(self) -> None:
        self.set_where(self.sql_where)

    @param.depends("clear_where", watch=True)
    def _on_clear_where(self) -> None:
        self.sql_where = ""
        self.set_where("")

    def set_where(self, text: str) -> bool:
        """Accept ``text`` as the filter when the store's guard and DuckDB both accept it; else keep the current
        filter and set ``where_error``. Returns True when accepted."""
        text = (text or "").strip()
        if not text:
            self.param.update(where_error="", where_applied=None)
            self.grid.page = 1
            self.grid.refresh()
            return True
        try:
            validate_where(text)
            self.store.count_runs(text)  # unknown columns and type errors show up only when DuckDB runs it
        except QueryError as exc:
            self.where_error = f"Filter refused: {_strip_prefix(exc)}"
            return False
        self.param.update(where_error="", where_applied=text)
        with pn.io.hold():
            if self.grid.page != 1:
                with param.parameterized.discard_events(self.grid):
                    self.grid.page = 1
                self.grid.param.trigger("page")  # one fetch, with the new filter
            else:
                self.grid.refresh()
        return True

    @param.depends("refresh", watch=True)
    def _on_refresh(self) -> None:
        self._read_columns()
        self._last_query = None
        self.grid.refresh()

    # ---------------------------------------------------------------------------------------- selection

    def _on_selection(self, event) -> None:
        value = self.grid.value
        if value is None or value.empty or "run_id" not in value:
            self.selected_run_ids = []
            return
        rows = [i for i in event.new if 0 <= i < len(value)]
        self.selected_run_ids = [str(value["run_id"].iloc[i]) for i in rows]

    @param.depends("selected_run_ids", watch=True)
    def _auto_compare(self) -> None:
        if len(self.selected_run_ids) == 2:
            self.param.update(compare_a=self.selected_run_ids[0], compare_b=self.selected_run_ids[1])

    @param.depends("set_a", watch=True)
    def _on_set_a(self) -> None:
        if self.selected_run_ids:
            self.compare_a = self.selected_run_ids[0]

    @param.depends("set_b", watch=True)
    def _on_set_b(self) -> None:
        if self.selected_run_ids:
            self.compare_b = self.selected_run_ids[0]

    def actions_html(self, selected: list[str], a: str | None, b: str | None) -> str:
        parts = []
        if selected:
            first = selected[0]
            parts.append(_anchor(plan_link(first), f"Open {first} in Plan page", "action open-run"))
        else:
            parts.append('<span class="muted">Select runs (tick boxes) to open, compare or export them.</span>')
        if a or b:
            parts.append(f'<span class="muted">A: <code>{html.escape(a or "—")}</code> · '
                         f'B: <code>{html.escape(b or "—")}</code></span>')
        if a and b and a != b:
            parts.append(_anchor(compare_link(a, b), "Compare A and B in Plan page", "action compare-runs"))
        return " ".join(parts)

    # ------------------------------------------------------------------------------------------- export

    def selection_csv(self) -> io.StringIO:
        ids = list(self.selected_run_ids)
        if not ids:
            return io.StringIO("")
        where = "run_id IN (" + ", ".join("?" for _ in ids) + ")"
        return _csv(self.store.list_runs(where, params=ids, order_by=DEFAULT_ORDER))

    def filtered_csv(self) -> io.StringIO:
        where, params = self.current_where()
        return _csv(self.store.list_runs(where, params=params or None, order_by=order_sql(self.grid.sorters,
                                                                                          self._columns)))

    # ------------------------------------------------------------------------------------------ scatter

    def scatter_data(self) -> pd.DataFrame:
        x, y = self.x_column, self.y_column
        if not x or not y:
            return pd.DataFrame()
        colour = None if self.colour_column in (None, NO_COLOUR) else self.colour_column
        cols = [c for c in scatter_columns(x, y, colour) if c in self._store_columns]
        where, params = self.current_where()
        try:
            return self.store.list_runs(where, columns=cols, params=params or None, order_by="run_id")
        except QueryError as exc:
            log.info("scatter query failed: %s", exc)
            return pd.DataFrame(columns=cols)

    def _scatter_view(self, x, y, colour, threshold, _version):
        if not x or not y:
            return pn.pane.HTML('<div class="muted">No numeric columns yet: no runs in the store.</div>')
        df = self.scatter_data()
        self._scatter_df = df
        colour = None if colour in (None, NO_COLOUR) or colour not in df else colour
        if df.empty:
            return pn.pane.HTML('<div class="muted" style="padding:30px">No runs match the filter.</div>',
                                stylesheets=[LINK_CSS])
        overlay = parameter_space_plot(df, x, y, colour, threshold)
        tap = hv.streams.Tap(source=overlay)
        tap.param.watch(lambda e: self._on_tap(tap.x, tap.y), ["x", "y"])
        return pn.pane.HoloViews(overlay, sizing_mode="stretch_width", height=440, linked_axes=False,
                                 css_classes=["parameter-space"])

    def _on_tap(self, px, py) -> None:
        if self.x_column is None or self.y_column is None:
            return
        run_id = nearest_run(self._scatter_df, self.x_column, self.y_column, px, py)
        if run_id is not None:
            self.tapped_run_id = run_id

    def tapped_html(self, run_id: str | None) -> str:
        if not run_id:
            return '<span class="muted">Click a point to pick its run.</span>'
        row = self._scatter_df[self._scatter_df["run_id"] == run_id] if not self._scatter_df.empty else None
        details = ""
        if row is not None and not row.empty:
            r = row.iloc[0]
            vals = []
            for c in dict.fromkeys([self.x_column, self.y_column, self.colour_column]):
                if c and c != NO_COLOUR and c in r and pd.notna(r[c]):
                    vals.append(f"{html.escape(column_title(c))} {float(r[c]):.4g}")
            if "gap" in r and pd.notna(r["gap"]):
                vals.append(f"gap {100 * float(r['gap']):.2f} %")
            details = " · ".join(vals)
        return (f'Run <code class="tapped-run">{html.escape(run_id)}</code> <span class="muted">{details}</span> '
                + _anchor(plan_link(run_id), "Open in Plan page", "action open-tapped"))

    # ------------------------------------------------------------------------------------------- layout

    def _status_html(self, total, matching, where_error, filter_notice, where_applied):
        parts = []
        if where_error:
            parts.append(f'<div class="err where-error">{html.escape(where_error)}</div>')
        if filter_notice:
            parts.append(f'<div class="err filter-notice">{html.escape(filter_notice)}</div>')
        scope = f" matching <code>{html.escape(where_applied)}</code>" if where_applied else ""
        parts.append(f'<span class="muted run-count">{matching:,} of {total:,} runs{scope}</span>')
        return "".join(parts)

    def __panel__(self):
        box = pn.widgets.TextAreaInput.from_param(
            self.param.sql_where, name="", placeholder="SQL condition over the runs, e.g.  gap < 0.05 AND "
            "n_beams >= 7 AND CORD_max_gy < 45", height=64, sizing_mode="stretch_width", css_classes=["where-box"])
        apply = pn.widgets.Button.from_param(self.param.apply_where, name="Apply filter", color="primary",
                                             width=120, css_classes=["apply-where"])
        clear = pn.widgets.Button.from_param(self.param.clear_where, name="Clear", width=80)
        refresh = pn.widgets.Button.from_param(self.param.refresh, name="↻ Refresh", width=100)
        columns_help = pn.widgets.TooltipIcon(value=(
            "A single SQL expression over the runs' columns (DuckDB syntax): comparisons, AND/OR, IN, LIKE, "
            "BETWEEN, IS NULL, arithmetic and ordinary functions. Statements, subqueries and functions that read "
            "files or settings are refused. Columns: " + ", ".join(sorted(self._store_columns))))
        status = pn.pane.HTML(pn.bind(self._status_html, self.param.total_runs, self.param.matching_runs,
                                      self.param.where_error, self.param.filter_notice, self.param.where_applied),
                              stylesheets=[LINK_CSS], sizing_mode="stretch_width", css_classes=["history-status"])
        extra = pn.widgets.MultiChoice.from_param(self.param.extra_columns, name="More columns", width=420,
                                                  placeholder="add store columns to the grid")
        actions = pn.pane.HTML(pn.bind(self.actions_html, self.param.selected_run_ids, self.param.compare_a,
                                       self.param.compare_b), stylesheets=[LINK_CSS], margin=(10, 6),
                               css_classes=["history-actions"], sizing_mode="stretch_width")
        set_a = pn.widgets.Button.from_param(self.param.set_a, name="Set as A", width=90,
                                             disabled=pn.bind(lambda s: not s, self.param.selected_run_ids))
        set_b = pn.widgets.Button.from_param(self.param.set_b, name="Set as B", width=90,
                                             disabled=pn.bind(lambda s: not s, self.param.selected_run_ids))
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        dl_sel = pn.widgets.FileDownload(callback=self.selection_csv, filename=f"vmat-runs-selected-{stamp}.csv",
                                         label="Selection as CSV", color="light", width=150,
                                         disabled=pn.bind(lambda s: not s, self.param.selected_run_ids))
        dl_all = pn.widgets.FileDownload(callback=self.filtered_csv, filename=f"vmat-runs-{stamp}.csv",
                                         label="Filtered runs as CSV", color="light", width=170)
        controls = pn.Row(
            pn.widgets.Select.from_param(self.param.x_column, name="x axis", width=200),
            pn.widgets.Select.from_param(self.param.y_column, name="y axis", width=200),
            pn.widgets.Select.from_param(self.param.colour_column, name="colour", width=220),
            pn.widgets.FloatInput.from_param(self.param.gap_threshold_pct, name="gap threshold (%)", width=140),
            sizing_mode="stretch_width",
        )
        plot = pn.panel(pn.bind(self._scatter_view, self.param.x_column, self.param.y_column,
                                self.param.colour_column, self.param.gap_threshold_pct, self.param.query_version),
                        sizing_mode="stretch_width", min_height=440, loading_indicator=True)
        tapped = pn.pane.HTML(pn.bind(self.tapped_html, self.param.tapped_run_id), stylesheets=[LINK_CSS],
                              margin=(6, 10), css_classes=["tapped-info"], sizing_mode="stretch_width")
        card = {"sizing_mode": "stretch_width", "margin": (4, 6),
                "styles": {"background": "white", "border": f"1px solid {theme.BORDER}", "border-radius": "6px"}}
        return pn.Column(
            pn.Column(
                pn.Row(pn.pane.HTML("<b>Filter (SQL WHERE over the runs)</b>", margin=(8, 6)), columns_help),
                pn.Row(box, pn.Column(apply, clear, margin=0), refresh, sizing_mode="stretch_width"),
                status,
                **card,
            ),
            pn.Column(self.grid, pn.Row(actions, set_a, set_b, dl_sel, dl_all, sizing_mode="stretch_width"),
                      extra, **card),
            pn.Column(pn.pane.HTML("<b>Parameter space</b> <span class='muted'>— same filter as the grid; click "
                                   "a point to pick its run</span>", stylesheets=[LINK_CSS], margin=(8, 6)),
                      controls, plot, tapped, **card),
            sizing_mode="stretch_width",
        )


def _strip_prefix(exc: Exception) -> str:
    # DuckDB appends the internal query with a caret under the culprit; the planner never typed that query.
    text = str(exc).split("\n\nLINE ", 1)[0].strip()
    for prefix in ("where: ", "query: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _csv(df: pd.DataFrame) -> io.StringIO:
    out = df.copy()
    for name in out.columns:
        if out[name].map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any():
            out[name] = out[name].map(lambda v: " ".join(str(x) for x in v) if isinstance(v, (list, tuple,
                                                                                            np.ndarray)) else v)
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    buf.seek(0)
    return buf


# ------------------------------------------------------------------------------------------ page factory


def nav_html(active: str) -> str:
    links = [("Plan", PLAN_PAGE_URL), ("History", "./history"), ("Jobs", "./jobs")]
    items = []
    for name, href in links:
        weight = "700" if name == active else "400"
        items.append(f'<a href="{href}" style="color:white;text-decoration:none;margin:0 10px;font-weight:{weight}">'
                     f"{name}</a>")
    return f'<div style="margin-top:4px">{"".join(items)}</div>'


def page_template(title: str, active: str, main: list) -> pn.template.FastListTemplate:
    return pn.template.FastListTemplate(
        title=f"VMAT Planner · {title}",
        accent=theme.ACCENT,
        header_background=theme.ACCENT,
        background_color=theme.BACKGROUND,
        header=[pn.pane.HTML(nav_html(active), margin=(6, 10))],
        main=main,
        main_layout=None,
        theme_toggle=False,
    )


def create_history_page(store: RunStore | None = None):
    """The History page for one browser session."""
    # Each page is its own document: it declares the browser resources it needs (here the Tabulator grid).
    pn.extension("tabulator", sizing_mode="stretch_width", raw_css=[theme.RAW_CSS], notifications=False)
    page = HistoryPage(store=store)
    return page_template("Run history", "History", [page])
