"""The notebook's VMAT global-optimal MIP, built from a PortPy plan.

The mathematics is exactly that of PortPy's ``vmat_global_optimal`` example (section 1):

* objective: for each ``quadratic-overdose`` row ``w/|V| * sum(dO)`` with ``A_V x <= d + dO``; for each
  ``quadratic-underdose`` row ``w/|V| * sum(dU)`` with ``A_V x >= d - dU`` (slacks ``>= 0``, d in Gy per
  fraction); for each ``quadratic`` row ``w/|V| * sum(A_V x)``; other types (``linear-overdose``,
  ``smoothness-quadratic``) do not enter the notebook's objective;
* the max/mean-dose constraints that PortPy's ``Optimization.create_cvxpy_problem`` derives from the clinical
  criteria and the protocol's rind constraints (the notebook keeps them; the over/under-dose rows that
  ``create_cvxpy_problem`` also adds carry free slacks that no longer appear in the objective, so they cut
  nothing and are left out);
* deliverability per control point ``i`` and leaf row ``r`` of its beam's-eye-view grid, with beamlet
  ``b`` in column ``c_b`` of a row of ``n`` columns: ``rbi_r - (c_b+1) z_b >= 1``,
  ``(n - c_b) z_b + lbi_r <= n``, ``sum_b z_b = rbi_r - lbi_r - 1``, ``rbi_r <= n``, ``x_b <= U z_b``,
  ``mu_i - U (1 - z_b) <= x_b <= mu_i``, ``mu_i <= U``, ``lbi, rbi >= 0`` integer, ``z`` binary.

The notebook writes these one leaf at a time (thousands of tiny cvxpy constraints, slow to canonicalise); here
each family is one vectorised constraint over all leaves, which is the same set of linear inequalities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

MODEL_OBJECTIVE_TYPES = ("quadratic-overdose", "quadratic-underdose", "quadratic")


@dataclass
class LeafRows:
    """Leaf-row geometry of all control points, flattened (one entry per beamlet in a leaf row)."""

    beamlet: np.ndarray  # beamlet column in A
    row: np.ndarray  # global leaf-row index
    col: np.ndarray  # column of the beamlet inside its row's BEV grid
    beam: np.ndarray  # control-point index (0..n_beams-1)
    row_num_cols: np.ndarray  # per global leaf row: number of columns of its beam's grid
    row_beam: np.ndarray  # per global leaf row: control-point index
    beam_ids: list

    @property
    def n_rows(self) -> int:
        return int(self.row_num_cols.size)


@dataclass
class ObjectiveTerm:
    key: str  # "STRUCT/type"
    expression: cp.Expression


@dataclass
class VmatModel:
    problem: cp.Problem
    x: cp.Variable
    z: cp.Variable
    lbi: cp.Variable
    rbi: cp.Variable
    mu: cp.Variable
    leaves: LeafRows
    terms: list[ObjectiveTerm]
    mu_bound: float
    build_time_s: float
    skipped_objectives: list[str] = field(default_factory=list)

    @property
    def size(self) -> dict:
        return {
            "n_beamlets": int(self.x.shape[0]),
            "n_leaf_rows": self.leaves.n_rows,
            "n_control_points": len(self.leaves.beam_ids),
            "n_integer_vars": 2 * self.leaves.n_rows,
            "n_binary_vars": int(self.z.shape[0]),
        }

    def term_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.terms:
            v = t.expression.value
            out[t.key] = float(v) if v is not None else float("nan")
        return out


def leaf_rows(inf_matrix, beam_ids: list) -> LeafRows:
    """Leaf rows of each control point's BEV grid, as the notebook derives them from ``get_bev_2d_grid``."""
    maps = inf_matrix.get_bev_2d_grid(beam_id=list(beam_ids))
    beamlet, row, col, beam, row_cols, row_beam = [], [], [], [], [], []
    g = 0
    for i, beam_map in enumerate(maps):
        beam_map = beam_map[~np.all(beam_map == -1, axis=1), :]  # rows outside the BEV carry no leaf
        n_cols = beam_map.shape[1]
        for r in range(beam_map.shape[0]):
            cols = np.flatnonzero(beam_map[r] >= 0)
            beamlet.append(beam_map[r, cols])
            col.append(cols)
            row.append(np.full(cols.size, g))
            beam.append(np.full(cols.size, i))
            row_cols.append(n_cols)
            row_beam.append(i)
            g += 1
    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return LeafRows(
        beamlet=cat(beamlet),
        row=cat(row),
        col=cat(col),
        beam=cat(beam),
        row_num_cols=np.asarray(row_cols, dtype=np.int64),
        row_beam=np.asarray(row_beam, dtype=np.int64),
        beam_ids=list(beam_ids),
    )


