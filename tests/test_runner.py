"""The notebook-faithful runner on the synthetic case, with the real solvers and the real run store."""

from __future__ import annotations

import json
import subprocess
import sys

import cvxpy as cp
import numpy as np
import pytest

from vmat_core.config import ConfigError, apply_overrides, default_config, to_portpy_opt_params
from vmat_core.runner import down_sampled_matrix, load_case, protocol_criteria, run_vmat_global_optimal
from vmat_core.store import RunStore

# Small enough to be solved to proven optimality in seconds, large enough to have every constraint family.
TINY = ["beam_ids=12,30", "voxel_down_sample_factors=12,12,2", "solver.time_limit_s=60", "solver.mip_gap=0"]


def tiny_config(*extra: str):
    return apply_overrides(default_config(), TINY + list(extra))


def notebook_problem(cfg, prepared=None) -> cp.Problem:
    """The example's section 1, written out leaf by leaf as PortPy's notebook does.

    ``prepared`` (a ``PreparedCase``) skips loading, so that benchmarks time the model alone.
    """
    import portpy.photon as pp

    if prepared is None:
        _, ct, structs, beams, clinical_criteria, opt_params = load_case(cfg)
        _, inf_db = down_sampled_matrix(cfg, ct, structs, beams)
    else:
        ct, structs, beams, inf_db = prepared.ct, prepared.structs, prepared.beams, prepared.inf_db
        clinical_criteria = protocol_criteria(cfg.protocol)
        opt_params = to_portpy_opt_params(cfg)
    plan = pp.Plan(ct=ct, structs=structs, beams=beams, inf_matrix=inf_db, clinical_criteria=clinical_criteria)
    opt = pp.Optimization(plan, opt_params=opt_params)
    opt.create_cvxpy_problem()
    A, st, x = inf_db.A, inf_db, opt.vars["x"]
    nfx = clinical_criteria.get_num_of_fractions()
    opt.obj = []
    for f in opt_params["objective_functions"]:
        if f.get("structure_name") not in plan.structures.get_structures():
            continue
        vox = st.get_opt_voxels_idx(f["structure_name"])
        if f["type"] == "quadratic-overdose":
            dO = cp.Variable(len(vox), pos=True)
            opt.obj += [(1 / len(vox)) * (f["weight"] * cp.sum(dO))]
            opt.constraints += [A[vox, :] @ x <= opt.get_num(f["dose_gy"]) / nfx + dO]
        elif f["type"] == "quadratic-underdose":
            dU = cp.Variable(len(vox), pos=True)
            opt.obj += [(1 / len(vox)) * (f["weight"] * cp.sum(dU))]
            opt.constraints += [A[vox, :] @ x >= opt.get_num(f["dose_gy"]) / nfx - dU]
        elif f["type"] == "quadratic":
            opt.obj += [(1 / len(vox)) * (f["weight"] * cp.sum(A[vox, :] @ x))]
    maps = plan.inf_matrix.get_bev_2d_grid(beam_id=plan.beams.get_all_beam_ids())
    vmat = []
    for m in maps:
        m = m[~np.all(m == -1, axis=1), :]
        vmat.append({"map": m, "leaves": {j: r[r >= 0].tolist() for j, r in enumerate(m)}, "cols": m.shape[1]})
    rows = sum(len(b["leaves"]) for b in vmat)
    lbi, rbi = cp.Variable(rows, integer=True), cp.Variable(rows, integer=True)
    z = cp.Variable(A.shape[1], boolean=True)
    mu = cp.Variable(len(vmat), pos=True)
    U, prev = cfg.mu_bound, 0
    for i, b in enumerate(vmat):
        for leaf, bl in b["leaves"].items():
            c = np.where(np.isin(b["map"], bl))
            opt.constraints += [
                rbi[prev + leaf] - cp.multiply(c[1] + 1, z[bl]) >= 1,
                cp.multiply(b["cols"] - c[1], z[bl]) + lbi[prev + leaf] <= b["cols"],
                cp.sum([z[k] for k in bl]) == rbi[prev + leaf] - lbi[prev + leaf] - 1,
                rbi[prev + leaf] <= b["cols"],
                x[bl] <= U * z[bl],
                mu[i] - U * (1 - z[bl]) <= x[bl],
                x[bl] <= mu[i],
            ]
        prev += len(b["leaves"])
        opt.constraints += [mu[i] <= U]
    opt.constraints += [lbi >= 0, rbi >= 0]
    return cp.Problem(cp.Minimize(cp.sum(opt.obj)), opt.constraints)


