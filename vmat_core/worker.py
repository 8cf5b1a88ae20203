"""Where jobs run: the embedded worker loop, the solve process, and the Dask task.

Each job's solve runs in a **solve process** of its own (``python -m vmat_core.worker --solve-child``), started
by whoever runs the job (an embedded worker or a Dask task). That isolates crashes, keeps the solver's memory
and threads out of long-lived processes, and lets a cancel end a solver that does not stop by itself. The
protocol is deliberately small:

- the job spec is one JSON line on the child's stdin; later lines ``stop`` ask the solver to stop (it keeps its
  incumbent); end of stdin means the parent died, and the child exits at once;
- the child reports JSON lines (``event``, ``log``, ``result``) on a dedicated pipe; whatever the solver or
  PortPy print on stdout/stderr is forwarded as console lines.

A worker starts its next solve process while idle so the imports (PortPy, cvxpy, solvers: a few seconds) are
done before a job arrives.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from vmat_core import paths
from vmat_core.jobs import (
    CANCEL_GRACE_S,
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_TIMEOUT_S,
    JOB_KINDS,
    JobError,
    Ledger,
    cancel_event_name,
    clean_value,
    dask_topic,
    hostname,
    pid_alive,
)

log = logging.getLogger(__name__)

_SRC_DIR = str(Path(__file__).resolve().parent.parent)
_WORKER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
KILL_WAIT_S = 3.0
_BEFORE_SOLVE = (None, "load", "downsample", "build")
EXIT_ORPHANED = 70


# --------------------------------------------------------------------------------------------------------------
# What a job does (runs inside the solve process)


def execute_job(
    kind: str,
    config: dict,
    *,
    on_event: Callable[[dict], None],
    on_log: Callable[[str], None],
    should_stop: Callable[[], bool],
) -> dict:
    """Run one job to its end: ``{"status": "done"|"cancelled", "run_id": ..., "error": ...}``.

    Errors propagate; the caller records them with their traceback."""
    if kind == "optimise":
        from vmat_core.runner import RunCancelled, run_vmat_global_optimal

        try:
            res = run_vmat_global_optimal(config, on_progress=on_event, on_log=on_log, should_stop=should_stop)
        except RunCancelled as e:
            return {"status": "cancelled", "run_id": None, "error": str(e)}
        # A run that comes back after a cancel is the solver's incumbent at the moment it stopped.
        cancelled = should_stop() or res.metadata.get("status") == "cancelled"
        return {"status": "cancelled" if cancelled else "done", "run_id": res.run_id, "error": None}
    if kind == "dose":
        from vmat_core.runner import reconstruct_full_dose

        t0 = time.perf_counter()
        on_event({"phase": "dose", "elapsed_s": 0.0, "run_id": config["run_id"]})
        reconstruct_full_dose(config["run_id"])
        on_event({"phase": "done", "elapsed_s": time.perf_counter() - t0, "run_id": config["run_id"]})
        return {"status": "done", "run_id": config["run_id"], "error": None}
    raise JobError(f"kind: must be one of {', '.join(JOB_KINDS)}, got {kind!r}")


class _PipeLogHandler(logging.Handler):
    def __init__(self, send: Callable[[dict], None]) -> None:
        super().__init__(logging.INFO)
        self._send = send
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self._send({"type": "log", "line": self.format(record)})


def solve_child_main(msg_fd: int) -> int:
    """The solve process: import, wait for a job spec on stdin, run it, report on ``msg_fd``."""
    out = os.fdopen(msg_fd, "w", encoding="utf-8")
    lock = threading.Lock()

    def send(obj: dict) -> None:
        line = json.dumps(clean_value(obj), allow_nan=False)
        with lock:
            out.write(line + "\n")
            out.flush()

    # Warm up while idle (PortPy, cvxpy and the solvers take seconds to import); a real import error surfaces
    # when the job runs.
    for module in ("vmat_core.runner", "vmat_core.solvers", "vmat_core.model", "portpy.photon"):
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    line = sys.stdin.readline()
    if not line.strip():
        return 0
    spec = json.loads(line)
    stop = threading.Event()

    def watch_parent() -> None:
        for cmd in sys.stdin:
            if cmd.strip() == "stop":
                stop.set()
        # stdin closed: the worker that owns this job is gone, so nobody would record what we compute.
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    handler = _PipeLogHandler(send)
    logging.getLogger().addHandler(handler)
    logging.getLogger("vmat_core").setLevel(logging.INFO)
    send({"type": "started", "pid": os.getpid()})
    try:
        result = execute_job(
            spec["kind"], spec["config"],
            # The wall-clock stamp lets a reader measure how long a point took to reach it (bench_jobs).
            on_event=lambda ev: send({"type": "event", "event": {**ev, "emitted_at": time.time()}}),
            on_log=lambda text: send({"type": "log", "line": str(text).rstrip("\n")}),
            should_stop=stop.is_set,
        )
    except BaseException as e:  # noqa: BLE001 - every failure is reported, with its traceback
        result = {"status": "failed", "run_id": None, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    send({"type": "result", **result})
    out.close()
    return 0


# --------------------------------------------------------------------------------------------------------------
# The parent side of a solve process


class SolveProcess:
    """A started solve process waiting for its job (see the module docstring for the protocol)."""

    def __init__(self, env: dict | None = None) -> None:
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join([_SRC_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmat_core.worker", "--solve-child", "--msg-fd", str(w)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(w,), env=env,
                cwd=_SRC_DIR, start_new_session=True,  # a Ctrl-C meant for the worker must not kill the solve
            )
        finally:
            os.close(w)
        self._q: queue.Queue = queue.Queue()
        msgs = os.fdopen(r, "r", encoding="utf-8", errors="replace")
        self._readers = [
            threading.Thread(target=self._read, args=("msg", msgs), daemon=True),
            threading.Thread(target=self._read, args=("out", self.proc.stdout), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self, channel: str, stream) -> None:
        try:
            for line in stream:
                self._q.put((channel, line.decode("utf-8", "replace") if isinstance(line, bytes) else line))
        except (OSError, ValueError):
            pass
        finally:
            self._q.put((channel, None))
            with contextlib.suppress(Exception):
                stream.close()

    def _write(self, text: str) -> bool:
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def discard(self) -> None:
        """End an unused (or finished) process: closing stdin makes it exit by itself."""
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()

    def run(
        self,
        spec: dict,
        *,
        on_event: Callable[[dict], None],
        on_log: Callable[[str], None],
        check: Callable[[], str | None],
        tick_s: float = 0.25,
        grace_s: float = CANCEL_GRACE_S,
    ) -> dict:
        """Run ``spec`` and return its result dict.

        ``check()`` is called every ``tick_s``: ``"stop"`` asks the solver to stop and kills it after ``grace_s``;
        ``"abandon"`` kills it at once (the job is no longer ours)."""
        result: dict | None = None
        done_run_id: str | None = None
        open_channels = {"msg", "out"}
        stop_sent_at: float | None = None
        killed: str | None = None
        exited_at: float | None = None
        tail: list[str] = []
        phase: str | None = None
        if not self._write(json.dumps(spec) + "\n"):
            killed = None  # the process is already gone; the exit code below says why
        next_tick = 0.0
        while True:
            try:
                channel, line = self._q.get(timeout=0.1)
            except queue.Empty:
                channel, line = None, None
            if channel is not None:
                if line is None:
                    open_channels.discard(channel)
                elif channel == "out":
                    text = line.rstrip("\n")
                    tail = (tail + [text])[-20:]
                    on_log(text)
                else:
                    try:
                        msg = json.loads(line)
                    except ValueError:  # a half-written line from a killed process
                        continue
                    kind = msg.get("type")
                    if kind == "event":
                        ev = msg.get("event") or {}
                        done_run_id = ev.get("run_id") or done_run_id
                        phase = ev.get("phase") or phase
                        on_event(ev)
                    elif kind == "log":
                        on_log(msg.get("line", ""))
                    elif kind == "result":
                        result = msg
            now = time.monotonic()
            if not self.alive():
                exited_at = exited_at or now
                # Both pipes normally close with the process; give the readers a moment to drain them.
                if (not open_channels or now - exited_at > 2.0) and self._q.empty():
                    break
            if now >= next_tick:
                next_tick = now + tick_s
                action = check()
                if self.alive() and killed is None:
                    if action == "abandon":
                        killed = "abandoned"
                        self._kill()
                    elif action == "stop" and phase in _BEFORE_SOLVE:
                        # Nothing worth keeping exists before the solve, and loading does not poll the flag.
                        killed = "before_solve"
                        self._kill()
                    elif action == "stop" and stop_sent_at is None:
                        stop_sent_at = now
                        self._write("stop\n")
                    elif stop_sent_at is not None and now - stop_sent_at > grace_s:
                        killed = "grace"
                        on_log(f"the solver did not stop within {grace_s:.0f} s; killing solve process {self.pid}")
                        self._kill()
        self.proc.wait()
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        if result is not None:
            return {"status": result.get("status", "failed"), "run_id": result.get("run_id"),
                    "error": result.get("error")}
        if killed == "abandoned":
            return {"status": "lost", "run_id": None, "error": "the job was taken from this worker"}
        if killed == "before_solve":
            return {"status": "cancelled", "run_id": None, "error": f"cancelled before the solve started ({phase or 'starting'})"}
        if killed == "grace":
            return {"status": "cancelled", "run_id": done_run_id,
                    "error": f"the solver did not stop within {grace_s:.0f} s of the cancel and was killed"}
        rc = self.proc.returncode
        how = f"was killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"
        detail = "\n".join(tail)
        return {"status": "failed", "run_id": done_run_id,
                "error": f"the solve process {how} without a result" + (f"; its last output:\n{detail}" if detail
                                                                          else "")}


# --------------------------------------------------------------------------------------------------------------
# The embedded worker


class EmbeddedWorker:
    """Lease jobs from the ledger and run them, one at a time, until stopped."""

    def __init__(
        self,
        worker_id: str | None = None,
        *,
        max_jobs: int | None = None,
        idle_exit_s: float | None = None,
        jobs_root: Path | None = None,
        poll_s: float = 0.1,
        prestart: bool = True,
    ) -> None:
        if worker_id is not None and not _WORKER_ID_RE.match(worker_id):
            raise ValueError(f"--id: {worker_id!r} is not a valid worker name (letters, digits, '_.:@-', ≤128)")
        if max_jobs is not None and max_jobs < 1:
            raise ValueError(f"--max-jobs: must be at least 1, got {max_jobs}")
        if idle_exit_s is not None and not idle_exit_s > 0:
            raise ValueError(f"--idle-exit: must be > 0 seconds, got {idle_exit_s}")
        self.ledger = Ledger(jobs_root)
        self.host = hostname()
        self.pid = os.getpid()
        self.worker_id = worker_id or f"{self.host}-{self.pid}"
        self.max_jobs = max_jobs
        self.idle_exit_s = idle_exit_s
        self.poll_s = poll_s
        self.prestart = prestart
        self.jobs_done = 0
        self._state = "idle"
        self._job: str | None = None
        self._stopping = threading.Event()
        self._stop_reason = ""
        self._hb_stop = threading.Event()
        self._spare: SolveProcess | None = None

    def stop(self, reason: str = "stopped") -> None:
        self._stop_reason = reason
        self._stopping.set()

    def _register(self) -> None:
        old = self.ledger.get_worker(self.worker_id)
        if old and old.get("pid") != self.pid and old.get("state") not in ("dead", "stopped", "starting"):
            fresh = time.time() - (old.get("last_heartbeat") or 0) < HEARTBEAT_TIMEOUT_S
            if fresh and (old.get("host") != self.host or pid_alive(old.get("pid"))):
                raise ValueError(f"--id: worker {self.worker_id} is already running (pid {old.get('pid')} on "
                                   f"{old.get('host')})")
        now = time.time()
        self.ledger.put_worker({
            "id": self.worker_id, "backend": "embedded", "host": self.host, "pid": self.pid, "state": "idle",
            "current_job": None, "started_at": now, "last_heartbeat": now, "jobs_done": 0,
            "data_dir": str(paths.data_dir()),
        })

    def _beat(self) -> None:
        self.ledger.heartbeat(self.worker_id, state=self._state, current_job=self._job)

    def _heartbeat_loop(self) -> None:
        while not self._hb_stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self._beat()
            except Exception:  # a locked or briefly unavailable ledger must not end the heartbeats
                log.exception("heartbeat of worker %s", self.worker_id)

    def run(self) -> int:
        """Serve jobs until stopped, ``max_jobs`` ran, or idle for ``idle_exit_s``; returns the jobs run."""
        self._register()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda s, f: self.stop(f"received {signal.Signals(s).name}"))
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        hb.start()
        idle_since = time.monotonic()
        next_reap = next_forget = 0.0
        try:
            while not self._stopping.is_set():
                if self.max_jobs is not None and self.jobs_done >= self.max_jobs:
                    break
                now = time.monotonic()
                if now >= next_reap:
                    next_reap = now + HEARTBEAT_INTERVAL_S
                    with contextlib.suppress(Exception):
                        self.ledger.reap()
                    if now >= next_forget:
                        next_forget = now + 3600.0
                        with contextlib.suppress(Exception):
                            self.ledger.forget_workers()
                try:
                    job = self.ledger.lease(self.worker_id, self.host, self.pid)
                except Exception:  # a busy or briefly unreadable ledger: try again shortly
                    log.exception("leasing a job")
                    job = None
                if job is None:
                    if self.idle_exit_s is not None and now - idle_since > self.idle_exit_s:
                        break
                    if self.prestart and (self._spare is None or not self._spare.alive()):
                        self._spare = SolveProcess()
                    self._stopping.wait(self.poll_s)
                    continue
                self._run_job(job)
                self.jobs_done += 1
                idle_since = time.monotonic()
        finally:
            if self._spare is not None:
                self._spare.discard()
                self._spare = None
            self._hb_stop.set()
            hb.join(timeout=5)
            rec = self.ledger.get_worker(self.worker_id) or {"id": self.worker_id}
            rec.update(state="stopped", current_job=None, last_heartbeat=time.time(), jobs_done=self.jobs_done)
            self.ledger.put_worker(rec)
            self.ledger.close()
        return self.jobs_done

    def _run_job(self, job: dict) -> None:
        job_id = job["job_id"]
        self._job, self._state = job_id, "busy"
        with contextlib.suppress(Exception):
            self._beat()
        spare, self._spare = self._spare, None
        proc = spare if spare is not None and spare.alive() else SolveProcess()
        events: list[dict] = []
        lines: list[str] = [f"worker {self.worker_id} on {self.host} runs job {job_id} in solve process {proc.pid}"]
        self.ledger.append_progress(job_id, [], [], solver_pid=proc.pid)
        state = {"cancel_asked": False}

        def flush() -> None:
            if events or lines:
                self.ledger.append_progress(job_id, events[:], lines[:])
                events.clear()
                lines.clear()

        def check() -> str | None:
            try:
                flush()
                d = self.ledger.get(job_id)
            except Exception:  # keep solving through a transient ledger error; the next tick retries
                log.exception("ledger update for job %s", job_id)
                return None
            if d is None or d.get("worker_id") != self.worker_id or d["status"] not in ("running", "cancelling"):
                return "abandon"
            if d["status"] == "cancelling":
                state["cancel_asked"] = True
                return "stop"
            if self._stopping.is_set():
                return "stop"
            return None

        try:
            result = proc.run(
                {"job_id": job_id, "kind": job.get("kind", "optimise"), "config": job["config"]},
                on_event=events.append, on_log=lines.append, check=check,
            )
        except Exception as e:  # noqa: BLE001 - a worker bug must still end the job visibly
            with contextlib.suppress(Exception):
                proc._kill()
            result = {"status": "failed", "run_id": None, "error": f"{e!r}\n{traceback.format_exc()}"}
        with contextlib.suppress(Exception):
            flush()
        status = result["status"]
        if status != "lost":
            error = result.get("error")
            if status == "cancelled" and not state["cancel_asked"] and self._stopping.is_set():
                error = (f"worker {self.worker_id} was stopped ({self._stop_reason}) during the job"
                         + ("; the best plan found so far was kept" if result.get("run_id") else ""))
            self.ledger.finish(job_id, status, owner=self.worker_id, run_id=result.get("run_id"), error=error)
        self._job, self._state = None, "idle"
        with contextlib.suppress(Exception):
            self._beat()


# --------------------------------------------------------------------------------------------------------------
# The Dask task


class _DaskPublisher:
    """Batches a task's messages into Dask events (one topic per job), with heartbeats."""

    def __init__(self, worker, topic: str, every_s: float = 0.25) -> None:
        self._worker = worker
        self._topic = topic
        self._every_s = every_s
        self._items: list[dict] = []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # keeps sequence numbers in send order across both threads
        self._seq = 0
        self._closed = threading.Event()
        self._last_sent = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"publish-{topic}", daemon=True)
        self._thread.start()

    def put(self, item: dict, *, now: bool = False) -> None:
        """Queue ``item``; ``now`` sends it at once (a job's start should not wait for the next batch)."""
        with self._lock:
            self._items.append(clean_value(item))
        if now:
            try:
                self._flush()
            except Exception:
                log.exception("publishing progress on %s", self._topic)

    def _flush(self, force_heartbeat: bool = False) -> None:
        with self._send_lock:
            with self._lock:
                items, self._items = self._items, []
            if not items and not force_heartbeat:
                return
            self._seq += 1
            self._worker.log_event(self._topic, {"seq": self._seq, "items": items or [{"type": "hb"}]})
            self._last_sent = time.monotonic()

    def _loop(self) -> None:
        while not self._closed.wait(self._every_s):
            try:
                self._flush(force_heartbeat=time.monotonic() - self._last_sent >= HEARTBEAT_INTERVAL_S)
            except Exception:
                log.exception("publishing progress on %s", self._topic)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._flush()


