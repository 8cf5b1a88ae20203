"""Axial viewer timings, server side: slice changes, display settings, loading a run's dose, the reference dose.

Usage: ``python bench/bench_viewer.py [--case Lung_Synth_Patient_1] [--slices 40]``. The viewer is rendered
into a Bokeh document as a served page would be, so each change produces the same document events; "patch"
is the time to serialise those events into the PATCH-DOC message the server sends (the browser's own drawing
is not included). Runs and caches go to a temporary data directory whose ``portpy`` folder links to the real
cases, so the bench never touches the user's runs. Target: a slice change ≤ 30 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from _common import scratch_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_SLICE_MS = 30.0


def _ms(seconds: float) -> float:
    return seconds * 1e3


class _Patches:
    """Collects the document events of one change and serialises them like the server does."""

    def __init__(self, doc) -> None:
        self.events: list = []
        doc.on_change(self.events.append)

    def serialise_ms(self) -> float:
        from bokeh.protocol import Protocol

        events = [e for e in self.events if hasattr(e, "to_serializable")]
        self.events.clear()
        if not events:
            return 0.0
        t0 = time.perf_counter()
        msg = Protocol().create("PATCH-DOC", events)
        _ = msg.content, msg.buffers
        return _ms(time.perf_counter() - t0)


def _stats(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)
    p95 = v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]
    return statistics.median(v), p95, v[-1]


def _slice_row(label: str, state, patches: _Patches, zs: list[int]) -> tuple[str, str, str]:
    """A table row: slice changes over ``zs`` timed, with the size of what they send to the browser."""
    change, patch = _time_slices(state, patches, zs)
    return (label, "median {:.1f} / p95 {:.1f} / max {:.1f} ms".format(*_stats(change)),
            f"patch median {_stats(patch)[0]:.1f} ms")


def _time_slices(state, patches: _Patches, zs: list[int]) -> tuple[list[float], list[float]]:
    change, patch = [], []
    for z in zs:
        t0 = time.perf_counter()
        state.slice_index = z
        change.append(_ms(time.perf_counter() - t0))
        patch.append(patches.serialise_ms())
    return change, patch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="Lung_Synth_Patient_1")
    ap.add_argument("--slices", type=int, default=40, help="slices visited per pass")
    args = ap.parse_args(argv)

    rows: list[tuple[str, str, str]] = []
    with scratch_data_dir("vmat-bench-viewer-"):
        from bokeh.document import Document

        from app import axial_view as av
        from app.state import PlanState
        from vmat_core import imaging
        from vmat_core.store import RunStore, new_run_id

        t0 = time.perf_counter()
        _hu, geom = imaging.ct_volume(args.case)
        rows.append(("open case: CT volume read (cold)", f"{_ms(time.perf_counter() - t0):.0f} ms",
                     f"{geom.shape_zyx} int16"))

        t0 = time.perf_counter()
        ref = imaging.reference_dose(args.case)
        rows.append(("reference dose, first conversion (PortPy RT Dose reader)",
                     f"{_ms(time.perf_counter() - t0):.0f} ms", "then cached on disk"))
        imaging.clear_caches()
        imaging.ct_volume(args.case)
        t0 = time.perf_counter()
        ref = imaging.reference_dose(args.case)
        rows.append(("reference dose from the disk cache (new process)", f"{_ms(time.perf_counter() - t0):.0f} ms",
                     "sha256-checked .npy"))

        # two runs with realistic dose arrays (compressed npz, as the runner writes them)
        store = RunStore()
        run_ids = []
        for k, scale in enumerate((1.0, 1.08)):
            rid = new_run_id(f"bench-viewer-{k}")
            store.write_run(rid, config={"case_id": args.case, "prescription_gy": 60.0},
                            metadata={"case_id": args.case, "status": "optimal", "prescription_gy": 60.0,
                                      "created_at": datetime.now(UTC)},
                            arrays={"dose_3d_gy": (ref * scale).astype(np.float32)})
            run_ids.append(rid)

        state = PlanState(case_id=args.case)
        state.param.update(displayed_run_id=None, show_reference=False)
        viewer = av.AxialViewer(state=state)
        doc = Document()
        doc.add_root(viewer.__panel__().get_root(doc))
        patches = _Patches(doc)
        ptv_z = imaging.structure_centroid_slice(args.case, "PTV")
        half = args.slices // 2
        zs = [min(max(z, 0), geom.nz - 1) for z in range(ptv_z - half, ptv_z + half)]
        n_struct = len(state.visible_structures)

        imaging.clear_caches()
        imaging.ct_volume(args.case)
        rows.append(_slice_row(f"slice change, CT + {n_struct} contours, first visit (traces contours)",
                               state, patches, zs))
        rows.append(_slice_row(f"slice change, CT + {n_struct} contours, revisited",
                               state, patches, list(reversed(zs))))

        av.clear_dose_cache()
        t0 = time.perf_counter()
        state.displayed_run_id = run_ids[0]
        rows.append(("load a run's dose and show it (cold: read npz)", f"{_ms(time.perf_counter() - t0):.0f} ms",
                     f"{ref.nbytes / 2**20:.0f} MB float32"))
        patches.serialise_ms()
        t0 = time.perf_counter()
        av.load_plan_dose(args.case, run_ids[1])
        rows.append(("  of which reading the run's npz alone", f"{_ms(time.perf_counter() - t0):.0f} ms", ""))
        state.displayed_run_id = None
        t0 = time.perf_counter()
        state.displayed_run_id = run_ids[0]
        rows.append(("switch back to a run already loaded (memory cache)",
                     f"{_ms(time.perf_counter() - t0):.1f} ms", ""))
        patches.serialise_ms()

        levels = len(state.isodose_levels_pct)
        rows.append(_slice_row(f"slice change + dose wash + {levels} isodose levels, first visit",
                               state, patches, zs))
        rows.append(_slice_row(f"slice change + dose wash + {levels} isodose levels, revisited",
                               state, patches, list(reversed(zs))))

        state.param.update(compare_a=run_ids[0], compare_b=run_ids[1])
        viewer.show_difference = True
        patches.serialise_ms()
        rows.append(_slice_row("slice change, difference map B − A", state, patches, zs))
        viewer.show_difference = False
        patches.serialise_ms()

        for label, change in (("window/level preset", {"ct_window": 350.0, "ct_level": 50.0}),
                              ("wash threshold", {"dose_threshold_pct": 30.0}),
                              ("wash opacity", {"dose_opacity": 0.7})):
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                state.param.update(**change)
                times.append(_ms(time.perf_counter() - t0))
                state.param.update(**{k: state.param[k].default for k in change})
            rows.append((f"change {label}", f"median {statistics.median(times):.1f} ms", "colour mapper only"))

    width = max(len(r[0]) for r in rows)
    vw = max(len(r[1]) for r in rows)
    print(f"{'measure':<{width}}  {'server-side time':<{vw}}  note")
    print(f"{'-' * width}  {'-' * vw}  ----")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<{vw}}  {note}")
    print(f"\ntarget: a slice change <= {TARGET_SLICE_MS:.0f} ms server-side")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
