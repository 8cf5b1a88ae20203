"""The run store with real files and real DuckDB: round trips, atomic writes, id and path safety, queries."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from vmat_core import store as store_mod
from vmat_core.store import (
    RUN_ID_RE,
    ArtifactNotFound,
    InvalidName,
    InvalidRunId,
    QueryError,
    RunExists,
    RunNotFound,
    RunStore,
    new_run_id,
    validate_where,
)

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 26, 17, 15, 2, tzinfo=UTC)


def _write(store: RunStore, i: int, **metadata) -> str:
    created_at = metadata.pop("created_at", T0 + timedelta(minutes=i))
    run_id = new_run_id(f"cfg-{i}", created_at)
    store.write_run(run_id, config={"i": i}, metadata={"created_at": created_at, **metadata})
    return run_id


# ------------------------------------------------------------------------------------------- write and read


def test_every_artifact_kind_round_trips(runs_root: Path) -> None:
    store = RunStore(runs_root)
    run_id = new_run_id("abc", T0)
    dose = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)
    dvh = pd.DataFrame({"dose_gy": [0.0, 30.0, 60.0], "volume_pct": [100.0, 55.5, np.nan]})
    config = {"case_id": "Lung_Synth_Patient_1", "beam_ids": [0, 10, 20], "weights": {"CORD": 1.5}}
    path = store.write_run(
        run_id,
        config=config,
        metadata={
            "created_at": T0.astimezone(timezone(timedelta(hours=2))),
            "case_id": "Lung_Synth_Patient_1",
            "beam_ids": np.array([0, 10, 20]),
            "gap": float("nan"),
            "objective": None,
            "PTV_D95_gy": np.float64(59.1),
            "criteria_passed": np.int64(9),
            "optimal": True,
        },
        arrays={"dose_gy": dose, "intensity": np.arange(7)},
        tables={"dvh": dvh},
        texts={"solver": "HiGHS 1.16\nobjective 12.5 ✓\n"},
        json_files={"timings": {"t_solve_s": 1.25, "phases": ["load", "solve"]}},
    )
    assert path == runs_root.resolve() / run_id
    assert sorted(p.name for p in path.iterdir()) == store.list_artifacts(run_id) == [
        "config.json", "dose.npz", "dvh.parquet", "run.parquet", "solver.log", "timings.json"]
    assert store.read_config(run_id) == config
    md = store.read_metadata(run_id)
    assert md["run_id"] == run_id and md["schema_version"] == store_mod.SCHEMA_VERSION
    assert md["created_at"] == T0 and md["created_at"].utcoffset() == timedelta(0)
    assert md["beam_ids"] == [0, 10, 20]
    assert np.isnan(md["gap"]) and md["objective"] is None
    assert md["PTV_D95_gy"] == 59.1 and md["criteria_passed"] == 9 and md["optimal"] is True
    arrays = store.read_arrays(run_id)
    assert arrays["dose_gy"].dtype == np.float32 and np.array_equal(arrays["dose_gy"], dose)
    assert list(store.read_arrays(run_id, ["intensity"])) == ["intensity"]
    pd.testing.assert_frame_equal(store.read_table(run_id, "dvh"), dvh)
    assert store.read_text(run_id, "solver") == "HiGHS 1.16\nobjective 12.5 ✓\n"
    assert store.read_json(run_id, "timings") == {"t_solve_s": 1.25, "phases": ["load", "solve"]}

    listed = store.list_runs()
    assert listed["run_id"].tolist() == [run_id]
    assert listed["beam_ids"].iloc[0] == [0, 10, 20]
    assert str(listed["created_at"].dt.tz) == "UTC" and listed["created_at"].iloc[0] == pd.Timestamp(T0)

    with pytest.raises(ArtifactNotFound, match="no array nope; available: dose_gy, intensity"):
        store.read_arrays(run_id, ["nope"])
    with pytest.raises(ArtifactNotFound):
        store.read_table(run_id, "criteria")


def test_a_run_moves_between_stores_whole(runs_root: Path, tmp_path: Path) -> None:
    """export_run / import_run: what a Dask worker without the app's data directory sends back."""
    here = RunStore(runs_root)
    run_id = _write(here, 7, objective=12.5)
    files = here.export_run(run_id)
    assert set(files) == set(here.list_artifacts(run_id)) and "config.json" in files and "run.parquet" in files

    there = RunStore(tmp_path / "other-runs")
    path = there.import_run(run_id, files)
    assert path == there.root / run_id and there.exists(run_id)
    assert there.read_metadata(run_id) == here.read_metadata(run_id)
    assert there.read_config(run_id) == here.read_config(run_id)
    assert there.list_runs(where="objective = 12.5")["run_id"].tolist() == [run_id]
    with pytest.raises(RunExists):
        there.import_run(run_id, files)

    # Bad payloads leave nothing behind, visible or hidden.
    other = new_run_id("abc")
    for bad, message in [
        ({**files, "../escape": b"x"}, "not a file name"),
        ({k: v for k, v in files.items() if k != "run.parquet"}, "needs run.parquet"),
        ({**files, "config.json": b"{not json"}, "not a readable run"),
        (files, "not a readable run"),  # its metadata names another run
        ({}, "non-empty"),
    ]:
        with pytest.raises((ValueError, InvalidName), match=message):
            there.import_run(other, bad)
    assert sorted(p.name for p in there.root.iterdir()) == [run_id]


