"""Solve the VMAT mixed-integer program (a cvxpy Problem) with MOSEK, HiGHS or SCIP, and report honestly.

HiGHS and SCIP are driven directly from cvxpy's standard form (``problem.get_problem_data``) rather than through
``problem.solve``: cvxpy drops the incumbent when a HiGHS solve is interrupted and turns a SCIP time limit without
a solution into an exception, while a planner needs the best plan found so far, live progress, and a Stop button.
The solution is mapped back with cvxpy's own reduction chain, so ``variable.value`` works exactly as after
``problem.solve``. MOSEK (when licensed) goes through cvxpy's own interface.

One gap definition is used everywhere (:func:`relative_gap`): ``(incumbent - bound) / max(|incumbent|, 1e-10)``.
HiGHS and MOSEK use the same one; SCIP divides by ``min(|P|, |D|)`` instead, so its run is stopped here as soon as
this module's gap reaches the requested one.

Callbacks (``on_progress``, ``on_log``, ``should_stop``) are always called on the thread that called
:func:`solve_mip`: the solver itself runs on a helper thread. A Stop is honoured at the solver's next check:
within a fraction of a second during branch and bound, but neither HiGHS nor SCIP checks inside a single LP
solve, so the first (root) LP of a large VMAT model can delay it by that LP's duration.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import queue
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from numbers import Integral, Real

import cvxpy as cp
import cvxpy.settings as cvxpy_settings
import numpy as np
import scipy.sparse as sp
from cvxpy.reductions.solution import Solution

_log = logging.getLogger(__name__)

SOLVERS = ("MOSEK", "HIGHS", "SCIP")
_SOLVER_LABELS = {"MOSEK": "MOSEK", "HIGHS": "HiGHS", "SCIP": "SCIP"}
# A run that stops with a gap at or below this is "optimal": it is the default relative tolerance of all three.
OPTIMALITY_GAP = 1e-4
_GAP_DENOMINATOR_FLOOR = 1e-10
_PROGRESS_INTERVAL_S = 0.5
_POLL_INTERVAL_S = 0.05
_STOP_POLL_INTERVAL_S = 0.1
_INTEGRALITY_ROUNDING = 1e-6
_START_TOL = 1e-6  # the primal feasibility tolerance of HiGHS and SCIP

# Options the arguments of solve_mip own: setting them through solver_options would make the reported status lie.
_OWNED_OPTIONS = {
    "HIGHS": {"time_limit", "mip_rel_gap", "threads", "log_to_console", "output_flag"},
    "SCIP": {"limits/time", "limits/gap"},
    "MOSEK": {"MSK_DPAR_MIO_MAX_TIME", "MSK_DPAR_MIO_TOL_REL_GAP", "MSK_IPAR_NUM_THREADS", "MSK_DPAR_OPTIMIZER_MAX_TIME"},
}

STATUSES = ("optimal", "gap_limit", "time_limit", "cancelled", "infeasible", "unbounded", "no_solution", "error")


class SolverUnavailable(ValueError):
    """An explicitly requested solver that is not installed or not licensed."""


@dataclass(frozen=True)
class SolverChoice:
    name: str
    reason: str


@dataclass
class ProgressPoint:
    """A sample of a running solve, in the objective's own sense; ``elapsed_s`` counts from the solver start."""

    elapsed_s: float
    incumbent: float | None
    bound: float | None
    gap: float | None
    nodes: int | None


@dataclass
class MipResult:
    """The outcome of :func:`solve_mip`.

    ``status`` is one of STATUSES: "optimal" (proved within 1e-4, or within the requested gap when that is
    smaller), "gap_limit" (stopped at a requested gap above 1e-4), "time_limit" (stopped by a limit with a plan,
    whatever its gap), "cancelled" (stopped on request; a plan may exist), "infeasible", "unbounded",
    "no_solution" (a limit hit before any plan) or "error". ``gap`` is :func:`relative_gap` of ``objective`` and
    ``bound``. ``solve_time_s`` is the solver run's wall time (building its model is excluded); ``trace`` always
    ends with a point for the final state. ``warm_start_accepted`` is None without a start or when the solver
    does not tell.
    """

    solver: str
    reason: str
    status: str
    has_solution: bool
    objective: float | None
    bound: float | None
    gap: float | None
    solve_time_s: float
    trace: list[ProgressPoint]
    log: str
    message: str
    warm_start_objective: float | None = None
    warm_start_accepted: bool | None = None


# ----------------------------------------------------------------------------------------------------------------
# Gap


def _finite_or_none(value) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def relative_gap(incumbent, bound, *, maximize: bool = False) -> float | None:
    """The one relative MIP gap of the planner: ``(incumbent - bound) / max(|incumbent|, 1e-10)``, clipped at 0.

    For a maximisation the difference is ``bound - incumbent``. None when either value is missing or not finite.
    """
    inc = _finite_or_none(incumbent)
    bnd = _finite_or_none(bound)
    if inc is None or bnd is None:
        return None
    if inc == bnd:
        return 0.0
    diff = bnd - inc if maximize else inc - bnd
    return max(diff, 0.0) / max(abs(inc), _GAP_DENOMINATOR_FLOOR)


# ----------------------------------------------------------------------------------------------------------------
# Availability


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