def run_dask_job(job_id: str, kind: str, config: dict, data_dir: str | None = None,
                 app_store_id: str | None = None, run_files: dict[str, bytes] | None = None) -> dict:
    """The Dask task of a job: runs the solve process on this Dask worker and reports back through events.

    When this machine sees the submitting app's data directory (same machine or a shared filesystem: the same
    path holds the same store id), the run is written straight into it. Otherwise the job runs in the worker's
    own ``$VMAT_DATA_DIR`` (which must hold the case) and its results travel back in the return value: the run
    folder's files, or a full-resolution dose (whose run, ``run_files``, came with the task)."""
    from distributed import Event, get_client, get_worker

    from vmat_core.jobs import shares_store
    from vmat_core.store import RunStore

    worker = get_worker()
    client = get_client()
    pub = _DaskPublisher(worker, dask_topic(job_id))
    pub.put({"type": "started", "worker_id": worker.address, "host": hostname(), "pid": os.getpid(),
             "at": time.time()}, now=True)
    stop = threading.Event()
    finished = threading.Event()

    def watch_cancel() -> None:
        flag = Event(cancel_event_name(job_id), client=client)
        while not finished.is_set():
            try:
                if flag.wait(timeout=1.0):
                    stop.set()
                    return
            except Exception:  # noqa: BLE001 - a scheduler hiccup; the cancel is polled again
                time.sleep(1.0)

    threading.Thread(target=watch_cancel, name=f"cancel-{job_id}", daemon=True).start()
    env = dict(os.environ)
    shared = shares_store(data_dir, app_store_id)
    if shared:
        env[paths.DATA_DIR_ENV] = data_dir
    elif kind == "dose" and run_files and not RunStore().exists(config["run_id"]):
        RunStore().import_run(config["run_id"], run_files)
    try:
        proc = _take_dask_spare(env)
        pub.put({"type": "pid", "pid": proc.pid}, now=True)
        result = proc.run(
            {"job_id": job_id, "kind": kind, "config": config},
            on_event=lambda ev: pub.put({"type": "event", "event": ev}),
            on_log=lambda text: pub.put({"type": "log", "line": text}),
            check=lambda: "stop" if stop.is_set() else None,
        )
    except Exception as e:  # noqa: BLE001
        result = {"status": "failed", "run_id": None, "error": f"{e!r}\n{traceback.format_exc()}"}
    finally:
        finished.set()
    if not shared and result.get("run_id"):
        try:
            if kind == "dose":
                from vmat_core import runner

                result["full_dose"] = runner.export_full_dose(result["run_id"])
            else:
                result["run_files"] = RunStore().export_run(result["run_id"])
        except Exception as e:  # noqa: BLE001 - the job then fails with the reason, rather than vanish
            result = {"status": "failed", "run_id": result["run_id"],
                      "error": f"the results could not be sent back from {hostname()}: {e!r}"}
    # The app finishes a job from its return value when files come with it; the event only says so.
    shipped = bool(result.get("run_files") or result.get("full_dose"))
    pub.put({"type": "result", "shipped": shipped,
             **{k: v for k, v in result.items() if k not in ("run_files", "full_dose")}})
    pub.close()
    _leave_dask_spare(env)
    return result


