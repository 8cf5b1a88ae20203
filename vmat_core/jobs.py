"""Optimisations as background jobs: a durable ledger, worker processes on this machine, or a Dask cluster.

A VMAT MIP runs for minutes to hours, so the app never runs one itself: it submits a job and keeps working.

**The ledger** is a ``diskcache.Cache`` under ``vmat_core.paths.jobs_dir()/ledger``; it is the one source of truth
for both backends and survives server restarts (a new :class:`JobClient` only reads it). Keys:

- ``job:<id>``: the :class:`JobRecord` as a dict; ``events:<id>``: progress points (bounded, thinned evenly when
  long so the incumbent/bound chart keeps its whole time axis); ``log:<id>``: the last console lines;
- ``index``: every job id, oldest first; ``active``: ``{job_id: dedup key}`` of queued/running/cancelling jobs;
  ``queue``: queued embedded job ids, first in first out;
- ``worker:<id>`` and ``workers``: embedded worker records (host, pid, state, current job, last heartbeat);
- ``dask_seq:<id>``: the last Dask message applied for a job (messages are replayed after a client restart).

Every read-modify-write runs inside ``cache.transact()`` (SQLite ``BEGIN IMMEDIATE``), so a queued job is leased
by exactly one worker and a cancel never races a worker's final write.

**Embedded backend** (default): ``python -m vmat_core.worker`` processes lease jobs, heartbeat every
:data:`HEARTBEAT_INTERVAL_S`, and run each solve in a child process of their own (see ``vmat_core.worker``).
A running job whose heartbeat is older than :data:`HEARTBEAT_TIMEOUT_S` becomes ``lost`` with the reason; any
client call or idle worker performs that check.

**Dask backend** (``VMAT_DASK_SCHEDULER=tcp://host:8786`` or ``get_job_client(scheduler=...)``): a job is a Dask
task keyed by the job id; it reports progress as Dask events on the topic ``vmat-job-<id>``, which a listener
thread of the submitting client writes into the same local ledger. Cancel sets the Dask ``Event``
``vmat-cancel-<id>``. The task writes its run folder itself, into the data directory of the client when the
worker can see it (same machine or a shared filesystem), else into the worker's own ``$VMAT_DATA_DIR``: the run
store must therefore be shared between the app and the Dask workers for results to appear in the app.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import queue
import secrets
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmat_core import paths

JOB_STATES = ("queued", "running", "cancelling", "cancelled", "done", "failed", "lost")
ACTIVE_STATES = ("queued", "running", "cancelling")
TERMINAL_STATES = ("cancelled", "done", "failed", "lost")
JOB_KINDS = ("optimise", "dose")
BACKENDS = ("embedded", "dask")
WORKER_STATES = ("starting", "idle", "busy", "stopped", "dead")

SCHEDULER_ENV = "VMAT_DASK_SCHEDULER"
# On a Dask worker: "1" sends every run back to the app through Dask even when the app's data directory path
# exists on this machine (a same-named but different folder).
SHIP_RUNS_ENV = "VMAT_DASK_SHIP_RUNS"
STORE_ID_FILE = "store_id"


def store_id(data_dir: Path | None = None) -> str:
    """A random id of this data directory, made once: a Dask worker that reads the same id through the same path
    shares the app's store and writes runs into it; any other worker sends its runs back through Dask."""
    path = Path(data_dir or paths.data_dir()) / "jobs" / STORE_ID_FILE
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{STORE_ID_FILE}-{os.getpid()}-{secrets.token_hex(3)}")
    tmp.write_text(secrets.token_hex(16), encoding="ascii")
    try:
        os.link(tmp, path)  # the first writer wins; a racing one reads the winner's id
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text(encoding="ascii").strip()


def shares_store(data_dir: str | None, expected_id: str | None) -> bool:
    """Whether ``data_dir`` on this machine is the app's data directory (same path, same store id)."""
    if not data_dir or not expected_id or os.environ.get(SHIP_RUNS_ENV) == "1":
        return False
    try:
        return (Path(data_dir) / "jobs" / STORE_ID_FILE).read_text(encoding="ascii").strip() == expected_id
    except OSError:
        return False
HEARTBEAT_INTERVAL_S = 2.0
# Five missed heartbeats: long enough for a loaded 2-core machine, short enough to report a dead worker in 30 s.
HEARTBEAT_TIMEOUT_S = 10.0
CANCEL_GRACE_S = 10.0
MAX_EVENTS = 2000
MAX_LOG_LINES = 2000
REAP_EVERY_S = 1.0
DEAD_WORKER_KEEP_S = 24 * 3600.0


class JobError(RuntimeError):
    """A job that cannot give what was asked (unknown id, failed, cancelled without a run, lost)."""


class JobNotFound(JobError, KeyError):
    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else "job not found"


class JobFailed(JobError):
    pass


class JobCancelled(JobError):
    pass


class JobLost(JobError):
    pass


@dataclass
class JobRecord:
    """One job as the ledger keeps it. Times are seconds since the epoch (``time.time()``)."""

    job_id: str
    case_id: str
    config_hash: str
    config: dict
    status: str = "queued"
    kind: str = "optimise"
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    host: str | None = None
    error: str | None = None
    run_id: str | None = None
    backend: str = "embedded"
    target_worker: str | None = None
    last_heartbeat: float | None = None
    progress: dict = field(default_factory=dict)
    solver_pid: int | None = None
    cancel_requested_at: float | None = None
    scheduler: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> JobRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    @property
    def elapsed_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at


# --------------------------------------------------------------------------------------------------------------
# Helpers


def new_job_id(now: float | None = None) -> str:
    """Sortable and unique: ``j-20260314-101502-3fa9c1``."""
    stamp = datetime.fromtimestamp(now or time.time(), UTC).strftime("%Y%m%d-%H%M%S")
    return f"j-{stamp}-{secrets.token_hex(3)}"


