"""Deliverable starting plans (MIP starts) for the VMAT MIP, and how the solver is driven from them.

The MIP (``vmat_core.model``) decides which beamlets are open (``z``, contiguous per leaf row, bracketed by the
leaf positions ``lbi``/``rbi``) and the MU of each control point (``mu``); the fluence is then ``x_b = mu_i`` on
open beamlets and 0 elsewhere. Once the apertures are fixed, what is left is a linear program in ``mu`` and the
dose slacks: the *aperture LP*. Every start here is built from apertures plus that LP, so it is deliverable by
construction, and it is checked against the cvxpy constraints themselves before a solver sees it.

Sources of apertures:

* ``previous_run``: a stored run of the same case, beams, down-sampling and MU bound. Only weights or dose targets
  changed, so its plan is still deliverable; its slacks are recomputed for the new targets (and, within the
  heuristic budget, its MU re-optimised and its leaves polished by the local search below).
* ``heuristic:<seed>+ls``: local search from a seed, ``open`` (every leaf row open over its widest run of
  beamlets) or ``conformal`` (each row open over the beamlets that dose the target), then iterated from random
  perturbations of the best plan while the budget lasts. A move shifts one leaf by one beamlet; moves are tried
  in the order the LP's fluence gradient ranks them and the first that lowers the aperture LP's objective is
  kept. The LP is re-solved by HiGHS's dual simplex from the previous basis, tens of milliseconds per move on the
  notebook's problem. ``lp_rounding`` (the LP relaxation's fluence, one contiguous interval per row) is
  available but measured worse as a seed there (11 208 before and 3 330 after 60 s of search, against 2 416 from
  open rows and 1 989 from the conformal seed) and costs a 15 s relaxation, so the default search does not use it.

:func:`choose_mip_solver` is the measured solver portfolio used when the planner asks for ``auto``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np

from vmat_core.model import LeafRows, VmatModel

# The deliverability constraints hold exactly for the values built here; anything above this is a bug or a plan
# from a different problem. It is also the feasibility tolerance of HiGHS and SCIP.
FEASIBILITY_TOL = 1e-6
# A beamlet "sees" the target when its dose to the target is at least this fraction of the best beamlet's of
# the same control point: a ray through the target gives it primary dose, one beside it only scatter.
CONFORMAL_DOSE_FRACTION = 0.5
_IMPROVEMENT_RTOL = 1e-7
MAX_STALE_RESTARTS = 8


class WarmStartError(ValueError):
    """A start that cannot be used for this run; the message names the field and the reason."""


@dataclass
class StartPlan:
    """A complete, checked MIP start: every variable of the model has a value."""

    source: str  # "previous_run" | "heuristic:<name>"
    values: dict[cp.Variable, np.ndarray]
    objective: float
    max_violation: float
    time_s: float
    details: dict = field(default_factory=dict)

    def by_name(self) -> dict[str, np.ndarray]:
        return {v.name(): np.asarray(a) for v, a in self.values.items()}


# ----------------------------------------------------------------------------------------------------------------
# Apertures, leaf positions and complete starts


def leaf_positions(leaves: LeafRows, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lbi, rbi) per leaf row for the open beamlets ``z`` (0/1 per beamlet), in the model's convention.

    An open interval of columns ``a..b`` has ``lbi = a`` and ``rbi = b + 2``; a closed row has ``lbi = 0``,
    ``rbi = 1``. Raises ValueError when a row's open beamlets are not one run of adjacent columns.
    """
    z = np.asarray(z)
    if z.ndim != 1 or z.size < (leaves.beamlet.max() + 1 if leaves.beamlet.size else 0):
        raise ValueError(f"z must be one 0/1 value per beamlet; got shape {z.shape}")
    is_open = np.rint(z[leaves.beamlet]).astype(bool)
    lbi = np.zeros(leaves.n_rows, dtype=np.int64)
    rbi = np.ones(leaves.n_rows, dtype=np.int64)
    for r in range(leaves.n_rows):
        sel = leaves.row == r
        cols = np.sort(leaves.col[sel][is_open[sel]])
        if cols.size == 0:
            continue
        row_cols = set(leaves.col[sel].tolist())
        if cols[-1] - cols[0] + 1 != cols.size or any(c not in row_cols for c in range(cols[0], cols[-1] + 1)):
            raise ValueError(f"leaf row {r} (control point {leaves.row_beam[r]}): open beamlets in columns "
                             f"{cols.tolist()} are not contiguous")
        if cols[-1] + 2 > leaves.row_num_cols[r]:
            raise ValueError(f"leaf row {r}: column {cols[-1]} cannot be open (the right leaf would leave the grid)")
        lbi[r], rbi[r] = cols[0], cols[-1] + 2
    return lbi, rbi


