"""The History page over 10 000 stored runs (DuckDB pages, header filters, the SQL box and its guard, exports,
the parameter-space plot) and ``vmat-planner reindex`` (corrupt folders, schema-0 migration). No server: the
page's params and widgets are driven directly."""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import pytest

from app.history_page import (
    PAGE_SIZE,
    HistoryPage,
    nearest_run,
    parameter_space_plot,
    proven_mask,
)
from vmat_core import migrate
from vmat_core import store as store_mod
from vmat_core.store import RunStore, new_run_id

N_RUNS = 10_000
T0 = datetime(2026, 3, 1, tzinfo=UTC)
SOLVERS = ("HIGHS", "SCIP", "MOSEK")
CASES = ("Lung_Synth_Patient_1", "Lung_Synth_Patient_2")


def synthetic_metadata(i: int) -> dict:
    """A metadata row shaped like the runner's, every value a deterministic function of ``i``."""
    gap = (i * 7919 % 1000) / 5000  # 0 … 0.1998, well mixed
    objective = 1000.0 + (i * 37 % 5000)
    n_beams = 3 + i % 6
    md = {
        "created_at": T0 + timedelta(minutes=i),
        "case_id": CASES[i % 2],
        "beam_ids": [(i + 11 * k) % 72 for k in range(n_beams)],
        "n_beams": n_beams,
        "voxel_ds_x": 6 + 6 * (i % 2),
        "voxel_ds_y": 6 + 6 * (i % 2),
        "voxel_ds_z": 1 + i % 2,
        "beamlet_ds": 6,
        "solver": SOLVERS[i % 3],
        "time_limit_s": float(60 * (1 + i % 4)),
        "mip_gap_requested": 1e-4,
        "status": "optimal" if gap < 0.002 else "time_limit",
        "objective": objective,
        "bound": objective * (1 - gap),
        "gap": gap,
        "solve_time_s": float(i % 600) + 0.5,
        "PTV_d95_gy": 55 + (i % 60) / 10,
        "PTV_v100_pct": 80 + (i * 3 % 200) / 10,
        "CORD_max_gy": 30 + (i * 13 % 200) / 10,
        "ESOPHAGUS_mean_gy": 10 + (i * 17 % 150) / 10,
        "HEART_mean_gy": 5 + (i * 19 % 100) / 10,
        "criteria_passed": 10 + i % 7,
        "criteria_failed": i % 4,
        "w_CORD_quadratic": float(1 + i % 5),
        "w_HEART_quadratic": float(10 * (1 + i % 3)),
        "w_PTV_quadratic_underdose": 100000.0,
    }
    if i % 10 == 9:  # a structure only later configs weight: a column most runs lack
        md["w_GTV_quadratic"] = float(i % 7)
    return md


def _write_batch(root: str, start: int, stop: int) -> list[tuple[str, int]]:
    # Without fsync: durability is not under test here; everything else is the real writer.
    store = RunStore(Path(root), fsync=False)
    out = []
    for i in range(start, stop):
        md = synthetic_metadata(i)
        run_id = new_run_id(f"history-{i}", md["created_at"])
        store.write_run(run_id, config={"i": i}, metadata=md)
        out.append((run_id, i))
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[RunStore, pd.DataFrame]:
    """10 000 runs in a store, and the same rows as a DataFrame to compute expected answers with pandas."""
    root = tmp_path_factory.mktemp("history") / "runs"
    bounds = np.linspace(0, N_RUNS, 9).astype(int)
    # spawn: this process may already run DuckDB/Arrow threads, which fork() would copy half-alive.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        ids = [pair for batch in pool.map(_write_batch, [str(root)] * 8, bounds[:-1], bounds[1:]) for pair in batch]
    rows = []
    for run_id, i in ids:
        md = synthetic_metadata(i)
        md["run_id"] = run_id
        rows.append(md)
    expected = pd.DataFrame(rows)
    store = RunStore(root)
    assert store.count_runs() == N_RUNS  # also builds the store's index once for the module
    return store, expected