def hostname() -> str:
    return platform.node() or "localhost"


def iso(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pid_alive(pid: int | None) -> bool:
    """True for a running process of this machine (a zombie counts as dead: it will never heartbeat again)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def clean_value(v: Any) -> Any:
    """JSON- and msgpack-ready copies of progress values (numpy scalars → Python numbers, NaN/inf → None)."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): clean_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean_value(x) for x in v]
    if hasattr(v, "dtype") and hasattr(v, "item"):  # numpy scalars and 0-d arrays
        try:
            return clean_value(v.item())
        except (TypeError, ValueError):
            pass
    return str(v)


def thin_events(events: list[dict], max_n: int = MAX_EVENTS) -> list[dict]:
    """At most ``max_n`` events, keeping the first event of every phase and the latest one and dropping every
    other point in between, so a long solve still charts from its start to now."""
    if len(events) <= max_n:
        return events
    while len(events) > max_n:
        keep: list[dict] = []
        prev_phase = object()
        odd = False
        for i, ev in enumerate(events):
            phase = ev.get("phase")
            if phase != prev_phase or i == len(events) - 1:
                keep.append(ev)
                odd = False
            else:
                if odd:
                    keep.append(ev)
                odd = not odd
            prev_phase = phase
        if len(keep) >= len(events):  # only phase changes left: keep the newest
            return events[-max_n:]
        events = keep
    return events


def merge_latest(latest: dict, events: list[dict]) -> dict:
    """The newest value of every progress field (a later phase keeps the last incumbent and bound)."""
    out = dict(latest)
    for ev in events:
        out.update({k: v for k, v in ev.items() if v is not None})
    return out


# --------------------------------------------------------------------------------------------------------------
# The ledger


class Ledger:
    """Durable job records, queue, progress and worker heartbeats in a ``diskcache.Cache``."""

    def __init__(self, jobs_root: Path | None = None) -> None:
        import diskcache

        self.root = Path(jobs_root or paths.jobs_dir()).expanduser().resolve()
        self.directory = self.root / "ledger"
        self.directory.mkdir(parents=True, exist_ok=True)
        # No eviction: a job record must never disappear because the cache grew.
        self.cache = diskcache.Cache(str(self.directory), eviction_policy="none", timeout=60)

    def close(self) -> None:
        self.cache.close()

    @contextlib.contextmanager
    def transact(self) -> Iterator[None]:
        with self.cache.transact():
            yield

    # ---------------------------------------------------------------------------------------------- jobs

    def get(self, job_id: str) -> dict | None:
        return self.cache.get(f"job:{job_id}")

    def record(self, job_id: str) -> JobRecord:
        d = self.get(job_id) if isinstance(job_id, str) else None
        if d is None:
            raise JobNotFound(f"job_id: no job {job_id!r} in {self.directory}")
        return JobRecord.from_dict(d)

    def create(self, rec: JobRecord, dedup_key: str, *, enqueue: bool) -> tuple[str, bool]:
        """Add ``rec`` unless a queued or running job has the same dedup key: (job id, created)."""
        with self.transact():
            active: dict = self.cache.get("active", {})
            for jid, key in active.items():
                if key == dedup_key:
                    other = self.get(jid)
                    if other and other["status"] in ("queued", "running"):
                        return jid, False
            self.cache.set(f"job:{rec.job_id}", rec.to_dict())
            self.cache.set(f"events:{rec.job_id}", [])
            self.cache.set(f"log:{rec.job_id}", [])
            index: list = self.cache.get("index", [])
            index.append(rec.job_id)
            self.cache.set("index", index)
            active[rec.job_id] = dedup_key
            self.cache.set("active", active)
            if enqueue:
                q: list = self.cache.get("queue", [])
                q.append(rec.job_id)
                self.cache.set("queue", q)
        return rec.job_id, True

    def _store_final(self, d: dict, status: str, **changes: Any) -> dict:
        """Inside a transaction: a job's terminal state, and off the active list and queue."""
        d.update(changes, status=status, finished_at=d.get("finished_at") or time.time())
        self.cache.set(f"job:{d['job_id']}", d)
        active: dict = self.cache.get("active", {})
        if active.pop(d["job_id"], None) is not None:
            self.cache.set("active", active)
        q: list = self.cache.get("queue", [])
        if d["job_id"] in q:
            q.remove(d["job_id"])
            self.cache.set("queue", q)
        return d

    def update(self, job_id: str, fn: Callable[[dict], dict | None]) -> dict | None:
        """Apply ``fn`` to the stored record atomically; ``fn`` returns the new record or None (no change)."""
        with self.transact():
            d = self.get(job_id)
            if d is None:
                return None
            new = fn(dict(d))
            if new is None:
                return d
            if new["status"] in TERMINAL_STATES and d["status"] not in TERMINAL_STATES:
                return self._store_final(new, new["status"])
            self.cache.set(f"job:{job_id}", new)
            return new

    def finish(self, job_id: str, status: str, *, owner: str | None = None, **changes: Any) -> dict | None:
        """Record a terminal state, only while the job is still active (and leased by ``owner`` when given):
        a job already marked lost or cancelled keeps that state."""
        with self.transact():
            d = self.get(job_id)
            if d is None or d["status"] in TERMINAL_STATES:
                return None
            if owner is not None and d.get("worker_id") not in (None, owner):
                return None
            return self._store_final(d, status, **changes)

    def lease(self, worker_id: str, host: str, pid: int | None = None) -> dict | None:
        """Take the oldest queued job this worker may run; exactly one worker gets each job."""
        with self.transact():
            q: list = self.cache.get("queue", [])
            chosen = None
            stale = []
            for jid in q:
                d = self.get(jid)
                if d is None or d["status"] != "queued":
                    stale.append(jid)
                    continue
                if d.get("target_worker") not in (None, worker_id):
                    continue
                chosen = d
                break
            if chosen is None and not stale:
                return None
            for jid in stale:
                q.remove(jid)
            if chosen is not None:
                q.remove(chosen["job_id"])
                now = time.time()
                chosen.update(status="running", started_at=now, last_heartbeat=now, worker_id=worker_id, host=host)
                self.cache.set(f"job:{chosen['job_id']}", chosen)
            self.cache.set("queue", q)
            return chosen

    def append_progress(self, job_id: str, events: list[dict], lines: list[str], **changes: Any) -> None:
        """Add progress points and console lines (bounded) and refresh the record's ``progress``."""
        if not events and not lines and not changes:
            return
        with self.transact():
            d = self.get(job_id)
            if d is None:
                return
            if events:
                stored: list = self.cache.get(f"events:{job_id}", [])
                stored.extend(events)
                self.cache.set(f"events:{job_id}", thin_events(stored))
                d["progress"] = merge_latest(d.get("progress") or {}, events)
            if lines:
                log: list = self.cache.get(f"log:{job_id}", [])
                log.extend(lines)
                self.cache.set(f"log:{job_id}", log[-MAX_LOG_LINES:])
            d.update(changes)
            self.cache.set(f"job:{job_id}", d)

    def events(self, job_id: str) -> list[dict]:
        return self.cache.get(f"events:{job_id}", [])

    def log(self, job_id: str) -> list[str]:
        return self.cache.get(f"log:{job_id}", [])

    def job_ids(self) -> list[str]:
        return list(self.cache.get("index", []))

    def active_ids(self) -> list[str]:
        return list(self.cache.get("active", {}))

    def queued_ids(self) -> list[str]:
        return list(self.cache.get("queue", []))

    # ------------------------------------------------------------------------------------------- workers

    def put_worker(self, rec: dict) -> None:
        with self.transact():
            ids: list = self.cache.get("workers", [])
            if rec["id"] not in ids:
                ids.append(rec["id"])
                self.cache.set("workers", ids)
            self.cache.set(f"worker:{rec['id']}", rec)

    def get_worker(self, worker_id: str) -> dict | None:
        return self.cache.get(f"worker:{worker_id}")

    def worker_records(self) -> list[dict]:
        out = []
        for wid in self.cache.get("workers", []):
            rec = self.get_worker(wid)
            if rec is not None:
                out.append(rec)
        return out

    def heartbeat(self, worker_id: str, *, state: str, current_job: str | None) -> str | None:
        """Refresh the worker's heartbeat and its job's; returns the job's status (None when not ours)."""
        now = time.time()
        with self.transact():
            rec = self.get_worker(worker_id) or {"id": worker_id}
            rec.update(last_heartbeat=now, state=state, current_job=current_job)
            self.cache.set(f"worker:{worker_id}", rec)
            if current_job is None:
                return None
            d = self.get(current_job)
            if d is None or d.get("worker_id") != worker_id or d["status"] not in ("running", "cancelling"):
                return None
            d["last_heartbeat"] = now
            self.cache.set(f"job:{current_job}", d)
            return d["status"]

    def forget_workers(self, older_than_s: float = DEAD_WORKER_KEEP_S) -> None:
        now = time.time()
        with self.transact():
            ids: list = self.cache.get("workers", [])
            keep = []
            for wid in ids:
                rec = self.get_worker(wid)
                if rec and (rec.get("state") not in ("dead", "stopped") or now - (rec.get("last_heartbeat") or 0)
                            < older_than_s):
                    keep.append(wid)
                else:
                    self.cache.delete(f"worker:{wid}")
            if keep != ids:
                self.cache.set("workers", keep)

    # ------------------------------------------------------------------------------------ lost detection

    def reap(self, now: float | None = None) -> list[str]:
        """Mark ``lost`` every embedded job whose worker stopped heartbeating; returns their ids.

        A worker of this machine whose process is gone is recognised after two missed heartbeats rather than
        waiting for the full timeout."""
        now = now or time.time()
        here = hostname()
        candidates = []
        for jid in self.active_ids():
            d = self.get(jid)
            if d and d.get("backend") == "embedded" and d["status"] in ("running", "cancelling"):
                candidates.append(jid)
        if not candidates:
            return []
        lost = []
        with self.transact():
            for jid in candidates:
                d = self.get(jid)
                if not d or d["status"] not in ("running", "cancelling"):
                    continue
                age = now - (d.get("last_heartbeat") or d.get("started_at") or now)
                w = self.get_worker(d.get("worker_id") or "") or {}
                gone = (
                    w.get("host") == here
                    and age > 2 * HEARTBEAT_INTERVAL_S
                    and not pid_alive(w.get("pid"))
                )
                if age <= HEARTBEAT_TIMEOUT_S and not gone:
                    continue
                last = d.get("last_heartbeat") or d.get("started_at")
                reason = (
                    f"worker {d.get('worker_id')} on {d.get('host') or w.get('host') or '?'} stopped heartbeating "
                    f"at {iso(last)}"
                    + (" (its process has exited)" if gone else f" (no heartbeat for {age:.0f} s)")
                )
                self._store_final(d, "lost", error=reason)
                if w:
                    w.update(state="dead", current_job=None)
                    self.cache.set(f"worker:{w['id']}", w)
                lost.append(jid)
        return lost


# --------------------------------------------------------------------------------------------------------------
# Clients


def _validated(config: Any):
    """(RunConfig, config dict) checked against its case; ConfigError otherwise (nothing is queued)."""
    from vmat_core import cases
    from vmat_core.config import ConfigError, RunConfig, validate_config

    if isinstance(config, RunConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = RunConfig.from_dict(config)
    else:
        raise ConfigError("config", f"expected a RunConfig or a dict, got {type(config).__name__}")
    try:
        case = cases.case_info(cfg.case_id)
    except cases.CaseError as e:
        raise ConfigError("case_id", str(e).removeprefix("case_id: ")) from None
    cfg = validate_config(cfg, case)
    return cfg, cfg.to_dict()


class JobClient:
    """Submit, watch, cancel and list jobs; the embedded backend (worker processes on this machine).

    All state is in the ledger, so any number of clients in any number of processes see the same jobs."""

    backend = "embedded"

    def __init__(self, jobs_root: Path | None = None) -> None:
        self.ledger = Ledger(jobs_root)
        self._last_reap = 0.0
        self._reap_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.ledger.root)!r})"

    def close(self) -> None:
        with _clients_lock:
            for key, c in list(_clients.items()):
                if c is self:
                    del _clients[key]
        self.ledger.close()

    # ------------------------------------------------------------------------------------------- submit

    def submit(self, config: Any, *, worker: str | None = None) -> str:
        """Queue an optimisation; the same config already queued or running gives that job's id."""
        cfg, cfg_dict = _validated(config)
        chash = cfg.content_hash()
        return self._submit("optimise", cfg.case_id, chash, cfg_dict, worker)

    def submit_dose(self, run_id: str, *, worker: str | None = None) -> str:
        """Queue a full-resolution dose reconstruction of an existing run."""
        from vmat_core.store import RunStore, check_run_id

        check_run_id(run_id)
        store = RunStore()
        if not store.exists(run_id):
            raise ValueError(f"run_id: no run {run_id} in {store.root}")
        case_id = str(store.read_metadata(run_id).get("case_id", ""))
        return self._submit("dose", case_id, f"dose:{run_id}", {"run_id": run_id}, worker)

    def _check_worker(self, worker: str | None) -> str | None:
        if worker is None:
            return None
        known = {w["id"]: w for w in self.workers()}
        if worker not in known or known[worker]["state"] in ("dead", "stopped"):
            alive = [w for w, rec in known.items() if rec["state"] not in ("dead", "stopped")]
            raise ValueError(f"worker: no live worker {worker!r}; live workers: {', '.join(alive) or 'none'}")
        return worker

    def _submit(self, kind: str, case_id: str, chash: str, cfg_dict: dict, worker: str | None) -> str:
        rec = self._new_record(kind, case_id, chash, cfg_dict, self._check_worker(worker))
        job_id, _ = self.ledger.create(rec, f"{kind}:{chash}", enqueue=True)
        return job_id

    def _new_record(self, kind: str, case_id: str, chash: str, cfg_dict: dict, target: str | None,
                    **extra: Any) -> JobRecord:
        now = time.time()
        return JobRecord(job_id=new_job_id(now), kind=kind, case_id=case_id, config_hash=chash, config=cfg_dict,
                         status="queued", created_at=now, backend=self.backend, target_worker=target, **extra)

    # ------------------------------------------------------------------------------------------- reads

    def _maybe_reap(self) -> None:
        now = time.time()
        if now - self._last_reap < REAP_EVERY_S or not self._reap_lock.acquire(blocking=False):
            return
        try:
            self._last_reap = now
            _reap_spawned()
            self.ledger.reap(now)
        finally:
            self._reap_lock.release()

    def status(self, job_id: str) -> JobRecord:
        self._maybe_reap()
        return self.ledger.record(job_id)

    def progress(self, job_id: str, *, log_tail: int = 200) -> dict:
        """What a progress chart and console need: status, progress points, the latest values, last lines."""
        rec = self.status(job_id)
        log = self.ledger.log(job_id)
        return {
            "job_id": job_id,
            "status": rec.status,
            "events": self.ledger.events(job_id),
            "latest": rec.progress,
            "log": log[-log_tail:] if log_tail > 0 else [],
            "run_id": rec.run_id,
            "error": rec.error,
        }

    def list_jobs(self, *, status: str | None = None, case_id: str | None = None, limit: int = 200) -> list[JobRecord]:
        """Newest first."""
        if status is not None and status not in JOB_STATES:
            raise ValueError(f"status: must be one of {', '.join(JOB_STATES)}, got {status!r}")
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: must be a positive integer, got {limit!r}")
        self._maybe_reap()
        out: list[JobRecord] = []
        for jid in reversed(self.ledger.job_ids()):
            d = self.ledger.get(jid)
            if d is None or (status and d["status"] != status) or (case_id and d.get("case_id") != case_id):
                continue
            out.append(JobRecord.from_dict(d))
            if len(out) >= limit:
                break
        return out

    def workers(self) -> list[dict]:
        """Embedded workers: id, backend, host, pid, state (starting/idle/busy/dead/stopped), current job."""
        self._maybe_reap()
        now = time.time()
        here = hostname()
        out = []
        for w in self.ledger.worker_records():
            w = dict(w)
            age = now - (w.get("last_heartbeat") or 0)
            if w.get("state") not in ("stopped", "dead") and (
                age > HEARTBEAT_TIMEOUT_S or (w.get("host") == here and age > 2 * HEARTBEAT_INTERVAL_S
                                              and not pid_alive(w.get("pid")))
            ):
                w["state"] = "dead"
            w.setdefault("backend", "embedded")
            out.append(w)
        return out

    # ---------------------------------------------------------------------------------------- control

    def cancel(self, job_id: str) -> JobRecord:
        """A queued job is cancelled at once; a running one becomes ``cancelling`` until its worker stops it."""
        self.ledger.record(job_id)

        def change(d: dict) -> dict | None:
            if d["status"] == "queued":
                d.update(status="cancelled", cancel_requested_at=time.time(), error="cancelled before it started")
                return d
            if d["status"] == "running":
                d.update(status="cancelling", cancel_requested_at=time.time())
                return d
            return None

        self.ledger.update(job_id, change)
        return self.status(job_id)

    def result(self, job_id: str, timeout_s: float | None = None) -> str:
        """The run id once the job ends; raises JobFailed/JobCancelled/JobLost, or TimeoutError."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            rec = self.status(job_id)
            if rec.status in TERMINAL_STATES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {rec.status} after {timeout_s} s")
            time.sleep(0.25)
        if rec.run_id and rec.status in ("done", "cancelled"):
            return rec.run_id
        if rec.status == "failed":
            raise JobFailed(f"job {job_id} failed: {rec.error}")
        if rec.status == "cancelled":
            raise JobCancelled(f"job {job_id} was cancelled without a run ({rec.error or 'no solution yet'})")
        if rec.status == "lost":
            raise JobLost(f"job {job_id} was lost: {rec.error}")
        raise JobFailed(f"job {job_id} ended {rec.status} without a run")

    def retry(self, job_id: str) -> str:
        """Submit a finished job's config again (a new job id, or the id of the same config already active),
        on the same worker when it was pinned to one that is still alive."""
        rec = self.ledger.record(job_id)
        if rec.status not in TERMINAL_STATES:
            raise JobError(f"job {job_id} is still {rec.status}; cancel it first or wait for it to end")
        target = rec.target_worker
        if target is not None:
            try:
                target = self._check_worker(target)
            except ValueError:  # that worker is gone: any worker may run the retry
                target = None
        return self._retry(rec, target)

    def _retry(self, rec: JobRecord, worker: str | None) -> str:
        if rec.kind == "dose":
            return self.submit_dose(rec.config["run_id"], worker=worker)
        return self.submit(rec.config, worker=worker)


class DaskJobClient(JobClient):
    """Jobs on a Dask cluster, tracked in the same local ledger as embedded jobs.

    A listener thread applies the tasks' messages (started, progress, log lines, heartbeats, result) to the
    ledger and watches the futures; the scheduler itself persists nothing."""

    backend = "dask"

    def __init__(self, scheduler: str, jobs_root: Path | None = None, *, timeout_s: float = 10.0) -> None:
        from distributed import Client

        super().__init__(jobs_root)
        self.scheduler = scheduler
        self.client = Client(scheduler, set_as_default=False, timeout=timeout_s)
        self._futures: dict[str, Any] = {}
        self._next_known_check = 0.0
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="vmat-dask-jobs", daemon=True)
        self._thread.start()
        for jid in self.ledger.active_ids():  # re-attach after a restart of the app
            d = self.ledger.get(jid)
            if d and d.get("backend") == "dask" and d.get("scheduler") == scheduler:
                self._watch(jid)

    def __repr__(self) -> str:
        return f"DaskJobClient({self.scheduler!r}, {str(self.ledger.root)!r})"

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.client.close()
        super().close()

    # ------------------------------------------------------------------------------------------- submit

    def _check_worker(self, worker: str | None) -> str | None:
        if worker is None:
            return None
        known = self.workers()
        addresses = [w["id"] for w in known if w["state"] != "dead"]
        names = {w.get("name"): w["id"] for w in known}
        address = worker if worker in addresses else names.get(worker)
        if address is None:
            raise ValueError(f"worker: no Dask worker {worker!r}; workers: {', '.join(addresses) or 'none'}")
        return address

    def _submit(self, kind: str, case_id: str, chash: str, cfg_dict: dict, worker: str | None) -> str:
        from distributed import fire_and_forget

        from vmat_core.worker import run_dask_job

        target = self._check_worker(worker)
        rec = self._new_record(kind, case_id, chash, cfg_dict, target, scheduler=self.scheduler)
        job_id, created = self.ledger.create(rec, f"{kind}:{chash}", enqueue=False)
        if not created:
            return job_id
        try:
            from vmat_core.store import RunStore

            # A worker that does not share this data directory gets the run a dose job needs (a few hundred kB).
            run_files = RunStore().export_run(cfg_dict["run_id"]) if kind == "dose" else None
            future = self.client.submit(
                run_dask_job, job_id, kind, cfg_dict, str(paths.data_dir()), store_id(), run_files,
                key=job_id, pure=False, workers=[target] if target else None, allow_other_workers=False,
                retries=0,
            )
            fire_and_forget(future)
        except Exception as e:
            self.ledger.finish(job_id, "failed", error=f"could not submit to {self.scheduler}: {e}\n"
                               + traceback.format_exc())
            raise
        self._watch(job_id, future)
        return job_id

    # ------------------------------------------------------------------------------------------- watch

    def _watch(self, job_id: str, future: Any = None) -> None:
        from distributed import Future

        with self._lock:
            if job_id in self._futures:
                return
            self._futures[job_id] = future if future is not None else Future(job_id, client=self.client)
        # The replay marker goes in before subscribing, so messages sent before this client existed are applied
        # first and live ones after (duplicates are dropped by sequence number).
        self._inbox.put(("replay", job_id))
        self.client.subscribe_topic(dask_topic(job_id), lambda ev, j=job_id: self._inbox.put(("msg", j, ev[1])))

    def _unwatch(self, job_id: str) -> None:
        with self._lock:
            self._futures.pop(job_id, None)
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(dask_topic(job_id))
        with contextlib.suppress(Exception):
            from distributed import Event

            Event(cancel_event_name(job_id), client=self.client).clear()

    def _pump(self) -> None:
        next_check = 0.0
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=0.5)
            except queue.Empty:
                item = ()
            try:
                if item is None:
                    break
                if item and item[0] == "replay":
                    events = self.client.get_events(dask_topic(item[1]))
                    for msg in sorted((m for _, m in events), key=lambda m: m.get("seq", 0)):
                        self._apply(item[1], msg)
                elif item:
                    self._apply(item[1], item[2])
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    self._check_futures()
            except Exception:  # the listener must outlive one bad message or a scheduler hiccup
                import logging

                logging.getLogger(__name__).exception("Dask job listener")

    def _apply(self, job_id: str, msg: dict) -> None:
        """Apply one batch of a task's messages to the ledger (idempotent by sequence number, in order)."""
        seq = int(msg.get("seq", 0))
        last = self.ledger.cache.get(f"dask_seq:{job_id}", 0)
        if seq <= last:
            return
        if seq > last + 1:
            # A batch published after the replay read the topic but before the subscription took effect never
            # reaches the callback; the scheduler still holds it, so fetch the gap before going on.
            with contextlib.suppress(Exception):
                missed = [m for _, m in self.client.get_events(dask_topic(job_id))
                          if last < int(m.get("seq", 0)) < seq]
                for m in sorted(missed, key=lambda m: int(m["seq"])):
                    self._apply_batch(job_id, m)
        self._apply_batch(job_id, msg)

    def _apply_batch(self, job_id: str, msg: dict) -> None:
        seq = int(msg.get("seq", 0))
        key = f"dask_seq:{job_id}"
        if seq <= self.ledger.cache.get(key, 0):
            return
        self.ledger.cache.set(key, seq)
        events, lines, changes, result = [], [], {}, None
        for item in msg.get("items", []):
            kind = item.get("type")
            if kind == "event":
                events.append(item["event"])
            elif kind == "log":
                lines.append(item["line"])
            elif kind == "started":
                changes.update(worker_id=item.get("worker_id"), host=item.get("host"),
                               started_at=item.get("at") or time.time())
            elif kind == "pid":
                changes["solver_pid"] = item.get("pid")
            elif kind == "result":
                # A result with files to bring home is finished from the task's return value (it carries them).
                result = None if item.get("shipped") else item
        d = self.ledger.get(job_id)
        if d is None or d["status"] in TERMINAL_STATES:
            return
        changes["last_heartbeat"] = time.time()
        if "started_at" in changes and d["status"] == "queued":
            changes["status"] = "running"
        self.ledger.append_progress(job_id, events, lines, **changes)
        if result is not None:
            self._finish(job_id, result)

    def _finish(self, job_id: str, result: dict) -> None:
        status, error = result.get("status", "failed"), result.get("error")
        try:
            self._bring_home(result)
        except Exception as e:  # noqa: BLE001 - the job's outcome must still be recorded, with why
            status, error = "failed", f"the worker's results could not be stored here: {e!r}\n{traceback.format_exc()}"
        self.ledger.finish(job_id, status, run_id=result.get("run_id"), error=error)
        self._unwatch(job_id)

    @staticmethod
    def _bring_home(result: dict) -> None:
        """Store what a worker without this data directory sent back: its run folder, a full-resolution dose."""
        from vmat_core.store import RunStore

        run_id = result.get("run_id")
        files = result.get("run_files")
        if run_id and files:
            store = RunStore()
            if not store.exists(run_id):
                store.import_run(run_id, files)
        if run_id and result.get("full_dose"):
            from vmat_core import runner

            runner.import_full_dose(run_id, result["full_dose"])

    def _check_futures(self) -> None:
        now = time.time()
        with self._lock:
            watched = list(self._futures.items())
        known: dict = {}
        if watched and now >= self._next_known_check:
            # A Future made from a key the scheduler does not have stays "pending" for ever (e.g. after a
            # scheduler restart), so ask the scheduler directly now and then.
            self._next_known_check = now + 5.0
            with contextlib.suppress(Exception):
                known = self.client.sync(self.client.scheduler.get_task_status, keys=[j for j, _ in watched])
        for job_id, fut in watched:
            d = self.ledger.get(job_id)
            if d is None or d["status"] in TERMINAL_STATES:
                self._unwatch(job_id)
                continue
            state = fut.status
            if state == "finished":
                with contextlib.suppress(Exception):
                    self._finish(job_id, fut.result(timeout=5))
            elif state == "error":
                exc = fut.exception(timeout=5)
                tb = "".join(traceback.format_exception(type(exc), exc, fut.traceback(timeout=5)))
                self._finish(job_id, {"status": "failed", "error": f"the Dask task failed: {exc!r}\n{tb}"})
            elif state in ("cancelled", "lost"):
                if d["status"] == "cancelling" or d.get("cancel_requested_at"):
                    self._finish(job_id, {"status": "cancelled", "error": "cancelled on the Dask scheduler"})
                else:
                    self._finish(job_id, {"status": "lost", "error": f"the Dask scheduler {self.scheduler} "
                                          f"no longer has this task ({state})"})
            elif job_id in known and known[job_id] is None and now - d["created_at"] > HEARTBEAT_TIMEOUT_S:
                self._finish(job_id, {"status": "lost", "error": f"the Dask scheduler {self.scheduler} does not "
                                      "know this task (was it restarted?)"})
            elif d["status"] in ("running", "cancelling"):
                age = now - (d.get("last_heartbeat") or d.get("started_at") or now)
                if age > HEARTBEAT_TIMEOUT_S:
                    # Dask would re-run the task on another worker; a planner expects a dead worker to mean lost.
                    with contextlib.suppress(Exception):
                        fut.cancel(force=True)
                    self._finish(job_id, {"status": "lost", "error": (
                        f"Dask worker {d.get('worker_id')} on {d.get('host') or '?'} stopped heartbeating at "
                        f"{iso(d.get('last_heartbeat'))} (no heartbeat for {age:.0f} s)")})

    # ------------------------------------------------------------------------------------------ control

    def cancel(self, job_id: str) -> JobRecord:
        from distributed import Event

        rec = self.ledger.record(job_id)
        if rec.backend != "dask":
            return super().cancel(job_id)
        if rec.status in ACTIVE_STATES:
            # The flag first: a task that starts right now still sees it.
            Event(cancel_event_name(job_id), client=self.client).set()
        if rec.status == "queued":
            with self._lock:
                fut = self._futures.get(job_id)
            if fut is not None:
                with contextlib.suppress(Exception):
                    fut.cancel(force=True)
        return super().cancel(job_id)

    def workers(self) -> list[dict]:
        info = self.client.scheduler_info(n_workers=-1)
        busy = {}
        for jid in self.ledger.active_ids():
            d = self.ledger.get(jid)
            if d and d.get("backend") == "dask" and d["status"] in ("running", "cancelling"):
                busy[d.get("worker_id")] = jid
        now = time.time()
        out = []
        for address, w in info.get("workers", {}).items():
            last_seen = w.get("last_seen")
            out.append({
                "id": address,
                "name": str(w.get("name", "")),
                "backend": "dask",
                "host": w.get("host"),
                "pid": w.get("pid"),
                "state": "busy" if address in busy else "idle",
                "current_job": busy.get(address),
                "last_heartbeat": last_seen if isinstance(last_seen, (int, float)) else now,
                "nthreads": w.get("nthreads"),
            })
        return out