def test_new_run_ids_are_strict_unique_and_carry_the_utc_time() -> None:
    ids = {new_run_id("same-config", T0) for _ in range(2000)}
    assert len(ids) == 2000
    assert all(RUN_ID_RE.fullmatch(i) and i.startswith("20261126T171502Z-") for i in ids)
    assert new_run_id("x", T0.astimezone(timezone(timedelta(hours=-5)))).startswith("20261126T171502Z-")
    with pytest.raises(ValueError, match="naive datetime"):
        new_run_id("x", datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="config_hash"):
        new_run_id("")


def test_an_existing_run_is_never_overwritten(runs_root: Path) -> None:
    store = RunStore(runs_root)
    run_id = _write(store, 1, gap=0.5)
    with pytest.raises(RunExists, match="already exists"):
        store.write_run(run_id, config={"other": True}, metadata={"gap": 0.0})
    assert store.read_config(run_id) == {"i": 1}
    assert store.read_metadata(run_id)["gap"] == 0.5
    assert [p.name for p in runs_root.iterdir()] == [run_id]  # no temporary folder left behind


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tables": {"../x": pd.DataFrame({"a": [1]})}}, "table name"),
        ({"tables": {"run": pd.DataFrame({"a": [1]})}}, "reserved"),
        ({"tables": {"dvh": [1, 2]}}, "expected a pandas DataFrame"),
        ({"arrays": {"a/b": np.zeros(2)}}, "array name"),
        ({"arrays": {"allow_pickle": np.zeros(2)}}, "reserved"),
        ({"arrays": {"obj": np.array([{}, None], dtype=object)}}, "object arrays"),
        ({"texts": {"solver.log": "x"}}, "pass 'solver'"),
        ({"json_files": {"config": {}}}, "reserved"),
        ({"json_files": {"bad": {"x": float("nan")}}}, "cannot be written as JSON"),
        ({"metadata": {"bad key": 1}}, "metadata column"),
        ({"metadata": {"Gap": 1, "gap": 2}}, "names ignore case"),
        ({"metadata": {"weights": {"CORD": 1}}}, "nested dicts"),
        ({"metadata": {"created_at": datetime(2026, 1, 1)}}, "naive datetime"),
        ({"metadata": {"beam_ids": [1, "a"]}}, "a list must hold"),
        ({"metadata": {"run_id": "20000101T000000Z-0000000000"}}, "set by the store"),
    ],
)
def test_bad_payloads_are_refused_before_anything_is_written(runs_root: Path, kwargs: dict, message: str) -> None:
    store = RunStore(runs_root)
    args = {"config": {}, "metadata": {}, **kwargs}
    with pytest.raises((InvalidName, ValueError, TypeError), match=message):
        store.write_run(new_run_id("x", T0), **args)
    assert list(runs_root.iterdir()) == []