@pytest.fixture()
def history(big) -> HistoryPage:
    store, _ = big
    return HistoryPage(store=store)


def _html_panes(page: HistoryPage) -> list[str]:
    layout = page.__panel__()
    return [str(p.object) for p in layout.select(pn.pane.HTML)]


# ------------------------------------------------------------------------------------------- the grid


def test_first_page_is_the_newest_fifty_runs(history, big) -> None:
    _, expected = big
    grid = history.grid
    assert grid.pagination == "remote" and grid.page_size == PAGE_SIZE
    assert len(grid.value) == PAGE_SIZE
    assert grid.row_count == history.matching_runs == history.total_runs == N_RUNS
    assert grid.param.page.bounds == (1, N_RUNS // PAGE_SIZE)
    newest = expected.sort_values("created_at", ascending=False)["run_id"].head(PAGE_SIZE).tolist()
    assert grid.value["run_id"].tolist() == newest
    # the shown columns: the runner's, the key metrics, criteria counts and one per objective weight
    for field in ("case_id", "created", "beams", "voxel_ds", "solver", "time_limit_s", "status", "objective",
                  "gap_pct", "solve_time_s", "PTV_d95_gy", "PTV_v100_pct", "CORD_max_gy", "ESOPHAGUS_mean_gy",
                  "HEART_mean_gy", "criteria_passed", "criteria_failed", "w_CORD_quadratic", "w_GTV_quadratic",
                  "w_PTV_quadratic_underdose", "run_id"):
        assert field in grid.value.columns, field
    first = expected.set_index("run_id").loc[newest[0]]
    row = grid.value.iloc[0]
    assert row["gap_pct"] == pytest.approx(first["gap"] * 100)
    assert row["beams"] == ",".join(map(str, first["beam_ids"]))
    assert row["voxel_ds"] == f"{first['voxel_ds_x']}×{first['voxel_ds_y']}×{first['voxel_ds_z']}"
    assert row["created"] == first["created_at"].strftime("%Y-%m-%d %H:%M")
    assert grid.header_filters["gap_pct"]["func"] == "<=" and grid.header_filters["PTV_d95_gy"]["func"] == ">="


def test_header_filters_sort_and_page_come_from_duckdb(history, big) -> None:
    _, expected = big
    grid = history.grid
    grid.filters = [
        {"field": "case_id", "type": "like", "value": "patient_2"},
        {"field": "gap_pct", "type": "<=", "value": 5},
        {"field": "solver", "type": "like", "value": "hig"},
    ]
    grid.sorters = [{"field": "CORD_max_gy", "dir": "asc"}]
    want = expected[(expected["case_id"] == "Lung_Synth_Patient_2") & (expected["gap"] * 100 <= 5)
                    & (expected["solver"] == "HIGHS")]
    want = want.sort_values(["CORD_max_gy", "run_id"])
    assert history.matching_runs == grid.row_count == len(want) > 3 * PAGE_SIZE
    assert grid.param.page.bounds == (1, -(-len(want) // PAGE_SIZE))
    grid.page = 3
    assert grid.value["run_id"].tolist() == want["run_id"].iloc[2 * PAGE_SIZE: 3 * PAGE_SIZE].tolist()
    assert (grid.value["gap_pct"] <= 5).all() and (grid.value["solver"] == "HIGHS").all()

    # a new filter starts again on page 1; descending sort on a derived column sorts by its source
    grid.filters = [*grid.filters, {"field": "beams", "type": "like", "value": "11,22"}]
    assert grid.page == 1
    want = want[want["beam_ids"].map(lambda b: "11,22" in ",".join(map(str, b)))]
    assert history.matching_runs == len(want) > 0
    assert grid.value["run_id"].tolist() == want["run_id"].head(PAGE_SIZE).tolist()
    grid.sorters = [{"field": "gap_pct", "dir": "desc"}]
    assert grid.value["run_id"].tolist() == want.sort_values(
        ["gap", "run_id"], ascending=[False, True])["run_id"].head(PAGE_SIZE).tolist()


def test_sql_box_narrows_grid_and_combines_with_header_filters(history, big) -> None:
    _, expected = big
    history.sql_where = "n_beams >= 7 AND CORD_max_gy < 40 AND w_GTV_quadratic IS NOT NULL"
    history.param.trigger("apply_where")
    assert history.where_error == "" and history.where_applied == history.sql_where
    want = expected[(expected["n_beams"] >= 7) & (expected["CORD_max_gy"] < 40) & expected["w_GTV_quadratic"].notna()]
    assert history.matching_runs == len(want) > 0
    assert set(history.grid.value["run_id"]) <= set(want["run_id"])
    history.grid.filters = [{"field": "PTV_d95_gy", "type": ">=", "value": 58}]
    both = want[want["PTV_d95_gy"] >= 58]
    assert history.matching_runs == len(both) > 0
    assert history.grid.value["run_id"].tolist() == both.sort_values("created_at", ascending=False)[
        "run_id"].head(PAGE_SIZE).tolist()
    assert any(f"{len(both):,} of {N_RUNS:,} runs" in h for h in _html_panes(history))
    history.param.trigger("clear_where")
    assert history.where_applied is None and history.matching_runs == len(expected[expected["PTV_d95_gy"] >= 58])


def test_a_header_filter_value_that_is_not_a_number_is_reported(history) -> None:
    history.grid.filters = [{"field": "gap_pct", "type": "<=", "value": "abc"}]
    assert history.matching_runs == N_RUNS
    assert "gap (%): 'abc' is not a number" in history.filter_notice


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("gap < 0.1; DROP TABLE runs", "';' is not allowed"),
        ("gap < 0.1) ; COPY runs TO '/tmp/x.csv' --", "not allowed"),
        ("COPY runs TO '/tmp/out.csv'", "keyword COPY is not allowed"),
        ("ATTACH '/tmp/evil.duckdb' AS evil", "keyword ATTACH is not allowed"),
        ("EXISTS (SELECT * FROM read_csv('/etc/passwd'))", "is not allowed"),
        ("length(read_csv('/etc/passwd')) > 0", "function read_csv() is not allowed"),
        ("case_id IN (SELECT column0 FROM read_parquet('/tmp/*.parquet'))", "is not allowed"),
        ("read_parquet('x.parquet') IS NOT NULL", "function read_parquet() is not allowed"),
        ("len(glob('/etc/*')) > 0", "function glob() is not allowed"),
        ("getenv('HOME') = '/root'", "function getenv() is not allowed"),
        ("no_such_column > 1", 'column "no_such_column" not found'),
    ],
)
def test_sql_box_refuses_anything_but_a_read_of_runs(history, typed, message) -> None:
    history.sql_where = "solver = 'SCIP'"
    history.param.trigger("apply_where")
    accepted = history.matching_runs
    page_before = history.grid.value["run_id"].tolist()

    history.sql_where = typed
    history.param.trigger("apply_where")
    assert history.where_error.startswith("Filter refused: ")
    assert message in history.where_error
    # the previous filter stays in force, and the refusal is shown beside the box
    assert history.where_applied == "solver = 'SCIP'" and history.matching_runs == accepted
    assert history.grid.value["run_id"].tolist() == page_before
    shown = [h for h in _html_panes(history) if "where-error" in h]
    assert shown and message.replace("'", "&#x27;").replace('"', "&quot;") in shown[0]
    assert not Path("/tmp/out.csv").exists() and not Path("/tmp/evil.duckdb").exists()

    history.sql_where = "solver = 'MOSEK'"
    history.param.trigger("apply_where")
    assert history.where_error == "" and history.where_applied == "solver = 'MOSEK'"


def test_more_columns_can_be_shown_and_filtered(history, big) -> None:
    _, expected = big
    # columns the grid does not show yet, and only those the store has
    assert set(history.param.extra_columns.objects) == {"bound", "schema_version"}
    history.extra_columns = ["bound"]
    assert "bound" in history.grid.value.columns and history.grid.header_filters["bound"]["func"] == "<="
    history.grid.filters = [{"field": "bound", "type": "<=", "value": 1500}]
    assert history.matching_runs == int((expected["bound"] <= 1500).sum()) > 0
    assert (history.grid.value["bound"] <= 1500).all()


# ------------------------------------------------------------------------------------ selection, exports


def test_selection_opens_compares_and_exports(history, big) -> None:
    _, expected = big
    history.grid.filters = [{"field": "case_id", "type": "like", "value": "patient_1"}]
    history.grid.page = 2
    history.grid.selection = [3, 7]
    picked = history.grid.value["run_id"].iloc[[3, 7]].tolist()
    assert history.selected_run_ids == picked
    assert (history.compare_a, history.compare_b) == tuple(picked)  # two selected runs become A and B
    actions = history.actions_html(history.selected_run_ids, history.compare_a, history.compare_b)
    assert f'href="./?run={picked[0]}"' in actions
    assert f"compare_a={picked[0]}&amp;compare_b={picked[1]}" in actions

    history.grid.selection = [0]
    history.param.trigger("set_b")
    assert history.compare_b == history.grid.value["run_id"].iloc[0]

    history.grid.selection = [3, 7]
    selected = pd.read_csv(history.selection_csv())
    assert sorted(selected["run_id"]) == sorted(picked)
    assert {"PTV_d95_gy", "w_CORD_quadratic", "beam_ids", "created_at"} <= set(selected)
    everything = pd.read_csv(history.filtered_csv())
    assert len(everything) == (expected["case_id"] == "Lung_Synth_Patient_1").sum()
    row = everything.set_index("run_id").loc[picked[0]]
    assert row["beam_ids"] == " ".join(map(str, expected.set_index("run_id").loc[picked[0], "beam_ids"]))


def test_a_new_page_clears_the_selection(history) -> None:
    history.grid.selection = [1]
    assert len(history.selected_run_ids) == 1
    history.grid.page = 4
    assert history.grid.selection == [] and history.selected_run_ids == []


# -------------------------------------------------------------------------------------- parameter space


def test_parameter_space_over_all_matching_runs(history, big) -> None:
    _, expected = big
    assert (history.x_column, history.y_column) == ("PTV_d95_gy", "CORD_max_gy")
    assert history.colour_column == "w_CORD_quadratic"
    history.sql_where = "solver = 'SCIP'"
    history.param.trigger("apply_where")
    df = history.scatter_data()
    want = expected[expected["solver"] == "SCIP"]
    assert len(df) == len(want)
    overlay = parameter_space_plot(df, history.x_column, history.y_column, history.colour_column,
                                   history.gap_threshold_pct)
    points = overlay.traverse(lambda e: e, [hv.Points])
    proven, hollow = points
    n_open = int((want["gap"] * 100 > 5).sum())
    assert len(hollow) == n_open > 0 and len(proven) == len(want) - n_open
    assert "not proven optimal" in hollow.label
    assert overlay.traverse(lambda e: e, [hv.Segments]) == []  # intervals only on an objective axis
    rendered = hv.render(overlay)
    assert any(getattr(r, "label", None) for r in rendered.legend[0].items)

    history.y_column = "objective"
    history.gap_threshold_pct = 10.0
    df = history.scatter_data()
    overlay = parameter_space_plot(df, history.x_column, "objective", None, history.gap_threshold_pct)
    (segments,) = overlay.traverse(lambda e: e, [hv.Segments])
    open_runs = df[~proven_mask(df, 10.0)]
    assert len(segments) == len(open_runs) == int((want["gap"] * 100 > 10).sum())
    seg = segments.dframe()
    assert np.allclose(seg["y0"].to_numpy(), open_runs["objective"].to_numpy())
    assert np.allclose(seg["y1"].to_numpy(), open_runs["bound"].to_numpy())
    assert (seg["y1"] < seg["y0"]).all()  # the bound lies below the objective of a minimisation


def test_clicking_a_point_picks_its_run(history, big) -> None:
    _, expected = big
    view = history._scatter_view(history.x_column, history.y_column, history.colour_column,
                                 history.gap_threshold_pct, 0)
    assert isinstance(view, pn.pane.HoloViews)
    target = expected.iloc[1234]
    history._on_tap(target["PTV_d95_gy"], target["CORD_max_gy"])
    picked = history._scatter_df.set_index("run_id").loc[history.tapped_run_id]
    assert picked["PTV_d95_gy"] == target["PTV_d95_gy"] and picked["CORD_max_gy"] == target["CORD_max_gy"]
    info = history.tapped_html(history.tapped_run_id)
    assert f'href="./?run={history.tapped_run_id}"' in info and "Open in Plan page" in info
    # far from every run: nothing is picked
    assert nearest_run(history._scatter_df, "PTV_d95_gy", "CORD_max_gy", 500.0, -500.0) is None


def test_an_empty_store_gives_an_empty_page(tmp_path) -> None:
    page = HistoryPage(store=RunStore(tmp_path / "none"))
    assert page.total_runs == 0 and page.grid.value.empty
    page.sql_where = "gap < 0.1"  # nothing to check columns against yet: accepted, and matches nothing
    page.param.trigger("apply_where")
    assert page.where_error == "" and page.matching_runs == 0
    assert "No numeric columns" in str(page._scatter_view(None, None, None, 5.0, 0).object)


# -------------------------------------------------------------------------------------- reindex / migration


def _schema0_folder(root: Path, run_id: str, cfg: dict) -> Path:
    """A run folder as the first prototype wrote it: JSON files and no run.parquet."""
    folder = root / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "metrics.json").write_text(json.dumps([
        {"structure": "PTV", "mean_gy": 60.1, "max_gy": 66.0, "d95_gy": 57.5, "d98_gy": 56.0, "d2_gy": 64.0,
         "v100_pct": 91.0, "volume_cc": 87.0},
        {"structure": "CORD", "mean_gy": 8.0, "max_gy": 41.5, "volume_cc": 71.0},
    ]))
    (folder / "dvh.json").write_text(json.dumps({
        "PTV": {"dose_gy": [0, 30, 60, 66], "volume_pct": [100, 100, 60, 0]},
        "CORD": {"dose_gy": [0, 20, 41.5], "volume_pct": [100, 30, 0]},
    }))
    (folder / "result.json").write_text(json.dumps({
        "solver": "HIGHS", "status": "time_limit", "objective": 123.4, "bound": 110.0, "gap": 0.1086,
        "solve_time_s": 120.2, "created_at": "2025-06-01T10:20:30+00:00",
    }))
    (folder / "criteria.json").write_text(json.dumps([
        {"criterion": "Max dose", "structure": "CORD", "status": "pass"},
        {"criterion": "Mean dose", "structure": "HEART", "status": "fail"},
    ]))
    np.savez_compressed(folder / "dose.npz", dose_3d_gy=np.ones((2, 3, 4), dtype=np.float32))
    return folder


