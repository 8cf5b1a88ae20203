"""Latency of the job ledger operations the app and the workers perform, on a scratch data directory.

Prints one table: median and 95th percentile per operation. The ledger must stay cheap enough for a worker to
flush progress every 0.5 s and for the app to poll ``progress()`` every second while thousands of points and
console lines accumulate.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vmat-bench-jobs-") as tmp:
        os.environ["VMAT_DATA_DIR"] = tmp
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
