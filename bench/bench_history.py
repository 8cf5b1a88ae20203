"""History page timings over a store of many runs: a filtered, sorted grid page and the parameter-space scatter.

Usage: ``python bench/bench_history.py [--runs 10000] [--workers 2] [--root DIR] [--repeat 20]``. Without
``--root`` the runs are written (with the store's own writer, without fsync) into a temporary folder that is
removed afterwards. Times are medians of ``--repeat`` warm calls (the store's index already built), except the
rows marked "first", which include building the index from 10 000 run folders. Target: ≤ 100 ms per query.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from _common import median_time, scratch_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import holoviews as hv

from app.history_page import HistoryPage, parameter_space_plot
from vmat_core import store as store_mod
from vmat_core.store import RunStore, new_run_id

TARGET_MS = 100.0
T0 = datetime(2026, 1, 1, tzinfo=UTC)
HEADER_FILTERS = [
    {"field": "case_id", "type": "like", "value": "patient_1"},
    {"field": "gap_pct", "type": "<=", "value": 5},
    {"field": "PTV_d95_gy", "type": ">=", "value": 56},
]
SORTERS = [{"field": "CORD_max_gy", "dir": "asc"}]
SQL_BOX = "n_beams >= 5 AND solver <> 'MOSEK'"


def _metadata(i: int) -> dict:
    rng = np.random.default_rng(i)
    gap = float(rng.uniform(0, 0.2))
    objective = float(rng.uniform(1e3, 1e5))
    n_beams = int(rng.integers(3, 12))
    md = {
        "created_at": T0 + timedelta(minutes=i),
        "case_id": f"Lung_Synth_Patient_{1 + i % 2}",
        "beam_ids": sorted(rng.choice(72, size=n_beams, replace=False).tolist()),
        "n_beams": n_beams,
        "voxel_ds_x": 6, "voxel_ds_y": 6, "voxel_ds_z": 1, "beamlet_ds": 6,
        "solver": ("HIGHS", "SCIP", "MOSEK")[i % 3],
        "time_limit_s": 600.0, "mip_gap_requested": 1e-4,
        "status": "optimal" if gap < 0.001 else "time_limit",
        "objective": objective, "bound": objective * (1 - gap), "gap": gap,
        "solve_time_s": float(rng.uniform(5, 600)),
        "PTV_d95_gy": float(rng.uniform(54, 61)), "PTV_v100_pct": float(rng.uniform(80, 99)),
        "PTV_max_gy": float(rng.uniform(62, 70)), "CORD_max_gy": float(rng.uniform(20, 50)),
        "ESOPHAGUS_mean_gy": float(rng.uniform(5, 30)), "HEART_mean_gy": float(rng.uniform(2, 20)),
        "criteria_passed": int(rng.integers(8, 17)), "criteria_failed": int(rng.integers(0, 4)),
    }
    for s in ("PTV_quadratic_underdose", "PTV_quadratic_overdose", "CORD_quadratic", "ESOPHAGUS_quadratic",
              "HEART_quadratic", "LUNG_L_quadratic", "LUNG_R_quadratic"):
        md[f"w_{s}"] = float(rng.choice([1.0, 5.0, 10.0, 20.0, 100.0]))
    return md


def _write_batch(root: str, start: int, stop: int) -> int:
    store = RunStore(Path(root), fsync=False)
    for i in range(start, stop):
        md = _metadata(i)
        store.write_run(new_run_id(f"bench-{i}", md["created_at"]), config={"i": i}, metadata=md)
    return stop - start


def build_store(root: Path, n: int, workers: int) -> float:
    bounds = np.linspace(0, n, workers * 8 + 1).astype(int)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        k = len(bounds) - 1
        assert sum(pool.map(_write_batch, [str(root)] * k, bounds[:-1], bounds[1:])) == n
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=None, help="existing or new store folder (kept)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    rows: list[tuple[str, float, str]] = []
    with ExitStack() as scratch:
        root = args.root or scratch.enter_context(scratch_data_dir("bench-history-", link_cases=False)) / "runs"
        root.mkdir(parents=True, exist_ok=True)
        existing = sum(1 for p in root.iterdir() if store_mod.is_run_id(p.name))
        if existing < args.runs:
            n = args.runs - existing
            secs = build_store(root, n, args.workers)
            rows.append((f"write {n} runs ({args.workers} processes, no fsync)", secs, f"{secs / n * 1e3:.2f} ms/run"))
        store = RunStore(root)
        store_mod._CACHES.clear()
        t = time.perf_counter()
        page = HistoryPage(store=store)
        rows.append(("first page of a new History page (first: builds the index)", time.perf_counter() - t,
                     f"{page.total_runs} runs"))

        grid = page.grid
        grid.filters = HEADER_FILTERS
        grid.sorters = SORTERS
        page.sql_where = SQL_BOX
        page.param.trigger("apply_where")
        where, params = page.current_where()
        n_pages = grid.param.page.bounds[1]
        order = "CORD_max_gy ASC"
        cols = [c for c in page._columns for c in c.sources]
        cols = list(dict.fromkeys(cols))

        secs, df = median_time(lambda: store.list_runs(where, columns=cols, order_by=order, limit=50, offset=100,
                                                   params=params), args.repeat)
        rows.append(("DuckDB: filtered, sorted page (list_runs, limit 50, offset 100)", secs, f"{len(df)} rows"))
        secs, count = median_time(lambda: store.count_runs(where, params=params), args.repeat)
        rows.append(("DuckDB: count of the same filter (pager)", secs, f"= {count}"))

        def turn_page() -> int:
            grid.page = 2 if grid.page != 2 else 3
            return len(grid.value)

        secs, n = median_time(turn_page, args.repeat)
        rows.append(("grid: next page (count + page query + display frame)", secs,
                     f"{n} rows, {page.matching_runs} match, {n_pages} pages"))

        scatter_cols = ["run_id", "PTV_d95_gy", "CORD_max_gy", "gap", "status", "objective", "bound",
                        "w_CORD_quadratic"]
        secs, df = median_time(lambda: store.list_runs(columns=scatter_cols, order_by="run_id"), args.repeat)
        rows.append(("DuckDB: scatter columns of all runs", secs, f"{len(df)} points"))
        page.param.trigger("clear_where")
        grid.filters = []
        secs, df = median_time(page.scatter_data, args.repeat)
        rows.append(("page: scatter query (x, y, colour, gap, bound; all runs)", secs, f"{len(df)} points"))
        secs, overlay = median_time(lambda: parameter_space_plot(df, "PTV_d95_gy", "CORD_max_gy", "w_CORD_quadratic",
                                                             5.0), max(3, args.repeat // 4))
        rows.append(("HoloViews: build the scatter elements", secs, f"{len(df)} points"))
        secs, _ = median_time(lambda: hv.render(overlay), 3)
        rows.append(("Bokeh: render the scatter figure (server side)", secs, ""))
        secs, _ = median_time(lambda: hv.render(parameter_space_plot(df, "PTV_d95_gy", "objective", None, 5.0)), 3)
        rows.append(("Bokeh: objective axis with bound intervals, built + rendered", secs, ""))

    print(f"History page benchmark: {args.runs} runs; target ≤ {TARGET_MS:.0f} ms per query; medians of "
          f"{args.repeat} warm calls unless marked first")
    width = max(len(r[0]) for r in rows)
    print(f"{'operation':<{width}}  {'time':>10}  {'target':>6}  result")
    for label, secs, note in rows:
        value = f"{secs:.2f} s" if secs >= 1 else f"{secs * 1e3:.1f} ms"
        verdict = ""
        if label.startswith(("DuckDB", "grid", "page:")):
            verdict = "ok" if secs * 1e3 <= TARGET_MS else "SLOW"
        print(f"{label:<{width}}  {value:>10}  {verdict:>6}  {note}")


if __name__ == "__main__":
    main()
