"""``run_vmat_global_optimal(config)``: PortPy's VMAT global-optimal workflow as a callable.

Phases: load the case with PortPy's own classes, down-sample the influence matrix (cached), build the notebook's
MIP (``vmat_core.model``), solve it (``vmat_core.solvers``), evaluate the plan (``vmat_core.evaluation``) and
write one complete run folder (``vmat_core.store``). Progress is reported through ``on_progress(event)`` with
plain dicts so that worker processes can forward it to the job ledger unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pickle
import platform
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from vmat_core import __version__, cases, paths
from vmat_core.config import ConfigError, RunConfig, to_portpy_opt_params, validate_config
from vmat_core.evaluation import evaluate_plan, is_target

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    metadata: dict
    timings_s: dict = field(default_factory=dict)


class RunCancelled(RuntimeError):
    """Raised when a run is cancelled before the solver produced anything worth keeping."""


@contextlib.contextmanager
def _quiet():
    """PortPy prints progress chatter (and get_volume warnings) to stdout; keep it out of the planner's console."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


def load_case(cfg: RunConfig, portpy_dir: Path | None = None):
    """PortPy objects of the case: (data, ct, structs, beams, clinical_criteria, opt_params)."""
    import portpy.photon as pp

    case_dir = cases.resolve_case_dir(cfg.case_id, portpy_dir)
    with _quiet():
        data = pp.DataExplorer(data_dir=str(case_dir.parent))
        data.patient_id = cfg.case_id
        ct = pp.CT(data)
        structs = pp.Structures(data)
        beams = pp.Beams(data, beam_ids=list(cfg.beam_ids))
        clinical_criteria = pp.ClinicalCriteria(data, protocol_name=cfg.protocol)
        opt_params = to_portpy_opt_params(cfg)
        structs.create_opt_structures(opt_params=opt_params, clinical_criteria=clinical_criteria)
    return data, ct, structs, beams, clinical_criteria, opt_params


def down_sampled_matrix(cfg: RunConfig, ct, structs, beams):
    """(full-resolution influence matrix, down-sampled one), as the notebook creates them."""
    import portpy.photon as pp

    with _quiet():
        inf_matrix = pp.InfluenceMatrix(ct=ct, structs=structs, beams=beams)
        vox_mm = [r * f for r, f in zip(ct.get_ct_res_xyz_mm(), cfg.voxel_down_sample_factors)]
        k = cfg.beamlet_down_sample_factor
        inf_db = inf_matrix.create_down_sample(
            beamlet_width_mm=beams.get_finest_beamlet_width() * k,
            beamlet_height_mm=beams.get_finest_beamlet_height() * k,
            opt_vox_xyz_res_mm=vox_mm,
        )
    return inf_matrix, inf_db


def protocol_criteria(protocol: str):
    """PortPy's ClinicalCriteria of a shipped protocol (it reads PortPy's own config files, not the case)."""
    import portpy.photon as pp

    return pp.ClinicalCriteria(pp.DataExplorer(data_dir=str(paths.portpy_data_dir())), protocol_name=protocol)


@dataclass
class PreparedCase:
    """Everything the MIP needs that does not depend on weights or dose targets."""

    ct: object
    structs: object
    beams: object
    inf_db: object
    cache_hit: bool = False
    load_s: float = 0.0
    downsample_s: float = 0.0


def prepared_cache_key(cfg: RunConfig, portpy_dir: Path | None = None) -> str:
    """Inputs of the slow steps (optimisation structures, down-sampling): case files, beams, factors, definitions."""
    import hashlib

    case_dir = cases.resolve_case_dir(cfg.case_id, portpy_dir)
    stamps = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in case_dir.iterdir() if p.is_file()
    )
    opt = to_portpy_opt_params(cfg)
    defs = sorted(
        {(o.get("structure_name"), o.get("structure_def")) for o in opt.get("objective_functions", [])
         if o.get("structure_def")}
        | {(c["parameters"].get("structure_name"), c["parameters"].get("structure_def"))
           for c in opt.get("constraints", []) if c.get("parameters", {}).get("structure_def")}
    )
    payload = repr((str(case_dir), stamps, cfg.protocol, sorted(cfg.beam_ids), list(cfg.voxel_down_sample_factors),
                    cfg.beamlet_down_sample_factor, defs, PREPARED_CACHE_VERSION))
    return hashlib.sha256(payload.encode()).hexdigest()