@lru_cache(maxsize=1)
def mosek_licence_status() -> tuple[bool, str]:
    """Whether MOSEK can solve an integer problem here, by solving a one-variable one with MOSEK's own API.

    Cached for the life of the process; never raises.
    """
    try:
        import mosek
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, f"MOSEK is not installed (import mosek failed: {exc})"
    try:
        version = ".".join(str(p) for p in mosek.Env.getversion())
    except Exception:  # noqa: BLE001
        version = _package_version("mosek")
    try:
        with mosek.Env() as env, env.Task(0, 0) as task:
            task.appendvars(1)
            task.putvarbound(0, mosek.boundkey.ra, 0.0, 3.0)
            task.putvartype(0, mosek.variabletype.type_int)
            task.putcj(0, 1.0)
            task.putobjsense(mosek.objsense.maximize)
            task.optimize()
            solsta = task.getsolsta(mosek.soltype.itg)
            value = task.getxx(mosek.soltype.itg)[0]
        if solsta == mosek.solsta.integer_optimal and abs(value - 3.0) < 1e-6:
            return True, f"MOSEK {version} is installed and licensed"
        return False, f"MOSEK {version} is installed but could not solve a one-variable integer test problem ({solsta})"
    except mosek.Error as exc:
        code = getattr(exc, "errno", None)
        code_text = f"{int(code)} {getattr(code, 'name', '')}".strip() if code is not None else "?"
        detail = str(getattr(exc, "msg", "") or "").strip()
        suffix = f": {detail}" if detail else ""
        if code is not None and int(code) in (1008, 1010, 1011, 1001, 1002, 1014, 1015, 1016, 1017, 1018, 1019, 1020):
            return False, f"MOSEK {version} is installed but has no licence (mosek.Error {code_text}{suffix})"
        return False, f"MOSEK {version} is installed but its licence check failed (mosek.Error {code_text}{suffix})"
    except Exception as exc:  # noqa: BLE001 - the check must never raise
        return False, f"MOSEK {version} is installed but its licence check failed ({type(exc).__name__}: {exc})"


@lru_cache(maxsize=1)
def _open_source_status() -> dict[str, dict]:
    out: dict[str, dict] = {}
    try:
        import highspy  # noqa: F401

        out["HIGHS"] = {"installed": True, "licensed": True,
                        "detail": f"HiGHS (highspy {_package_version('highspy')}), open source (MIT)"}
    except Exception as exc:  # noqa: BLE001
        out["HIGHS"] = {"installed": False, "licensed": False, "detail": f"HiGHS is not installed ({exc})"}
    try:
        import pyscipopt  # noqa: F401

        out["SCIP"] = {"installed": True, "licensed": True,
                       "detail": f"SCIP (pyscipopt {_package_version('pyscipopt')}), open source (Apache 2.0)"}
    except Exception as exc:  # noqa: BLE001
        out["SCIP"] = {"installed": False, "licensed": False, "detail": f"SCIP is not installed ({exc})"}
    return out


def solver_status() -> dict[str, dict]:
    """Per solver name in SOLVERS: ``{"installed": bool, "licensed": bool, "detail": str}``."""
    licensed, detail = mosek_licence_status()
    installed = not detail.startswith("MOSEK is not installed")
    status = {"MOSEK": {"installed": installed, "licensed": licensed, "detail": detail}}
    status.update({k: dict(v) for k, v in _open_source_status().items()})
    return {name: status[name] for name in SOLVERS}


def _normalise_solver_name(requested) -> str:
    allowed = ("auto", *SOLVERS)
    if not isinstance(requested, str) or requested.strip().upper() not in {a.upper() for a in allowed}:
        raise ValueError(f"solver must be one of {', '.join(allowed)} (case-insensitive); got {requested!r}")
    return requested.strip().upper()


def choose_solver(requested: str = "auto") -> SolverChoice:
    """Resolve a solver request. ``auto`` picks MOSEK when licensed, else HiGHS (else SCIP).

    An explicit request for a solver that cannot run here raises :class:`SolverUnavailable`; there is no silent
    fallback to another solver.
    """
    name = _normalise_solver_name(requested)
    status = solver_status()
    available = [n for n in SOLVERS if status[n]["installed"] and status[n]["licensed"]]
    if name == "AUTO":
        if "MOSEK" in available:
            return SolverChoice("MOSEK", f"auto: {status['MOSEK']['detail']}; MOSEK is preferred when licensed")
        if "HIGHS" in available:
            return SolverChoice(
                "HIGHS", f"auto: {status['MOSEK']['detail']}; HiGHS is the default open-source MIP solver")
        if "SCIP" in available:
            return SolverChoice(
                "SCIP", f"auto: {status['MOSEK']['detail']}; {status['HIGHS']['detail']}; SCIP is available")
        raise SolverUnavailable(
            "solver: no MIP solver can run here: " + "; ".join(status[n]["detail"] for n in SOLVERS))
    if name not in available:
        others = ", ".join(available) if available else "none"
        raise SolverUnavailable(
            f"solver {name!r} is unavailable: {status[name]['detail']}. Available solvers: {others} (or 'auto')")
    return SolverChoice(name, f"requested: {status[name]['detail']}")


# ----------------------------------------------------------------------------------------------------------------
# Argument checks


