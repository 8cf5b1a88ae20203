"""Left column: structures (visibility, colour, role), objective rows, beams, solver and down-sampling settings.

Every edit produces a new ``RunConfig`` that goes through ``PlanState.set_config``: it is validated at once
against the case, and an invalid value sets ``config_error`` (shown next to its row) and blocks Re-optimise.
The editors rebuild their widgets only when the config is replaced wholesale (``config_revision``), so typing
never loses focus.
"""

from __future__ import annotations

import copy
import html
import re
from collections.abc import Callable

import numpy as np
import panel as pn
import param

from app import theme
from app.state import PlanState
from vmat_core.config import (
    DEFAULT_BEAM_IDS,
    SOLVER_NAMES,
    WARM_START_STRATEGIES,
    RunConfig,
    default_config,
    derive_role,
    objectives_table,
)

IGNORED_NOTE = "ignored by the notebook's MIP"
NOTEBOOK_PRESET = "Notebook: 7 beams (0, 11, …, 66)"
PLANNER_PRESET = "Planner beams"
EVERY_K_PRESET = "Every k-th control point"
CUSTOM_PRESET = "Custom"
_INPUT_CSS = ":host { --font-size: 12px; } input { padding: 2px 4px !important; height: 26px; }"


def evenly_spaced_beams(beam_ids: list[int] | tuple[int, ...], count: int) -> list[int]:
    """``count`` ids spread evenly over the arc of ``beam_ids`` (the first id always included)."""
    ids = list(beam_ids)
    if not ids:
        return []
    count = max(1, min(int(count), len(ids)))
    idx = np.unique(np.floor(np.arange(count) * len(ids) / count).astype(int))
    return [ids[i] for i in idx]


def every_kth_beam(beam_ids: list[int] | tuple[int, ...], k: int) -> list[int]:
    return list(beam_ids)[:: max(1, int(k))]


def parse_beam_ids(text: str) -> list[int]:
    """'0, 11 22' → [0, 11, 22]; ValueError naming the offending token."""
    tokens = [t for t in re.split(r"[,\s;]+", text.strip()) if t]
    if not tokens:
        raise ValueError("enter at least one beam id, e.g. 0, 11, 22")
    out = []
    for t in tokens:
        if not re.fullmatch(r"\d{1,6}", t):
            raise ValueError(f"{t!r} is not a beam id (a whole number)")
        out.append(int(t))
    return out


