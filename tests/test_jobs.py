"""Background jobs with real worker processes, the real runner and solvers on the synthetic case.

Every job here is a real optimisation: a tiny one (2 beams, coarse voxels) that finishes in seconds, or the
example's 7-beam MIP with a long time limit, which does not close its gap in the life of a test and is cancelled
or has its worker killed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import pytest

from vmat_core import paths
from vmat_core.config import ConfigError, apply_overrides, default_config
from vmat_core.jobs import (
    HEARTBEAT_INTERVAL_S,
    JobCancelled,
    JobClient,
    JobRecord,
    Ledger,
    add_cli_commands,
    get_job_client,
    pid_alive,
    reset_job_clients,
    start_embedded_workers,
    stop_embedded_workers,
)
from vmat_core.store import RunStore

# HiGHS without a MIP start: its callbacks stream incumbent/bound points even on a problem this small.
TINY = ["beam_ids=0,36", "voxel_down_sample_factors=12,12,2", "solver.time_limit_s=20", "solver.threads=1",
        "solver.solver=HIGHS", "solver.warm_start=none"]
# The example's 7 beams on a coarser voxel grid: quick to set up, yet HiGHS is still far from closing the gap
# after minutes, so the job is reliably mid-solve when it is cancelled or its worker is killed.
LONG = ["voxel_down_sample_factors=12,12,2", "solver.time_limit_s=3600", "solver.mip_gap=0", "solver.threads=1"]


def config(*overrides: str):
    return apply_overrides(default_config(), list(overrides))


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def solve_point(client: JobClient, job_id: str) -> dict | None:
    """The first progress point with an incumbent from the solver, if any yet."""
    for ev in client.progress(job_id, log_tail=0)["events"]:
        if ev.get("phase") == "solve" and ev.get("incumbent") is not None:
            return ev
    return None


@pytest.fixture(scope="module")
def data_root(portpy_dir: Path, session_data_dir: Path, tmp_path_factory) -> Path:
    """A data directory of this module's own: a fresh ledger and run store, the built case linked in, and the
    session's cache of prepared (down-sampled) cases shared, since preparing is not what is tested here."""
    root = tmp_path_factory.mktemp("jobs-data")
    (root / "portpy").symlink_to(portpy_dir, target_is_directory=True)
    (session_data_dir / "cache").mkdir(exist_ok=True)
    (root / "cache").symlink_to(session_data_dir / "cache", target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(paths.DATA_DIR_ENV, str(root))
        reset_job_clients()
        yield root
        reset_job_clients()


@pytest.fixture(scope="module")
def worker_pids(data_root):
    """Pids of the workers this module starts; each is stopped (SIGTERM, then SIGKILL) at the end."""
    pids: list[int] = []
    yield pids
    stop_embedded_workers(pids)
    assert not [pid for pid in pids if pid_alive(pid)], "a worker outlived stop_embedded_workers"


@pytest.fixture(scope="module")
def client(data_root) -> JobClient:
    c = get_job_client()
    assert type(c) is JobClient and c.ledger.root == data_root / "jobs"
    return c


def worker_id_of(client: JobClient, pid: int) -> str:
    def find():
        return next((w["id"] for w in client.workers() if w["pid"] == pid and w["state"] in ("idle", "busy")), None)

    return wait_for(find, 20, f"worker pid {pid} to heartbeat")


def another_worker(client: JobClient, worker_pids: list[int], n_live: int) -> tuple[int, str]:
    """Start one more embedded worker (``n_live`` in all) for this module: (pid, worker id once it heartbeats)."""
    pid = start_embedded_workers(n_live)[0]
    worker_pids.append(pid)
    return pid, worker_id_of(client, pid)


def test_invalid_config_raises_and_queues_nothing(client):
    before = client.ledger.job_ids()
    bad = config(*TINY).to_dict()
    bad["voxel_down_sample_factors"] = [0, 12, 2]
    with pytest.raises(ConfigError, match="voxel_down_sample_factors"):
        client.submit(bad)
    unknown_beam = config(*TINY, "beam_ids=0,99999")
    with pytest.raises(ConfigError, match="beam_ids"):
        client.submit(unknown_beam)
    unknown_case = config(*TINY).to_dict() | {"case_id": "No_Such_Patient"}
    with pytest.raises(ConfigError, match="case_id"):
        client.submit(unknown_case)
    with pytest.raises(ValueError, match="worker"):
        client.submit(config(*TINY), worker="nobody")
    assert client.ledger.job_ids() == before
    assert client.ledger.queued_ids() == []


@pytest.fixture(scope="module")
def shared() -> dict:
    return {}


def test_job_streams_progress_and_ends_done_with_a_run(client, worker_pids, shared):
    t0 = time.monotonic()
    worker_pids += start_embedded_workers(2)
    assert len(worker_pids) == 2
    assert start_embedded_workers(2) == []  # enough live workers already
    cfg = config(*TINY)
    job_id = client.submit(cfg)
    # The next test's long solve starts now on the second worker, so its set-up overlaps this job.
    shared["long"] = client.submit(config(*LONG))
    assert client.submit(cfg.to_dict()) == job_id  # same config while queued or running: the same job
    rec = client.status(job_id)
    assert rec.status in ("queued", "running") and rec.kind == "optimise" and rec.backend == "embedded"

    run_id = client.result(job_id, timeout_s=150)
    elapsed = time.monotonic() - t0
    rec = client.status(job_id)
    assert rec.status == "done" and rec.run_id == run_id and rec.error is None
    assert rec.worker_id in {worker_id_of(client, pid) for pid in worker_pids}
    store = RunStore()
    assert store.root == client.ledger.root.parent / "runs"
    assert store.exists(run_id)
    assert store.read_metadata(run_id)["config_hash"] == rec.config_hash == cfg.content_hash()

    prog = client.progress(job_id)
    phases = [e["phase"] for e in prog["events"]]
    for phase in ("load", "build", "solve", "postprocess", "write", "done"):
        assert phase in phases, (phase, phases)
    point = solve_point(client, job_id)
    assert point is not None and point["elapsed_s"] > 0 and "bound" in point and "gap" in point
    assert prog["latest"]["phase"] == "done" and prog["latest"]["run_id"] == run_id
    assert prog["log"] and any(job_id in line for line in prog["log"])
    json.dumps(prog, allow_nan=False)  # the HTTP API and the app get plain JSON

    # After it ended, the same config is a new job (only queued/running jobs are shared).
    again = client.submit(cfg)
    assert again != job_id
    client.cancel(again)
    assert [j.job_id for j in client.list_jobs(status="done")] == [job_id]
    print(f"\ntiny job: submitted to done in {elapsed:.1f} s")


def test_cancel_queued_and_running_and_reattach(client, worker_pids, shared):
    long_id = client.submit(config(*LONG))
    assert long_id == shared["long"]  # still running: the same job
    wait_for(lambda: solve_point(client, long_id), 240, "the 7-beam solve to report an incumbent")
    rec = client.status(long_id)
    assert rec.status == "running" and pid_alive(rec.solver_pid)

    # Pinned to the busy worker, this one waits in the queue; cancelling it is immediate.
    queued = client.submit(config(*TINY, "solver.time_limit_s=21"), worker=rec.worker_id)
    time.sleep(1.0)
    assert client.status(queued).status == "queued"
    assert client.cancel(queued).status == "cancelled"
    with pytest.raises(JobCancelled):
        client.result(queued, timeout_s=1)
    assert queued not in client.ledger.queued_ids()
    retried = client.retry(queued)
    assert retried != queued and client.status(retried).config == client.status(queued).config
    assert client.cancel(retried).status == "cancelled"

    # A new client (the app after a restart) reads the same ledger and follows the running job.
    fresh = JobClient()
    seen = len(fresh.progress(long_id)["events"])
    assert fresh.status(long_id).status == "running"
    wait_for(lambda: fresh.status(long_id).last_heartbeat > time.time() - 2 * HEARTBEAT_INTERVAL_S, 10,
             "a fresh heartbeat")
    wait_for(lambda: len(fresh.progress(long_id)["events"]) > seen, 30, "more progress events")
    # And a reader in a new process (the CLI, as after a server restart) sees the same jobs in the same states.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vmat_core.cli", "jobs", "--json", "--limit", "50"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    listed = {j["job_id"]: j for j in json.loads(out)}
    assert listed[long_id]["status"] == "running" and listed[long_id]["worker_id"] == rec.worker_id
    assert listed[queued]["status"] == listed[retried]["status"] == "cancelled"
    assert set(listed) <= set(client.ledger.job_ids())

    t = time.monotonic()
    assert fresh.cancel(long_id).status == "cancelling"
    rec = wait_for(lambda: (r := client.status(long_id)).status == "cancelled" and r, 15, "the cancel to land")
    took = time.monotonic() - t
    assert not pid_alive(rec.solver_pid), "the solve process must be gone"
    assert rec.run_id is not None, "the solver had an incumbent, so the cancelled job keeps a run"
    assert RunStore().read_metadata(rec.run_id)["status"] == "cancelled"
    assert client.result(long_id) == rec.run_id
    fresh.close()
    print(f"\ncancel of a running 7-beam solve: cancelled in {took:.1f} s")


def test_two_jobs_run_in_parallel_on_two_workers(client, worker_pids):
    """Both workers of the module are idle again: two different jobs submitted together run side by side."""
    ids = {worker_id_of(client, pid) for pid in worker_pids}
    assert len(ids) == 2
    wait_for(lambda: all(w["state"] == "idle" for w in client.workers() if w["id"] in ids), 30,
             "both workers to be idle")
    a = client.submit(config(*TINY, "solver.time_limit_s=24", "mu_bound=2.4"))
    b = client.submit(config(*TINY, "solver.time_limit_s=25", "mu_bound=2.6"))
    assert a != b
    both_running = wait_for(
        lambda: (ra := client.status(a)).status == "running" and (rb := client.status(b)).status == "running"
        and (ra, rb), 60, "both jobs to be running at once")
    assert {r.worker_id for r in both_running} == ids
    assert len({r.solver_pid for r in both_running}) == 2 and all(pid_alive(r.solver_pid) for r in both_running)
    runs = [client.result(j, timeout_s=150) for j in (a, b)]
    ra, rb = client.status(a), client.status(b)
    assert ra.status == rb.status == "done" and ra.worker_id != rb.worker_id
    # Their running intervals overlap: each started before the other finished.
    assert max(ra.started_at, rb.started_at) < min(ra.finished_at, rb.finished_at)
    store = RunStore()
    assert all(store.exists(r) for r in runs) and runs[0] != runs[1]
    assert store.read_metadata(runs[0])["mu_bound"] != store.read_metadata(runs[1])["mu_bound"]
    overlap = min(ra.finished_at, rb.finished_at) - max(ra.started_at, rb.started_at)
    print(f"\ntwo jobs on two workers: ran side by side for {overlap:.1f} s")


def test_killed_worker_makes_its_job_lost_and_others_go_on(client, worker_pids):
    pid, victim = another_worker(client, worker_pids, 3)
    job_id = client.submit(config(*LONG, "mu_bound=2.5"), worker=victim)
    rec = wait_for(lambda: (r := client.status(job_id)).solver_pid and r.status == "running" and r, 60,
                   "the pinned job to start")
    assert rec.worker_id == victim
    wait_for(lambda: client.progress(job_id, log_tail=0)["latest"].get("phase") in ("build", "solve"), 60,
             "the job to be mid-way")
    solver_pid = client.status(job_id).solver_pid
    t = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    rec = wait_for(lambda: (r := client.status(job_id)).status == "lost" and r, 30, "the job to be marked lost")
    took = time.monotonic() - t
    assert victim in rec.error and "stopped heartbeating" in rec.error
    assert {w["id"]: w["state"] for w in client.workers()}[victim] == "dead"
    wait_for(lambda: not pid_alive(solver_pid), 10, "the orphaned solve process to exit")

    # Nothing else is affected: a fresh worker takes the next job and finishes it.
    _, fresh = another_worker(client, worker_pids, 3)
    next_id = client.submit(config(*TINY, "solver.time_limit_s=22"), worker=fresh)
    assert RunStore().exists(client.result(next_id, timeout_s=120))
    assert client.status(next_id).worker_id == fresh
    print(f"\nSIGKILL of a busy worker: job lost after {took:.1f} s")


def test_stopping_a_busy_worker_cancels_its_job_and_keeps_the_plan(client, worker_pids):
    pid, wid = another_worker(client, worker_pids, 4)
    job_id = client.submit(config(*LONG, "mu_bound=2.2"), worker=wid)
    wait_for(lambda: solve_point(client, job_id), 240, "the solve to report an incumbent")
    solver_pid = client.status(job_id).solver_pid
    stop_embedded_workers([pid])
    assert not pid_alive(pid) and not pid_alive(solver_pid)
    rec = client.status(job_id)
    assert rec.status == "cancelled" and f"worker {wid} was stopped" in rec.error
    assert rec.run_id and RunStore().read_metadata(rec.run_id)["status"] == "cancelled"
    assert {w["id"]: w["state"] for w in client.workers()}[wid] == "stopped"


def test_dose_job_kind(client, worker_pids):
    from vmat_core import runner

    run_id = client.list_jobs(status="done", limit=1)[0].run_id
    job_id = client.submit_dose(run_id)
    assert client.status(job_id).kind == "dose"
    assert client.submit_dose(run_id) == job_id
    rec = wait_for(lambda: (r := client.status(job_id)).status in ("done", "failed") and r, 120, "the dose job")
    assert rec.status == "done" and rec.run_id == run_id, rec.error
    assert runner.full_dose_path(run_id).is_file()
    assert [e["phase"] for e in client.progress(job_id)["events"]] == ["dose", "done"]
    with pytest.raises(ValueError, match="run_id"):
        client.submit_dose("no-such-run")


def test_cli_lists_jobs(client, capsys):
    parser = argparse.ArgumentParser()
    add_cli_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["jobs", "--json", "--status", "done"])
    assert args.func(args) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed and {j["status"] for j in listed} == {"done"}
    assert JobRecord.from_dict(listed[0]).run_id
    args = parser.parse_args(["jobs", "--workers"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["id", "backend", "host", "pid", "state", "current_job", "last_heartbeat"]
    assert any(" idle " in line or " busy " in line for line in out.splitlines()[2:])


def test_cli_full_dose_queues_follows_and_prints(client, worker_pids, capsys):
    from vmat_core import runner

    run_id = next(r.run_id for r in client.list_jobs(status="done")
                  if r.kind == "optimise" and runner.read_full_dose(r.run_id) is None)
    parser = argparse.ArgumentParser()
    add_cli_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["full-dose", run_id, "--wait"])
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    job_id = out[0]
    assert client.status(job_id).kind == "dose" and client.status(job_id).status == "done"
    assert any(line.startswith("done ") for line in out)
    assert f"run {run_id}: full-resolution dose" in "\n".join(out)
    ptv = next(line.split() for line in out if line.startswith("PTV "))
    full = runner.read_full_dose(run_id, with_dose=False)
    assert float(ptv[2]) == pytest.approx(full["metrics"].set_index("structure").loc["PTV", "mean_gy"], abs=0.01)
    # Computed already: printed straight away, nothing queued.
    before = len(client.ledger.job_ids())
    args = parser.parse_args(["full-dose", run_id])
    assert args.func(args) == 0 and len(client.ledger.job_ids()) == before
    assert "PTV " in capsys.readouterr().out


def test_dask_backend_runs_jobs_on_any_and_on_a_named_worker(data_root):
    from distributed import LocalCluster

    t0 = time.monotonic()
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        dask_client = get_job_client(scheduler=cluster.scheduler_address)
        assert dask_client.backend == "dask" and get_job_client(scheduler=cluster.scheduler_address) is dask_client
        workers = wait_for(lambda: len(w := dask_client.workers()) == 2 and w, 30, "two Dask workers")
        assert {w["state"] for w in workers} == {"idle"}
        by_name = {w["name"]: w["id"] for w in workers}
        named = max(by_name)
        with pytest.raises(ValueError, match="worker"):
            dask_client.submit(config(*TINY), worker="tcp://127.0.0.1:1")
        # One job for any worker, one for the worker called by its Dask name; both at once.
        cfg_any = config(*TINY, "solver.time_limit_s=23")
        cfg_named = config(*TINY, "solver.time_limit_s=23", "mu_bound=2.7")
        any_id = dask_client.submit(cfg_any)
        named_id = dask_client.submit(cfg_named, worker=named)
        assert dask_client.submit(cfg_any) == any_id
        assert dask_client.status(named_id).target_worker == by_name[named]
        run_ids = {j: dask_client.result(j, timeout_s=180) for j in (any_id, named_id)}
        for job_id, run_id in run_ids.items():
            rec = dask_client.status(job_id)
            assert rec.backend == "dask" and rec.status == "done" and rec.run_id == run_id
            # Every batch the task sent reached the ledger, its start included (a lost one leaves this None).
            assert rec.created_at <= rec.started_at <= rec.finished_at
            assert rec.worker_id in by_name.values()
            assert RunStore().exists(run_id)
            phases = {e["phase"] for e in dask_client.progress(job_id)["events"]}
            assert {"load", "build", "solve", "done"} <= phases
            assert solve_point(dask_client, job_id) is not None
        assert dask_client.status(named_id).worker_id == by_name[named]
        assert RunStore().read_metadata(run_ids[named_id])["mu_bound"] == pytest.approx(2.7)
        # The ledger is the same one the embedded backend uses: any client sees the Dask jobs.
        other = Ledger()
        assert other.get(any_id)["status"] == other.get(named_id)["status"] == "done"
        other.close()

        # Cancel reaches the task through a Dask Event; the solve stops and keeps its incumbent.
        long_id = dask_client.submit(config(*LONG, "mu_bound=3"))
        wait_for(lambda: solve_point(dask_client, long_id), 180, "the Dask solve to report an incumbent")
        solver_pid = dask_client.status(long_id).solver_pid
        assert dask_client.cancel(long_id).status == "cancelling"
        rec = wait_for(lambda: (r := dask_client.status(long_id)).status == "cancelled" and r, 15,
                       "the Dask cancel to land")
        assert rec.run_id and RunStore().exists(rec.run_id)
        assert not pid_alive(solver_pid)
        dask_client.close()
    print(f"\nDask: two workers up, two jobs done, one cancelled, cluster down in {time.monotonic() - t0:.1f} s")


def test_dask_worker_without_the_apps_data_directory_sends_results_back(data_root, portpy_dir, tmp_path):
    """A Dask worker on a machine that cannot see the app's store (its own data directory, holding the case):
    the optimisation's run folder and a full-resolution dose come back through Dask into the app's store."""
    from distributed import LocalCluster

    from vmat_core import runner
    from vmat_core.jobs import store_id

    elsewhere = tmp_path / "worker-data"
    elsewhere.mkdir()
    (elsewhere / "portpy").symlink_to(portpy_dir, target_is_directory=True)
    app_runs = RunStore()
    earlier_run = next(r.run_id for r in get_job_client().list_jobs(status="done") if r.kind == "optimise")
    assert app_runs.exists(earlier_run) and runner.read_full_dose(earlier_run) is None
    # Same machine, so the worker could see the app's folder: SHIP_RUNS makes it behave as another machine would.
    env = {"VMAT_DATA_DIR": str(elsewhere), "VMAT_DASK_SHIP_RUNS": "1"}
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None, env=env) as cluster:
        dask_client = get_job_client(scheduler=cluster.scheduler_address)
        job_id = dask_client.submit(config(*TINY, "solver.time_limit_s=26", "label=from elsewhere"))
        run_id = dask_client.result(job_id, timeout_s=180)
        assert app_runs.exists(run_id), "the run folder came back into the app's store"
        assert app_runs.read_metadata(run_id)["label"] == "from elsewhere"
        worker_store = RunStore(elsewhere / "runs")
        assert worker_store.exists(run_id) and worker_store.root != app_runs.root
        assert app_runs.read_arrays(run_id, ["fluence"])["fluence"].tolist() == \
            worker_store.read_arrays(run_id, ["fluence"])["fluence"].tolist()
        assert app_runs.list_runs(where="label = 'from elsewhere'")["run_id"].tolist() == [run_id]

        # A dose job on a run the worker has never seen: the run goes with the task, the dose comes back.
        assert not worker_store.exists(earlier_run)
        dose_id = dask_client.submit_dose(earlier_run)
        rec = wait_for(lambda: (r := dask_client.status(dose_id)).status in ("done", "failed") and r, 180,
                       "the Dask dose job")
        assert rec.status == "done", rec.error
        full = runner.read_full_dose(earlier_run)
        assert full is not None and full["dose_3d_gy"].ndim == 3
        assert worker_store.exists(earlier_run)
        dask_client.close()
    assert (data_root / "jobs" / "store_id").read_text() == store_id()