def fluence_of(leaves: LeafRows, z: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """``x_b = mu_i`` on the open beamlets of control point ``i``, 0 elsewhere (what the constraints force)."""
    z = np.rint(np.asarray(z, dtype=float))
    x = np.zeros(z.size)
    x[leaves.beamlet] = np.asarray(mu, dtype=float)[leaves.beam] * z[leaves.beamlet]
    return x


def _slack_variables(model: VmatModel) -> list[cp.Variable]:
    own = {model.x.id, model.z.id, model.lbi.id, model.rbi.id, model.mu.id}
    return [v for v in model.problem.variables() if v.id not in own]


def _set_values(model: VmatModel, values: dict[cp.Variable, np.ndarray]) -> dict:
    saved = {v: v.value for v in model.problem.variables()}
    for v in model.problem.variables():
        v.value = None
    for v, a in values.items():
        v.value = np.asarray(a, dtype=float).reshape(v.shape)
    return saved


def _restore(saved: dict) -> None:
    for v, a in saved.items():
        v.value = a


def complete_start(model: VmatModel, z: np.ndarray, mu: np.ndarray) -> dict[cp.Variable, np.ndarray]:
    """Every variable's value for apertures ``z`` and MU ``mu``: fluence, leaf positions and the dose slacks.

    Each slack ``s`` appears in one constraint ``expr(x) - s <= 0`` (overdose: ``A x - d - s``; underdose:
    ``d - s - A x``); its smallest feasible value is ``max(0, expr(x))`` evaluated at ``s = 0``.
    """
    z = np.rint(np.asarray(z, dtype=float)).clip(0, 1)
    mu = np.clip(np.asarray(mu, dtype=float), 0.0, model.mu_bound)
    lbi, rbi = leaf_positions(model.leaves, z)
    values: dict[cp.Variable, np.ndarray] = {
        model.x: fluence_of(model.leaves, z, mu), model.z: z, model.lbi: lbi.astype(float),
        model.rbi: rbi.astype(float), model.mu: mu,
    }
    slacks = _slack_variables(model)
    if not slacks:
        return values
    saved = _set_values(model, {**values, **{s: np.zeros(s.shape) for s in slacks}})
    try:
        for s in slacks:
            owners = [c for c in model.problem.constraints if s.id in {v.id for v in c.variables()}]
            if len(owners) != 1 or not isinstance(owners[0], cp.constraints.Inequality):
                raise WarmStartError(f"warm_start: cannot complete variable {s.name()!r}: it is not a dose slack "
                                     "of one inequality")
            con = owners[0]
            at_zero = np.asarray(con.expr.value, dtype=float)
            s.value = np.ones(s.shape)
            coefficient = np.asarray(con.expr.value, dtype=float) - at_zero
            s.value = np.zeros(s.shape)
            if not np.allclose(coefficient, -1.0):
                raise WarmStartError(f"warm_start: cannot complete variable {s.name()!r}: its constraint is not "
                                     "of the form expr - slack <= 0")
            values[s] = np.maximum(at_zero, 0.0).reshape(s.shape)
    finally:
        _restore(saved)
    return values


def max_violation(model: VmatModel, values: dict[cp.Variable, np.ndarray]) -> tuple[float, str]:
    """The largest violation of any cvxpy constraint, variable domain or integrality, and where it is."""
    missing = [v.name() for v in model.problem.variables() if v not in values]
    if missing:
        return math.inf, f"no value for {', '.join(missing)}"
    saved = _set_values(model, values)
    try:
        worst, where = 0.0, ""
        for i, con in enumerate(model.problem.constraints):
            viol = con.violation()
            v = float(np.max(viol)) if np.size(viol) else 0.0
            if v > worst:
                worst, where = v, f"constraint {i} ({type(con).__name__}, {con.size} rows)"
        for var in model.problem.variables():
            a = np.asarray(var.value, dtype=float)
            checks = []
            if var.attributes.get("nonneg") or var.attributes.get("pos"):
                checks.append(np.maximum(-a, 0.0))
            if var.attributes.get("boolean"):
                checks += [np.abs(a - np.rint(a)), np.maximum(a - 1.0, 0.0), np.maximum(-a, 0.0)]
            if var.attributes.get("integer"):
                checks.append(np.abs(a - np.rint(a)))
            for c in checks:
                if c.size and float(c.max()) > worst:
                    worst, where = float(c.max()), f"domain of {var.name()}"
        return worst, where
    finally:
        _restore(saved)


def objective_value(model: VmatModel, values: dict[cp.Variable, np.ndarray]) -> float:
    saved = _set_values(model, values)
    try:
        return float(model.problem.objective.value)
    finally:
        _restore(saved)


def make_start(model: VmatModel, source: str, z: np.ndarray, mu: np.ndarray, time_s: float,
               details: dict | None = None) -> StartPlan:
    """A checked :class:`StartPlan`; raises WarmStartError when the values violate the model's constraints."""
    values = complete_start(model, z, mu)
    violation, where = max_violation(model, values)
    if not violation <= FEASIBILITY_TOL:
        raise WarmStartError(f"warm_start: the {source} plan violates the MIP's constraints by {violation:.3g} "
                             f"(worst: {where})")
    return StartPlan(source, values, objective_value(model, values), violation, time_s, dict(details or {}))


# ----------------------------------------------------------------------------------------------------------------
# The aperture LP: the MIP with apertures fixed, solved by HiGHS on cvxpy's standard form of the model


class ApertureLP:
    """The MIP with its apertures fixed, as a HiGHS LP in the MU and the slacks only.

    With ``z`` fixed the constraints force ``x = P mu`` (``P[b, i] = z_b`` for beamlet ``b`` of control point
    ``i``), so the fluence columns of cvxpy's standard form are substituted out and the integer columns moved to
    the right-hand side: a handful of MU columns instead of one column per beamlet. Rows that then involve the MU
    alone (the max/mean-dose limits, thousands of voxels, almost all slack) are added lazily: the LP is solved with
    the rows seen violated so far and re-solved while any row is violated, so it stays a few thousand rows. The
    working rows only grow, so each solve restarts from the previous optimal basis and a one-leaf change costs a
    few dual simplex iterations. ``solve(z)`` returns the optimal objective (inf when infeasible).
    """

    _ROW_TOL = 1e-9

    def __init__(self, model: VmatModel, threads: int | None = None):
        import scipy.sparse as sp

        from vmat_core.solvers import _compile

        self.model = model
        self.sf = sf = _compile(model.problem, "HIGHS")
        cols = {}
        for name in ("x", "z", "lbi", "rbi", "mu"):
            var = getattr(model, name)
            start, _ = sf.var_cols[var.id]
            cols[name] = start + np.arange(var.size, dtype=np.int64)
        self._cols = cols
        A = sf.A.tocsc()
        self._fixed_cols = np.concatenate([cols["z"], cols["lbi"], cols["rbi"]])
        dropped = np.zeros(sf.n_cols, dtype=bool)
        dropped[cols["x"]] = True
        dropped[self._fixed_cols] = True
        self._rest = np.flatnonzero(~dropped)  # the LP's columns: mu and every slack, in standard-form order
        self._mu_pos = np.searchsorted(self._rest, cols["mu"])
        self._A_x = A[:, cols["x"]].tocsr()
        self._A_fixed = A[:, self._fixed_cols].tocsr()
        self._A_rest = A[:, self._rest].tocsr()
        not_mu = np.ones(self._rest.size, dtype=bool)
        not_mu[self._mu_pos] = False
        has_other = np.asarray(abs(self._A_rest[:, np.flatnonzero(not_mu)]).sum(axis=1)).ravel() > 0
        always = has_other.copy()
        always[: sf.n_eq] = True
        self._always = np.flatnonzero(always)
        self._lazy = np.flatnonzero(~always)
        self._A_x_lazy = self._A_x[self._lazy]
        self._A_mu_lazy = self._A_rest[self._lazy][:, self._mu_pos]
        self._working: list[int] = []  # lazy rows in the LP, in the order they were added
        self._sp = sp
        leaves = model.leaves
        self._beam_of = np.full(model.x.size, -1, dtype=np.int64)
        self._beam_of[leaves.beamlet] = leaves.beam
        self._n_mu = model.mu.size
        self.threads = threads
        self.n_solves = 0
        self.solve_time_s = 0.0
        self._basis = None
        self._basis_rows = 0
        self._solution: np.ndarray | None = None
        self._row_dual: np.ndarray | None = None
        self._rows_solved: np.ndarray | None = None
        self.z: np.ndarray | None = None

    def _highs(self):
        import highspy as hp

        h = hp.Highs()
        h.setOptionValue("output_flag", False)
        if self.threads is not None:
            h.setOptionValue("threads", int(self.threads))
        return h

    def _solve_rows(self, rows: np.ndarray, P, b: np.ndarray, cost: np.ndarray, offset: float) -> float:
        import highspy as hp

        from vmat_core.solvers import highs_lp_from_standard_form

        sp = self._sp
        to_rest = sp.csr_matrix((np.ones(self._n_mu), (np.arange(self._n_mu), self._mu_pos)),
                                shape=(self._n_mu, self._rest.size))
        A = (self._A_rest[rows] + (self._A_x[rows] @ P) @ to_rest).tocsc()
        h = self._highs()
        lp = highs_lp_from_standard_form(self.sf, relax_integers=True, rows=rows, cols=self._rest, A=A, c=cost,
                                         b=b, offset=offset)
        t0 = time.perf_counter()
        h.passModel(lp)
        if self._basis is not None:
            basis = self._basis
            extra = rows.size - self._basis_rows
            if extra > 0:  # the new rows enter with their slack basic: still a valid basis
                basis.row_status = list(basis.row_status) + [hp.HighsBasisStatus.kBasic] * extra
            h.setBasis(basis)
        h.run()
        self.solve_time_s += time.perf_counter() - t0
        self.n_solves += 1
        if h.getModelStatus().name != "kOptimal":
            return math.inf
        self._basis = h.getBasis()
        self._basis_rows = rows.size
        sol = h.getSolution()
        self._solution = np.asarray(sol.col_value, dtype=float)
        self._row_dual = np.asarray(sol.row_dual, dtype=float)
        self._rows_solved = rows
        return float(h.getInfo().objective_function_value)

    def solve(self, z: np.ndarray) -> float:
        sp, sf = self._sp, self.sf
        z = np.rint(np.asarray(z, dtype=float))
        lbi, rbi = leaf_positions(self.model.leaves, z)
        fixed = np.concatenate([z, lbi.astype(float), rbi.astype(float)])
        open_ = np.flatnonzero((z > 0.5) & (self._beam_of >= 0))
        P = sp.csr_matrix((np.ones(open_.size), (open_, self._beam_of[open_])), shape=(z.size, self._n_mu))
        b = sf.b - self._A_fixed @ fixed
        cost = sf.c[self._rest].copy()
        cost[self._mu_pos] += P.T @ sf.c[self._cols["x"]]  # the fluence's own cost (the dose-sum terms)
        offset = sf.offset + float(sf.c[self._fixed_cols] @ fixed)
        b_lazy = b[self._lazy]
        A_lazy_mu = (self._A_x_lazy @ P + self._A_mu_lazy).tocsr()
        while True:
            rows = np.concatenate([self._always, self._lazy[np.asarray(self._working, dtype=np.int64)]])
            value = self._solve_rows(rows, P, b, cost, offset)
            if not math.isfinite(value):
                return value
            violated = np.flatnonzero(A_lazy_mu @ self.mu > b_lazy + self._ROW_TOL)
            # Rows already in the LP hold to HiGHS's own tolerance (1e-7): only rows left out can be new.
            seen = set(self._working)
            new = [int(k) for k in violated if int(k) not in seen]
            if not new:
                self.z = z
                return value
            self._working.extend(new)

    @property
    def mu(self) -> np.ndarray:
        """The MU of the last feasible solve."""
        return self._solution[self._mu_pos].copy()

    def fluence_gradient(self) -> np.ndarray:
        """d(objective)/d(x_b) at the last feasible solve: cost minus ``A^T y`` over the LP's rows (the lazy
        rows left out are inactive, so their duals are 0)."""
        rows = self._rows_solved
        return self.sf.c[self._cols["x"]] - self._A_x[rows].T @ self._row_dual


def lp_relaxation(model: VmatModel, threads: int | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """The MIP's LP relaxation solved by HiGHS: (objective, fluence x, MU)."""
    import highspy as hp

    from vmat_core.solvers import _compile, highs_lp_from_standard_form

    sf = _compile(model.problem, "HIGHS")
    h = hp.Highs()
    h.setOptionValue("output_flag", False)
    if threads is not None:
        h.setOptionValue("threads", int(threads))
    h.passModel(highs_lp_from_standard_form(sf, relax_integers=True))
    h.run()
    if h.getModelStatus().name != "kOptimal":
        raise WarmStartError(f"warm_start: the LP relaxation did not solve ({h.getModelStatus().name})")
    sol = np.asarray(h.getSolution().col_value, dtype=float)
    x0, _ = sf.var_cols[model.x.id]
    m0, _ = sf.var_cols[model.mu.id]
    return (float(h.getInfo().objective_function_value), sol[x0:x0 + model.x.size],
            sol[m0:m0 + model.mu.size])


# ----------------------------------------------------------------------------------------------------------------
# Apertures from the case


def _row_runs(leaves: LeafRows) -> list[list[np.ndarray]]:
    """Per leaf row, its runs of adjacent columns that may be open (as arrays of beamlet indices, by column)."""
    out = []
    for r in range(leaves.n_rows):
        sel = np.flatnonzero(leaves.row == r)
        order = sel[np.argsort(leaves.col[sel])]
        cols, beamlets = leaves.col[order], leaves.beamlet[order]
        ok = cols + 2 <= leaves.row_num_cols[r]
        cols, beamlets = cols[ok], beamlets[ok]
        runs, start = [], 0
        for k in range(1, cols.size + 1):
            if k == cols.size or cols[k] != cols[k - 1] + 1:
                if k > start:
                    runs.append(beamlets[start:k])
                start = k
        out.append(runs)
    return out


def _best_interval(run: np.ndarray, gain: np.ndarray) -> tuple[int, int] | None:
    """The contiguous slice [i, j) of ``run`` with the largest positive total ``gain`` (None if all ≤ 0)."""
    best, best_ij, acc, start = 0.0, None, 0.0, 0
    for k, b in enumerate(run):
        if acc <= 0:
            acc, start = 0.0, k
        acc += gain[b]
        if acc > best:
            best, best_ij = acc, (start, k + 1)
    return best_ij


def intervals_from_scores(leaves: LeafRows, score: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
    """Per leaf row, the contiguous interval of beamlets that maximises ``sum(score - threshold)``."""
    gain = np.asarray(score, dtype=float) - threshold
    z = np.zeros(score.size)
    for runs in _row_runs(leaves):
        best = None
        for run in runs:
            ij = _best_interval(run, gain)
            if ij is not None:
                total = gain[run[ij[0]:ij[1]]].sum()
                if best is None or total > best[0]:
                    best = (total, run[ij[0]:ij[1]])
        if best is not None:
            z[best[1]] = 1.0
    return z


def conformal_apertures(model: VmatModel, inf_matrix, target: str = "PTV") -> np.ndarray:
    """Each leaf row open over the beamlets whose dose to ``target`` is at least half their control point's best."""
    vox = inf_matrix.get_opt_voxels_idx(target)
    if len(vox) == 0:
        raise WarmStartError(f"warm_start: structure {target!r} has no optimisation voxels")
    target_dose = np.asarray(inf_matrix.A[vox, :].sum(axis=0)).ravel()
    leaves = model.leaves
    per_cp_best = np.zeros(len(leaves.beam_ids))
    np.maximum.at(per_cp_best, leaves.beam, target_dose[leaves.beamlet])
    threshold = np.zeros(target_dose.size)
    threshold[leaves.beamlet] = CONFORMAL_DOSE_FRACTION * per_cp_best[leaves.beam]
    # A gain of +1 inside the target's shadow and -1 outside makes the interval the shadow's convex hull per row.
    score = np.where(target_dose >= threshold, 1.0, -1.0)
    return intervals_from_scores(leaves, score, 0.0)


def lp_rounding_apertures(model: VmatModel, threads: int | None = None) -> tuple[np.ndarray, float]:
    """Apertures from the LP relaxation: per row the interval maximising ``sum(x_b - mu_i / 2)``.

    Returns (z, the relaxation's objective). Half the control point's relaxed MU as threshold keeps beamlets that
    the relaxation uses at least half-open.
    """
    relaxed, x, mu = lp_relaxation(model, threads)
    leaves = model.leaves
    threshold = np.zeros(x.size)
    threshold[leaves.beamlet] = 0.5 * mu[leaves.beam]
    return intervals_from_scores(leaves, x, threshold + 1e-9), relaxed


# ----------------------------------------------------------------------------------------------------------------
# Local search over leaf positions


def _neighbours(runs: list[np.ndarray], z: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Apertures one leaf step away in this row: (beamlets to open, beamlets to close)."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    none = np.zeros(0, dtype=np.int64)
    open_run = None
    for run in runs:
        if z[run].any():
            open_run = run
    if open_run is None:
        for run in runs:
            out.extend((np.array([b]), none) for b in run)
        return out
    run = open_run
    idx = np.flatnonzero(z[run] > 0.5)
    i, j = int(idx[0]), int(idx[-1])
    if i > 0:
        out.append((run[i - 1:i], none))  # left leaf out
    if j < run.size - 1:
        out.append((run[j + 1:j + 2], none))  # right leaf out
    if j > i:
        out.append((none, run[i:i + 1]))  # left leaf in
        out.append((none, run[j:j + 1]))  # right leaf in
    else:
        out.append((none, run[i:i + 1]))  # close the row
    if i > 0:
        out.append((run[i - 1:i], run[j:j + 1]))  # shift left
    if j < run.size - 1:
        out.append((run[j + 1:j + 2], run[i:i + 1]))  # shift right
    return out


def local_search(lp: ApertureLP, z: np.ndarray, *, deadline: float, rng: np.random.Generator | None = None,
                 on_improve: Callable[[float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, float, int]:
    """First-improvement search over one-leaf moves until no move helps or ``deadline`` (perf_counter) passes.

    The moves are tried in the order the LP's fluence gradient predicts them to help (opening beamlet ``b`` of
    control point ``i`` changes the objective by about ``g_b * mu_i``), so an improving move is usually among the
    first few LPs; the search stops only after every move has been tried without improvement. Returns (z,
    objective, number of accepted moves).
    """
    rng = rng or np.random.default_rng(0)
    z = np.rint(np.asarray(z, dtype=float))
    best = lp.solve(z)
    if not math.isfinite(best):
        return z, best, 0
    leaves = lp.model.leaves
    beam_of = np.full(z.size, -1, dtype=np.int64)
    beam_of[leaves.beamlet] = leaves.beam
    runs = _row_runs(leaves)
    accepted = 0
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        mu_b = np.where(beam_of >= 0, lp.mu[np.maximum(beam_of, 0)], 0.0)
        g = lp.fluence_gradient() * mu_b
        moves = [m for r in range(len(runs)) for m in _neighbours(runs[r], z)]
        predicted = np.array([g[o].sum() - g[c].sum() for o, c in moves]) + 1e-12 * rng.random(len(moves))
        for k in np.argsort(predicted):
            if time.perf_counter() >= deadline or (should_stop is not None and should_stop()):
                break
            to_open, to_close = moves[k]
            trial = z.copy()
            trial[to_open], trial[to_close] = 1.0, 0.0
            value = lp.solve(trial)
            if value < best - _IMPROVEMENT_RTOL * max(1.0, abs(best)):
                z, best, improved = trial, value, True
                accepted += 1
                if on_improve is not None:
                    on_improve(best)
                break  # new incumbent: new gradient, new order
        if not improved:
            break
    lp.solve(z)  # leave the LP (its MU, basis and gradient) at the returned apertures
    return z, best, accepted


# ----------------------------------------------------------------------------------------------------------------
# Starts


def open_apertures(model: VmatModel) -> np.ndarray:
    """Every leaf row open over its widest run of beamlets."""
    return intervals_from_scores(model.leaves, np.ones(model.x.size), 0.0)


def _perturb(z: np.ndarray, runs: list[list[np.ndarray]], rng: np.random.Generator, n_rows: int) -> np.ndarray:
    """``z`` with ``n_rows`` random leaf rows re-drawn: closed, fully open, or a random interval."""
    z = z.copy()
    for r in rng.choice(len(runs), size=min(n_rows, len(runs)), replace=False):
        if not runs[r]:
            continue
        for run in runs[r]:
            z[run] = 0.0
        run = runs[r][int(rng.integers(len(runs[r])))]
        kind = rng.integers(3)
        if kind == 1:
            z[run] = 1.0
        elif kind == 2:
            i, j = sorted(rng.integers(0, run.size, size=2))
            z[run[i:j + 1]] = 1.0
    return z


def heuristic_start(model: VmatModel, inf_matrix, *, time_budget_s: float = 20.0, target: str | None = None,
                    seed: int = 0, threads: int | None = None,
                    on_improve: Callable[[float, float], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> StartPlan:
    """The best deliverable plan found within ``time_budget_s`` by aperture local search.

    Local search from the conformal apertures (``target``'s shadow; the first target structure of the objectives
    when None) and from fully open rows, then, while time remains, from random perturbations of the best plan
    (iterated local search). ``on_improve(elapsed_s, objective)`` reports each new best plan; a True from
    ``should_stop`` ends the search with the best plan so far. Every plan is an exact MIP solution (checked by
    :func:`make_start`).
    """
    if not (isinstance(time_budget_s, (int, float)) and math.isfinite(time_budget_s) and time_budget_s > 0):
        raise ValueError(f"time_budget_s must be a number of seconds > 0; got {time_budget_s!r}")
    t0 = time.perf_counter()
    deadline = t0 + float(time_budget_s)
    rng = np.random.default_rng(seed)
    lp = ApertureLP(model, threads=threads)
    target = target or _target_structure(model)
    best = {"value": math.inf, "z": None, "mu": None, "name": ""}
    history: list[tuple[float, float, str]] = []

    def consider(name: str, z: np.ndarray, value: float) -> None:
        if value < best["value"]:
            best.update(value=value, z=z.copy(), mu=lp.mu, name=name)
            history.append((time.perf_counter() - t0, value, name))
            if on_improve is not None:
                on_improve(time.perf_counter() - t0, value)

    # Open rows reach a (poorer) local optimum within seconds; the conformal seed starts far off but tends to
    # end lower. Both share the budget's first 60 %; perturbations of the best get the rest.
    seeds: list[tuple[str, np.ndarray]] = [("open", open_apertures(model))]
    if target is not None:
        seeds.append(("conformal", conformal_apertures(model, inf_matrix, target)))
    for k, (name, z0) in enumerate(seeds):
        share = t0 + 0.6 * time_budget_s * (k + 1) / len(seeds)
        z, value, _ = local_search(lp, z0, deadline=min(share, deadline), rng=rng, should_stop=should_stop)
        if math.isfinite(value):
            consider(f"{name}+ls", z, value)
    runs = _row_runs(model.leaves)
    n_restarts = stale = 0
    # On a small problem the search settles in well under a second: stop there rather than burn the budget.
    while best["z"] is not None and time.perf_counter() < deadline - 0.05 and stale < MAX_STALE_RESTARTS \
            and not (should_stop is not None and should_stop()):
        trial = _perturb(best["z"], runs, rng, n_rows=max(2, len(runs) // 8))
        z, value, _ = local_search(lp, trial, deadline=deadline, rng=rng, should_stop=should_stop)
        n_restarts += 1
        stale += 1
        if math.isfinite(value) and value < best["value"]:
            consider(best["name"], z, value)
            stale = 0
    if best["z"] is None:
        raise WarmStartError("warm_start: no deliverable start found: every aperture tried made the MU LP "
                             "infeasible (the constraints may be unreachable with these beams)")
    details = {"lp_solves": lp.n_solves, "lp_time_s": round(lp.solve_time_s, 3), "restarts": n_restarts,
               "history": history}
    return make_start(model, f"heuristic:{best['name']}", best["z"], best["mu"], time.perf_counter() - t0,
                      details)


def _target_structure(model: VmatModel) -> str | None:
    for term in model.terms:
        name, _, kind = term.key.partition("/")
        if kind == "quadratic-underdose":
            return name
    return None


# Settings that must match for a stored plan to be a solution of this run's MIP: they define its variables and
# deliverability constraints. Weights, dose targets and constraint limits may differ.
COMPATIBILITY_FIELDS = ("case_id", "beam_ids", "voxel_down_sample_factors", "beamlet_down_sample_factor", "mu_bound")


def check_previous_run(cfg, previous_cfg, run_id: str) -> None:
    """Raise WarmStartError naming ``warm_start_run_id`` when run ``run_id`` solved a different MIP."""
    for name in COMPATIBILITY_FIELDS:
        mine, theirs = getattr(cfg, name), getattr(previous_cfg, name)
        if isinstance(mine, (list, tuple)):
            mine, theirs = list(mine), list(theirs)
        if mine != theirs:
            raise WarmStartError(
                f"warm_start_run_id: run {run_id} has {name} = {theirs!r} but this run has {mine!r}; a previous "
                f"run can start this one only when {', '.join(COMPATIBILITY_FIELDS)} are the same")


def load_previous_run(cfg, run_id: str, store=None) -> dict[str, np.ndarray]:
    """The stored plan of ``run_id`` (checked compatible with ``cfg``): fluence, mu, beamlet_open, leaf positions."""
    from vmat_core.config import RunConfig
    from vmat_core.store import RunNotFound, RunStore

    store = store or RunStore()
    try:
        previous_cfg = RunConfig.from_dict(store.read_config(run_id))
        arrays = store.read_arrays(run_id, ["fluence", "mu", "beamlet_open", "left_leaf_pos", "right_leaf_pos"])
    except (RunNotFound, FileNotFoundError, KeyError) as exc:
        raise WarmStartError(f"warm_start_run_id: run {run_id} not found or incomplete ({exc})") from exc
    check_previous_run(cfg, previous_cfg, run_id)
    return arrays


def previous_run_start(model: VmatModel, arrays: dict[str, np.ndarray], *, polish_s: float = 0.0,
                       threads: int | None = None, seed: int = 0,
                       should_stop: Callable[[], bool] | None = None) -> StartPlan:
    """The stored plan as a start for this model: same apertures and MU, slacks recomputed for the new targets.

    With ``polish_s > 0`` the MU are re-optimised for the new weights (never worse: the stored MU are feasible
    for the aperture LP) and the leaves moved by the local search for at most that long.
    """
    t0 = time.perf_counter()
    z = np.asarray(arrays["beamlet_open"], dtype=float)
    mu = np.asarray(arrays["mu"], dtype=float)
    if z.shape != (model.x.size,) or mu.shape != (model.mu.size,):
        raise WarmStartError(f"warm_start_run_id: the stored plan has {z.size} beamlets and {mu.size} control "
                             f"points; this run's MIP has {model.x.size} and {model.mu.size}")
    try:
        exact = make_start(model, "previous_run", z, mu, 0.0)
    except (WarmStartError, ValueError) as exc:
        exact, reason = None, str(exc)
    best = exact
    if polish_s > 0 or exact is None:
        lp = ApertureLP(model, threads=threads)
        budget = polish_s if polish_s > 0 else 5.0
        zz, value, moves = local_search(lp, z, deadline=time.perf_counter() + budget,
                                        rng=np.random.default_rng(seed), should_stop=should_stop)
        if math.isfinite(value) and (best is None or value < best.objective):
            best = make_start(model, "previous_run", zz, lp.mu, 0.0,
                              {"exact_objective": None if exact is None else exact.objective, "leaf_moves": moves})
    if best is None:
        raise WarmStartError(f"warm_start_run_id: the stored plan cannot be made feasible for this run ({reason})")
    best.time_s = time.perf_counter() - t0
    return best


# ----------------------------------------------------------------------------------------------------------------
# How the solver is driven

# Share of the time limit given to the start heuristic, and its cap. Measured on the notebook's 7-beam problem:
# neither HiGHS nor SCIP improved on a local-search start within 60 s, while the search itself was still finding
# better plans after 40 s; the solver's time then mostly buys the bound (SCIP: 826 after 60 s, 832 after 120 s).
HEURISTIC_SHARE = 0.4
HEURISTIC_CAP_S = 60.0


def heuristic_time_s(settings) -> float:
    """Seconds of ``settings.time_limit_s`` spent on the start (``settings.heuristic_time_s`` when set)."""
    if settings.heuristic_time_s is not None:
        return float(settings.heuristic_time_s)
    return min(HEURISTIC_CAP_S, HEURISTIC_SHARE * float(settings.time_limit_s))


@dataclass(frozen=True)
class SolverPlan:
    choice: object  # solvers.SolverChoice
    options: dict
    reason: str


# Measured on the notebook's default problem (synthetic lung patient, 7 beams, factors 6/6/1: 18 343 rows x
# 2 545 columns, 216 integer), 2 shared cores, mip_gap 1e-4:
#   no start, 120 s:            HiGHS objective 9 911, bound 810.7 (gap 92 %); SCIP 3 334, bound 831.7 (gap 75 %)
#   local-search start 2 263, 60 s: HiGHS kept 2 263, bound 793.5; SCIP kept 2 263, bound 825.8
# SCIP finds better plans alone and proves better bounds from a start, so it leads; bench/bench_gap.py prints
# the full curves.
PORTFOLIO = ("SCIP", "HIGHS")
PORTFOLIO_OPTIONS: dict[str, dict] = {"SCIP": {}, "HIGHS": {}}


def choose_mip_solver(settings) -> SolverPlan:
    """The solver for ``settings`` (a config's SolverSettings) and the options it runs with.

    An explicit solver is used as asked, with the planner's options only. ``auto`` takes MOSEK when licensed,
    else the open-source solver measured best on this problem (:data:`PORTFOLIO`) with its measured options;
    the planner's own options are applied on top.
    """
    from vmat_core import solvers

    user = dict(settings.options or {})
    if settings.solver != "auto":
        choice = solvers.choose_solver(settings.solver)
        return SolverPlan(choice, user, choice.reason)
    status = solvers.solver_status()
    if status["MOSEK"]["licensed"]:
        choice = solvers.choose_solver("MOSEK")
        return SolverPlan(choice, user, f"auto: {status['MOSEK']['detail']}; MOSEK is preferred when licensed")
    for name in PORTFOLIO:
        if status[name]["installed"] and status[name]["licensed"]:
            choice = solvers.choose_solver(name)
            options = {**PORTFOLIO_OPTIONS[name], **user}
            reason = (f"auto: {status['MOSEK']['detail']}; {name} reached the best objective by the time limit "
                      "on the notebook's problem here (measured portfolio)")
            return SolverPlan(choice, options, reason)
    choice = solvers.choose_solver("auto")  # raises SolverUnavailable with the details
    return SolverPlan(choice, user, choice.reason)


def build_case_model(cfg, portpy_dir=None):
    """(model, prepared case) for ``cfg``: the runner's load and build steps, for benchmarks and tests."""
    import portpy.photon as pp

    from vmat_core import cases
    from vmat_core.config import to_portpy_opt_params
    from vmat_core.model import build_vmat_mip
    from vmat_core.runner import _quiet, prepare_case

    prepared = prepare_case(cfg, portpy_dir)
    case = cases.case_info(cfg.case_id, portpy_dir)
    criteria = pp.ClinicalCriteria(pp.DataExplorer(data_dir=str(case.path.parent)), protocol_name=cfg.protocol)
    opt_params = to_portpy_opt_params(cfg)
    with _quiet():
        plan = pp.Plan(ct=prepared.ct, structs=prepared.structs, beams=prepared.beams, inf_matrix=prepared.inf_db,
                       clinical_criteria=criteria)
        opt = pp.Optimization(plan, opt_params=opt_params)
        model = build_vmat_mip(opt, opt_params, int(criteria.get_num_of_fractions()), cfg.mu_bound)
    return model, prepared