def format_beam_ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def css_key(key: str) -> str:
    """An objective key as a CSS class fragment: 'CORD/quadratic' → 'CORD_quadratic'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def _row_prefix(i: int) -> tuple[str, str]:
    return f"objectives[{i}:", f"objectives[{i}]"


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:g}"


class ObjectivesPanel(pn.viewable.Viewer):
    state = param.ClassSelector(class_=PlanState)

    # --------------------------------------------------------------------------------------------- editing

    def _edit(self, mutate: Callable[[RunConfig], None]) -> None:
        if self.state.config is None:
            return
        cfg = copy.deepcopy(self.state.config)
        mutate(cfg)
        self.state.set_config(cfg)

    def _defaults(self) -> RunConfig:
        cfg = self.state.config
        return default_config(cfg.case_id, protocol=cfg.protocol)

    # --------------------------------------------------------------------------------------------- structures

    def _structures(self, case_id):
        state = self.state
        info = state.case
        if info is None:
            return pn.pane.Markdown("No case", css_classes=["muted"])
        rows = []
        boxes: dict[str, pn.widgets.Checkbox] = {}
        for name in info.structure_names:
            colour = state.structure_colors.get(name, "#888888")
            role = derive_role(name)
            box = pn.widgets.Checkbox(value=name in state.visible_structures, width=22, margin=(4, 2, 0, 4))
            boxes[name] = box

            def toggled(event, name=name):
                current = list(state.visible_structures)
                if event.new and name not in current:
                    current.append(name)
                elif not event.new and name in current:
                    current.remove(name)
                order = list(info.structure_names)
                state.visible_structures = sorted(current, key=lambda s: order.index(s) if s in order else 999)

            box.param.watch(toggled, "value")
            vol = info.structure_volumes_cc.get(name)
            label = pn.pane.HTML(
                f'<span class="chip" style="background:{colour}"></span> <b>{html.escape(name)}</b> '
                f'<span class="role" style="background:{theme.ROLE_COLOURS.get(role, theme.MUTED)}">{role}</span>'
                + (f' <span class="muted">{vol:.0f} cc</span>' if vol is not None and np.isfinite(vol) else ""),
                stylesheets=[theme.BADGE_CSS],
                margin=(2, 0),
            )
            rows.append(pn.Row(box, label, margin=0, height=26))

        def sync(event):
            for name, box in boxes.items():
                box.value = name in event.new

        watcher = state.param.watch(sync, "visible_structures")
        self._build_watchers.append(watcher)
        return pn.Column(*rows, margin=(0, 0, 6, 0))

    # --------------------------------------------------------------------------------------------- objectives

    def _objective_rows(self, revision):
        state = self.state
        cfg = state.config
        if cfg is None:
            return pn.pane.Markdown("No config")
        table = objectives_table(cfg)
        defaults = {r.key: r for r in self._defaults().objectives}
        header = pn.pane.HTML(
            '<div style="display:flex;font-size:11px;color:#6B7280;font-weight:600">'
            '<span style="width:170px">row</span><span style="width:90px">weight</span>'
            '<span style="width:90px">dose Gy</span></div>',
            margin=(0, 4),
        )
        rows = [header]
        for i, entry in enumerate(table):
            rows.append(self._objective_row(i, entry, defaults.get(entry["key"])))
        reset_all = pn.widgets.Button(label="Reset all objectives", color="light", width=170, margin=(6, 4))

        def do_reset_all(_):
            d = self._defaults()

            def mutate(c: RunConfig) -> None:
                c.objectives = copy.deepcopy(d.objectives)

            self._edit(mutate)
            state.config_revision += 1

        reset_all.on_click(do_reset_all)
        rows.append(reset_all)
        return pn.Column(*rows, margin=0)

    def _objective_row(self, i: int, entry: dict, default):
        state = self.state
        used = entry["used_by_model"]
        name = entry["structure_name"] or "all beams"
        colour = state.structure_colors.get(entry["structure_name"] or "", "#BBBBBB")
        title = f"{name} · {entry['type']}"
        note = "" if used else f'<div class="muted" style="font-size:10px">{IGNORED_NOTE}</div>'
        label = pn.pane.HTML(
            f'<div title="{html.escape(entry["key"])}" style="font-size:12px;line-height:1.2">'
            f'<span class="chip" style="background:{colour}"></span> {html.escape(title)}{note}</div>',
            stylesheets=[theme.BADGE_CSS],
            width=170,
            margin=(4, 4),
        )
        weight = pn.widgets.FloatInput(value=entry["weight"], width=84, margin=(2, 3), stylesheets=[_INPUT_CSS],
                                       label="", placeholder="weight", css_classes=[f"weight-{css_key(entry['key'])}"])

        def set_weight(event, i=i):
            def mutate(c: RunConfig) -> None:
                c.objectives[i].weight = event.new

            self._edit(mutate)

        weight.param.watch(set_weight, "value")
        self.weight_inputs[entry["key"]] = weight
        widgets: list = [label, weight]
        dose = None
        if entry["type"] in ("quadratic-overdose", "quadratic-underdose", "linear-overdose"):
            dose = pn.widgets.FloatInput(value=entry["dose_gy"], width=84, margin=(2, 3), stylesheets=[_INPUT_CSS],
                                         label="", placeholder="dose Gy", css_classes=[f"dose-{css_key(entry['key'])}"])

            def set_dose(event, i=i):
                def mutate(c: RunConfig) -> None:
                    c.objectives[i].dose_gy = event.new
                    c.objectives[i].dose_perc = None

                self._edit(mutate)

            dose.param.watch(set_dose, "value")
            self.dose_inputs[entry["key"]] = dose
            widgets.append(dose)
        else:
            widgets.append(pn.Spacer(width=90))
        reset = pn.widgets.Button(label="↺", width=30, margin=(2, 2), color="light",
                                  description="Reset this row to the protocol default")

        def do_reset(_, i=i, default=default):
            if default is None:
                return
            w = default.weight
            d = default.dose_gy_resolved(state.config.prescription_gy) if default.takes_dose else None
            # Setting the widgets runs their watchers, which write the config.
            weight.value = w
            if dose is not None:
                dose.value = d

        reset.on_click(do_reset)
        reset.disabled = default is None
        widgets.append(reset)
        prefixes = _row_prefix(i)
        error = self._error_pane(lambda field: field.startswith(prefixes))
        self.row_errors[entry["key"]] = error
        style = {} if used else {"opacity": "0.55"}
        return pn.Column(pn.Row(*widgets, margin=0), error, margin=0, styles=style,
                         css_classes=["objective-row"] + ([] if used else ["ignored"]))

    # --------------------------------------------------------------------------------------------- beams

    def _beams(self, revision):
        state = self.state
        cfg, info = state.config, state.case
        if cfg is None or info is None:
            return pn.pane.Markdown("No case")
        all_ids = list(info.beam_ids)
        planner = list(info.planner_beam_ids)
        options = [NOTEBOOK_PRESET]
        if planner:
            options.append(f"{PLANNER_PRESET} ({len(planner)})")
        options += [EVERY_K_PRESET, CUSTOM_PRESET]
        current = list(cfg.beam_ids)
        if current == list(DEFAULT_BEAM_IDS):
            initial = NOTEBOOK_PRESET
        elif planner and current == planner:
            initial = options[1]
        else:
            initial = CUSTOM_PRESET
        preset = pn.widgets.Select(label="Beam preset", options=options, value=initial, margin=(2, 4))
        k = pn.widgets.IntInput(label="k (every k-th)", value=6, start=1, end=max(len(all_ids), 1), width=110,
                                margin=(2, 4))
        count = pn.widgets.IntSlider(label="Beam count (even over the arc)", start=1, end=max(len(all_ids), 1),
                                     value=len(current), margin=(2, 10))
        text = pn.widgets.TextInput(label="Beam ids (advanced)", value=format_beam_ids(current), margin=(2, 4),
                                    css_classes=["beam-ids"])
        summary = pn.pane.HTML(
            self._beam_summary(cfg, info),
            margin=(0, 8),
            styles={"font-size": "11px", "color": theme.MUTED},
            css_classes=["beam-summary"],
        )
        busy = {"on": False}

        def set_ids(ids: list[int]) -> None:
            def mutate(c: RunConfig) -> None:
                c.beam_ids = list(ids)

            self._edit(mutate)

        def on_preset(event):
            if busy["on"]:
                return
            if event.new == NOTEBOOK_PRESET:
                set_ids([b for b in DEFAULT_BEAM_IDS])
            elif event.new.startswith(PLANNER_PRESET):
                set_ids(planner)
            elif event.new == EVERY_K_PRESET:
                set_ids(every_kth_beam(all_ids, k.value))

        def on_k(event):
            if preset.value == EVERY_K_PRESET:
                set_ids(every_kth_beam(all_ids, event.new))
            else:
                preset.value = EVERY_K_PRESET

        def on_count(event):
            if busy["on"]:
                return
            set_ids(evenly_spaced_beams(all_ids, event.new))

        def on_text(event):
            if busy["on"]:
                return
            try:
                ids = parse_beam_ids(event.new)
            except ValueError as e:
                state.param.update(config_error=f"beam_ids: {e}", config_error_field="beam_ids")
                return
            set_ids(ids)

        def sync(event):
            cfg_ids = list(event.new.beam_ids) if event.new is not None else []
            busy["on"] = True
            try:
                try:
                    shown = parse_beam_ids(text.value)
                except ValueError:
                    shown = None
                if shown != cfg_ids:
                    text.value = format_beam_ids(cfg_ids)
                if cfg_ids and count.value != len(cfg_ids):
                    count.value = min(len(cfg_ids), count.end)
                if cfg_ids == list(DEFAULT_BEAM_IDS):
                    preset.value = NOTEBOOK_PRESET
                elif planner and cfg_ids == planner:
                    preset.value = options[1]
                elif preset.value != EVERY_K_PRESET or cfg_ids != every_kth_beam(all_ids, k.value):
                    preset.value = CUSTOM_PRESET
            finally:
                busy["on"] = False
            summary.object = self._beam_summary(event.new, info)

        preset.param.watch(on_preset, "value")
        k.param.watch(on_k, "value")
        count.param.watch(on_count, "value_throttled")
        text.param.watch(on_text, "value")
        self._build_watchers.append(state.param.watch(sync, "config"))
        error = self._error_pane(lambda field: field.startswith("beam_ids"))
        return pn.Column(pn.Row(preset, k, margin=0), count, text, error, summary, margin=0)

    @staticmethod
    def _beam_summary(cfg, info) -> str:
        if cfg is None or info is None:
            return ""
        angles = [info.gantry_angles_deg.get(b) for b in cfg.beam_ids]
        shown = ", ".join(f"{a:g}°" if a is not None and np.isfinite(a) else "?" for a in angles[:12])
        more = " …" if len(angles) > 12 else ""
        return f"{len(cfg.beam_ids)} of {len(info.beam_ids)} control points · gantry {shown}{more}"

    # --------------------------------------------------------------------------------------------- solver

    def _solver(self, revision):
        state = self.state
        cfg = state.config
        if cfg is None:
            return pn.pane.Markdown("")
        s = cfg.solver
        solver = pn.widgets.Select(label="Solver", options=list(SOLVER_NAMES), value=s.solver, width=110,
                                   margin=(2, 4))
        time_limit = pn.widgets.FloatInput(label="Time limit (s)", value=s.time_limit_s, width=110, margin=(2, 4),
                                           css_classes=["time-limit"])
        gap = pn.widgets.FloatInput(label="Rel. MIP gap", value=s.mip_gap, width=110, margin=(2, 4),
                                    format="0.[0000]")
        warm = pn.widgets.Select(label="MIP start", options=list(WARM_START_STRATEGIES), value=s.warm_start,
                                 width=110, margin=(2, 4),
                                 description="auto: the previous run when one is set, else a heuristic plan")
        threads = pn.widgets.IntInput(label="Threads (0 = solver)", value=s.threads or 0, width=110,
                                      margin=(2, 4))
        vx, vy, vz = cfg.voxel_down_sample_factors
        fx = pn.widgets.IntInput(label="Voxel ×x", value=vx, width=70, margin=(2, 4), css_classes=["voxel-x"])
        fy = pn.widgets.IntInput(label="Voxel ×y", value=vy, width=70, margin=(2, 4), css_classes=["voxel-y"])
        fz = pn.widgets.IntInput(label="Voxel ×z", value=vz, width=70, margin=(2, 4), css_classes=["voxel-z"])
        fb = pn.widgets.IntInput(label="Beamlet ×", value=cfg.beamlet_down_sample_factor, width=80, margin=(2, 4))
        mu = pn.widgets.FloatInput(label="MU bound U", value=cfg.mu_bound, width=90, margin=(2, 4))

        def bind(widget, setter):
            def on_change(event):
                self._edit(lambda c: setter(c, event.new))

            widget.param.watch(on_change, "value")

        bind(solver, lambda c, v: setattr(c.solver, "solver", v))
        bind(time_limit, lambda c, v: setattr(c.solver, "time_limit_s", v))
        bind(gap, lambda c, v: setattr(c.solver, "mip_gap", v))
        bind(threads, lambda c, v: setattr(c.solver, "threads", v or None))
        bind(warm, lambda c, v: setattr(c.solver, "warm_start", v))
        bind(fx, lambda c, v: c.voxel_down_sample_factors.__setitem__(0, v))
        bind(fy, lambda c, v: c.voxel_down_sample_factors.__setitem__(1, v))
        bind(fz, lambda c, v: c.voxel_down_sample_factors.__setitem__(2, v))
        bind(fb, lambda c, v: setattr(c, "beamlet_down_sample_factor", v))
        bind(mu, lambda c, v: setattr(c, "mu_bound", v))
        error = self._error_pane(lambda field: not field.startswith(("objectives", "beam_ids")))
        return pn.Column(
            pn.Row(solver, time_limit, margin=0),
            pn.Row(gap, threads, margin=0),
            pn.Row(warm, margin=0),
            pn.pane.HTML('<span class="muted" style="font-size:11px">Down-sampling (multiples of CT voxel / '
                         'beamlet)</span>', stylesheets=[theme.BADGE_CSS], margin=(4, 8, 0, 8)),
            pn.Row(fx, fy, fz, margin=0),
            pn.Row(fb, mu, margin=0),
            error,
            margin=0,
        )

    # --------------------------------------------------------------------------------------------- errors

    def _error_html(self, matches: Callable[[str], bool]) -> str:
        msg, field = self.state.config_error, self.state.config_error_field
        return f'<div class="err">{html.escape(msg)}</div>' if msg and matches(field) else ""

    def _error_pane(self, matches: Callable[[str], bool]) -> pn.pane.HTML:
        """An error line shown under the editor whose fields ``matches`` accepts."""
        pane = pn.pane.HTML(self._error_html(matches), stylesheets=[theme.BADGE_CSS], margin=(0, 8))
        self._error_panes.append((pane, matches))
        return pane

    def _show_errors(self, *_) -> None:
        for pane, matches in self._error_panes:
            pane.object = self._error_html(matches)

    # --------------------------------------------------------------------------------------------- layout

    def _rebuild(self, revision):
        # Drop the previous build's watchers on the shared state so replaced widgets stop listening.
        for w in self._build_watchers:
            self.state.param.unwatch(w)
        self._build_watchers = []
        # The current build's row widgets by objective key (tests and scripts drive the editor through them).
        self.weight_inputs: dict[str, pn.widgets.FloatInput] = {}
        self.dose_inputs: dict[str, pn.widgets.FloatInput] = {}
        self.row_errors: dict[str, pn.pane.HTML] = {}
        self._error_panes: list[tuple[pn.pane.HTML, Callable[[str], bool]]] = []
        self._build_watchers.append(
            self.state.param.watch(self._show_errors, ["config_error", "config_error_field"]))
        return pn.Column(
            pn.pane.HTML("<b>Structures</b>", margin=(4, 8)),
            self._structures(self.state.case_id),
            pn.layout.Divider(margin=(2, 4)),
            pn.pane.HTML("<b>Objectives</b> <span class='muted' style='font-size:11px'>(weight, dose target)"
                         "</span>", stylesheets=[theme.BADGE_CSS], margin=(4, 8)),
            self._objective_rows(revision),
            pn.layout.Divider(margin=(2, 4)),
            pn.pane.HTML("<b>Beams</b>", margin=(4, 8)),
            self._beams(revision),
            pn.layout.Divider(margin=(2, 4)),
            pn.pane.HTML("<b>Solver &amp; down-sampling</b>", margin=(4, 8)),
            self._solver(revision),
            margin=0,
            sizing_mode="stretch_width",
        )

    def __panel__(self):
        self._build_watchers = []
        return pn.Column(
            pn.bind(self._rebuild, self.state.param.config_revision),
            sizing_mode="stretch_width",
            scroll=True,
        )
