"""Latency of jobs, on a scratch data directory linked to the built case.

Prints three tables (medians and 95th percentiles; asserts nothing):

1. ledger operations the app and the workers perform — the ledger must stay cheap enough for a worker to flush
   progress every 0.5 s and for the app to poll ``progress()`` every second while thousands of points and
   console lines accumulate;
2. live jobs on real workers, for the embedded backend (one worker process) and for Dask (a LocalCluster with
   one worker): submit-to-running latency, submit to the first progress point the app can read, and the
   progress update latency — from the moment the solve process emits a point to the moment a polling client
   sees it in the ledger;
3. the set-up (load + down-sample) of the first job on a fresh cache against the jobs after it.

    python bench/bench_jobs.py [--jobs 4] [--no-dask]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _common import scratch_data_dir


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


TINY = ["beam_ids=0,36", "voxel_down_sample_factors=12,12,2", "solver.time_limit_s=6", "solver.threads=1",
        "solver.solver=HIGHS", "solver.warm_start=none"]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def watch_job(client, job_id: str, poll_s: float = 0.01) -> dict:
    """Poll one job as fast as the app could, recording when each progress point first became visible."""
    t_submit = time.time()
    seen: dict[tuple, float] = {}
    delays: list[float] = []
    running_at = first_point_at = None
    while True:
        rec = client.status(job_id)
        now = time.time()
        if running_at is None and (rec.status != "queued"):
            running_at = now
        for ev in client.progress(job_id, log_tail=0)["events"]:
            key = (ev.get("emitted_at"), ev.get("phase"), ev.get("incumbent"), ev.get("bound"))
            if key in seen or ev.get("emitted_at") is None:
                continue
            seen[key] = now
            delays.append(now - ev["emitted_at"])
            if first_point_at is None:
                first_point_at = now
        if not rec.active:
            return {"record": rec, "observed_running_s": running_at - t_submit,
                    "first_point_s": (first_point_at or now) - t_submit, "delays": delays}
        time.sleep(poll_s)


def live_jobs(client, n_jobs: int, tag: str) -> dict:
    """One warm-up job (it also fills the prepared-case cache), then ``n_jobs`` measured ones, one at a time."""
    from vmat_core.config import apply_overrides, default_config
    from vmat_core.store import RunStore

    out = {"ledger_running": [], "observed_running": [], "first_point": [], "delays": [], "setup": []}
    for i in range(n_jobs + 1):
        cfg = apply_overrides(default_config(), TINY + [f"mu_bound={2.0 + 0.01 * i:.2f}", f"label=bench-{tag}-{i}"])
        # A planner looks at a result before the next submit; the pause lets the worker warm its next solve
        # process, as it has time to between real submissions.
        time.sleep(3.0)
        job_id = client.submit(cfg)
        w = watch_job(client, job_id)
        rec = w["record"]
        if rec.status != "done":
            raise RuntimeError(f"{tag} job {job_id} ended {rec.status}: {rec.error}")
        md = RunStore().read_metadata(rec.run_id)
        setup_s = float(md["t_load_s"]) + float(md["t_downsample_s"])
        out["setup"].append((setup_s, bool(md["prepared_cache_hit"])))
        if i == 0:
            continue
        out["ledger_running"].append(rec.started_at - rec.created_at)
        out["observed_running"].append(w["observed_running_s"])
        out["first_point"].append(w["first_point_s"])
        out["delays"].extend(w["delays"])
    return out


def embedded_live(n_jobs: int) -> dict:
    from vmat_core.jobs import JobClient, start_embedded_workers, stop_embedded_workers

    client = JobClient()
    pids = start_embedded_workers(1)
    try:
        # Wait until the worker heartbeats as idle and its spare solve process has imported PortPy.
        deadline = time.monotonic() + 60
        while not any(w["state"] == "idle" for w in client.workers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(8)
        return live_jobs(client, n_jobs, "embedded")
    finally:
        stop_embedded_workers(pids)
        client.close()


def dask_live(n_jobs: int) -> dict:
    from distributed import LocalCluster

    from vmat_core.jobs import DaskJobClient

    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        client = DaskJobClient(cluster.scheduler_address)
        try:
            return live_jobs(client, n_jobs, "dask")
        finally:
            client.close()


def print_live(results: dict[str, dict]) -> None:
    print("\nLive jobs (tiny 2-beam optimisations, one at a time 3 s apart, client polling every 10 ms); seconds")
    print(f"{'backend':10s} {'measure':44s} {'median':>8s} {'p95':>8s} {'n':>5s}")
    for backend, r in results.items():
        for label, key in (("submit -> running (ledger stamps)", "ledger_running"),
                           ("submit -> running (seen by a polling client)", "observed_running"),
                           ("submit -> first progress point readable", "first_point"),
                           ("progress update: emitted -> readable", "delays")):
            v = r[key]
            print(f"{backend:10s} {label:44s} {statistics.median(v):8.3f} {pct(v, 0.95):8.3f} {len(v):5d}")
    print("\nSet-up (load + down-sample) of each job, read from its run; the first ran on an empty cache")
    print(f"{'backend':10s} {'first':>8s} {'later (median)':>15s} {'ratio':>7s}  cache hits")
    for backend, r in results.items():
        (first, first_hit), later = r["setup"][0], [s for s, _ in r["setup"][1:]]
        hits = sum(h for _, h in r["setup"][1:])
        med = statistics.median(later)
        print(f"{backend:10s} {first:7.2f}s {med:14.2f}s {first / max(med, 1e-9):6.1f}x  "
              f"{hits}/{len(later)} (first: {'hit' if first_hit else 'miss'})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=4, help="measured live jobs per backend (after one warm-up)")
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask backend")
    args = ap.parse_args()
    # No case linked here: further down, the repository's built case is linked, and its absence tolerated.
    with scratch_data_dir("vmat-bench-jobs-", link_cases=False) as tmp:
        from vmat_core.jobs import MAX_EVENTS, JobClient, JobRecord, Ledger

        ledger = Ledger(Path(tmp) / "jobs")
        client = JobClient(Path(tmp) / "jobs")
        rows: list[tuple[str, list[float]]] = []

        def create(i: int) -> None:
            rec = JobRecord(job_id=f"j-{i:05d}", case_id="c", config_hash=str(i), config={"i": i},
                            created_at=time.time())
            ledger.create(rec, f"optimise:{i}", enqueue=True)

        rows.append(("create + enqueue (1000 jobs in ledger)", timed(create, 1000)))
        rows.append(("lease (from a 1000-job queue)", timed(lambda i: ledger.lease("w", "h"), 200)))

        event = {"phase": "solve", "elapsed_s": 1.0, "incumbent": 1.0, "bound": 0.5, "gap": 0.5, "nodes": 10}
        lines = ["   B  1234  567  0.123  4.5e+03  1.2e+03  73.21%   1234  12  0  123  4.5s"] * 20
        rows.append(("append_progress (5 points + 20 lines)",
                     timed(lambda i: ledger.append_progress("j-00000", [event] * 5, lines), 600)))
        n_events = len(ledger.events("j-00000"))
        rows.append((f"progress() read ({n_events} points, 200 lines)",
                     timed(lambda i: client.progress("j-00000"), 200)))
        rows.append(("status()", timed(lambda i: client.status(f"j-{i:05d}"), 500)))
        rows.append(("list_jobs(limit=200)", timed(lambda i: client.list_jobs(limit=200), 50)))
        rows.append(("cancel (queued job)", timed(lambda i: client.cancel(f"j-{500 + i:05d}"), 200)))

        case_ready = False
        try:
            from vmat_core.cases import list_case_ids
            from vmat_core.paths import data_dir

            real = Path(__file__).resolve().parent.parent / "data" / "portpy"
            (data_dir() / "portpy").symlink_to(real, target_is_directory=True)
            case_ready = bool(list_case_ids())
        except OSError:
            pass
        if case_ready:
            from vmat_core.config import default_config

            cfg = default_config()
            client.submit(cfg)  # first call pays for imports
            rows.append(("submit(default config): validate + hash + dedup", timed(lambda i: client.submit(cfg), 50)))

        print(f"ledger events capped at {MAX_EVENTS}; times in milliseconds")
        print(f"{'operation':55s} {'median':>8s} {'p95':>8s} {'n':>5s}")
        for name, ts in rows:
            ts_ms = sorted(t * 1000 for t in ts)
            p95 = ts_ms[min(len(ts_ms) - 1, int(0.95 * len(ts_ms)))]
            print(f"{name:55s} {statistics.median(ts_ms):8.2f} {p95:8.2f} {len(ts_ms):5d}")
        client.close()
        ledger.close()

        if not case_ready:
            print("\nno case found under data/portpy (run `vmat-planner phantom`): live jobs skipped")
            return 0
        # The ledger-ops jobs above are not real configs; live jobs get a clean ledger of their own.
        os.environ["VMAT_DATA_DIR"] = str(Path(tmp) / "live")
        (Path(tmp) / "live").mkdir()
        (Path(tmp) / "live" / "portpy").symlink_to(Path(tmp) / "portpy", target_is_directory=True)
        results = {"embedded": embedded_live(args.jobs)}
        if not args.no_dask:
            # A cache of its own, so its first job also starts cold.
            os.environ["VMAT_DATA_DIR"] = str(Path(tmp) / "live-dask")
            (Path(tmp) / "live-dask").mkdir()
            (Path(tmp) / "live-dask" / "portpy").symlink_to(Path(tmp) / "portpy", target_is_directory=True)
            results["dask"] = dask_live(args.jobs)
        print_live(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