def notebook_objective(cfg) -> float:
    prob = notebook_problem(cfg)
    prob.solve(solver=cp.HIGHS, mip_rel_gap=0.0, time_limit=120)
    assert prob.status == cp.OPTIMAL, prob.status
    return float(prob.value)


def test_runner_matches_the_notebook_formulation_at_gap_zero(portpy_dir) -> None:
    cfg = tiny_config()
    res = run_vmat_global_optimal(cfg, store=RunStore())
    md = res.metadata
    assert md["status"] == "optimal", md
    # auto: the measured portfolio's choice, and the reason says MOSEK has no licence here
    assert md["solver"] in ("HIGHS", "SCIP") and "licen" in md["solver_reason"].lower()
    expected = notebook_objective(cfg)
    assert md["objective"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert md["gap"] == pytest.approx(0.0, abs=1e-4)


def test_run_folder_is_complete_and_deliverable(portpy_dir) -> None:
    store = RunStore()
    res = run_vmat_global_optimal(tiny_config("solver.mip_gap=0.01"), store=store)
    arrays = store.read_arrays(res.run_id)
    for name in ("dose_3d_gy", "dose_1d_gy", "fluence", "mu", "left_leaf_pos", "right_leaf_pos", "beamlet_open"):
        assert name in arrays, name
    x, mu, z = arrays["fluence"], arrays["mu"], arrays["beamlet_open"]
    assert np.all(mu <= 2.0 + 1e-6) and np.all(x <= 2.0 * z + 1e-6)
    assert arrays["dose_3d_gy"].ndim == 3 and arrays["dose_3d_gy"].max() > 0
    dvh = store.read_table(res.run_id, "dvh")
    assert {"PTV", "CORD", "HEART", "ESOPHAGUS"} <= set(dvh["structure"])
    crit = store.read_table(res.run_id, "criteria")
    assert set(crit["status"]) <= {"pass", "goal_missed", "fail", "not_evaluated"}
    assert (crit["structure"] == "PTV").any()
    progress = store.read_table(res.run_id, "progress")
    assert len(progress) >= 1
    log = store.read_text(res.run_id, "solver")
    assert ("HiGHS" in log) if md_solver(store, res.run_id) == "HIGHS" else ("SCIP" in log or "primal bound" in log)
    md = store.read_metadata(res.run_id)
    for k in ("t_load_s", "t_downsample_s", "t_build_s", "t_solve_s", "t_postprocess_s", "schema_version"):
        assert k in md
    assert json.loads(json.dumps(store.read_config(res.run_id)))["beam_ids"] == [12, 30]


def md_solver(store, run_id: str) -> str:
    return store.read_metadata(run_id)["solver"]


def test_raising_the_cord_weight_lowers_cord_dose(portpy_dir) -> None:
    store = RunStore()
    base = run_vmat_global_optimal(tiny_config("solver.mip_gap=0.001"), store=store).metadata
    heavy = run_vmat_global_optimal(tiny_config("solver.mip_gap=0.001", "CORD/quadratic.weight=1000000"), store=store)
    assert heavy.metadata["CORD_mean_gy"] < base["CORD_mean_gy"] - 0.05
    assert heavy.metadata["w_CORD_quadratic"] == 1_000_000


@pytest.mark.parametrize(
    "override, field",
    [
        ("CORD/quadratic.weight=-1", "weight"),
        ("PTV/quadratic-underdose.dose_perc=151", "dose"),
        ("beam_ids=0,999", "beam_ids"),
        ("voxel_down_sample_factors=0,6,1", "voxel_down_sample_factors"),
        ("solver.time_limit_s=0", "time_limit_s"),
        ("solver.mip_gap=1", "mip_gap"),
    ],
)
def test_invalid_configs_write_nothing(portpy_dir, tmp_path, override, field) -> None:
    store = RunStore(tmp_path / "runs")
    with pytest.raises(ConfigError, match=field):
        run_vmat_global_optimal(_raw(override), store=store)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _raw(override: str):
    """Apply an override without validation, so the runner's own check is what refuses it."""
    cfg = default_config().to_dict()
    key, value = override.split("=", 1)
    if key == "beam_ids" or key == "voxel_down_sample_factors":
        cfg[key] = [int(v) for v in value.split(",")]
    elif key.startswith("solver."):
        cfg["solver"][key.split(".")[1]] = float(value)
    else:
        struct_type, attr = key.split(".")
        struct, kind = struct_type.split("/")
        for row in cfg["objectives"]:
            if row["structure_name"] == struct and row["type"] == kind:
                row[attr] = float(value)
                if attr == "dose_perc":
                    row["dose_gy"] = None
    return cfg


def test_cli_run_and_runs(portpy_dir, session_data_dir) -> None:
    cmd = [sys.executable, "-m", "vmat_core.cli", "run", "--beams", "12,30", "--set",
           "voxel_down_sample_factors=12,12,2", "--time-limit", "20", "--gap", "0.01"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert ("HIGHS" in out.stdout or "SCIP" in out.stdout) and "criteria" in out.stdout
    assert "solve" in out.stderr  # progress lines while solving
    run_id = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("run "))
    listed = subprocess.run([sys.executable, "-m", "vmat_core.cli", "runs", "--where", "n_beams = 2"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout


def test_prepared_case_cache_gives_back_the_same_case(portpy_dir, tmp_path, monkeypatch):
    """A second run's set-up comes from the disk cache (a new worker process has only that) and is the same case:
    identical structure masks (bits on disk, their own dtypes back), opt voxels and down-sampled matrix."""
    import pickle
    import zlib

    from vmat_core import paths, runner

    (tmp_path / "portpy").symlink_to(portpy_dir, target_is_directory=True)
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(runner, "_MEMORY_CACHE", {})
    cfg = tiny_config("beam_ids=6,24")
    first = runner.prepare_case(cfg)
    assert not first.cache_hit and first.downsample_s > 0
    runner._MEMORY_CACHE.clear()
    again = runner.prepare_case(cfg)
    assert again.cache_hit and again is not first

    names = first.structs.structures_dict["name"]
    assert again.structs.structures_dict["name"] == names
    for name, a, b in zip(names, first.structs.structures_dict["structure_mask_3d"],
                          again.structs.structures_dict["structure_mask_3d"], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b), name
    assert (first.inf_db.A != again.inf_db.A).nnz == 0
    for name in names:
        assert np.array_equal(first.inf_db.get_opt_voxels_idx(name), again.inf_db.get_opt_voxels_idx(name)), name
    # The down-sampled matrix's own references point at the cached CT and structures, not at copies.
    assert again.inf_db._structs is again.structs and again.inf_db._ct is again.ct

    # On disk the masks are bits: the inflated entry is far smaller than the masks alone in memory.
    with runner._prepared_cache() as cache:
        raw = zlib.decompress(cache.get(runner.prepared_cache_key(cfg)))
    mask_bytes = sum(m.nbytes for m in first.structs.structures_dict["structure_mask_3d"])
    assert len(raw) < mask_bytes / 4
    assert isinstance(pickle.loads(raw), tuple)