def test_lease_gives_each_job_to_exactly_one_worker(tmp_path):
    """Four processes lease from one queue at once: every job is taken once, pinned jobs only by their worker."""
    import subprocess
    import sys

    ledger = Ledger(tmp_path)
    ids = []
    for i in range(40):
        rec = JobRecord(job_id=f"j-{i:03d}", case_id="c", config_hash=str(i), config={}, created_at=time.time(),
                        target_worker="w2" if i % 10 == 0 else None)
        ids.append(ledger.create(rec, f"optimise:{i}", enqueue=True)[0])
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from vmat_core.jobs import Ledger\n"
        "led = Ledger(Path(sys.argv[1])); got = []\n"
        "while (d := led.lease(sys.argv[2], 'h')) is not None:\n"
        "    got.append(d['job_id'])\n"
        "print(json.dumps(got))\n"
    )
    src = str(Path(__file__).resolve().parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"w{k}"], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": src}, cwd=src) for k in range(4)]
    leased = {f"w{k}": json.loads(p.communicate(timeout=60)[0]) for k, p in enumerate(procs)}
    everything = [j for got in leased.values() for j in got]
    assert sorted(everything) == ids  # each exactly once
    assert {f"j-{i:03d}" for i in range(0, 40, 10)} <= set(leased["w2"])
    assert ledger.queued_ids() == []
    assert all(ledger.get(j)["status"] == "running" for j in ids)
    ledger.close()