def test_reindex_migrates_schema0_and_skips_corrupt_folders(tmp_path, monkeypatch) -> None:
    from vmat_core.config import default_config

    root = tmp_path / "runs"
    store = RunStore(root, fsync=False)
    good = []
    for i in range(3):
        md = synthetic_metadata(i)
        rid = new_run_id(f"good-{i}", md["created_at"])
        store.write_run(rid, config={"i": i}, metadata=md)
        good.append(rid)
    cfg = default_config("Lung_Synth_Patient_1").to_dict()
    old_id = "20250601T102030Z-00000000aa"
    _schema0_folder(root, old_id, cfg)
    broken = "20250602T000000Z-00000000bb"
    (root / broken).mkdir()
    (root / broken / "run.parquet").write_bytes(b"this is not parquet")
    half = "20250603T000000Z-00000000cc"  # a prototype folder that lost its DVH file
    (root / half).mkdir()
    (root / half / "config.json").write_text(json.dumps(cfg))
    (root / half / "metrics.json").write_text("[]")
    bad_json = "20250604T000000Z-00000000dd"
    _schema0_folder(root, bad_json, cfg)
    (root / bad_json / "metrics.json").write_text("{not json")
    (root / "notes").mkdir()

    dry = migrate.reindex(store, dry_run=True)
    assert dry.to_migrate == [(old_id, 0), (bad_json, 0)] and dry.indexed == 0
    assert not (root / old_id / "run.parquet").exists()

    report = migrate.reindex(store)
    assert report.migrated == [(old_id, 0)]
    assert report.indexed == 4
    reasons = dict(report.skipped)
    assert set(reasons) == {broken, half, bad_json, "notes"}
    assert "unreadable" in reasons[broken]
    assert "missing dvh.json" in reasons[half]
    assert "metrics.json" in reasons[bad_json] and "migration from schema_version 0 failed" in reasons[bad_json]
    assert "not a run folder name" in reasons["notes"]
    assert (root / broken / "run.parquet").read_bytes() == b"this is not parquet"  # left as it was

    meta = store.read_metadata(old_id)
    assert meta["schema_version"] == store_mod.SCHEMA_VERSION and meta["migrated_from_schema"] == 0
    assert meta["created_at"] == datetime(2025, 6, 1, 10, 20, 30, tzinfo=UTC)
    assert (meta["case_id"], meta["solver"], meta["status"]) == ("Lung_Synth_Patient_1", "HIGHS", "time_limit")
    assert meta["gap"] == pytest.approx(0.1086) and meta["bound"] == pytest.approx(110.0)
    assert meta["PTV_d95_gy"] == 57.5 and meta["PTV_v100_pct"] == 91.0 and meta["CORD_max_gy"] == 41.5
    assert "CORD_d95_gy" not in meta  # target metrics only for targets, as the runner writes them
    assert meta["n_beams"] == len(cfg["beam_ids"]) and meta["beam_ids"] == cfg["beam_ids"]
    assert (meta["criteria_passed"], meta["criteria_failed"]) == (1, 0 + 1)
    cord = next(o for o in cfg["objectives"] if o["structure_name"] == "CORD" and o["type"] == "quadratic")
    assert meta["w_CORD_quadratic"] == cord["weight"]
    dvh = store.read_table(old_id, "dvh")
    assert dvh[dvh["structure"] == "CORD"]["dose_gy"].tolist() == [0, 20, 41.5]
    assert store.read_table(old_id, "metrics").set_index("structure").loc["PTV", "d95_gy"] == 57.5
    assert store.read_arrays(old_id, ["dose_3d_gy"])["dose_3d_gy"].shape == (2, 3, 4)
    for legacy in ("metrics.json", "dvh.json", "result.json", "criteria.json"):
        assert (root / old_id / legacy).is_file()  # the old files stay beside the new ones
    assert not [p for p in root.iterdir() if p.name.startswith((".tmp-", ".del-"))]

    listed = store.list_runs()
    assert sorted(listed["run_id"]) == sorted([*good, old_id])
    page = HistoryPage(store=store)
    page.sql_where = "migrated_from_schema = 0"
    page.param.trigger("apply_where")
    assert page.grid.value["run_id"].tolist() == [old_id]

    # the Plan page reads a migrated run like any other
    from app import state as plan_state

    monkeypatch.setattr(plan_state, "run_store", lambda: store)
    plan_state._PLAN_CACHE.clear()
    plan = plan_state.plan_data("Lung_Synth_Patient_1", old_id)
    plan_state._PLAN_CACHE.clear()
    assert plan is not None and set(plan["dvh"]["structure"]) == {"PTV", "CORD"}
    assert plan["prescription_gy"] == cfg["prescription_gy"]

    # a second reindex has nothing left to migrate and reports the same corrupt folders
    again = migrate.reindex(store)
    assert again.migrated == [] and again.indexed == 4 and dict(again.skipped).keys() == reasons.keys()