def dask_topic(job_id: str) -> str:
    return f"vmat-job-{job_id}"


def cancel_event_name(job_id: str) -> str:
    return f"vmat-cancel-{job_id}"


# --------------------------------------------------------------------------------------------------------------
# Process-wide clients and embedded workers

_clients: dict[tuple[str, str | None], JobClient] = {}
_clients_lock = threading.Lock()
_spawned: list = []


def get_job_client(*, scheduler: str | None = None) -> JobClient:
    """The process's client for the current data directory: Dask when ``scheduler`` or ``$VMAT_DASK_SCHEDULER``
    names a scheduler, else the embedded backend."""
    scheduler = scheduler or os.environ.get(SCHEDULER_ENV) or None
    key = (str(paths.jobs_dir()), scheduler)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = DaskJobClient(scheduler) if scheduler else JobClient()
            _clients[key] = client
        return client


def reset_job_clients() -> None:
    """Close and forget the process's clients (tests, or after the data directory changed)."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        with contextlib.suppress(Exception):
            client.close()


def _reap_spawned() -> None:
    """Collect exited workers this process started, so they do not linger as zombies."""
    for p in list(_spawned):
        if p.poll() is not None:
            _spawned.remove(p)


def start_embedded_workers(n: int = 1, *, jobs_root: Path | None = None) -> list[int]:
    """Start worker processes until ``n`` live ones heartbeat; returns the pids of the ones started.

    Workers are detached (their own session) so they keep running when the app restarts; their output goes to
    ``<jobs dir>/workers/<id>.log``."""
    import subprocess
    import sys

    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: must be a non-negative integer, got {n!r}")
    ledger = Ledger(jobs_root)
    try:
        _reap_spawned()
        now = time.time()
        here = hostname()
        live = 0
        for w in ledger.worker_records():
            if w.get("state") in ("dead", "stopped") or now - (w.get("last_heartbeat") or 0) > HEARTBEAT_TIMEOUT_S:
                continue
            if w.get("host") == here and not pid_alive(w.get("pid")):
                continue
            live += 1
        started = []
        log_dir = ledger.root / "workers"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env[paths.DATA_DIR_ENV] = str(paths.data_dir())
        # The package must import in the new process even when it is not installed (a source checkout).
        src = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        for _ in range(max(0, n - live)):
            worker_id = f"{here}-w{secrets.token_hex(3)}"
            with open(log_dir / f"{worker_id}.log", "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "vmat_core.worker", "--id", worker_id, "--jobs-root", str(ledger.root)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True, cwd=src,
                )
            _spawned.append(proc)
            # A placeholder heartbeat, so a second call right now does not start another worker.
            ledger.put_worker({
                "id": worker_id, "backend": "embedded", "host": here, "pid": proc.pid, "state": "starting",
                "current_job": None, "started_at": time.time(), "last_heartbeat": time.time(), "jobs_done": 0,
            })
            started.append(proc.pid)
        return started
    finally:
        ledger.close()


def stop_embedded_workers(pids: list[int], *, timeout_s: float = 15.0) -> None:
    """Stop worker processes: SIGTERM (a worker finishes its heartbeat and hands its running job back as
    cancelled, keeping the incumbent), then SIGKILL for any still alive after ``timeout_s``. Workers this process
    started are also reaped, so none is left a zombie."""
    import subprocess

    own = {p.pid: p for p in _spawned}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        proc = own.get(pid)
        if proc is not None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _spawned.remove(proc)
            continue
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------------------
# Command line


def _fmt_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _job_row(r: JobRecord) -> dict:
    p = r.progress or {}
    gap = p.get("gap")
    return {
        "job_id": r.job_id,
        "kind": r.kind,
        "status": r.status,
        "case": r.case_id,
        "created": iso(r.created_at),
        "elapsed_s": "-" if r.elapsed_s is None else f"{r.elapsed_s:.0f}",
        "phase": p.get("phase", "-"),
        "gap": "-" if gap is None else f"{100 * gap:.2f}%",
        "worker": r.worker_id or (f"({r.target_worker})" if r.target_worker else "-"),
        "run_id": r.run_id or "-",
    }


def cmd_worker(args) -> int:
    from vmat_core.worker import EmbeddedWorker

    w = EmbeddedWorker(args.id, max_jobs=args.max_jobs, idle_exit_s=args.idle_exit)
    print(f"worker {w.worker_id} (pid {os.getpid()}) serving jobs from {w.ledger.directory}", flush=True)
    n = w.run()
    print(f"worker {w.worker_id} stopped after {n} job(s)", flush=True)
    return 0


def cmd_jobs(args) -> int:
    import json

    client = get_job_client(scheduler=args.scheduler)
    if args.workers:
        rows = client.workers()
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
        elif rows:
            for w in rows:
                w["last_heartbeat"] = iso(w.get("last_heartbeat"))
            print(_fmt_table(rows, ["id", "backend", "host", "pid", "state", "current_job", "last_heartbeat"]))
        else:
            print("No workers. Start one with: vmat-planner worker")
        return 0
    jobs = client.list_jobs(status=args.status, case_id=args.case, limit=args.limit)
    if args.json:
        print(json.dumps([j.to_dict() for j in jobs], indent=2, default=str))
    elif jobs:
        rows = [_job_row(j) for j in jobs]
        print(_fmt_table(rows, list(rows[0])))
    else:
        print("No jobs.")
    return 0


def cmd_submit(args) -> int:
    import json

    from vmat_core.config import RunConfig

    cfg = RunConfig.from_json(Path(args.config).read_text())
    client = get_job_client(scheduler=args.scheduler)
    job_id = client.submit(cfg, worker=args.worker)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    rec = _follow(client, job_id)
    print(json.dumps({"status": rec.status, "run_id": rec.run_id, "error": rec.error}, indent=2))
    return 0 if rec.status == "done" else 1


def _follow(client: JobClient, job_id: str) -> JobRecord:
    """Print a line whenever the job's status, phase, incumbent or gap changes, until it ends."""
    last = None
    while True:
        rec = client.status(job_id)
        p = rec.progress or {}
        line = f"{rec.status:10s} {p.get('phase', '-'):12s} incumbent={p.get('incumbent')} gap={p.get('gap')}"
        if line != last:
            print(line, flush=True)
            last = line
        if rec.status in TERMINAL_STATES:
            return rec
        time.sleep(1.0)


