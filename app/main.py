"""VMAT Planner's page. ``panel serve app/main.py`` serves it too."""

from __future__ import annotations

import panel as pn

ACCENT = "#132456"
ACCENT_LIGHT = "#56B4DA"


def create_app():
    pn.extension(sizing_mode="stretch_width")
    from vmat_core import cases

    ids = cases.list_case_ids()
    header = pn.pane.Markdown("## VMAT Planner", styles={"color": ACCENT})
    body = pn.pane.Markdown(f"Cases: {', '.join(ids) or 'none (run `vmat-planner phantom`)'}")
    return pn.template.FastListTemplate(
        title="VMAT Planner", accent=ACCENT, header_background=ACCENT, main=[header, body]
    )


if pn.state.served:
    create_app().servable()