def test_reindex_command_reports(tmp_path, monkeypatch, capsys) -> None:
    from vmat_core import paths

    data = tmp_path / "data"
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(data))
    root = paths.runs_dir()
    store = RunStore(root, fsync=False)
    md = synthetic_metadata(5)
    store.write_run(new_run_id("cli", md["created_at"]), config={}, metadata=md)
    (root / "20250602T000000Z-00000000bb").mkdir()
    parser = argparse.ArgumentParser()
    migrate.add_cli_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["reindex"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Indexed 1 run(s); migrated 0; skipped 1." in out
    assert "skipped 20250602T000000Z-00000000bb: neither run.parquet" in out
    args = parser.parse_args(["reindex", "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["indexed"] == 1 and report["skipped"][0]["folder"] == "20250602T000000Z-00000000bb"


# ---------------------------------------------------------------------------------------------- jobs page


def test_jobs_page_cancels_and_retries_the_selected_job(tmp_path) -> None:
    from app.jobs_page import JobsPage, workers_frame
    from vmat_core.config import apply_overrides, default_config
    from vmat_core.jobs import JobClient

    client = JobClient(tmp_path / "jobs")
    try:
        cfg = apply_overrides(default_config(), ["beam_ids=12,30"])
        first = client.submit(cfg)
        page = JobsPage(client=client)
        table = page.jobs_table
        assert table.value["job_id"].tolist() == [first] and table.value["status"].iloc[0] == "queued"
        assert page.live_workers == 0 and page.counts == {"queued": 1}

        page.param.trigger("retry")  # nothing selected: nothing happens
        assert page.message == ""
        table.selection = [0]
        assert (page.selected_job_id, page.selected_status) == (first, "queued")
        page.param.trigger("retry")
        assert page.message_error and f"Retry {first}" in page.message and "still queued" in page.message

        page.param.trigger("cancel")
        assert not page.message_error and page.message == f"Job {first} is now cancelled."
        assert page.selected_status == "cancelled" and table.value["status"].iloc[0] == "cancelled"
        assert table.value["error"].iloc[0] == "cancelled before it started"

        page.param.trigger("retry")
        second = page.message.rsplit(" as ", 1)[1].rstrip(".")
        assert client.status(second).status == "queued" and second != first
        # the new job comes first; the selection stays on the job the planner picked
        assert table.value["job_id"].tolist() == [second, first]
        assert table.selection == [1] and page.selected_job_id == first
        assert page.counts == {"queued": 1, "cancelled": 1}
        client.cancel(second)
        page.refresh()
        assert table.value.set_index("job_id").loc[second, "status"] == "cancelled"
    finally:
        client.close()

    now = 1_800_000_000.0
    workers = workers_frame([{"id": "vm-w1", "backend": "embedded", "host": "vm", "pid": 42, "state": "busy",
                              "current_job": second, "last_heartbeat": now - 3.5, "jobs_done": 2}], now=now)
    row = workers.iloc[0]
    assert row["heartbeat_age_s"] == pytest.approx(3.5) and row["last_heartbeat"] == "2027-01-15 07:59:56"
    assert row["current_job"] == second and row["state"] == "busy"