# ---------------------------------------------------------------------------------------------- atomicity


def test_a_writer_killed_mid_write_leaves_no_visible_run(runs_root: Path) -> None:
    store = RunStore(runs_root)
    kept = _write(store, 0, case_id="before")
    run_id = new_run_id("killed", T0)
    code = (
        "import numpy as np\n"
        "from vmat_core.store import RunStore\n"
        "big = np.random.default_rng(0).random(16_000_000)\n"  # incompressible, so the write takes seconds
        f"RunStore({str(runs_root)!r}).write_run({run_id!r}, config={{}}, metadata={{'case_id': 'killed'}},"
        " arrays={'big': big})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    tmp_dir = None
    while time.monotonic() < deadline and proc.poll() is None:
        tmp_dirs = [p for p in runs_root.iterdir() if p.name.startswith(".tmp-") and (p / "dose.npz").exists()]
        if tmp_dirs:
            tmp_dir = tmp_dirs[0]
            break
        time.sleep(0.01)
    assert tmp_dir is not None, proc.stderr.read().decode() if proc.poll() is not None else "writer never started"
    assert proc.poll() is None, "the writer finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stderr.close()

    # The half-written folder holds run.parquet, yet no read sees it.
    assert (tmp_dir / "run.parquet").is_file()
    assert not store.exists(run_id)
    with pytest.raises(RunNotFound):
        store.run_path(run_id)
    assert store.list_runs()["run_id"].tolist() == [kept]
    assert store.count_runs("case_id = 'killed'") == 0
    assert store.reindex() == {"indexed": 1, "skipped": []}

    assert store.cleanup_stale_temp(older_than_s=3600) == []  # too recent: maybe a writer still at work
    assert store.cleanup_stale_temp(older_than_s=0) == [tmp_dir.name]
    assert not tmp_dir.exists()
    store.write_run(run_id, config={}, metadata={"case_id": "retried"})
    assert store.count_runs("case_id = 'retried'") == 1


def test_temporary_and_deleted_folders_are_invisible(runs_root: Path) -> None:
    store = RunStore(runs_root)
    run_id = _write(store, 1, case_id="a")
    # A copy of a complete run under a temporary name (as a crashed rename would leave it) is not a run.
    shutil.copytree(runs_root / run_id, runs_root / f".tmp-{run_id}-123-abcdef")
    shutil.copytree(runs_root / run_id, runs_root / f".del-{run_id}-123-abcdef")
    assert store.list_runs()["run_id"].tolist() == [run_id]
    assert store.count_runs() == 1

    store.delete_run(run_id)
    assert not store.exists(run_id)
    assert store.count_runs() == 0 and store.list_runs().empty
    with pytest.raises(RunNotFound):
        store.delete_run(run_id)
    old = time.time() - 7200
    for p in runs_root.iterdir():
        for f in p.iterdir():
            os.utime(f, (old, old))
        os.utime(p, (old, old))
    assert len(store.cleanup_stale_temp()) == 2
    assert list(runs_root.iterdir()) == []


# --------------------------------------------------------------------------------------- ids and paths

BAD_RUN_IDS = [
    "", "..", ".", "../x", "/etc/passwd", "..%2F..%2Fetc", "20261126T171502Z-3fa9c01b2e%2F..",
    "20261126T171502Z-3fa9c01b2e/..", "20261126T171502Z-3fa9c01b2e/../x", "20261126T171502Z-3FA9C01B2E",
    "20261126T171502Z-3fa9c01b2e\n", " 20261126T171502Z-3fa9c01b2e", "20261126T171502-3fa9c01b2e",
    "20261126T171502Z-3fa9c01b2", ".tmp-20261126T171502Z-3fa9c01b2e-1", "_index", None, 20261126,
]


@pytest.mark.parametrize("bad", BAD_RUN_IDS)
def test_malformed_run_ids_are_refused_everywhere(runs_root: Path, bad) -> None:
    store = RunStore(runs_root)
    for call in (
        lambda: store.run_path(bad),
        lambda: store.read_metadata(bad),
        lambda: store.read_arrays(bad),
        lambda: store.artifact_path(bad, "config.json"),
        lambda: store.delete_run(bad),
        lambda: store.write_run(bad, config={}, metadata={}),
    ):
        with pytest.raises(InvalidRunId, match="run_id"):
            call()
    assert store.exists(bad) is False
    assert list(runs_root.iterdir()) == []


def test_unknown_and_symlinked_runs_are_not_found(runs_root: Path, tmp_path: Path) -> None:
    store = RunStore(runs_root)
    missing = new_run_id("missing", T0)
    with pytest.raises(RunNotFound, match=f"no run {missing}"):
        store.read_config(missing)
    assert str(RunNotFound("plain message")) == "plain message"

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    linked = new_run_id("linked", T0)
    (runs_root / linked).symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunNotFound):
        store.run_path(linked)
    assert store.list_runs().empty


