"""MIP starts on the synthetic case: deliverable, checked feasible, accepted by HiGHS and SCIP, and wired into runs."""

from __future__ import annotations

import numpy as np
import pytest

from vmat_core import solvers, warmstart
from vmat_core.config import ConfigError, apply_overrides, default_config
from vmat_core.runner import run_vmat_global_optimal
from vmat_core.store import RunStore

SMALL = ["beam_ids=12,30,48", "voxel_down_sample_factors=12,12,2"]


def small_config(*extra: str):
    return apply_overrides(default_config(), SMALL + list(extra))


@pytest.fixture(scope="module")
def small(portpy_dir):
    model, prepared = warmstart.build_case_model(small_config(), portpy_dir)
    return model, prepared


@pytest.fixture(scope="module")
def heuristic(small):
    model, prepared = small
    return warmstart.heuristic_start(model, prepared.inf_db, time_budget_s=2.0)


def _assert_deliverable(model, values):
    leaves = model.leaves
    z = np.asarray(values[model.z])
    lbi, rbi = np.asarray(values[model.lbi]), np.asarray(values[model.rbi])
    mu, x = np.asarray(values[model.mu]), np.asarray(values[model.x])
    assert set(np.unique(z)) <= {0.0, 1.0}
    for r in range(leaves.n_rows):
        sel = leaves.row == r
        cols = np.sort(leaves.col[sel][z[leaves.beamlet[sel]] > 0.5])
        if cols.size:
            assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1)), f"row {r}: open columns {cols}"
            assert lbi[r] <= cols[0] and cols[-1] + 2 <= rbi[r], f"row {r}: leaves {lbi[r]}, {rbi[r]} vs {cols}"
        assert rbi[r] - lbi[r] - 1 == cols.size
    open_ = z[leaves.beamlet] > 0.5
    np.testing.assert_allclose(x[leaves.beamlet][open_], mu[leaves.beam][open_], rtol=0, atol=1e-12)
    assert np.all(x[leaves.beamlet][~open_] == 0)


def test_leaf_positions_follow_the_model_convention_and_refuse_gaps(small):
    model, _ = small
    leaves = model.leaves
    row = int(np.argmax(np.bincount(leaves.row)))  # the widest row
    sel = np.flatnonzero(leaves.row == row)
    order = sel[np.argsort(leaves.col[sel])]
    z = np.zeros(model.x.size)
    z[leaves.beamlet[order[1:3]]] = 1.0
    lbi, rbi = warmstart.leaf_positions(leaves, z)
    c0 = leaves.col[order[1]]
    assert (lbi[row], rbi[row]) == (c0, c0 + 3)
    others = np.arange(leaves.n_rows) != row
    assert np.all(lbi[others] == 0) and np.all(rbi[others] == 1)
    z[leaves.beamlet[order[2]]] = 0.0
    z[leaves.beamlet[order[3]]] = 1.0
    with pytest.raises(ValueError, match="not contiguous"):
        warmstart.leaf_positions(leaves, z)


def test_conformal_apertures_become_a_deliverable_feasible_start(small):
    model, prepared = small
    z = warmstart.conformal_apertures(model, prepared.inf_db, "PTV")
    assert 0 < z.sum() < z.size
    lp = warmstart.ApertureLP(model)
    value = lp.solve(z)
    start = warmstart.make_start(model, "heuristic:conformal", z, lp.mu, 0.0)
    _assert_deliverable(model, start.values)
    assert start.max_violation <= warmstart.FEASIBILITY_TOL
    # The aperture LP and the cvxpy objective of the completed start agree.
    assert start.objective == pytest.approx(value, rel=1e-7)
    assert set(start.values) == set(model.problem.variables())


def test_slacks_of_a_start_are_the_dose_excesses(small):
    model, prepared = small
    z = warmstart.open_apertures(model)
    mu = np.full(model.mu.size, 0.5 * model.mu_bound)
    values = warmstart.complete_start(model, z, mu)
    dose = prepared.inf_db.A @ values[model.x]
    vox = prepared.inf_db.get_opt_voxels_idx("PTV")
    slacks = {v.name(): a for v, a in values.items() if v.name().startswith("slack_PTV")}
    cfg = default_config()

    def per_fraction_gy(kind):
        row = next(r for r in cfg.objectives if r.structure_name == "PTV" and r.type == kind)
        gy = row.dose_gy if row.dose_gy is not None else row.dose_perc * cfg.prescription_gy / 100
        return gy / cfg.num_fractions

    over, under = per_fraction_gy("quadratic-overdose"), per_fraction_gy("quadratic-underdose")
    assert 0 < under <= over
    np.testing.assert_allclose(slacks["slack_PTV_quadratic-overdose"], np.maximum(dose[vox] - over, 0), atol=1e-12)
    np.testing.assert_allclose(slacks["slack_PTV_quadratic-underdose"], np.maximum(under - dose[vox], 0), atol=1e-12)


