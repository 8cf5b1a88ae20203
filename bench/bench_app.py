"""Server-side time of the Plan page's update when a run completes (target: ≤ 500 ms for the DVH).

Builds the page's views around one PlanState inside a Bokeh document (as a served session would), then times
what the server computes when the displayed run changes: reading the run's tables, building the HoloViews
overlay, and regenerating the Bokeh models of the DVH, the criteria table and the live chart. "cold" is the
first display of a run in the process (tables read from disk); "warm" re-displays a cached run.

Usage: ``python bench/bench_app.py [--repeat 5]``. It uses the most recent runs of the synthetic case in the
data directory (``VMAT_DATA_DIR`` or ``./data``); when there are fewer than two, it first runs tiny
optimisations (2–3 beams, 10 s limit) into a temporary data directory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from _common import scratch_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_MS = 500.0


def _ensure_runs(case_id: str, scratch: ExitStack, n: int = 2) -> list[str]:
    from vmat_core.store import RunStore

    df = RunStore().list_runs("case_id = ?", params=[case_id], columns=["run_id"], limit=n)
    if len(df) >= n:
        return [str(r) for r in df["run_id"]]
    scratch.enter_context(scratch_data_dir("bench-app-"))
    from vmat_core.config import default_config
    from vmat_core.runner import run_vmat_global_optimal

    ids = []
    for beams in ([0, 36], [0, 24, 48])[:n]:
        cfg = default_config(case_id)
        cfg.beam_ids = beams
        cfg.voxel_down_sample_factors = [12, 12, 2]
        cfg.solver.time_limit_s = 10.0
        print(f"  (creating a tiny run with beams {beams} …)", flush=True)
        ids.append(run_vmat_global_optimal(cfg).run_id)
    return ids


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return 1000.0 * (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)

    import panel as pn
    from bokeh.document import Document

    from app import state as state_mod
    from app.criteria_view import CriteriaView, plan_tables
    from app.dvh_view import DVHView, build_dvh
    from app.live_view import LiveView
    from app.state import PlanState
    from vmat_core.cases import DEFAULT_CASE_ID
    from vmat_core.phantom import ensure_phantom

    pn.extension("tabulator")
    ensure_phantom()
    case_id = DEFAULT_CASE_ID
    with ExitStack() as scratch:
        run_ids = _ensure_runs(case_id, scratch)
        state = PlanState(case_id=case_id)
        state.displayed_run_id = None
        page = pn.Column(DVHView(state=state), CriteriaView(state=state), LiveView(state=state))
        doc = Document()
        doc.add_root(page.get_root(doc))  # the Bokeh models a served session holds

        rows: list[tuple[str, list[float]]] = []

        def cold_read():
            state_mod._PLAN_CACHE.clear()
            state_mod.plan_data(case_id, run_ids[0])

        rows.append(("read run tables (cold)", [_ms(cold_read) for _ in range(args.repeat)]))
        rows.append(("build DVH overlay (HoloViews)", [
            _ms(lambda: build_dvh(case_id, run_ids[0], state.visible_structures, state.structure_colors,
                                  False, 95.0)) for _ in range(args.repeat)]))
        rows.append(("metrics + criteria tables", [
            _ms(lambda: plan_tables(case_id, run_ids[0], False, 95.0)) for _ in range(args.repeat)]))

        def switch(run_id, cold):
            def go():
                if cold:
                    state_mod._PLAN_CACHE.clear()
                state.displayed_run_id = run_id
            return go

        def completion(cold: bool) -> list[float]:
            out = []
            for i in range(args.repeat):
                state.displayed_run_id = None
                out.append(_ms(switch(run_ids[i % len(run_ids)], cold)))
            return out

        rows.append(("run completion → all views (cold)", completion(True)))
        rows.append(("run completion → all views (warm)", completion(False)))

        # The DVH view alone, on a state of its own.
        solo = PlanState(case_id=case_id)
        solo.displayed_run_id = None
        solo_page = pn.Column(DVHView(state=solo))
        solo_doc = Document()
        solo_doc.add_root(solo_page.get_root(solo_doc))

        def curve_points() -> int:
            from bokeh.models import ColumnDataSource

            return sum(len(m.data.get("dose_gy", [])) for m in solo_doc.models if isinstance(m, ColumnDataSource))

        # The timings below are only meaningful if the update reaches the figure: check that it does.
        assert curve_points() == 0
        solo.displayed_run_id = run_ids[0]
        shown = curve_points()
        assert shown > 0, "the DVH figure did not receive the run's curves"
        solo.displayed_run_id = None
        assert curve_points() == 0

        def solo_completion(cold: bool) -> list[float]:
            out = []
            for i in range(args.repeat):
                solo.displayed_run_id = None
                if cold:
                    state_mod._PLAN_CACHE.clear()
                out.append(_ms(lambda i=i: setattr(solo, "displayed_run_id", run_ids[i % len(run_ids)])))
            return out

        rows.append(("run completion → DVH view only (cold)", solo_completion(True)))
        rows.append(("run completion → DVH view only (warm)", solo_completion(False)))

        def normalise_toggle() -> list[float]:
            out = []
            for _ in range(args.repeat):
                solo.normalise = False
                out.append(_ms(lambda: setattr(solo, "normalise", True)))
            return out

        rows.append(("normalise toggle → DVH view", normalise_toggle()))

        print(f"Plan page server-side update times, case {case_id}, runs {', '.join(r[-8:] for r in run_ids)}; "
              f"{args.repeat} repeats, target DVH update ≤ {TARGET_MS:.0f} ms")
        print(f"{'step':44} {'median ms':>10} {'max ms':>10}")
        print("-" * 66)
        for name, vals in rows:
            print(f"{name:44} {statistics.median(vals):10.1f} {max(vals):10.1f}")
        dvh_cold = statistics.median(rows[5][1])
        verdict = "meets" if dvh_cold <= TARGET_MS else "MISSES"
        print(f"\nDVH update at run completion (cold, median): {dvh_cold:.0f} ms — {verdict} the {TARGET_MS:.0f} ms "
              "target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