PREPARED_CACHE_VERSION = 2  # 2: structure masks stored as bits
PREPARED_CACHE_SIZE_BYTES = 8 * 2**30
_MEMORY_CACHE: dict[str, PreparedCase] = {}


def _prepared_cache():
    import diskcache

    return diskcache.Cache(str(paths.cache_dir() / "prepared"), size_limit=PREPARED_CACHE_SIZE_BYTES,
                           eviction_policy="least-recently-used")


def _unpack_mask(bits: np.ndarray, shape: tuple, dtype: str) -> np.ndarray:
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(dtype, copy=False)


def _pickle_prepared(obj, structs) -> bytes:
    """Pickle a prepared case with its 0/1 structure masks as bits.

    PortPy keeps each mask as a full CT-sized array — uint8 for the case's structures, int64 for the
    optimisation structures it derives (rinds, LUNGS_NOT_GTV) — so the masks made up ~90 % of a cache entry
    (hundreds of MB to inflate on every cache hit). As bits they are 8–64× smaller and restore exactly."""
    import io

    masks = {id(m): m for m in structs.structures_dict.get("structure_mask_3d", [])
             if isinstance(m, np.ndarray) and m.size and np.array_equal(m, m.astype(bool))}

    class MaskPickler(pickle.Pickler):
        def reducer_override(self, o):
            m = masks.get(id(o))
            if m is not None and o is m:
                return _unpack_mask, (np.packbits(m.astype(bool, copy=False), axis=None), m.shape, m.dtype.str)
            return NotImplemented

    buf = io.BytesIO()
    MaskPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def prepare_case(cfg: RunConfig, portpy_dir: Path | None = None, *, use_cache: bool = True) -> PreparedCase:
    """Load the case and down-sample its influence matrix — or take both from the cache.

    PortPy's optimisation-structure dilations and ``create_down_sample`` dominate a run's set-up (minutes on the
    realistic-size case), yet depend only on the case, beams, factors and structure definitions; so the result
    is kept in a diskcache keyed by those, and in memory for the last setting of this process.
    """
    key = prepared_cache_key(cfg, portpy_dir)
    if use_cache:
        if key in _MEMORY_CACHE:
            hit = _MEMORY_CACHE[key]
            return PreparedCase(hit.ct, hit.structs, hit.beams, hit.inf_db, cache_hit=True)
        with contextlib.suppress(Exception), _prepared_cache() as cache:
            blob = cache.get(key)
            if blob is not None:
                prepared = PreparedCase(*pickle.loads(zlib.decompress(blob)), cache_hit=True)
                _MEMORY_CACHE.clear()
                _MEMORY_CACHE[key] = prepared
                return prepared
    t0 = time.perf_counter()
    _, ct, structs, beams, _, _ = load_case(cfg, portpy_dir)
    t1 = time.perf_counter()
    _, inf_db = down_sampled_matrix(cfg, ct, structs, beams)
    t2 = time.perf_counter()
    # The full-resolution matrices are only needed to build the down-sampled one; dropping them keeps the cache
    # entry a fraction of the size.
    beams.beams_dict.pop("influenceMatrixSparse", None)
    beams.beams_dict.pop("influenceMatrixFull", None)
    # create_down_sample deep-copies the whole matrix object, CT and structure masks included; point the copy back
    # at the originals (same content) so that a cache entry holds them once.
    inf_db._ct, inf_db._structs, inf_db._beams = ct, structs, beams
    prepared = PreparedCase(ct, structs, beams, inf_db, load_s=t1 - t0, downsample_s=t2 - t1)
    if use_cache:
        with contextlib.suppress(Exception), _prepared_cache() as cache:
            # Structure masks dominate the pickle; they are stored as bits (see _pickle_prepared).
            blob = zlib.compress(_pickle_prepared((ct, structs, beams, inf_db), structs), 1)
            cache.set(key, blob)
        _MEMORY_CACHE.clear()
        _MEMORY_CACHE[key] = prepared
    return prepared