def cmd_full_dose(args) -> int:
    from vmat_core import runner

    if args.here:
        full = runner.reconstruct_full_dose(args.run_id)
    else:
        client = get_job_client(scheduler=args.scheduler)
        full = runner.read_full_dose(args.run_id, with_dose=False)
        if full is None:
            job_id = client.submit_dose(args.run_id, worker=args.worker)
            print(job_id, flush=True)
            if not args.wait:
                return 0
            rec = _follow(client, job_id)
            if rec.status != "done":
                print(f"{job_id}: {rec.status}: {rec.error}", file=sys.stderr)
                return 1
            full = runner.read_full_dose(args.run_id, with_dose=False)
    m = full["metrics"]
    cols = [c for c in ("structure", "volume_cc", "mean_gy", "max_gy", "d95_gy", "v100_pct") if c in m.columns]
    rows = [{c: ("-" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}" if isinstance(v, float) else str(v))
             for c, v in r.items()} for r in m[cols].to_dict("records")]
    crit = full["criteria"]
    print(f"run {args.run_id}: full-resolution dose (every dose voxel, every beamlet)")
    print(_fmt_table(rows, cols))
    print("criteria: " + ", ".join(f"{n} {k}" for k, n in crit["status"].value_counts().items()))
    return 0


def cmd_cancel(args) -> int:
    rec = get_job_client(scheduler=args.scheduler).cancel(args.job_id)
    print(f"{rec.job_id}: {rec.status}")
    return 0