@pytest.mark.parametrize(
    "bad",
    ["../config.json", "..", ".", "", "/etc/passwd", "a/b", "dose.npz/..", "..%2Fx", ".hidden", "a\\b",
     "config.json\x00", "x" * 200, None],
)
def test_artifact_path_refuses_names_that_could_escape(runs_root: Path, bad) -> None:
    store = RunStore(runs_root)
    run_id = _write(store, 1)
    with pytest.raises(InvalidName, match="filename"):
        store.artifact_path(run_id, bad)


def test_artifact_path_serves_only_regular_files_inside_the_run(runs_root: Path, tmp_path: Path) -> None:
    store = RunStore(runs_root)
    run_id = _write(store, 1)
    assert store.artifact_path(run_id, "config.json") == runs_root.resolve() / run_id / "config.json"
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (runs_root / run_id / "leak.txt").symlink_to(secret)
    with pytest.raises(InvalidName, match="symbolic link"):
        store.artifact_path(run_id, "leak.txt")
    assert "leak.txt" not in store.list_artifacts(run_id)
    with pytest.raises(ArtifactNotFound):
        store.artifact_path(run_id, "absent.log")


# ------------------------------------------------------------------------------------------------ queries


@pytest.fixture()
def six_runs(runs_root: Path) -> tuple[RunStore, list[str]]:
    store = RunStore(runs_root)
    ids = [
        _write(store, i, case_id=case, gap=gap, solver=solver, beam_ids=[0, 10 * i])
        for i, (case, gap, solver) in enumerate(
            [("Lung_Synth_Patient_1", 0.05, "HIGHS"), ("Lung_Synth_Patient_1", 0.20, "SCIP"),
             ("Lung_Synth_Patient_2", 0.01, "HIGHS"), ("Lung_Synth_Patient_1", 0.00, "HIGHS"),
             ("Lung_Synth_Patient_1", 0.15, "SCIP"), ("Lung_Synth_Patient_2", 0.30, "SCIP")]
        )
    ]
    return store, ids


def test_list_runs_filters_orders_and_pages(six_runs) -> None:
    store, ids = six_runs
    assert store.list_runs()["run_id"].tolist() == ids[::-1]  # newest first by default
    where = "case_id = 'Lung_Synth_Patient_1' AND gap < 0.1"
    assert validate_where(where) == where
    assert store.list_runs(where)["run_id"].tolist() == [ids[3], ids[0]]
    assert store.count_runs(where) == 2
    by_gap = store.list_runs(order_by="gap ASC")["run_id"].tolist()
    assert by_gap == [ids[3], ids[2], ids[0], ids[4], ids[1], ids[5]]
    assert store.list_runs(order_by="gap", limit=2, offset=2)["run_id"].tolist() == by_gap[2:4]
    assert store.list_runs(order_by="gap", offset=5)["run_id"].tolist() == by_gap[5:]
    assert store.list_runs(order_by="solver DESC, gap ASC", limit=1)["run_id"].tolist() == [ids[4]]
    df = store.list_runs("solver = ? AND gap <= ?", params=["HIGHS", 0.01], columns=["run_id", "gap"])
    assert list(df.columns) == ["run_id", "gap"] and df["run_id"].tolist() == [ids[3], ids[2]]
    assert store.count_runs("list_contains(beam_ids, 40)") == 1
    assert store.count_runs("year(created_at) = 2026 AND extract(month FROM created_at) = 11") == 6
    assert store.count_runs("created_at >= ?", params=[T0 + timedelta(minutes=4)]) == 2
    # Strings may hold anything, including what would be refused as SQL.
    assert store.count_runs("case_id LIKE '%read_csv(''/etc/passwd''); DROP TABLE x --%'") == 0


