"""The MIP solver layer with the real solvers on small MIPs shaped like the VMAT problem."""

from __future__ import annotations

import math
import threading
import time

import cvxpy as cp
import numpy as np
import pytest

from vmat_core import solvers
from vmat_core.solvers import MipResult, ProgressPoint, SolverUnavailable, relative_gap, solve_mip

OPEN_SOURCE = ("HIGHS", "SCIP")
FEAS_TOL = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Small problems


def facility_location(n_facilities: int = 3, n_customers: int = 8, seed: int = 0):
    """Uncapacitated-enough facility location: boolean openings linked to a 2-D continuous assignment by big-M."""
    rng = np.random.default_rng(seed)
    fixed_cost = rng.uniform(20, 40, n_facilities)
    cost = rng.uniform(1, 20, (n_facilities, n_customers))
    demand = rng.uniform(1, 3, n_customers)
    capacity = np.full(n_facilities, demand.sum())
    open_ = cp.Variable(n_facilities, boolean=True)
    assign = cp.Variable((n_facilities, n_customers), nonneg=True)
    constraints = [cp.sum(assign, axis=0) == 1, assign <= 1,
                   assign @ demand <= cp.multiply(capacity, open_)]
    for i in range(n_facilities):
        constraints.append(assign[i, :] <= open_[i])
    problem = cp.Problem(cp.Minimize(fixed_cost @ open_ + cp.sum(cp.multiply(cost, assign))), constraints)
    return problem, open_, assign, cost


def aperture_problem(seed: int = 3):
    """Two beams with three leaf rows of five beamlets: consecutive-ones apertures, one MU per beam, linear
    over/underdose objective on a random influence matrix (the VMAT structure in miniature)."""
    rng = np.random.default_rng(seed)
    n_beams, n_rows, n_cols = 2, 3, 5
    n_beamlets = n_beams * n_rows * n_cols
    n_target, n_oar = 8, 8
    influence = rng.uniform(0.0, 1.0, (n_target + n_oar, n_beamlets))
    influence[n_target:] *= 0.6
    prescription = 4.0
    oar_limit = 1.5
    max_mu = 2.0

    z = cp.Variable(n_beamlets, boolean=True)  # beamlet open
    left = cp.Variable(n_beams * n_rows, integer=True)  # last closed position of the left leaf
    right = cp.Variable(n_beams * n_rows, integer=True)  # first closed position of the right leaf
    mu = cp.Variable(n_beams, nonneg=True)
    x = cp.Variable(n_beamlets, nonneg=True)
    under = cp.Variable(n_target, nonneg=True)
    over = cp.Variable(n_oar, nonneg=True)
    dose = influence @ x
    constraints = [dose[:n_target] >= prescription - under, dose[n_target:] <= oar_limit + over,
                   mu <= max_mu, left >= 0, right <= n_cols + 1]
    for b in range(n_beams):
        for r in range(n_rows):
            row = b * n_rows + r
            cols = np.arange(n_cols)
            idx = b * n_rows * n_cols + r * n_cols + cols
            # open beamlets lie strictly between the leaves and are contiguous (count = gap between the leaves)
            constraints += [right[row] >= cp.multiply(cols + 2, z[idx]),
                            left[row] <= cols + (n_cols + 1) * (1 - z[idx]),
                            cp.sum(z[idx]) == right[row] - left[row] - 1,
                            x[idx] <= max_mu * z[idx],
                            x[idx] >= mu[b] - max_mu * (1 - z[idx]),
                            x[idx] <= mu[b]]
    objective = cp.Minimize(cp.sum(under) / n_target + 2 * cp.sum(over) / n_oar + 0.01 * cp.sum(mu))
    return cp.Problem(objective, constraints), {"z": z, "left": left, "right": right, "mu": mu, "x": x,
                                                 "shape": (n_beams, n_rows, n_cols)}