def test_an_infeasible_start_is_caught_before_the_solver(small):
    model, _ = small
    values = warmstart.complete_start(model, warmstart.open_apertures(model), np.full(model.mu.size, 1.0))
    values[model.x] = values[model.x] * 1.01  # fluence no longer equal to the MU on open beamlets
    violation, where = warmstart.max_violation(model, values)
    assert violation > 1e-3 and "constraint" in where


def test_heuristic_start_is_deliverable_feasible_and_better_than_its_seeds(small, heuristic):
    model, prepared = small
    assert heuristic.source.startswith("heuristic:")
    assert heuristic.max_violation <= 1e-6
    _assert_deliverable(model, heuristic.values)
    lp = warmstart.ApertureLP(model)
    seeds = [lp.solve(warmstart.conformal_apertures(model, prepared.inf_db, "PTV")),
             lp.solve(warmstart.open_apertures(model))]
    assert heuristic.objective <= min(seeds) + 1e-9


@pytest.mark.parametrize("solver", ["HIGHS", "SCIP"])
def test_each_open_source_solver_accepts_the_start(small, heuristic, solver):
    model, _ = small
    result = solvers.solve_mip(model.problem, solver=solver, time_limit_s=20, mip_gap=1e-4,
                               warm_start=heuristic.values)
    assert result.warm_start_accepted is True
    assert result.warm_start_objective == pytest.approx(heuristic.objective, rel=1e-9)
    first = next(p.incumbent for p in result.trace if p.incumbent is not None)
    assert first <= heuristic.objective * (1 + 1e-9)
    assert result.objective <= heuristic.objective * (1 + 1e-9)


def test_auto_portfolio_resolves_to_an_installed_solver():
    plan = warmstart.choose_mip_solver(default_config().solver)
    assert plan.choice.name in solvers.SOLVERS and plan.reason.startswith("auto")
    explicit = default_config().solver
    explicit.solver, explicit.options = "HIGHS", {"mip_heuristic_effort": 0.2}
    plan = warmstart.choose_mip_solver(explicit)
    assert plan.choice.name == "HIGHS" and plan.options == {"mip_heuristic_effort": 0.2}


def test_previous_run_start_is_refused_for_different_beams():
    cfg = small_config()
    other = small_config("beam_ids=12,30")
    with pytest.raises(warmstart.WarmStartError, match="warm_start_run_id.*beam_ids"):
        warmstart.check_previous_run(other, cfg, "run-x")
    warmstart.check_previous_run(small_config("CORD/quadratic.weight=50"), cfg, "run-x")


def test_weight_only_rerun_starts_from_the_previous_run(runs_root, portpy_dir):
    store = RunStore(runs_root)
    first = run_vmat_global_optimal(small_config("solver.time_limit_s=20", "solver.heuristic_time_s=2"),
                                    store=store, portpy_dir=portpy_dir)
    assert first.metadata["warm_start"].startswith("heuristic:")
    assert first.metadata["warm_start_objective"] is not None
    assert first.metadata["objective"] <= first.metadata["warm_start_objective"] * (1 + 1e-9)

    cfg = small_config("solver.time_limit_s=20", "solver.heuristic_time_s=2", "CORD/quadratic.weight=40",
                       f"warm_start_run_id={first.run_id}")
    again = run_vmat_global_optimal(cfg, store=store, portpy_dir=portpy_dir)
    md = again.metadata
    assert md["warm_start"] == "previous_run" and md["warm_start_accepted"] is True
    trace = store.read_table(again.run_id, "progress")
    first_incumbent = trace["incumbent"].dropna().iloc[0]
    assert first_incumbent <= md["warm_start_objective"] * (1 + 1e-9)

    with pytest.raises(ConfigError, match="warm_start_run_id.*beam_ids"):
        run_vmat_global_optimal(small_config("beam_ids=12,30", f"warm_start_run_id={first.run_id}"), store=store,
                                portpy_dir=portpy_dir)