# A Dask worker keeps one warm solve process for its next task, as an embedded worker does: importing PortPy,
# cvxpy and the solvers takes seconds that a planner would otherwise wait before the first progress point.
_dask_spare: dict = {}
_dask_spare_lock = threading.Lock()


def _take_dask_spare(env: dict) -> SolveProcess:
    with _dask_spare_lock:
        proc, spare_env = _dask_spare.pop("proc", None), _dask_spare.pop("env", None)
    if proc is not None and proc.alive() and spare_env == env:
        return proc
    if proc is not None:
        proc.discard()
    return SolveProcess(env=env)


def _leave_dask_spare(env: dict) -> None:
    """Start the next task's solve process (it exits by itself when this Dask worker goes away)."""
    with contextlib.suppress(Exception), _dask_spare_lock:
        if "proc" not in _dask_spare:
            _dask_spare.update(proc=SolveProcess(env=env), env=env)


# --------------------------------------------------------------------------------------------------------------
# python -m vmat_core.worker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmat_core.worker", description="VMAT Planner job worker")
    p.add_argument("--id", help="worker name (default <host>-<pid>)")
    p.add_argument("--max-jobs", type=int, default=None)
    p.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS")
    p.add_argument("--jobs-root", default=None, help="jobs directory (default <data dir>/jobs)")
    p.add_argument("--solve-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--msg-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.solve_child:
        return solve_child_main(args.msg_fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    w = EmbeddedWorker(args.id, max_jobs=args.max_jobs, idle_exit_s=args.idle_exit,
                       jobs_root=Path(args.jobs_root) if args.jobs_root else None)
    log.info("worker %s (pid %s) serving %s", w.worker_id, w.pid, w.ledger.directory)
    n = w.run()
    log.info("worker %s stopped after %d job(s)", w.worker_id, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