def test_columns_added_by_later_runs_are_kept(runs_root: Path) -> None:
    store = RunStore(runs_root)
    older = _write(store, 1, w_CORD_quadratic=1, status="optimal")
    newer = _write(store, 2, w_CORD_quadratic=2.5, w_HEART_quadratic=10.0, status=3)
    df = store.list_runs(order_by="created_at ASC")
    assert df["run_id"].tolist() == [older, newer]
    assert pd.isna(df["w_HEART_quadratic"].iloc[0]) and df["w_HEART_quadratic"].iloc[1] == 10.0
    assert df["w_CORD_quadratic"].tolist() == [1.0, 2.5]  # int in one run, float in the other: widened
    assert df["status"].tolist() == ["optimal", "3"]  # conflicting types are kept as text, never dropped
    assert store.list_runs("w_HEART_quadratic IS NULL")["run_id"].tolist() == [older]
    assert store.columns()["w_HEART_quadratic"] == "DOUBLE"


def test_an_empty_store_answers_with_nothing(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "never-created")
    assert store.list_runs().empty
    assert list(store.list_runs("gap < 1", columns=["run_id", "gap"]).columns) == ["run_id", "gap"]
    assert store.count_runs("gap < 1") == 0
    assert store.reindex() == {"indexed": 0, "skipped": []}
    assert not store.root.exists()  # reads never create the root
    with pytest.raises(QueryError):
        store.list_runs("1=1; DROP TABLE runs")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"where": "no_such_column > 1"}, "no_such_column"),
        ({"where": "gap <"}, "syntax error"),
        ({"where": "gap < 0.1)"}, "syntax error"),
        ({"where": "count(*) > 1"}, "aggregate"),
        ({"order_by": "gap; DROP TABLE runs"}, "order_by"),
        ({"order_by": "length(case_id)"}, "order_by"),
        ({"columns": ["gap", "1+1"]}, "columns"),
        ({"columns": ["nope"]}, "nope"),
        ({"limit": -1}, "limit"),
        ({"offset": "5"}, "offset"),
    ],
)
def test_bad_queries_raise_query_error(six_runs, kwargs: dict, message: str) -> None:
    store, _ = six_runs
    with pytest.raises(QueryError, match=message):
        store.list_runs(**kwargs)


@pytest.mark.parametrize(
    "sql",
    [
        "1=1; DROP TABLE x",
        "gap < 1; COPY runs TO '/tmp/x.csv'",
        "COPY runs TO '/tmp/x.csv'",
        "ATTACH '/tmp/x.db' AS x",
        "read_csv('/etc/passwd') IS NOT NULL",
        "\"read_csv\"('/etc/passwd') IS NOT NULL",
        "getenv('HOME') = '/root'",
        "current_setting('enable_external_access') = false",
        "gap < 1 -- trailing comment",
        "gap < 1 /* comment */",
        "case_id IN (SELECT case_id FROM runs)",
        "case_id IN (FROM runs)",  # no refused word: the parse tree shows the subquery
        "EXISTS (FROM runs WHERE gap > 1)",
        "case_id IN (FROM read_csv('/etc/passwd'))",
        "EXISTS (FROM glob('/etc/*'))",
        "len((FROM read_text('/etc/passwd'))) > 0",
        "gap < 1) UNION ALL SELECT * FROM runs WHERE (1=1",
        "gap < 1) LIMIT (1",
        "gap < 1) GROUP BY (gap",
        "query('SELECT 1') IS NULL",
        "list_sum(range(1000000000)) > 0",
        "length(repeat('x', 1000000000)) > 0",
        "E'\\'' = 'x'",
        "$$x$$ = 'x'",
        "SET enable_external_access = true",
        "'unterminated",
        "",
        "   ",
    ],
)
def test_validate_where_refuses_anything_but_one_expression(sql: str) -> None:
    with pytest.raises(QueryError, match="where"):
        validate_where(sql)