def add_cli_commands(subparsers) -> None:
    """``worker``, ``jobs``, ``submit`` and ``cancel`` for the ``vmat-planner`` command."""
    sched_help = f"Dask scheduler address (default ${SCHEDULER_ENV}; none: this machine's workers)"

    s = subparsers.add_parser("worker", help="run a job worker in this process (until stopped)")
    s.add_argument("--id", help="worker name (default <host>-<pid>); jobs can be pinned to it")
    s.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    s.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                   help="exit after this many seconds without a job")
    s.set_defaults(func=cmd_worker)

    s = subparsers.add_parser("jobs", help="list jobs (newest first), or workers with --workers")
    s.add_argument("--status", choices=JOB_STATES)
    s.add_argument("--case", help="only jobs of this case id")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--workers", action="store_true", help="list workers instead of jobs")
    s.add_argument("--json", action="store_true")
    s.add_argument("--scheduler", default=None, help=sched_help)
    s.set_defaults(func=cmd_jobs)

    s = subparsers.add_parser("submit", help="queue an optimisation from a config JSON file; prints the job id")
    s.add_argument("--config", required=True, help="RunConfig JSON file")
    s.add_argument("--worker", help="run only on this worker (name, or Dask worker address)")
    s.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    s.add_argument("--scheduler", default=None, help=sched_help)
    s.set_defaults(func=cmd_submit)

    s = subparsers.add_parser(
        "full-dose", help="a run's full-resolution dose (every dose voxel and beamlet): queue it as a job "
                          "(prints the job id), or print its metrics once computed")
    s.add_argument("run_id")
    s.add_argument("--wait", action="store_true", help="follow the job and print the metrics when it lands")
    s.add_argument("--here", action="store_true", help="compute it in this process instead of a job")
    s.add_argument("--worker", help="run only on this worker (name, or Dask worker address)")
    s.add_argument("--scheduler", default=None, help=sched_help)
    s.set_defaults(func=cmd_full_dose)

    s = subparsers.add_parser("cancel", help="cancel a queued or running job")
    s.add_argument("job_id")
    s.add_argument("--scheduler", default=None, help=sched_help)
    s.set_defaults(func=cmd_cancel)