def _check_arguments(problem, time_limit_s, mip_gap, threads, on_progress, on_log, should_stop, warm_start,
                     solver_options) -> None:
    if not isinstance(problem, cp.Problem):
        raise ValueError(f"problem must be a cvxpy.Problem; got {type(problem).__name__}")  # noqa: TRY004
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, Real) or not math.isfinite(time_limit_s) \
            or time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be a finite number of seconds > 0; got {time_limit_s!r}")
    if isinstance(mip_gap, bool) or not isinstance(mip_gap, Real) or not math.isfinite(mip_gap) \
            or not 0 <= mip_gap < 1:
        raise ValueError(f"mip_gap must be a relative gap in [0, 1); got {mip_gap!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, Integral) or threads < 1):
        raise ValueError(f"threads must be None (solver default) or an integer >= 1; got {threads!r}")
    for name, fn in (("on_progress", on_progress), ("on_log", on_log), ("should_stop", should_stop)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable or None; got {type(fn).__name__}")
    if warm_start is not None and not isinstance(warm_start, dict):
        raise ValueError(f"warm_start must be a dict {{cvxpy.Variable: array}} or None; got {type(warm_start).__name__}")
    if solver_options is not None and not isinstance(solver_options, dict):
        raise ValueError(f"solver_options must be a dict or None; got {type(solver_options).__name__}")


def _check_solver_options(solver: str, options: dict) -> None:
    clash = sorted(set(options) & _OWNED_OPTIONS[solver])
    if clash:
        raise ValueError(
            f"solver_options must not set {', '.join(clash)} for {_SOLVER_LABELS[solver]}: use the arguments "
            "time_limit_s, mip_gap and threads, so the reported status stays true")


# ----------------------------------------------------------------------------------------------------------------
# cvxpy standard form


@dataclass
class _StandardForm:
    """``minimise c x + offset  s.t.  A[:n_eq] x = b[:n_eq],  A[n_eq:] x <= b[n_eq:],  lower <= x <= upper``."""

    c: np.ndarray
    offset: float
    A: sp.csr_matrix
    b: np.ndarray
    n_eq: int
    lower: np.ndarray
    upper: np.ndarray
    integer_cols: np.ndarray
    binary_cols: np.ndarray
    maximize: bool
    chain: object
    inverse_data: list
    var_cols: dict[int, tuple[int, cp.Variable]]
    compile_time_s: float

    @property
    def n_cols(self) -> int:
        return self.c.size

    def original(self, std_value) -> float | None:
        """A standard-form objective value (offset included) in the sense of the user's objective."""
        v = _finite_or_none(std_value)
        if v is None:
            return None
        return -v if self.maximize else v

    def objective_of(self, x: np.ndarray) -> float:
        return self.original(float(self.c @ x) + self.offset)

    def gap(self, incumbent, bound) -> float | None:
        return relative_gap(incumbent, bound, maximize=self.maximize)


def _compile(problem: cp.Problem, solver: str) -> _StandardForm:
    if not problem.is_mixed_integer():
        raise ValueError("problem must be a mixed-integer program (it has no integer or boolean variable); "
                         "solve_mip handles mixed-integer linear programs only")
    t0 = time.monotonic()
    try:
        data, chain, inverse_data = problem.get_problem_data(getattr(cp, solver))
    except cp.error.SolverError as exc:
        raise ValueError(f"problem must be a mixed-integer linear program that {_SOLVER_LABELS[solver]} accepts: "
                         f"{exc}") from exc
    dims = data[cvxpy_settings.DIMS]
    if dims.soc or dims.psd or dims.exp or getattr(dims, "p3d", None) or getattr(dims, "pnd", None):
        raise ValueError("problem must be a mixed-integer *linear* program: it has conic constraints")
    A = sp.csr_matrix(data[cvxpy_settings.A])
    A.eliminate_zeros()
    b = np.asarray(data[cvxpy_settings.B], dtype=float)
    n_eq, n_leq = int(dims.zero), int(dims.nonneg)
    if A.shape[0] != n_eq + n_leq:
        raise ValueError(f"problem: unexpected standard form ({A.shape[0]} rows for {n_eq} equalities and "
                         f"{n_leq} inequalities)")
    c = np.asarray(data[cvxpy_settings.C], dtype=float).ravel()
    n = c.size
    lower = data.get(cvxpy_settings.LOWER_BOUNDS)
    upper = data.get(cvxpy_settings.UPPER_BOUNDS)
    lower = np.full(n, -np.inf) if lower is None else np.asarray(lower, dtype=float).copy()
    upper = np.full(n, np.inf) if upper is None else np.asarray(upper, dtype=float).copy()
    binary = np.array(sorted(int(i) for i in data[cvxpy_settings.BOOL_IDX]), dtype=np.int64)
    integer = np.array(sorted({int(i) for i in data[cvxpy_settings.BOOL_IDX]} | {int(i) for i in data[cvxpy_settings.INT_IDX]}),
                       dtype=np.int64)
    if binary.size:
        lower[binary] = np.maximum(lower[binary], 0.0)
        upper[binary] = np.minimum(upper[binary], 1.0)
    param_prob = data[cvxpy_settings.PARAM_PROB]
    var_cols = {int(v.id): (int(param_prob.var_id_to_col[v.id]), v) for v in param_prob.variables}
    offset = float(np.asarray(inverse_data[-1][cvxpy_settings.OFFSET]).item())
    return _StandardForm(
        c=c, offset=offset, A=A, b=b, n_eq=n_eq, lower=lower, upper=upper, integer_cols=integer,
        binary_cols=binary, maximize=isinstance(problem.objective, cp.Maximize), chain=chain,
        inverse_data=list(inverse_data), var_cols=var_cols, compile_time_s=time.monotonic() - t0)


@dataclass
class _Start:
    cols: np.ndarray
    values: np.ndarray
    complete: bool
    objective: float | None  # only when complete
    max_violation: float | None


def _map_warm_start(sf: _StandardForm, warm_start: dict) -> _Start:
    cols, vals = [], []
    for var, value in warm_start.items():
        if not isinstance(var, cp.Variable):
            raise ValueError(  # noqa: TRY004 - every bad argument is a ValueError naming it
                f"warm_start keys must be cvxpy Variables of the problem; got {type(var).__name__}")
        if var.id not in sf.var_cols:
            raise ValueError(f"warm_start: variable {var.name()!r} is not a variable of the problem's standard form "
                             "(not in the problem, or replaced by cvxpy)")
        start, std_var = sf.var_cols[var.id]
        arr = np.asarray(value, dtype=float)
        if arr.size != std_var.size:
            raise ValueError(f"warm_start[{var.name()}] must have {std_var.size} values (shape {std_var.shape}); "
                             f"got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"warm_start[{var.name()}] must be finite")
        arr = arr.reshape(std_var.shape) if std_var.shape else arr.reshape(())
        cols.append(start + np.arange(std_var.size))
        vals.append(np.ravel(arr, order="F"))  # cvxpy stacks variables column-major
    if not cols:
        raise ValueError("warm_start must give values for at least one variable")
    cols_a = np.concatenate(cols).astype(np.int64)
    vals_a = np.concatenate(vals).astype(float)
    is_int = np.isin(cols_a, sf.integer_cols)
    near = is_int & (np.abs(vals_a - np.rint(vals_a)) <= _INTEGRALITY_ROUNDING)
    vals_a[near] = np.rint(vals_a[near])
    order = np.argsort(cols_a)
    cols_a, vals_a = cols_a[order], vals_a[order]
    complete = np.unique(cols_a).size == sf.n_cols
    objective = violation = None
    if complete:
        x = np.empty(sf.n_cols)
        x[cols_a] = vals_a
        objective = sf.objective_of(x)
        violation = _max_violation(sf, x)
    return _Start(cols_a, vals_a, complete, objective, violation)


def _max_violation(sf: _StandardForm, x: np.ndarray) -> float:
    r = sf.A @ x - sf.b
    parts = [np.abs(r[: sf.n_eq]), np.maximum(r[sf.n_eq:], 0), np.maximum(sf.lower - x, 0), np.maximum(x - sf.upper, 0)]
    if sf.integer_cols.size:
        xi = x[sf.integer_cols]
        parts.append(np.abs(xi - np.rint(xi)))
    return float(max((p.max() for p in parts if p.size), default=0.0))


def _write_solution(problem: cp.Problem, sf: _StandardForm, x: np.ndarray | None, optimal: bool,
                    solve_time_s: float, solver: str) -> None:
    """Set the problem's variable values through cvxpy's own reduction chain (or clear them when x is None)."""
    if x is None:
        for v in problem.variables():
            v.value = None
        return
    x = np.asarray(x, dtype=float).copy()
    if sf.integer_cols.size:
        xi = x[sf.integer_cols]
        near = np.abs(xi - np.rint(xi)) <= _INTEGRALITY_ROUNDING
        xi[near] = np.rint(xi[near])
        x[sf.integer_cols] = xi
    status = cvxpy_settings.OPTIMAL if optimal else cvxpy_settings.USER_LIMIT
    attr = {cvxpy_settings.SOLVE_TIME: solve_time_s, cvxpy_settings.EXTRA_STATS: {"solver": solver}}
    # The solver interface (last reduction) is bypassed: its invert expects that solver's own result object.
    solution = Solution(status, float(sf.c @ x) + sf.offset, {"x": x}, None, attr)
    for reduction, inv in reversed(list(zip(sf.chain.reductions[:-1], sf.inverse_data[:-1]))):
        solution = reduction.invert(solution, inv)
    problem.unpack(solution)


# ----------------------------------------------------------------------------------------------------------------
# Running a solver on a helper thread while the caller's thread handles callbacks and Stop


class _Monitor:
    def __init__(self, sf: _StandardForm | None, on_progress, on_log, should_stop):
        self.sf = sf
        self.on_progress = on_progress
        self.on_log = on_log
        self.should_stop = should_stop
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.stop_requested = threading.Event()
        self.trace: list[ProgressPoint] = []
        self.log_parts: list[str] = []
        self._line_buffer = ""
        self._lock = threading.Lock()
        self.t0 = time.monotonic()
        self._last_point_t = -math.inf
        self._best_std = math.inf
        self.nodes: int | None = None
        self.wall_s: float | None = None  # the solver run's wall time, model building excluded
        # An exception raised by a caller's callback: the solver is stopped and the exception re-raised as is.
        self.callback_error: BaseException | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # -- solver thread --------------------------------------------------------------------------------------------
    def solver_point(self, incumbent_std, bound_std, nodes, improving: bool) -> None:
        """A progress sample in standard-form values (minimisation, offset included); throttled unless improving."""
        inc = _finite_or_none(incumbent_std)
        now = self.elapsed()
        with self._lock:
            if nodes is not None:
                self.nodes = int(nodes)
            if improving:
                if inc is None or inc >= self._best_std:
                    return
            elif now - self._last_point_t < _PROGRESS_INTERVAL_S:
                return
            if inc is not None and inc < self._best_std:
                self._best_std = inc
            best = self._best_std if math.isfinite(self._best_std) else None
            self._last_point_t = now
        sf = self.sf
        incumbent, bound = sf.original(best), sf.original(bound_std)
        point = ProgressPoint(now, incumbent, bound, sf.gap(incumbent, bound), None if nodes is None else int(nodes))
        self.events.put(("progress", point))

    def solver_log(self, text: str) -> None:
        self.events.put(("log", text))

    # -- caller thread --------------------------------------------------------------------------------------------
    def _deliver(self) -> None:
        while True:
            try:
                kind, payload = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                self.trace.append(payload)
                if self.on_progress is not None:
                    self.on_progress(payload)
            else:
                self.log_parts.append(payload)
                self._line_buffer += payload
                *lines, self._line_buffer = self._line_buffer.split("\n")
                if self.on_log is not None:
                    for line in lines:
                        self.on_log(line)

    def flush_log(self) -> None:
        self._deliver()
        if self._line_buffer:
            if self.on_log is not None:
                self.on_log(self._line_buffer)
            self._line_buffer = ""

    def stop_now(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def run(self, target: Callable[[], None], interrupt: Callable[[], None],
            poll: Callable[[], None] | None = None) -> float:
        """Run ``target`` on a helper thread; return its wall time. Re-raises its exception (or a callback's)."""
        outcome: dict = {}

        def work():
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="vmat-mip-solver", daemon=True)
        self.t0 = time.monotonic()
        worker.start()
        last_stop_check = -math.inf
        last_interrupt = -math.inf
        while worker.is_alive():
            worker.join(_POLL_INTERVAL_S)
            if self.callback_error is not None:
                pass  # waiting for the interrupted solver; no more callbacks
            else:
                try:
                    if poll is not None:
                        poll()
                    self._deliver()
                    now = time.monotonic()
                    if not self.stop_requested.is_set() and now - last_stop_check >= _STOP_POLL_INTERVAL_S:
                        last_stop_check = now
                        if self.stop_now():
                            self.stop_requested.set()
                except BaseException as exc:  # noqa: BLE001 - stop the solver before handing the error on
                    self.callback_error = exc
                    self.stop_requested.set()
            if self.stop_requested.is_set() and time.monotonic() - last_interrupt >= 0.25:
                last_interrupt = time.monotonic()
                try:
                    interrupt()
                except Exception as exc:  # noqa: BLE001 - the solver may be between stages; retried next poll
                    _log.debug("solver interrupt deferred: %s", exc)
        wall = time.monotonic() - self.t0
        self.wall_s = wall
        if self.callback_error is not None:
            raise self.callback_error
        try:
            if poll is not None:
                poll()
            self.flush_log()
        except BaseException as exc:
            self.callback_error = exc
            raise
        if "error" in outcome:
            raise outcome["error"]
        return wall


@dataclass
class _Raw:
    """What a solver run produced, in standard-form values (minimisation, offset included)."""

    kind: str  # optimal | gap | time | limit | cancelled | infeasible | unbounded | error
    x: np.ndarray | None
    incumbent_std: float | None
    bound_std: float | None
    nodes: int | None
    detail: str
    start_accepted: bool | None = None
    start_objective_std: float | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# HiGHS

_HIGHS_LIMITS = {"kIterationLimit": "iteration limit", "kSolutionLimit": "solution limit",
                 "kObjectiveBound": "objective bound", "kObjectiveTarget": "objective target",
                 "kMemoryLimit": "memory limit"}
_HIGHS_START_RE = re.compile(r"MIP start solution is feasible: objective value is\s+(\S+)")


def highs_lp_from_standard_form(sf: _StandardForm, *, relax_integers: bool = False, rows: np.ndarray | None = None,
                                cols: np.ndarray | None = None, A: sp.spmatrix | None = None,
                                c: np.ndarray | None = None, b: np.ndarray | None = None,
                                offset: float | None = None):
    """HiGHS's model (a ``highspy.HighsLp``) of cvxpy's standard form ``sf``, or of a problem derived from it.

    ``rows`` and ``cols`` keep only those standard-form rows and columns (all by default). A problem with some
    variables fixed or substituted keeps sf's row senses and column bounds but has its own numbers: ``A`` (the
    kept rows x kept columns), ``c`` (one per kept column), ``b`` (one per standard-form row) and ``offset``
    replace sf's. ``relax_integers`` gives the LP relaxation: no column is marked integer.
    """
    import highspy as hp

    inf = hp.kHighsInf
    if A is None:
        A = sf.A if rows is None else sf.A[rows]
        if cols is not None:
            A = A[:, cols]
    A = A.tocsc()
    b = sf.b if b is None else b
    equality = np.arange(sf.A.shape[0]) < sf.n_eq
    if rows is not None:
        b, equality = b[rows], equality[rows]
    lower, upper = (sf.lower, sf.upper) if cols is None else (sf.lower[cols], sf.upper[cols])

    lp = hp.HighsLp()
    lp.num_col_ = A.shape[1]
    lp.num_row_ = A.shape[0]
    lp.col_cost_ = sf.c if c is None else c
    # So HiGHS's gap, log and bounds are in the true objective, like this module's.
    lp.offset_ = sf.offset if offset is None else offset
    lp.row_lower_ = np.where(equality, b, -inf)
    lp.row_upper_ = np.array(b, dtype=float)
    lp.a_matrix_.format_ = hp.MatrixFormat.kColwise
    lp.a_matrix_.start_ = A.indptr
    lp.a_matrix_.index_ = A.indices
    lp.a_matrix_.value_ = A.data
    lp.col_lower_ = np.where(np.isfinite(lower), lower, -inf)
    lp.col_upper_ = np.where(np.isfinite(upper), upper, inf)
    if not relax_integers:
        integer = sf.integer_cols if cols is None else np.flatnonzero(np.isin(cols, sf.integer_cols))
        integrality = [hp.HighsVarType.kContinuous] * lp.num_col_
        for j in integer:
            integrality[int(j)] = hp.HighsVarType.kInteger
        lp.integrality_ = integrality
    return lp


def _solve_highs(sf: _StandardForm, mon: _Monitor, *, time_limit_s, mip_gap, threads, options,
                 start: _Start | None) -> _Raw:
    import highspy as hp

    h = hp.Highs()
    lp = highs_lp_from_standard_form(sf)

    h.setOptionValue("output_flag", True)
    h.setOptionValue("log_to_console", False)
    settings = {"time_limit": float(time_limit_s), "mip_rel_gap": float(mip_gap)}
    if threads is not None:
        settings["threads"] = int(threads)
    for key, value in {**settings, **options}.items():
        if h.setOptionValue(key, value) == hp.HighsStatus.kError:
            where = "solver_options" if key in options else "argument"
            raise ValueError(f"{where}: HiGHS rejected option {key}={value!r}")
    if h.passModel(lp) == hp.HighsStatus.kError:
        raise ValueError("problem: HiGHS rejected the model built from cvxpy's standard form")

    log_parts: list[str] = []

    def on_log(event):
        log_parts.append(event.message)
        mon.solver_log(event.message)

    def on_improving(event):
        out = event.data_out
        mon.solver_point(out.mip_primal_bound, out.mip_dual_bound, out.mip_node_count, improving=True)

    def on_mip_interrupt(event):
        if mon.stop_requested.is_set():
            event.interrupt()
            return
        out = event.data_out
        mon.solver_point(out.mip_primal_bound, out.mip_dual_bound, out.mip_node_count, improving=False)

    def on_lp_interrupt(event):
        if mon.stop_requested.is_set():
            event.interrupt()

    h.cbLogging += on_log
    h.cbMipImprovingSolution += on_improving
    h.cbMipInterrupt += on_mip_interrupt
    h.cbSimplexInterrupt += on_lp_interrupt
    h.cbIpmInterrupt += on_lp_interrupt

    if start is not None:
        status = h.setSolution(int(start.cols.size), start.cols.astype(np.int32), start.values)
        if status == hp.HighsStatus.kError:
            mon.solver_log("warm start rejected by HiGHS setSolution\n")

    mon.run(h.run, interrupt=lambda: None)

    model_status = h.getModelStatus()
    name = model_status.name
    info = h.getInfo()
    has_solution = int(info.primal_solution_status) == 2  # kSolutionStatusFeasible
    x = np.array(h.getSolution().col_value, dtype=float) if has_solution else None
    incumbent = info.objective_function_value if has_solution else None
    bound = info.mip_dual_bound
    nodes = int(info.mip_node_count)
    if name == "kOptimal":
        kind = "optimal"
    elif name == "kTimeLimit":
        kind = "time"
    elif name == "kInterrupt":
        kind = "cancelled" if mon.stop_requested.is_set() else "error"
    elif name == "kInfeasible":
        kind = "infeasible"
    elif name == "kUnbounded":
        kind = "unbounded"
    elif name == "kUnboundedOrInfeasible":
        kind = "infeasible"
    elif name in _HIGHS_LIMITS:
        kind = "limit"
    else:
        kind = "error"
    detail = {"kUnboundedOrInfeasible": "HiGHS reports the problem infeasible or unbounded (it cannot tell which)",
              **{k: f"HiGHS stopped at its {v} ({k})" for k, v in _HIGHS_LIMITS.items()}}.get(
        name, f"HiGHS model status {h.modelStatusToString(model_status)} ({name})")
    raw = _Raw(kind, x, incumbent, bound, nodes, detail)
    if start is not None:
        match = _HIGHS_START_RE.search("".join(log_parts))
        raw.start_accepted = match is not None
        if match is not None:
            raw.start_objective_std = _finite_or_none(match.group(1))
    return raw


# ----------------------------------------------------------------------------------------------------------------
# SCIP

_SCIP_LIMITS = {"nodelimit", "totalnodelimit", "stallnodelimit", "sollimit", "bestsollimit", "restartlimit",
                "memlimit", "primallimit", "duallimit"}


def _solve_scip(sf: _StandardForm, mon: _Monitor, *, time_limit_s, mip_gap, threads, options,
                start: _Start | None) -> _Raw:
    import pyscipopt as ps
    from pyscipopt import SCIP_EVENTTYPE, Expr, ExprCons
    from pyscipopt.scip import Term

    model = ps.Model()
    model.hideOutput(True)
    n = sf.n_cols
    is_integer = np.zeros(n, dtype=bool)
    is_integer[sf.integer_cols] = True
    is_binary = np.zeros(n, dtype=bool)
    is_binary[sf.binary_cols] = True
    variables = []
    for j in range(n):
        lo = float(sf.lower[j]) if np.isfinite(sf.lower[j]) else None
        hi = float(sf.upper[j]) if np.isfinite(sf.upper[j]) else None
        vtype = "B" if is_binary[j] and lo == 0.0 and hi == 1.0 else ("I" if is_integer[j] else "C")
        variables.append(model.addVar(name=f"x{j}", vtype=vtype, lb=lo, ub=hi, obj=float(sf.c[j])))
    if sf.offset:
        model.addObjoffset(sf.offset)
    terms = [Term(v) for v in variables]
    A = sf.A
    for i in range(A.shape[0]):
        lo_i, hi_i = A.indptr[i], A.indptr[i + 1]
        expr = Expr({terms[j]: float(a) for j, a in zip(A.indices[lo_i:hi_i].tolist(), A.data[lo_i:hi_i].tolist())})
        rhs = float(sf.b[i])
        model.addCons(ExprCons(expr, lhs=rhs if i < sf.n_eq else None, rhs=rhs), name=f"r{i}")

    model.setParam("limits/time", float(time_limit_s))
    model.setParam("limits/gap", float(mip_gap))
    for key, value in options.items():
        try:
            model.setParam(key, value)
        except (KeyError, LookupError, TypeError, ValueError) as exc:
            raise ValueError(f"solver_options: SCIP rejected parameter {key}={value!r} ({exc})") from exc

    raw_notes: list[str] = []
    start_accepted = None
    start_objective_std = None
    if start is not None:
        if start.complete:
            sol = model.createSol()
            for j, v in zip(start.cols.tolist(), start.values.tolist()):
                model.setSolVal(sol, variables[j], v)
            # SCIP only checks original-space solutions before the solve; trySol is not allowed at this stage.
            feasible = model.checkSol(sol, printreason=False, original=True)
            stored = model.addSol(sol) if feasible else False
            start_accepted = bool(feasible and stored)
            if start_accepted:
                start_objective_std = float(sf.c @ _dense(start, n)) + sf.offset
        else:
            sol = model.createPartialSol()
            for j, v in zip(start.cols.tolist(), start.values.tolist()):
                model.setSolVal(sol, variables[j], v)
            model.addSol(sol)
            raw_notes.append("partial warm start handed to SCIP's completion heuristic; acceptance unknown")

    state = {"gap_reached": False}
    target_gap = float(mip_gap)

    class _Events(ps.Eventhdlr):
        def eventinit(self):
            self.model.catchEvent(SCIP_EVENTTYPE.BESTSOLFOUND, self)
            self.model.catchEvent(SCIP_EVENTTYPE.NODESOLVED, self)
            # The root node of a VMAT model can take most of a run: its LP rounds keep progress and Stop alive.
            self.model.catchEvent(SCIP_EVENTTYPE.LPSOLVED, self)

        def eventexec(self, event):
            # Exceptions cannot propagate out of a SCIP callback; a failed sample is skipped.
            try:
                m = self.model
                improving = event.getType() == SCIP_EVENTTYPE.BESTSOLFOUND
                if improving:
                    incumbent = m.getSolObjVal(m.getBestSol())
                else:
                    incumbent = m.getPrimalbound()
                    incumbent = None if m.isInfinity(abs(incumbent)) else incumbent
                bound = m.getDualbound()
                bound = None if m.isInfinity(abs(bound)) else bound
                mon.solver_point(incumbent, bound, m.getNNodes(), improving=improving)
                if mon.stop_requested.is_set():
                    m.interruptSolve()
                elif target_gap > 0 and relative_gap(incumbent, bound) is not None \
                        and relative_gap(incumbent, bound) <= target_gap:
                    state["gap_reached"] = True
                    m.interruptSolve()
            except Exception as exc:  # noqa: BLE001
                _log.debug("SCIP progress sample skipped: %s", exc)

    model.includeEventhdlr(_Events(), "vmat_progress", "progress, cancel and gap check")

    with tempfile.TemporaryDirectory(prefix="vmat-scip-") as tmp:
        log_path = os.path.join(tmp, "scip.log")
        model.setLogfile(log_path)
        read_pos = [0]

        def tail_log():
            try:
                with open(log_path, encoding="utf-8", errors="replace") as fh:
                    fh.seek(read_pos[0])
                    text = fh.read()
                    read_pos[0] = fh.tell()
            except FileNotFoundError:
                return
            if text:
                mon.solver_log(text)

        mon.run(model.optimizeNogil, interrupt=model.interruptSolve, poll=tail_log)
        model.setLogfile(None)

    status = model.getStatus()
    n_sols = model.getNSols()
    x = incumbent = None
    if n_sols > 0:
        best = model.getBestSol()
        x = np.array([model.getSolVal(best, v) for v in variables], dtype=float)
        incumbent = model.getSolObjVal(best)
    bound = model.getDualbound()
    bound = None if model.isInfinity(abs(bound)) else bound
    nodes = int(model.getNNodes())
    if status == "optimal":
        kind = "optimal"
    elif status == "gaplimit":
        kind = "gap"
    elif status == "timelimit":
        kind = "time"
    elif status == "userinterrupt":
        kind = "cancelled" if mon.stop_requested.is_set() else ("gap" if state["gap_reached"] else "error")
    elif status == "infeasible":
        kind = "infeasible"
    elif status in ("unbounded", "inforunbd"):
        kind = "unbounded" if status == "unbounded" else "infeasible"
    elif status in _SCIP_LIMITS:
        kind = "limit"
    else:
        kind = "error"
    detail = {"inforunbd": "SCIP reports the problem infeasible or unbounded (it cannot tell which)"}.get(
        status, f"SCIP stopped with status {status}")
    raw = _Raw(kind, x, incumbent, bound, nodes, detail, start_accepted, start_objective_std, raw_notes)
    if threads is not None and threads > 1:
        raw.notes.append(f"threads={threads} ignored: SCIP solves on one thread")
    return raw


def _dense(start: _Start, n: int) -> np.ndarray:
    x = np.zeros(n)
    x[start.cols] = start.values
    return x


# ----------------------------------------------------------------------------------------------------------------
# MOSEK (through cvxpy's own interface)


class _ListHandler(logging.Handler):
    def __init__(self, mon: _Monitor):
        super().__init__(logging.INFO)
        self.mon = mon

    def emit(self, record):
        self.mon.solver_log(record.getMessage() + "\n")


def _solve_mosek(problem: cp.Problem, mon: _Monitor, *, time_limit_s, mip_gap, threads, options) -> tuple[_Raw, bool]:
    """Returns the raw outcome and whether cvxpy already wrote the values into the problem."""
    import mosek

    params = {"MSK_DPAR_MIO_MAX_TIME": float(time_limit_s), "MSK_DPAR_MIO_TOL_REL_GAP": float(mip_gap)}
    if threads is not None:
        params["MSK_IPAR_NUM_THREADS"] = int(threads)
    params.update(options)
    data, chain, inverse_data = problem.get_problem_data(cp.MOSEK)
    logger = cvxpy_settings.LOGGER
    saved = (logger.level, logger.propagate, list(logger.handlers))
    handler = _ListHandler(mon)
    result: dict = {}

    def run():
        result["out"] = chain.solve_via_data(problem, data, warm_start=False, verbose=True,
                                             solver_opts={"mosek_params": params})

    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        # cvxpy builds the MOSEK task internally, so a running MOSEK solve cannot be interrupted from here.
        mon.run(run, interrupt=lambda: None)
    except mosek.Error as exc:
        return _Raw("error", None, None, None, None, f"MOSEK failed: {exc}"), False
    finally:
        logger.handlers = saved[2]
        logger.propagate = saved[1]
        logger.setLevel(saved[0])
    task = result["out"]["task"]
    solsta = task.getsolsta(mosek.soltype.itg)
    prosta = task.getprosta(mosek.soltype.itg)
    bound = task.getdouinf(mosek.dinfitem.mio_obj_bound)
    nodes = int(task.getintinf(mosek.iinfitem.mio_num_branch))
    # MOSEK's objective excludes cvxpy's constant; its sense may be flipped by cvxpy's reformulation.
    has_solution = solsta in (mosek.solsta.integer_optimal, mosek.solsta.prim_feas)
    wrote = False
    if has_solution:
        try:
            with warnings.catch_warnings():
                # cvxpy calls every MIP solution short of proven optimality "inaccurate"; the status says more.
                warnings.simplefilter("ignore", UserWarning)
                problem.unpack_results(result["out"], chain, inverse_data)
            wrote = True
        except cp.error.SolverError:
            has_solution = False
    incumbent_user = problem.value if wrote else None
    if prosta == mosek.prosta.prim_infeas:
        kind = "infeasible"
    elif prosta == mosek.prosta.dual_infeas:
        kind = "unbounded"
    elif solsta == mosek.solsta.integer_optimal:
        kind = "optimal"
    elif task.getdouinf(mosek.dinfitem.optimizer_time) >= float(time_limit_s) * 0.99:
        kind = "time"
    else:
        kind = "limit" if has_solution else "error"
    task_sense_max = task.getobjsense() == mosek.objsense.maximize
    bound_user = None
    if _finite_or_none(bound) is not None and wrote:
        # The task objective differs from problem.value by cvxpy's constant and, when the senses differ, a sign.
        same_sense = task_sense_max == isinstance(problem.objective, cp.Maximize)
        task_obj = task.getprimalobj(mosek.soltype.itg)
        bound_user = incumbent_user + (bound - task_obj) * (1 if same_sense else -1)
    raw = _Raw(kind, None, None, None, nodes, f"MOSEK solution status {solsta}, problem status {prosta}")
    raw.notes.append("MOSEK runs cannot show live progress or be stopped mid-solve")
    raw.incumbent_std = incumbent_user  # already in the user's sense; see solve_mip
    raw.bound_std = bound_user
    return raw, wrote


# ----------------------------------------------------------------------------------------------------------------
# Orchestration


def _final_status(kind: str, has_solution: bool, gap: float | None, mip_gap: float) -> str:
    if kind in ("optimal", "gap"):
        if not has_solution:
            return "error"
        if kind == "optimal" and mip_gap <= OPTIMALITY_GAP:
            return "optimal"
        return "optimal" if gap is not None and gap <= OPTIMALITY_GAP else "gap_limit"
    if kind in ("time", "limit"):
        return "time_limit" if has_solution else "no_solution"
    return kind  # cancelled | infeasible | unbounded | error


def _describe(label: str, status: str, kind: str, detail: str, time_limit_s: float, objective, bound,
              gap) -> str:
    if kind == "limit":
        what = f"{label} stopped early: {detail}" + ("" if status == "time_limit" else ", without a feasible plan")
    else:
        what = {
            "optimal": f"{label} proved the plan optimal",
            "gap_limit": f"{label} stopped at the requested gap",
            "time_limit": f"{label} stopped at the {time_limit_s:g} s time limit",
            "cancelled": f"{label} was stopped on request",
            "infeasible": f"{label} found the problem infeasible ({detail})",
            "unbounded": f"{label} found the problem unbounded ({detail})",
            "no_solution": f"{label} stopped at the {time_limit_s:g} s time limit without finding a feasible plan",
            "error": f"{label} failed ({detail})",
        }[status]
    numbers = []
    if objective is not None:
        numbers.append(f"objective {objective:.6g}")
    if bound is not None:
        numbers.append(f"bound {bound:.6g}")
    if gap is not None:
        numbers.append(f"gap {100 * gap:.3g} %")
    return f"{what}: {', '.join(numbers)}" if numbers else what


def solve_mip(problem: cp.Problem, *, solver: str = "auto", time_limit_s: float = 120.0, mip_gap: float = 1e-4,
              threads: int | None = None, on_progress: Callable[[ProgressPoint], None] | None = None,
              on_log: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
              warm_start: dict[cp.Variable, np.ndarray] | None = None,
              solver_options: dict | None = None) -> MipResult:
    """Solve a mixed-integer linear cvxpy problem and write the best solution found into its variables.

    The values are written (as ``problem.solve`` would) whenever a feasible solution exists, including after a time
    limit or a Stop; otherwise every variable's value is reset to None. ``on_log`` receives whole log lines.
    ``should_stop`` is polled about every 0.1 s; a True makes HiGHS or SCIP return within about a second with
    status "cancelled" and the incumbent kept (a MOSEK solve cannot be interrupted once started).
    """
    _check_arguments(problem, time_limit_s, mip_gap, threads, on_progress, on_log, should_stop, warm_start,
                     solver_options)
    choice = choose_solver(solver)
    options = dict(solver_options or {})
    _check_solver_options(choice.name, options)
    label = _SOLVER_LABELS[choice.name]
    time_limit_s = float(time_limit_s)
    mip_gap = float(mip_gap)

    sf = None
    start = None
    if choice.name != "MOSEK":
        sf = _compile(problem, choice.name)
        if warm_start:
            start = _map_warm_start(sf, warm_start)
    elif warm_start is not None:
        for var in warm_start:
            if not isinstance(var, cp.Variable):
                raise ValueError(  # noqa: TRY004 - every bad argument is a ValueError naming it
                    f"warm_start keys must be cvxpy Variables; got {type(var).__name__}")
    mon = _Monitor(sf, on_progress, on_log, should_stop)

    if mon.stop_now():
        for v in problem.variables():
            v.value = None
        return MipResult(choice.name, choice.reason, "cancelled", False, None, None, None, 0.0,
                         [ProgressPoint(0.0, None, None, None, None)], "", f"{label} was stopped before it started",
                         start.objective if start else None, None)

    t0 = time.monotonic()
    notes: list[str] = []
    if choice.name == "MOSEK":
        try:
            raw, wrote = _solve_mosek(problem, mon, time_limit_s=time_limit_s, mip_gap=mip_gap, threads=threads,
                                      options=options)
        except Exception as exc:  # a solver crash is reported, not raised
            if exc is mon.callback_error:
                raise
            raw, wrote = _Raw("error", None, None, None, None, f"{type(exc).__name__}: {exc}"), False
        solve_time = mon.wall_s if mon.wall_s is not None else time.monotonic() - t0
        if not wrote:
            for v in problem.variables():
                v.value = None
        has_solution = wrote
        objective = raw.incumbent_std if wrote else None
        bound = raw.bound_std
        maximize = isinstance(problem.objective, cp.Maximize)
        gap = relative_gap(objective, bound, maximize=maximize)
        start_objective, start_accepted = None, None
        if warm_start:
            start_accepted = False
            notes.append("warm start not used: cvxpy's MOSEK interface does not pass MIP starts")
    else:
        runner = _solve_highs if choice.name == "HIGHS" else _solve_scip
        try:
            raw = runner(sf, mon, time_limit_s=time_limit_s, mip_gap=mip_gap, threads=threads, options=options,
                         start=start)
        except ValueError:
            raise
        except Exception as exc:  # a solver crash is reported, not raised
            if exc is mon.callback_error:
                raise
            raw = _Raw("error", None, None, None, None, f"{type(exc).__name__}: {exc}")
        solve_time = mon.wall_s if mon.wall_s is not None else time.monotonic() - t0
        has_solution = raw.x is not None and raw.kind not in ("infeasible", "unbounded")
        _write_solution(problem, sf, raw.x if has_solution else None, raw.kind == "optimal", solve_time,
                        choice.name)
        objective = None
        if has_solution:
            objective = _finite_or_none(problem.value)
            if objective is None:
                objective = sf.original(raw.incumbent_std)
        bound = sf.original(raw.bound_std)
        gap = sf.gap(objective, bound)
        start_accepted = raw.start_accepted
        start_objective = None
        if start is not None:
            feasible = start.complete and start.max_violation is not None and start.max_violation <= _START_TOL
            # An infeasible start has no meaningful objective unless the solver completed it into a feasible one.
            start_objective = start.objective if feasible else sf.original(raw.start_objective_std)
            if start.complete and not feasible:
                notes.append(f"warm start violates the constraints by up to {start.max_violation:.3g}; "
                             + ("the solver repaired it" if start_accepted else "not used"))
            elif start_accepted is False:
                notes.append(f"warm start not accepted by {label}")

    status = _final_status(raw.kind, has_solution, gap, mip_gap)
    notes.extend(raw.notes)
    setup_s = time.monotonic() - t0 - solve_time
    if setup_s >= 0.5:
        notes.append(f"solver model set up in {setup_s:.1f} s before the clock started")
    if raw.nodes is None:
        raw.nodes = mon.nodes
    mon.trace.append(ProgressPoint(solve_time, objective, bound, gap, raw.nodes))
    message = _describe(label, status, raw.kind, raw.detail, time_limit_s, objective, bound, gap)
    if sf is not None:
        notes.append(f"model {sf.A.shape[0]} rows x {sf.n_cols} columns ({sf.integer_cols.size} integer), "
                     f"built in {sf.compile_time_s:.2f} s")
    if notes:
        message += ". " + "; ".join(notes)
    return MipResult(
        solver=choice.name, reason=choice.reason, status=status, has_solution=has_solution, objective=objective,
        bound=bound, gap=gap, solve_time_s=solve_time, trace=mon.trace, log="".join(mon.log_parts),
        message=message, warm_start_objective=start_objective, warm_start_accepted=start_accepted)