def test_queries_run_without_file_access_even_past_the_filter_check() -> None:
    # The second guard: the connection queries run on cannot reach files or unlock its settings.
    cur = store_mod._cursor()
    try:
        with pytest.raises(duckdb.Error, match="disabled"):
            cur.execute("SELECT * FROM read_csv('/etc/passwd')")
        with pytest.raises(duckdb.Error, match="locked"):
            cur.execute("SET enable_external_access = true")
    finally:
        cur.close()


# --------------------------------------------------------------------------------------------- the index


def test_index_is_a_cache_of_the_folders(runs_root: Path) -> None:
    store = RunStore(runs_root)
    ids = [_write(store, i, gap=i / 100) for i in range(store_mod.COMPACT_AFTER + 6)]
    assert store.count_runs() == len(ids)
    index_files = sorted((runs_root / "_index").glob("runs-*.parquet"))
    assert len(index_files) == 1  # enough unindexed runs: the query compacted them
    extra = _write(store, 999, gap=9.99, w_GTV_quadratic=3.0)
    store.delete_run(ids[0])
    df = store.list_runs(order_by="gap DESC", limit=2)
    assert df["run_id"].tolist() == [extra, ids[-1]]
    assert store.count_runs() == len(ids)  # one added, one deleted
    assert store.count_runs("w_GTV_quadratic = 3") == 1

    # A directory listing is reused only while the root's mtime is unchanged; a new run changes it.
    past = time.time() - 60
    os.utime(runs_root, (past, past))
    assert store.count_runs() == len(ids)
    _write(store, 1000, gap=5.5)
    assert store.count_runs() == len(ids) + 1

    # Another process (modelled by forgetting this one's caches) reads the index back and sees the same rows.
    store_mod._CACHES.clear()
    assert store.count_runs() == len(ids) + 1
    # A damaged index is only a cache: queries still answer from the folders.
    for f in (runs_root / "_index").glob("runs-*.parquet"):
        f.write_bytes(b"not parquet")
    store_mod._CACHES.clear()
    assert store.count_runs() == len(ids) + 1
    assert store.count_runs("gap = 5.5") == 1


def test_reindex_skips_corrupt_folders_and_reports_them(runs_root: Path, caplog) -> None:
    store = RunStore(runs_root)
    good = [_write(store, i, gap=0.1 * i) for i in range(3)]
    broken = _write(store, 3)
    (runs_root / broken / "run.parquet").write_bytes(b"PAR1 garbage")
    emptied = _write(store, 4)
    (runs_root / emptied / "run.parquet").unlink()
    report = store.reindex()
    assert report["indexed"] == 3
    reasons = dict(report["skipped"])
    assert set(reasons) == {broken, emptied}
    assert "unreadable" in reasons[broken] and "missing" in reasons[emptied]
    assert sorted(store.list_runs()["run_id"]) == sorted(good)
    store_mod._CACHES.clear()
    assert sorted(store.list_runs()["run_id"]) == sorted(good)
    assert broken in caplog.text


# ------------------------------------------------------------------------------------------ 10 000 runs

N_BIG = 10_000


def _big_gap(i: int) -> float:
    return (i * 7919 % 1000) / 5000  # 0 … 0.1998, deterministic and well mixed


