"""VMAT Planner's Plan page. ``panel serve app/main.py`` serves it too."""

from __future__ import annotations

import os

import panel as pn

from app import theme

# Imported with the module, not per session: the viewer's custom browser component must be defined before the
# first session renders so that its model is registered for every page.
from app.axial_view import AxialViewer
from app.comparison_view import ComparisonView
from app.criteria_view import CriteriaView
from app.dvh_view import DVHView
from app.history_page import nav_html
from app.live_view import LiveView
from app.objectives_panel import ObjectivesPanel
from app.prescription_view import PrescriptionView
from app.state import PlanState
from app.topbar import TopBar

ACCENT = theme.ACCENT
ACCENT_LIGHT = theme.ACCENT_LIGHT
POLL_PERIOD_MS = 1000
_WORKERS_KEY = "vmat_embedded_workers"


def record_workers(pids: list[int]) -> None:
    """What the server started (maybe nothing): pages then start no workers of their own."""
    pn.state.cache[_WORKERS_KEY] = list(pids)


def ensure_workers(n: int = 1):
    """Start the embedded job workers once per process (``--dev`` reloads and new sessions reuse them).

    ``python -m app.server`` decides at start-up (its ``--workers``, or none with a Dask scheduler) and records
    that here first; this default serves ``panel serve app/main.py``. Jobs sent to a Dask scheduler never reach
    an embedded worker, so none is started then."""
    if _WORKERS_KEY not in pn.state.cache:
        from vmat_core import jobs

        started = [] if os.environ.get(jobs.SCHEDULER_ENV) else jobs.start_embedded_workers(n)
        pn.state.cache[_WORKERS_KEY] = started
    return pn.state.cache[_WORKERS_KEY]


def build_page(state=None):
    """The Plan page's components around one PlanState: (template, state)."""
    state = state or PlanState()
    card = {
        "sizing_mode": "stretch_width",
        "styles": {"background": "white", "border": f"1px solid {theme.BORDER}", "border-radius": "6px"},
        "margin": (4, 6),
    }
    centre = pn.Column(DVHView(state=state), CriteriaView(state=state), **card)
    right = pn.Column(AxialViewer(state=state), css_classes=["axial-viewer"], **card)
    live = pn.Card(LiveView(state=state), title="Live optimisation", collapsed=False, header_background="#EEF4FA",
                   sizing_mode="stretch_width", margin=(4, 6))
    comparison = pn.Column(ComparisonView(state=state), **card)
    template = pn.template.FastListTemplate(
        title="VMAT Planner",
        accent=theme.ACCENT,
        header_background=theme.ACCENT,
        background_color=theme.BACKGROUND,
        header=[pn.pane.HTML(nav_html("Plan"), margin=(6, 10))],
        sidebar=[PrescriptionView(state=state), ObjectivesPanel(state=state)],
        sidebar_width=440,
        main=[
            TopBar(state=state),
            pn.Row(centre, right, sizing_mode="stretch_width"),
            live,
            comparison,
        ],
        main_layout=None,
        theme_toggle=False,
    )
    return template, state


def create_app():
    pn.extension("tabulator", sizing_mode="stretch_width", raw_css=[theme.RAW_CSS], notifications=False)
    ensure_workers(1)
    template, state = build_page()
    state.open_from_url(pn.state.session_args)
    if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        cb = pn.state.add_periodic_callback(state.poll, period=POLL_PERIOD_MS)
        pn.state.on_session_destroyed(lambda _ctx: cb.stop())
    return template


if pn.state.served:
    create_app().servable()
