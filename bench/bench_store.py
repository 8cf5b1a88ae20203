"""Run store timings over a store of many runs: writing, a filtered history page and a scatter query.

Usage: ``python bench/bench_store.py [--runs 10000] [--workers 2] [--no-fsync] [--root DIR]``. Without
``--root`` the store is built in a temporary folder and removed afterwards. "cold" is the first query of a
process with nothing cached (the index has to be built the very first time, or read back from ``_index/``
afterwards); "warm" is the median of repeated queries. The last row times DuckDB reading every
``run.parquet`` directly (the approach the index replaces), for comparison.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from _common import median_time, scratch_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmat_core import store as store_mod
from vmat_core.store import RunStore, new_run_id

CASES = ("Lung_Synth_Patient_1", "Lung_Synth_Patient_2")
SOLVERS = ("HIGHS", "SCIP", "MOSEK")
STRUCTURES = ("PTV", "CORD", "ESOPHAGUS", "HEART", "LUNG_L", "LUNG_R")
PAGE_WHERE = "case_id = 'Lung_Synth_Patient_1' AND gap < 0.05 AND solver = 'HIGHS'"


def _metadata(i: int, created_at: datetime) -> dict:
    rng = np.random.default_rng(i)
    objective = float(rng.uniform(10, 100))
    gap = float(rng.uniform(0, 0.2))
    md: dict = {
        "created_at": created_at,
        "case_id": CASES[i % 2],
        "beam_ids": sorted(rng.choice(72, size=7, replace=False).tolist()),
        "voxel_down_sample_xyz": [5, 5, 1],
        "beamlet_down_sample": 4,
        "solver": SOLVERS[i % 3],
        "solver_reason": "user choice",
        "time_limit_s": 600.0,
        "mip_gap": 0.01,
        "status": "optimal" if gap < 0.01 else "time_limit",
        "objective": objective,
        "bound": objective * (1 - gap),
        "gap": gap,
        "t_load_s": float(rng.uniform(1, 3)),
        "t_build_s": float(rng.uniform(1, 5)),
        "t_solve_s": float(rng.uniform(10, 600)),
        "t_evaluate_s": float(rng.uniform(0.5, 2)),
        "criteria_passed": int(rng.integers(5, 12)),
        "criteria_failed": int(rng.integers(0, 4)),
        "portpy_version": "1.2.0",
        "cvxpy_version": "1.9.3",
    }
    for s in STRUCTURES:
        md[f"{s}_Dmax_gy"] = float(rng.uniform(20, 70))
        md[f"{s}_Dmean_gy"] = float(rng.uniform(5, 60))
        md[f"w_{s}_quadratic"] = float(rng.choice([1.0, 10.0, 100.0]))
    md["PTV_D95_gy"] = float(rng.uniform(55, 61))
    if i % 10 == 9:  # a structure weight only later configs have: must survive union by name
        md["w_GTV_quadratic"] = 5.0
    return md


def _write_batch(root: str, start: int, stop: int, t0: datetime, fsync: bool) -> int:
    store = RunStore(Path(root), fsync=fsync)
    dose = pd.DataFrame({"dose_gy": np.linspace(0, 70, 20), "volume_pct": np.linspace(100, 0, 20)})
    for i in range(start, stop):
        created_at = t0 + timedelta(seconds=i)
        run_id = new_run_id(f"config-{i}", created_at)
        store.write_run(
            run_id,
            config={"case_id": CASES[i % 2], "seed": i},
            metadata=_metadata(i, created_at),
            arrays={"dose_gy": np.full((4, 4, 4), float(i), dtype=np.float32)},
            tables={"dvh": dose},
            texts={"solver": f"run {i}\n"},
        )
    return stop - start


def build_store(root: Path, n: int, workers: int, fsync: bool = True) -> float:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    bounds = np.linspace(0, n, workers * 8 + 1).astype(int)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        k = len(bounds) - 1
        done = sum(pool.map(_write_batch, [str(root)] * k, bounds[:-1], bounds[1:], [t0] * k, [fsync] * k))
    assert done == n
    return time.perf_counter() - started


def _forget_caches() -> None:
    store_mod._CACHES.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-fsync", action="store_true", help="write runs without flushing them to disk")
    parser.add_argument("--root", type=Path, default=None, help="existing or new store folder (kept)")
    args = parser.parse_args()

    rows: list[tuple[str, float, str]] = []
    with ExitStack() as scratch:
        root = args.root or scratch.enter_context(scratch_data_dir("bench-store-", link_cases=False)) / "runs"
        root.mkdir(parents=True, exist_ok=True)
        store = RunStore(root)
        existing = sum(1 for p in root.iterdir() if store_mod.is_run_id(p.name))
        if existing < args.runs:
            n = args.runs - existing
            secs = build_store(root, n, args.workers, fsync=not args.no_fsync)
            how = f"{args.workers} processes{', no fsync' if args.no_fsync else ''}"
            rows.append((f"write {n} runs ({how})", secs, f"{secs / n * 1e3:.2f} ms/run"))
        n_runs = sum(1 for p in root.iterdir() if store_mod.is_run_id(p.name))

        def page() -> pd.DataFrame:
            return store.list_runs(PAGE_WHERE, limit=50)

        def count() -> int:
            return store.count_runs(PAGE_WHERE)

        def scatter() -> pd.DataFrame:
            return store.list_runs(columns=["objective", "PTV_D95_gy"], order_by="run_id")

        shutil.rmtree(root / store_mod.INDEX_DIR, ignore_errors=True)
        _forget_caches()
        secs, df = median_time(page)
        rows.append(("filtered page, cold, no index yet (builds it)", secs, f"{len(df)} rows"))
        for label, fn in (("filtered page (limit 50)", page), ("count of the filter", count),
                          ("scatter: 2 columns, all runs", scatter)):
            _forget_caches()
            secs, result = median_time(fn)
            size = f"{len(result)} rows" if isinstance(result, pd.DataFrame) else f"= {result}"
            rows.append((f"{label}, cold (index on disk)", secs, size))
            secs, result = median_time(fn, repeat=20)
            rows.append((f"{label}, warm (median of 20)", secs, size))

        _forget_caches()
        run_id = new_run_id("one-more")
        store.write_run(run_id, config={}, metadata=_metadata(n_runs, datetime.now(UTC)))
        secs, df = median_time(page)
        rows.append(("filtered page right after a new run", secs, f"{len(df)} rows"))

        secs, report = median_time(store.reindex)
        rows.append(("reindex()", secs, f"{report['indexed']} runs, {len(report['skipped'])} skipped"))

        import duckdb

        con = duckdb.connect()
        glob = f"{root}/*/run.parquet"
        direct = (f"SELECT * FROM read_parquet('{glob}', union_by_name=true) WHERE {PAGE_WHERE} "
                  "ORDER BY created_at DESC LIMIT 50")
        secs, df = median_time(lambda: con.execute(direct).df(), repeat=3)
        rows.append(("for comparison: DuckDB read_parquet glob, page", secs, f"{len(df)} rows"))

    print(f"Run store benchmark: {n_runs} runs in {root if args.root else 'a temporary folder'}")
    width = max(len(r[0]) for r in rows)
    print(f"{'operation':<{width}}  {'time':>10}  result")
    for label, secs, note in rows:
        value = f"{secs:.2f} s" if secs >= 1 else f"{secs * 1e3:.1f} ms"
        print(f"{label:<{width}}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