def _write_big_batch(root: str, start: int, stop: int) -> list[tuple[str, int]]:
    # Without fsync: durability is not what this test is about, and four flushes per run on a shared disk
    # would make generating 10 000 runs take minutes. Everything else is the real writer.
    store = RunStore(Path(root), fsync=False)
    out = []
    for i in range(start, stop):
        created_at = T0 + timedelta(seconds=i)
        run_id = new_run_id(f"big-{i}", created_at)
        metadata = {
            "created_at": created_at,
            "case_id": f"Lung_Synth_Patient_{1 + i % 2}",
            "beam_ids": [i % 72, (i + 36) % 72],
            "solver": ("HIGHS", "SCIP", "MOSEK")[i % 3],
            "gap": _big_gap(i),
            "objective": 100.0 - i / 100,
            "PTV_D95_gy": 55 + (i % 60) / 10,
            "w_CORD_quadratic": 1.0,
        }
        if i % 10 == 9:
            metadata["w_GTV_quadratic"] = float(i)
        store.write_run(run_id, config={"i": i}, metadata=metadata)
        out.append((run_id, i))
    return out


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> tuple[RunStore, dict[str, int]]:
    root = tmp_path_factory.mktemp("big") / "runs"
    bounds = np.linspace(0, N_BIG, 9).astype(int)
    # spawn: the test process may already hold DuckDB and Arrow threads, which fork() would copy half-alive.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        batches = pool.map(_write_big_batch, [str(root)] * 8, bounds[:-1], bounds[1:])
        ids = {run_id: i for batch in batches for run_id, i in batch}
    assert len(ids) == N_BIG
    return RunStore(root), ids


def test_ten_thousand_runs_give_the_right_page_and_count(big_store) -> None:
    store, ids = big_store
    where = "case_id = 'Lung_Synth_Patient_1' AND gap < 0.05 AND solver = 'HIGHS'"
    expected = sorted(
        (r for r, i in ids.items() if i % 2 == 0 and _big_gap(i) < 0.05 and i % 3 == 0),
        key=lambda r: (_big_gap(ids[r]), r),
    )
    assert store.count_runs(where) == len(expected) > 100
    page1 = store.list_runs(where, order_by="gap ASC", limit=50)
    page2 = store.list_runs(where, order_by="gap ASC", limit=50, offset=50)
    assert page1["run_id"].tolist() == expected[:50]
    assert page2["run_id"].tolist() == expected[50:100]
    newest = store.list_runs(limit=3)["run_id"].tolist()
    assert newest == sorted(ids, key=ids.get, reverse=True)[:3]
    assert store.count_runs("w_GTV_quadratic IS NOT NULL") == N_BIG // 10
    scatter = store.list_runs(columns=["objective", "PTV_D95_gy"])
    assert scatter.shape == (N_BIG, 2) and scatter["objective"].notna().all()

    started = time.perf_counter()
    for _ in range(5):
        store.list_runs(where, limit=50)
    warm_s = (time.perf_counter() - started) / 5
    # A loose guard for a shared machine; bench/bench_store.py measures the real figure.
    assert warm_s < 1.0, f"a warm filtered page over {N_BIG} runs took {warm_s:.2f} s"
    assert json.loads((store.root / newest[0] / "config.json").read_text())["i"] == N_BIG - 1


def test_a_slow_filter_is_stopped(big_store) -> None:
    store, _ = big_store
    quick = RunStore(store.root, query_timeout_s=0.2)
    heavy = f"levenshtein(case_id || '{'x' * 400}', '{'y' * 400}') >= 0"  # seconds over 10 000 runs
    started = time.monotonic()
    with pytest.raises(QueryError, match="stopped after 0.2 s"):
        quick.count_runs(heavy)
    assert time.monotonic() - started < 5
    assert quick.count_runs("gap < 0.05") > 0  # the store still answers afterwards


def test_concurrent_readers_and_a_writer(runs_root: Path) -> None:
    store = RunStore(runs_root)
    for i in range(5):
        _write(store, i, gap=0.01 * i)

    def read() -> list[int]:
        counts = []
        for _ in range(15):
            counts.append(store.count_runs("gap >= 0"))
            assert len(store.list_runs("gap >= ?", params=[0.0], limit=3)) == 3
        return counts

    with ThreadPoolExecutor(max_workers=3) as pool:
        readers = [pool.submit(read) for _ in range(3)]
        for i in range(5, 20):
            _write(store, i, gap=0.01 * i)
        seen = [f.result() for f in readers]  # re-raises anything a reader hit
    for counts in seen:
        assert counts == sorted(counts) and 5 <= counts[0] and counts[-1] <= 20
    assert store.count_runs() == 20