def market_split(m: int = 4, n: int = 30, seed: int = 1, offset: float = 10.0):
    """Cornuejols-Dawande market split with penalised slack: a feasible start is trivial, proving optimality is
    far beyond a few seconds for HiGHS and SCIP (both still open after 20 s), and the bound sits at the offset."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 100, size=(m, n))
    target = a.sum(axis=1) // 2
    x = cp.Variable(n, boolean=True)
    short = cp.Variable(m, nonneg=True)
    excess = cp.Variable(m, nonneg=True)
    problem = cp.Problem(cp.Minimize(cp.sum(short + excess) + offset), [a @ x + short - excess == target])
    return problem, x, short, excess, target


def max_violation(problem: cp.Problem) -> float:
    worst = 0.0
    for c in problem.constraints:
        v = np.max(np.atleast_1d(c.violation()))
        worst = max(worst, float(v))
    for var in problem.variables():
        if var.attributes.get("boolean") or var.attributes.get("integer"):
            worst = max(worst, float(np.max(np.abs(var.value - np.round(var.value)))))
        if var.attributes.get("boolean"):
            worst = max(worst, float(np.max(np.maximum(-var.value, var.value - 1))))
        if var.attributes.get("nonneg"):
            worst = max(worst, float(np.max(-var.value)))
    return worst


def reference_optimum(problem: cp.Problem) -> float:
    problem.solve(solver=cp.HIGHS, mip_rel_gap=0.0)
    assert problem.status == cp.OPTIMAL
    value = problem.value
    for v in problem.variables():
        v.value = None
    return value


# ---------------------------------------------------------------------------------------------------------------
# Gap definition


def test_relative_gap_is_the_one_documented_definition():
    assert relative_gap(11.0, 10.0) == pytest.approx(1 / 11)
    assert relative_gap(-100.0, -110.0) == pytest.approx(0.1)
    assert relative_gap(5.0, 5.0) == 0.0
    assert relative_gap(0.0, 0.0) == 0.0
    assert relative_gap(10.0, 10.5) == 0.0  # a bound past the incumbent (round-off) is clipped
    assert relative_gap(0.0, -1e-12) == pytest.approx(1e-12 / 1e-10)
    assert relative_gap(None, 1.0) is None and relative_gap(1.0, None) is None
    assert relative_gap(1.0, -math.inf) is None
    assert relative_gap(9.0, 10.0, maximize=True) == pytest.approx(1 / 9)


# ---------------------------------------------------------------------------------------------------------------
# Availability and choice


def test_solver_status_reports_every_solver():
    status = solvers.solver_status()
    assert tuple(status) == solvers.SOLVERS
    for name in ("HIGHS", "SCIP"):
        assert status[name]["installed"] and status[name]["licensed"]
    assert all(isinstance(s["detail"], str) and s["detail"] for s in status.values())


def test_mosek_without_licence_is_refused_clearly_and_auto_picks_highs():
    licensed, detail = solvers.mosek_licence_status()
    if licensed:
        pytest.skip("this machine has a MOSEK licence")
    assert "licence" in detail or "not installed" in detail
    with pytest.raises(SolverUnavailable) as err:
        solvers.choose_solver("MOSEK")
    text = str(err.value)
    assert "solver" in text and "MOSEK" in text and "HIGHS" in text and "SCIP" in text
    assert isinstance(err.value, ValueError)
    choice = solvers.choose_solver("auto")
    assert choice.name == "HIGHS"
    assert "licence" in choice.reason
    assert solvers.choose_solver("scip").name == "SCIP"
    problem, *_ = facility_location()
    with pytest.raises(SolverUnavailable):
        solve_mip(problem, solver="MOSEK")


# ---------------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"time_limit_s": 0}, "time_limit_s"),
        ({"time_limit_s": -1.0}, "time_limit_s"),
        ({"time_limit_s": math.inf}, "time_limit_s"),
        ({"time_limit_s": math.nan}, "time_limit_s"),
        ({"time_limit_s": "10"}, "time_limit_s"),
        ({"mip_gap": -0.1}, "mip_gap"),
        ({"mip_gap": 1.0}, "mip_gap"),
        ({"mip_gap": math.nan}, "mip_gap"),
        ({"solver": "GUROBI"}, "solver"),
        ({"threads": 0}, "threads"),
        ({"solver_options": {"time_limit": 5}}, "solver_options"),
        ({"solver": "SCIP", "solver_options": {"limits/gap": 0.1}}, "solver_options"),
        ({"solver_options": {"no_such_highs_option": 1}}, "solver_options"),
        ({"solver": "SCIP", "solver_options": {"no/such/param": 1}}, "solver_options"),
        ({"warm_start": {cp.Variable(2): np.zeros(2)}}, "warm_start"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    problem, *_ = facility_location()
    with pytest.raises(ValueError, match=field):
        solve_mip(problem, **kwargs)


def test_warm_start_of_the_wrong_size_and_a_problem_without_integers_are_refused():
    problem, open_, *_ = facility_location()
    with pytest.raises(ValueError, match="warm_start"):
        solve_mip(problem, warm_start={open_: np.ones(open_.size + 1)})
    y = cp.Variable(2, nonneg=True)
    with pytest.raises(ValueError, match="mixed-integer"):
        solve_mip(cp.Problem(cp.Minimize(cp.sum(y)), [y >= 1]))


# ---------------------------------------------------------------------------------------------------------------
# Optimal solves


@pytest.mark.parametrize("solver", OPEN_SOURCE)
@pytest.mark.parametrize("builder", [facility_location, aperture_problem], ids=["facility", "aperture"])
def test_reaches_the_reference_optimum_and_writes_feasible_values(solver, builder):
    problem, *_ = builder()
    expected = reference_optimum(problem)
    caller = threading.get_ident()
    threads_seen: set[int] = set()
    lines: list[str] = []

    def on_progress(point: ProgressPoint) -> None:
        threads_seen.add(threading.get_ident())

    result = solve_mip(problem, solver=solver, mip_gap=0.0, time_limit_s=30, threads=1,
                       on_progress=on_progress, on_log=lines.append)
    assert isinstance(result, MipResult)
    assert result.solver == solver
    assert result.status == "optimal", result.message
    assert result.has_solution
    assert result.objective == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert result.gap is not None and result.gap <= 1e-6
    assert result.gap == relative_gap(result.objective, result.bound)
    assert problem.value == pytest.approx(result.objective)
    assert max_violation(problem) <= FEAS_TOL
    assert result.trace and result.trace[-1].incumbent == pytest.approx(result.objective)
    assert threads_seen <= {caller}  # callbacks run on the caller's thread
    assert lines and all("\n" not in line for line in lines)
    assert result.log.strip()


def test_aperture_solution_has_consecutive_open_beamlets_between_the_leaves():
    problem, v = aperture_problem()
    result = solve_mip(problem, solver="HIGHS", mip_gap=0.0, time_limit_s=30)
    assert result.status == "optimal"
    n_beams, n_rows, n_cols = v["shape"]
    z = np.asarray(v["z"].value).reshape(n_beams * n_rows, n_cols)
    left, right = v["left"].value, v["right"].value
    assert np.array_equal(z, np.round(z)) and np.array_equal(left, np.round(left))  # integers written exactly
    for row in range(n_beams * n_rows):
        positions = np.arange(1, n_cols + 1)
        assert np.array_equal(z[row] == 1, (positions > left[row]) & (positions < right[row]))
    x = v["x"].value.reshape(n_beams, n_rows * n_cols)
    mu = v["mu"].value
    np.testing.assert_allclose(x, mu[:, None] * z.reshape(n_beams, -1), atol=1e-6)


def test_maximisation_reports_objective_and_bound_in_the_problem_sense():
    rng = np.random.default_rng(5)
    weight, value = rng.integers(5, 30, (2, 25)), rng.integers(5, 40, 25)
    pick = cp.Variable(25, boolean=True)
    problem = cp.Problem(cp.Maximize(value @ pick + 7), [weight @ pick <= 0.4 * weight.sum(axis=1)])
    expected = reference_optimum(problem)
    for solver in OPEN_SOURCE:
        result = solve_mip(problem, solver=solver, mip_gap=0.0)
        assert result.status == "optimal"
        assert result.objective == pytest.approx(expected)
        assert result.bound == pytest.approx(expected, rel=1e-6)
        assert result.bound >= result.objective - 1e-6


@pytest.mark.parametrize("solver", OPEN_SOURCE)
def test_infeasible_problem_has_no_solution_and_clears_values(solver):
    y = cp.Variable(3, boolean=True)
    problem = cp.Problem(cp.Minimize(cp.sum(y)), [cp.sum(y) >= 2, y[0] + y[1] <= 0, y[2] <= 0.5])
    y.value = np.ones(3)
    result = solve_mip(problem, solver=solver)
    assert result.status == "infeasible"
    assert not result.has_solution and result.objective is None
    assert y.value is None


# ---------------------------------------------------------------------------------------------------------------
# Limits, gap and cancel on a MIP too hard to finish


@pytest.mark.parametrize("solver", OPEN_SOURCE)
def test_time_limit_keeps_the_incumbent_and_reports_its_gap(solver):
    problem, *_ = market_split()
    t0 = time.monotonic()
    result = solve_mip(problem, solver=solver, time_limit_s=1.0, mip_gap=0.0)
    wall = time.monotonic() - t0
    assert result.status == "time_limit", result.message
    assert result.has_solution
    assert 0.9 <= result.solve_time_s <= 3.0 and wall < 5.0
    assert result.gap is not None and result.gap > 0
    assert result.gap == relative_gap(result.objective, result.bound)
    assert result.bound == pytest.approx(10.0, abs=1e-6)  # the LP bound of the penalised slack is the offset
    assert problem.value == pytest.approx(result.objective)
    assert problem.status == cp.USER_LIMIT
    assert max_violation(problem) <= FEAS_TOL
    assert len(result.trace) >= 2
    incumbents = [p.incumbent for p in result.trace if p.incumbent is not None]
    assert incumbents == sorted(incumbents, reverse=True)  # the trace never reports a worse incumbent
    assert "time limit" in result.message


@pytest.mark.parametrize("solver", OPEN_SOURCE)
def test_requested_gap_stops_early_with_gap_limit(solver):
    problem, *_ = market_split()
    result = solve_mip(problem, solver=solver, time_limit_s=20.0, mip_gap=0.9)
    assert result.status == "gap_limit", result.message
    assert result.solve_time_s < 10
    assert result.gap is not None and 1e-4 < result.gap <= 0.9
    assert result.gap == relative_gap(result.objective, result.bound)


@pytest.mark.parametrize("solver", OPEN_SOURCE)
def test_should_stop_cancels_quickly_and_keeps_the_incumbent(solver):
    problem, x, *_ = market_split()
    progress: list[ProgressPoint] = []
    started = time.monotonic()
    result = solve_mip(problem, solver=solver, time_limit_s=60.0, mip_gap=0.0, on_progress=progress.append,
                       should_stop=lambda: time.monotonic() - started > 0.5)
    elapsed = time.monotonic() - started
    assert result.status == "cancelled", result.message
    assert elapsed < 2.5  # 0.5 s of work, then about a second to notice and stop (60 s limit)
    assert result.has_solution and result.objective is not None
    assert x.value is not None and max_violation(problem) <= FEAS_TOL
    assert progress  # live points arrived before the stop
    assert result.trace[-1].incumbent == pytest.approx(result.objective)


def test_should_stop_before_start_does_not_solve():
    problem, open_, *_ = facility_location()
    result = solve_mip(problem, should_stop=lambda: True)
    assert result.status == "cancelled" and not result.has_solution and result.solve_time_s == 0.0
    assert open_.value is None


def test_an_exception_in_a_callback_stops_the_solver_and_reaches_the_caller():
    problem, *_ = market_split()

    def broken(point):
        raise RuntimeError("display failed")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="display failed"):
        solve_mip(problem, solver="HIGHS", time_limit_s=30.0, mip_gap=0.0, on_progress=broken)
    assert time.monotonic() - t0 < 3.0


# ---------------------------------------------------------------------------------------------------------------
# Warm start


@pytest.mark.parametrize("solver", OPEN_SOURCE)
def test_feasible_warm_start_is_accepted_and_never_beaten_by_a_worse_first_incumbent(solver):
    problem, x, short, excess, target = market_split()
    start = {x: np.zeros(x.size), short: target.astype(float), excess: np.zeros(excess.size)}
    start_objective = float(target.sum()) + 10.0
    result = solve_mip(problem, solver=solver, time_limit_s=0.5, mip_gap=0.0, warm_start=start)
    assert result.warm_start_accepted is True
    assert result.warm_start_objective == pytest.approx(start_objective)
    first = next(p.incumbent for p in result.trace if p.incumbent is not None)
    assert first <= start_objective + 1e-9
    assert result.objective <= start_objective


@pytest.mark.parametrize("solver", OPEN_SOURCE)
def test_warm_start_of_a_matrix_variable_maps_column_major_and_is_accepted(solver):
    problem, open_, assign, cost = facility_location()
    nearest = np.argmin(cost, axis=0)
    assignment = np.zeros(assign.shape)
    assignment[nearest, np.arange(assign.shape[1])] = 1.0
    start = {open_: np.ones(open_.size), assign: assignment}
    result = solve_mip(problem, solver=solver, mip_gap=0.0, warm_start=start)
    assert result.warm_start_accepted is True
    assert result.status == "optimal"
    open_.value, assign.value = start[open_], start[assign]
    assert result.warm_start_objective == pytest.approx(problem.objective.value)


@pytest.mark.parametrize("solver", OPEN_SOURCE)
def test_infeasible_warm_start_is_reported_not_accepted(solver):
    problem, open_, assign, _ = facility_location()
    assignment = np.zeros(assign.shape)
    assignment[0, :] = 1.0
    start = {open_: np.zeros(open_.size), assign: assignment}  # customers assigned to a closed facility
    result = solve_mip(problem, solver=solver, mip_gap=0.0, warm_start=start)
    assert result.warm_start_accepted is False
    assert result.warm_start_objective is None
    assert "violates" in result.message
    assert result.status == "optimal"  # the solver still found its own plan