def software_versions() -> dict:
    import cvxpy
    import highspy  # noqa: F401
    import portpy

    versions = {
        "vmat_planner": __version__,
        "python": platform.python_version(),
        "portpy": getattr(portpy, "__version__", "unknown"),
        "cvxpy": cvxpy.__version__,
        "numpy": np.__version__,
    }
    for mod in ("highspy", "pyscipopt", "mosek"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[mod] = version({"pyscipopt": "PySCIPOpt", "mosek": "Mosek"}.get(mod, mod))
    return versions


def run_vmat_global_optimal(
    config: RunConfig | dict,
    *,
    on_progress: ProgressFn | None = None,
    on_log: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    store=None,
    portpy_dir: Path | None = None,
    warm_start: dict | None = None,
) -> RunResult:
    """Run the notebook's VMAT global-optimal plan for ``config`` and write it to the run store.

    Invalid configs raise ``ConfigError`` before anything is loaded or written. The solver starts from a checked
    deliverable plan (``config.solver.warm_start``, see ``vmat_core.warmstart``): run ``warm_start_run_id`` when
    set (refused unless it has the same case, beams, down-sampling and MU bound), else the aperture heuristic;
    its time counts against ``time_limit_s``. ``warm_start`` (model variable name -> values) overrides both.
    """
    import portpy.photon as pp

    from vmat_core import solvers, warmstart
    from vmat_core.model import build_vmat_mip
    from vmat_core.store import RunStore, new_run_id

    cfg = RunConfig.from_dict(config) if isinstance(config, dict) else config
    case = cases.case_info(cfg.case_id, portpy_dir)
    validate_config(cfg, case)
    solver_plan = warmstart.choose_mip_solver(cfg.solver)
    choice = solver_plan.choice
    store = store or RunStore()
    previous_arrays = None
    if warm_start is None and cfg.warm_start_run_id is not None and cfg.solver.warm_start != "none":
        try:
            previous_arrays = warmstart.load_previous_run(cfg, cfg.warm_start_run_id, store)
        except warmstart.WarmStartError as exc:
            raise ConfigError("warm_start_run_id", str(exc).removeprefix("warm_start_run_id: ")) from exc
    emit = on_progress or (lambda event: None)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    created_at = datetime.now(UTC)

    def phase(name: str, **extra) -> None:
        emit({"phase": name, "elapsed_s": time.perf_counter() - t_start, **extra})

    phase("load")
    t = time.perf_counter()
    prepared = prepare_case(cfg, portpy_dir)
    ct, structs, beams, inf_db = prepared.ct, prepared.structs, prepared.beams, prepared.inf_db
    clinical_criteria = protocol_criteria(cfg.protocol)
    opt_params = to_portpy_opt_params(cfg)
    if prepared.cache_hit:
        timings["load"], timings["downsample"] = time.perf_counter() - t, 0.0
    else:
        timings["load"] = time.perf_counter() - t - prepared.downsample_s
        timings["downsample"] = prepared.downsample_s
    num_fractions = int(clinical_criteria.get_num_of_fractions())
    prescription_gy = float(clinical_criteria.get_prescription())

    phase("build")
    t = time.perf_counter()
    with _quiet():
        plan = pp.Plan(ct=ct, structs=structs, beams=beams, inf_matrix=inf_db, clinical_criteria=clinical_criteria)
        opt = pp.Optimization(plan, opt_params=opt_params)
        model = build_vmat_mip(opt, opt_params, num_fractions, cfg.mu_bound)
    timings["build"] = time.perf_counter() - t
    phase("solve", solver=choice.name, reason=solver_plan.reason, **model.size, n_voxels=int(inf_db.A.shape[0]))

    def progress(p) -> None:
        phase("solve", incumbent=p.incumbent, bound=p.bound, gap=p.gap, nodes=p.nodes, solver_elapsed_s=p.elapsed_s)

    log_lines: list[str] = []

    def on_solver_log(line: str) -> None:
        log_lines.append(line)
        if on_log:
            on_log(line)

    # The start's search is part of the solve phase (its events carry stage="warm_start") and counts against the
    # planner's time limit: the solver gets what is left.
    t = time.perf_counter()
    start_values, start = None, None
    start_label = "none"
    heuristic_s = warmstart.heuristic_time_s(cfg.solver)
    if warm_start:
        # Keys are the model's variable names: x, z, lbi, rbi, mu and any slack (e.g. slack_PTV_quadratic-overdose).
        by_name = {v.name(): v for v in model.problem.variables()}
        start_values = {by_name[k]: np.asarray(v) for k, v in warm_start.items() if k in by_name}
        start_label = "caller"
    elif previous_arrays is not None:
        phase("solve", stage="warm_start", source="previous_run")
        try:
            start = warmstart.previous_run_start(model, previous_arrays, polish_s=heuristic_s,
                                                 threads=cfg.solver.threads, should_stop=should_stop)
        except warmstart.WarmStartError as exc:
            raise ConfigError("warm_start_run_id", str(exc).removeprefix("warm_start_run_id: ")) from exc
    elif cfg.solver.warm_start in ("auto", "heuristic"):
        phase("solve", stage="warm_start", source="heuristic")
        try:
            start = warmstart.heuristic_start(
                model, inf_db, time_budget_s=heuristic_s, threads=cfg.solver.threads, should_stop=should_stop,
                on_improve=lambda s, v: phase("solve", stage="warm_start", incumbent=v, bound=None, gap=None,
                                              solver_elapsed_s=s))
        except warmstart.WarmStartError as exc:
            log.warning("no heuristic start: %s", exc)
            if on_log:
                on_log(f"no heuristic start: {exc}")
    if start is not None:
        start_values, start_label = start.values, start.source
    timings["warm_start"] = time.perf_counter() - t
    solver_time_s = max(cfg.solver.time_limit_s - timings["warm_start"], min(1.0, cfg.solver.time_limit_s))
    if start is not None:
        # The solver starts from this plan; a start that is already optimal may get no solver callback at all.
        phase("solve", incumbent=start.objective, bound=None, gap=None, nodes=0, solver_elapsed_s=0.0)
    t = time.perf_counter()
    result = solvers.solve_mip(
        model.problem,
        solver=choice.name,
        time_limit_s=solver_time_s,
        mip_gap=cfg.solver.mip_gap,
        threads=cfg.solver.threads,
        on_progress=progress,
        on_log=on_solver_log,
        should_stop=should_stop,
        warm_start=start_values,
        solver_options=solver_plan.options,
    )
    timings["solve"] = time.perf_counter() - t
    if not result.has_solution and result.status == "cancelled" and start is not None:
        # Stopped before the solver had a plan of its own: the start is a checked deliverable plan, already shown
        # to the planner as the incumbent, so the run keeps it.
        for var, value in start.values.items():
            var.value = np.asarray(value, dtype=float).reshape(var.shape)
        gap = solvers.relative_gap(start.objective, result.bound)
        result = dataclasses.replace(
            result, has_solution=True, objective=start.objective, gap=gap,
            trace=[solvers.ProgressPoint(0.0, start.objective, result.bound, gap, 0)],
            message=f"{result.message}; the run keeps its {start.source} start plan")
    if result.has_solution:
        phase("solve", incumbent=result.objective, bound=result.bound, gap=result.gap, nodes=result.trace[-1].nodes,
              solver_elapsed_s=result.solve_time_s)
    if not result.has_solution:
        if result.status == "cancelled":
            raise RunCancelled("cancelled before the solver found a deliverable plan")
        raise RuntimeError(f"{result.solver} found no solution: {result.status} ({result.message})")

    phase("postprocess")
    t = time.perf_counter()
    x = np.asarray(model.x.value, dtype=float).clip(min=0)
    dose_1d = inf_db.A @ (x * num_fractions)
    dose_3d = inf_db.dose_1d_to_3d(dose_1d=dose_1d)
    criteria_list = clinical_criteria.get_criteria()
    ev = evaluate_plan(inf_db, list(structs.get_structures()), dose_1d, prescription_gy, criteria_list)
    timings["postprocess"] = time.perf_counter() - t

    phase("write")
    t = time.perf_counter()
    cfg_dict = cfg.to_dict()
    run_id = new_run_id(cfg.content_hash(), created_at)
    metadata = _run_metadata(cfg, case, choice, result, model, inf_db, ev, timings, created_at, prescription_gy,
                             prepared.cache_hit)
    metadata["solver_reason"] = solver_plan.reason
    metadata["warm_start"] = start_label
    metadata["warm_start_objective"] = (result.warm_start_objective if result.warm_start_objective is not None
                                        else (start.objective if start is not None else None))
    metadata["warm_start_accepted"] = result.warm_start_accepted
    metadata["warm_start_time_s"] = float(timings["warm_start"])
    trace = pd.DataFrame(
        [
            {"elapsed_s": p.elapsed_s, "incumbent": p.incumbent, "bound": p.bound, "gap": p.gap, "nodes": p.nodes}
            for p in result.trace
        ],
        columns=["elapsed_s", "incumbent", "bound", "gap", "nodes"],
    ).astype("float64")
    arrays = {
        "dose_3d_gy": dose_3d.astype(np.float32),
        "dose_1d_gy": dose_1d.astype(np.float32),
        "fluence": x,
        "mu": np.asarray(model.mu.value, dtype=float),
        "left_leaf_pos": np.rint(np.asarray(model.lbi.value, dtype=float)).astype(np.int32),
        "right_leaf_pos": np.rint(np.asarray(model.rbi.value, dtype=float)).astype(np.int32),
        "beamlet_open": np.rint(np.asarray(model.z.value, dtype=float)).astype(np.int8),
        "leaf_row_beam": model.leaves.row_beam.astype(np.int32),
    }
    run_dir = store.write_run(
        run_id,
        config=cfg_dict,
        metadata=metadata,
        arrays=arrays,
        tables={"dvh": ev.dvh, "metrics": ev.metrics, "criteria": ev.criteria, "progress": trace},
        texts={"solver": result.log or "\n".join(log_lines)},
        json_files={"objective_terms": model.term_values(), "timings": timings},
    )
    timings["write"] = time.perf_counter() - t
    phase("done", run_id=run_id, status=result.status, objective=result.objective, gap=result.gap)
    return RunResult(run_id=run_id, run_dir=run_dir, metadata=metadata, timings_s=timings)


def weight_column(row) -> str:
    """History column of an objective row's weight, e.g. ``w_CORD_quadratic``, ``w_PTV_quadratic_underdose``."""
    from vmat_core.store import safe_column_name

    return safe_column_name("w", row.structure_name or "all", row.type)


def _run_metadata(cfg, case, choice, result, model, inf_db, ev, timings, created_at, prescription_gy,
                  cache_hit) -> dict:
    md: dict = {
        "created_at": created_at,
        "case_id": cfg.case_id,
        "protocol": cfg.protocol,
        "label": cfg.label,
        "config_hash": cfg.content_hash(),
        "beam_ids": [int(b) for b in cfg.beam_ids],
        "n_beams": len(cfg.beam_ids),
        "voxel_ds_x": int(cfg.voxel_down_sample_factors[0]),
        "voxel_ds_y": int(cfg.voxel_down_sample_factors[1]),
        "voxel_ds_z": int(cfg.voxel_down_sample_factors[2]),
        "beamlet_ds": int(cfg.beamlet_down_sample_factor),
        "mu_bound": float(cfg.mu_bound),
        "solver": result.solver,
        "solver_requested": cfg.solver.solver,
        "solver_reason": result.reason,
        "time_limit_s": float(cfg.solver.time_limit_s),
        "mip_gap_requested": float(cfg.solver.mip_gap),
        "status": result.status,
        "objective": result.objective,
        "bound": result.bound,
        "gap": result.gap,
        "solve_time_s": result.solve_time_s,
        "warm_start_objective": result.warm_start_objective,
        "n_opt_voxels": int(inf_db.A.shape[0]),
        "prepared_cache_hit": bool(cache_hit),
        "n_beamlets": int(inf_db.A.shape[1]),
        "n_leaf_rows": model.leaves.n_rows,
        "prescription_gy": prescription_gy,
        "criteria_passed": ev.passed,
        "criteria_failed": ev.failed,
        "hostname": platform.node(),
        "pid": os.getpid(),
    }
    for k, v in timings.items():
        md[f"t_{k}_s"] = float(v)
    md["t_total_s"] = float(sum(timings.values()))
    for row in cfg.objectives:
        md[weight_column(row)] = float(row.weight) if row.enabled else 0.0
    for _, m in ev.metrics.iterrows():
        s = m["structure"]
        md[f"{s}_mean_gy"] = float(m["mean_gy"])
        md[f"{s}_max_gy"] = float(m["max_gy"])
        if is_target(s):
            for col in ("d95_gy", "d98_gy", "d2_gy", "v100_pct"):
                md[f"{s}_{col}"] = float(m[col])
    md.update({f"version_{k}": v for k, v in software_versions().items()})
    return md


# --- the shipped reference plan -------------------------------------------------------------------------------

def _reference_dicom(case_dir: Path) -> Path | None:
    # PortPy's reader takes the last rt_dose file of the folder; do the same so both agree on "the" reference.
    files = sorted((case_dir / "DicomFiles").glob("rt_dose*.dcm"))
    return files[-1] if files else None


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def reference_plan(
    case_id: str, voxel_down_sample_factors: tuple[int, int, int] = (6, 6, 1), protocol: str | None = None,
    portpy_dir: Path | None = None,
) -> dict:
    """The case's shipped reference dose, evaluated exactly like a run (same voxels, DVH and criteria).

    Returns ``{"dose_3d_gy", "dvh", "metrics", "criteria", "full", "prescription_gy", "source"}``: the tables on
    the optimisation voxels of ``voxel_down_sample_factors`` (as a run's own evaluation), and under ``"full"`` the
    same tables on every dose voxel (as a run's reconstructed full-resolution dose), so the reference can be
    compared like for like on either grid. The result is cached under the data directory's cache, keyed by the
    DICOM file's size and time, so the app shows it instantly.
    """
    import portpy.photon as pp
    from portpy.photon.utils import convert_dose_rt_dicom_to_portpy

    from vmat_core.config import default_config

    case = cases.case_info(case_id, portpy_dir)
    dcm = _reference_dicom(case.path)
    if dcm is None:
        raise FileNotFoundError(f"case_id: {case_id!r} ships no reference dose (no DicomFiles/rt_dose*.dcm)")
    cfg = default_config(case_id, protocol=protocol or (case.protocols[0] if case.protocols else "Lung_2Gy_30Fx"))
    st = dcm.stat()
    factors = tuple(int(f) for f in voxel_down_sample_factors)
    key = f"{case_id}-{cfg.protocol}-{'x'.join(map(str, factors))}-{st.st_size}-{st.st_mtime_ns}-v2"
    cache_file = paths.cache_dir() / "reference" / f"{key}.pkl"
    if cache_file.is_file():
        with contextlib.suppress(Exception):
            return pickle.loads(cache_file.read_bytes())

    # The voxel grid does not depend on the beams; the default beams share the prepared-case cache with the
    # default runs, so the reference usually costs no loading at all.
    cfg = RunConfig.from_dict({**cfg.to_dict(), "voxel_down_sample_factors": list(factors)})
    prepared = prepare_case(cfg, portpy_dir)
    ct, structs, inf_db = prepared.ct, prepared.structs, prepared.inf_db
    clinical_criteria = protocol_criteria(cfg.protocol)
    with _quiet():
        dose_3d = np.asarray(convert_dose_rt_dicom_to_portpy(ct=ct, dose_file_name=str(dcm)), dtype=np.float32)
    dose_1d = inf_db.dose_3d_to_1d(dose_3d=dose_3d).astype(float)
    prescription_gy = float(clinical_criteria.get_prescription())
    ev = evaluate_plan(inf_db, list(structs.get_structures()), dose_1d, prescription_gy, clinical_criteria.get_criteria())
    # Every dose voxel: PortPy's full matrix maps them whatever the beams, so one beam keeps the load small; the
    # prepared case's CT and structures serve (the matrix copies what it takes from them).
    with _quiet():
        data = pp.DataExplorer(data_dir=str(case.path.parent))
        data.patient_id = case_id
        one_beam = pp.Beams(data, beam_ids=[int(cfg.beam_ids[0])])
        full_matrix = pp.InfluenceMatrix(ct=ct, structs=structs, beams=one_beam)
    full_ev = evaluate_plan(full_matrix, list(structs.get_structures()),
                            full_matrix.dose_3d_to_1d(dose_3d=dose_3d).astype(float), prescription_gy,
                            clinical_criteria.get_criteria())
    out = {
        "dose_3d_gy": dose_3d,
        "dvh": ev.dvh,
        "metrics": ev.metrics,
        "criteria": ev.criteria,
        "full": {"dvh": full_ev.dvh, "metrics": full_ev.metrics, "criteria": full_ev.criteria},
        "prescription_gy": prescription_gy,
        "source": dcm.name,
    }
    _atomic_write_bytes(cache_file, pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
    return out


# --- full-resolution dose of a stored run ---------------------------------------------------------------------

def full_dose_cache_key(run_id: str, store=None) -> str:
    """(run_id, checksum of the run's fluence): a reconstructed dose is valid exactly for that solution."""
    import hashlib

    from vmat_core.store import RunStore

    store = store or RunStore()
    fluence = store.read_arrays(run_id, ["fluence"])["fluence"]
    return f"{run_id}-{hashlib.sha256(np.ascontiguousarray(fluence).tobytes()).hexdigest()[:16]}"


def full_dose_path(run_id: str, store=None) -> Path:
    return paths.cache_dir() / "full_dose" / f"{full_dose_cache_key(run_id, store)}.npz"


def reconstruct_full_dose(run_id: str, *, store=None, portpy_dir: Path | None = None) -> dict:
    """Dose of a run on the full-resolution influence matrix (every dose voxel, every original beamlet).

    The optimisation works on the down-sampled matrix; this maps the optimal fluence back to the finest
    beamlets (each takes its parent's intensity, PortPy's ``sol_change_inf_matrix``) and recomputes dose, DVH,
    metrics and criteria. Cached by (run_id, fluence checksum), so it is computed once per run.
    """
    import portpy.photon as pp

    from vmat_core.store import RunStore

    store = store or RunStore()
    target = full_dose_path(run_id, store)
    if target.is_file():
        return _read_full_dose(target)
    cfg = RunConfig.from_dict(store.read_config(run_id))
    fluence = store.read_arrays(run_id, ["fluence"])["fluence"]
    _, ct, structs, beams, clinical_criteria, _ = load_case(cfg, portpy_dir)
    inf_matrix, inf_db = down_sampled_matrix(cfg, ct, structs, beams)
    with _quiet():
        sol_full = pp.InfluenceMatrix.sol_change_inf_matrix(
            {"optimal_intensity": fluence, "inf_matrix": inf_db}, inf_matrix=inf_matrix
        )
    nfx = int(clinical_criteria.get_num_of_fractions())
    dose_1d = inf_matrix.A @ (np.asarray(sol_full["optimal_intensity"], dtype=float) * nfx)
    dose_3d = inf_matrix.dose_1d_to_3d(dose_1d=dose_1d).astype(np.float32)
    rx = float(clinical_criteria.get_prescription())
    ev = evaluate_plan(inf_matrix, list(structs.get_structures()), dose_1d, rx, clinical_criteria.get_criteria())
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        dose_3d_gy=dose_3d,
        dvh_json=np.frombuffer(ev.dvh.to_json(orient="records").encode(), dtype=np.uint8),
        metrics_json=np.frombuffer(ev.metrics.to_json(orient="records").encode(), dtype=np.uint8),
        criteria_json=np.frombuffer(ev.criteria.to_json(orient="records").encode(), dtype=np.uint8),
    )
    _atomic_write_bytes(target, buf.getvalue())
    return _read_full_dose(target)


def export_full_dose(run_id: str, store=None) -> bytes | None:
    """The stored full-resolution dose file of a run (None when not computed), to move it to another machine."""
    path = full_dose_path(run_id, store)
    return path.read_bytes() if path.is_file() else None


def import_full_dose(run_id: str, data: bytes, store=None) -> Path:
    """Store a full-resolution dose file made elsewhere (checked readable first; an existing one is kept)."""
    target = full_dose_path(run_id, store)
    if not target.is_file():
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                missing = {"dose_3d_gy", "dvh_json", "metrics_json", "criteria_json"} - set(z.files)
        except (ValueError, OSError) as exc:
            raise ValueError(f"full dose of run {run_id}: not a readable .npz ({exc})") from exc
        if missing:
            raise ValueError(f"full dose of run {run_id}: missing {', '.join(sorted(missing))}")
        _atomic_write_bytes(target, data)
    return target


def read_full_dose(run_id: str, *, store=None, with_dose: bool = True) -> dict | None:
    """The run's full-resolution dose if it has been reconstructed, else None; never computes it.

    Same keys as ``reconstruct_full_dose``; ``with_dose=False`` leaves out ``dose_3d_gy`` (the DVH and criteria
    views need only the tables, and decompressing the CT-sized volume costs far more than reading them). A run
    without a stored fluence can have no full-resolution dose, so it is None too.
    """
    import zipfile

    from vmat_core.store import CorruptRun

    try:
        target = full_dose_path(run_id, store)
    except (KeyError, ValueError, OSError, CorruptRun) as e:
        log.debug("run %s has no full-resolution dose: %s", run_id, e)
        return None
    if not target.is_file():
        return None
    try:
        return _read_full_dose(target, with_dose=with_dose)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:  # damaged file: as if never computed
        log.warning("full-resolution dose of run %s unreadable (%s): %s", run_id, target, e)
        return None


def _read_full_dose(path: Path, *, with_dose: bool = True) -> dict:
    # np.load is lazy per array, so leaving out the dose skips its decompression.
    with np.load(path, allow_pickle=False) as z:
        out = {
            "dvh": pd.read_json(io.StringIO(bytes(z["dvh_json"]).decode()), orient="records"),
            "metrics": pd.read_json(io.StringIO(bytes(z["metrics_json"]).decode()), orient="records"),
            "criteria": pd.read_json(io.StringIO(bytes(z["criteria_json"]).decode()), orient="records"),
        }
        if with_dose:
            out = {"dose_3d_gy": z["dose_3d_gy"], **out}
        return out