def _selector(index: np.ndarray, n: int) -> sp.csr_matrix:
    m = index.size
    return sp.csr_matrix((np.ones(m), (np.arange(m), index)), shape=(m, n))


def deliverability_constraints(x, z, lbi, rbi, mu, leaves: LeafRows, mu_bound: float) -> list:
    n_beamlets = x.shape[0]
    U = float(mu_bound)
    b, c = leaves.beamlet, leaves.col.astype(float)
    n_of_entry = leaves.row_num_cols[leaves.row].astype(float)
    pick_row = _selector(leaves.row, leaves.n_rows)
    pick_beam = _selector(leaves.beam, len(leaves.beam_ids))
    row_sum = sp.csr_matrix((np.ones(b.size), (leaves.row, b)), shape=(leaves.n_rows, n_beamlets))
    zb, xb = z[b], x[b]
    return [
        pick_row @ rbi - cp.multiply(c + 1.0, zb) >= 1,
        cp.multiply(n_of_entry - c, zb) + pick_row @ lbi <= n_of_entry,
        row_sum @ z == rbi - lbi - 1,
        rbi <= leaves.row_num_cols.astype(float),
        xb <= U * zb,
        pick_beam @ mu - U * (1 - zb) <= xb,
        xb <= pick_beam @ mu,
        mu <= U,
        lbi >= 0,
        rbi >= 0,
    ]


def portpy_constraints(opt) -> list:
    """The constraints PortPy's ``create_cvxpy_problem`` adds, without the objective-slack rows (see module doc)."""
    x = opt.vars["x"]
    opt.create_cvxpy_problem()
    slack_ids = {v.id for term in opt.obj for v in term.variables() if v.id != x.id}
    kept = [c for c in opt.constraints if not ({v.id for v in c.variables()} & slack_ids)]
    opt.obj, opt.constraints = [], []
    return kept


def build_vmat_mip(opt, opt_params: dict, num_fractions: int, mu_bound: float = 2.0) -> VmatModel:
    """The MIP for PortPy ``Optimization`` object ``opt`` (whose plan holds the down-sampled matrix)."""
    t0 = time.perf_counter()
    plan = opt.my_plan
    st = opt.inf_matrix
    A = st.A
    x = opt.vars["x"]
    constraints = portpy_constraints(opt)
    structures = set(plan.structures.get_structures())
    terms: list[ObjectiveTerm] = []
    skipped: list[str] = []
    for row in opt_params.get("objective_functions", []):
        kind, name = row["type"], row.get("structure_name")
        key = f"{name}/{kind}"
        if kind not in MODEL_OBJECTIVE_TYPES:
            skipped.append(key)
            continue
        if name not in structures:
            skipped.append(key)
            continue
        vox = st.get_opt_voxels_idx(name)
        if len(vox) == 0:
            skipped.append(key)
            continue
        scale = float(row["weight"]) / len(vox)
        A_s = A[vox, :]
        if kind == "quadratic":
            terms.append(ObjectiveTerm(key, scale * cp.sum(A_s @ x)))
            continue
        dose = opt.get_num(row["dose_gy"]) / num_fractions
        slack = cp.Variable(len(vox), pos=True, name=f"slack_{name}_{kind}")
        terms.append(ObjectiveTerm(key, scale * cp.sum(slack)))
        if kind == "quadratic-overdose":
            constraints.append(A_s @ x <= dose + slack)
        else:
            constraints.append(A_s @ x >= dose - slack)

    leaves = leaf_rows(st, plan.beams.get_all_beam_ids())
    lbi = cp.Variable(leaves.n_rows, integer=True, name="lbi")
    rbi = cp.Variable(leaves.n_rows, integer=True, name="rbi")
    z = cp.Variable(A.shape[1], boolean=True, name="z")
    mu = cp.Variable(len(leaves.beam_ids), pos=True, name="mu")
    constraints += deliverability_constraints(x, z, lbi, rbi, mu, leaves, mu_bound)
    objective = cp.Minimize(cp.sum([t.expression for t in terms]) if terms else 0)
    problem = cp.Problem(objective, constraints)
    return VmatModel(
        problem=problem, x=x, z=z, lbi=lbi, rbi=rbi, mu=mu, leaves=leaves, terms=terms, mu_bound=float(mu_bound),
        build_time_s=time.perf_counter() - t0, skipped_objectives=skipped,
    )
