"""The case's prescription, and fetching a real PortPy patient into the data directory."""

from __future__ import annotations

import html
from concurrent.futures import ThreadPoolExecutor

import panel as pn
import param

from app import theme
from app.state import PlanState

_FETCH_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch-patient")


def prescription_html(cfg) -> str:
    if cfg is None:
        return "<i>No case</i>"
    per_fx = cfg.prescription_gy / cfg.num_fractions if cfg.num_fractions else float("nan")
    return (
        f'<div class="prescription"><b>Prescription</b> {cfg.prescription_gy:g} Gy in {cfg.num_fractions} fractions '
        f"({per_fx:.2g} Gy/fx) · protocol {html.escape(cfg.protocol)}</div>"
    )


class PrescriptionView(pn.viewable.Viewer):
    """Prescription of the case being planned, and a download of PortPy patients when the hub is reachable."""

    state = param.ClassSelector(class_=PlanState)
    patient_id = param.String(default="Lung_Patient_6", doc="PortPy patient to download.")
    fetch = param.Event(doc="Download patient_id with PortPy's own downloader (a background thread).")
    fetch_message = param.String(default="")

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._future = None

    @param.depends("fetch", watch=True)
    def _on_fetch(self) -> None:
        if self._future is not None and not self._future.done():
            return
        from vmat_core.fetch import fetch_patient

        self.fetch_message = f"Fetching {self.patient_id} …"
        self._future = _FETCH_POOL.submit(fetch_patient, self.patient_id)
        self._future.add_done_callback(self._fetched)

    def _fetched(self, fut) -> None:
        try:
            path = fut.result()
        except Exception as e:  # noqa: BLE001 - offline, unknown patient: the planner reads why
            self.fetch_message = f"Fetch failed: {e}"
            return
        from vmat_core import cases

        self.state.param.case_id.objects = cases.list_case_ids()
        self.fetch_message = f"{path.name} is ready: pick it in the case selector."

    def __panel__(self):
        rx = pn.pane.HTML(pn.bind(prescription_html, self.state.param.config), margin=(4, 10),
                          css_classes=["prescription-pane"])
        patient = pn.widgets.TextInput.from_param(self.param.patient_id, name="", width=170, margin=(4, 10))
        button = pn.widgets.Button.from_param(self.param.fetch, label="Fetch patient", color="light", width=120,
                                              margin=(4, 4))
        message = pn.pane.HTML(pn.bind(lambda m: f'<span style="font-size:12px">{html.escape(m)}</span>',
                                       self.param.fetch_message), margin=(0, 10), css_classes=["fetch-message"])
        return pn.Column(rx, pn.Row(patient, button), message, sizing_mode="stretch_width",
                         styles={"border-bottom": f"1px solid {theme.BORDER}"})