def test_stale_heartbeat_marks_a_job_lost_with_the_reason(tmp_path):
    """A worker on another machine cannot be checked by pid: only its missed heartbeats tell it is gone."""
    ledger = Ledger(tmp_path)
    now = time.time()
    for job_id, worker, age_s in (("j-stale", "far-1", 11.0), ("j-fresh", "far-2", 3.0)):
        ledger.put_worker({"id": worker, "host": "another-host", "pid": 1, "state": "busy", "current_job": job_id,
                           "last_heartbeat": now - age_s})
        ledger.create(JobRecord(job_id=job_id, case_id="c", config_hash=job_id, config={}, created_at=now - 60),
                      job_id, enqueue=True)
        assert ledger.lease(worker, "another-host")["job_id"] == job_id
        ledger.update(job_id, lambda d, a=age_s: d | {"last_heartbeat": now - a})
    assert ledger.reap(now) == ["j-stale"]
    stale = ledger.record("j-stale")
    assert stale.status == "lost" and stale.finished_at is not None
    assert "worker far-1 on another-host stopped heartbeating at" in stale.error
    assert ledger.record("j-fresh").status == "running"
    assert ledger.get_worker("far-1")["state"] == "dead"
    assert ledger.active_ids() == ["j-fresh"]
    ledger.close()
