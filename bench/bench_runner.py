"""Phase times of the default (notebook) run with HiGHS and SCIP, and model-build cost against the notebook's own
leaf-by-leaf cvxpy formulation on the same case. Prints tables; asserts nothing.

    python bench/bench_runner.py [--time-limit 120] [--beams 0,11,22,33,44,55,66]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import scratch_data_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--beams", default="0,11,22,33,44,55,66")
    ap.add_argument("--solvers", default="HIGHS,SCIP")
    args = ap.parse_args()
    with scratch_data_dir("vmat-bench-", ensure_phantom=True):
        return _measure(args)


def _measure(args) -> int:
    import cvxpy as cp
    from test_runner import notebook_problem

    from vmat_core import runner
    from vmat_core.config import apply_overrides, default_config
    from vmat_core.model import build_vmat_mip

    base = apply_overrides(default_config(), [f"beam_ids={args.beams}", f"solver.time_limit_s={args.time_limit}"])

    # Cold: nothing cached (what the first run of a new beam/down-sampling setting costs).
    t = time.perf_counter()
    runner.prepare_case(base, use_cache=True)
    cold_prepare = time.perf_counter() - t

    rows = []
    for solver in args.solvers.split(","):
        cfg = apply_overrides(base, [f"solver.solver={solver}"])
        t = time.perf_counter()
        res = runner.run_vmat_global_optimal(cfg)
        wall = time.perf_counter() - t
        md = res.metadata
        overhead = wall - md["t_solve_s"]
        rows.append((solver, md, wall, overhead))

    print(f"\nDefault run, beams {args.beams}, time limit {args.time_limit:g} s "
          f"({rows[0][1]['n_opt_voxels']} opt voxels x {rows[0][1]['n_beamlets']} beamlets, "
          f"{rows[0][1]['n_leaf_rows']} leaf rows)")
    print(f"cold set-up (load + optimisation structures + down-sampling, cached afterwards): {cold_prepare:.1f} s\n")
    hdr = f"{'solver':<7} {'load':>7} {'downs.':>7} {'build':>7} {'solve':>8} {'post':>7} {'write':>7} {'wall':>8} " \
          f"{'overhead':>9} {'status':>11} {'objective':>11} {'gap':>8}"
    print(hdr)
    print("-" * len(hdr))
    for solver, md, wall, overhead in rows:
        print(f"{solver:<7} {md['t_load_s']:7.2f} {md['t_downsample_s']:7.2f} {md['t_build_s']:7.2f} "
              f"{md['t_solve_s']:8.2f} {md['t_postprocess_s']:7.2f} {md.get('t_write_s', 0):7.2f} "
              f"{wall:8.2f} {overhead / wall:9.1%} {md['status']:>11} {md['objective']:11.4g} {md['gap']:8.2%}")

    # Model build: the runner's vectorised families against the notebook's one-constraint-per-leaf loop, both
    # including cvxpy's canonicalisation for HiGHS (what a solve would pay before the solver starts).
    import portpy.photon as pp

    prepared = runner.prepare_case(base)
    cc = runner.protocol_criteria(base.protocol)
    opt_params = runner.to_portpy_opt_params(base)
    t = time.perf_counter()
    plan = pp.Plan(ct=prepared.ct, structs=prepared.structs, beams=prepared.beams, inf_matrix=prepared.inf_db,
                   clinical_criteria=cc)
    model = build_vmat_mip(pp.Optimization(plan, opt_params=opt_params), opt_params, 30, base.mu_bound)
    model.problem.get_problem_data(cp.HIGHS)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    nb = notebook_problem(base, prepared)
    t_nb_build = time.perf_counter() - t
    nb.get_problem_data(cp.HIGHS)
    theirs = time.perf_counter() - t
    print(f"\nModel build + canonicalisation on the same prepared case: runner {ours:.2f} s, notebook's "
          f"leaf-by-leaf formulation {theirs:.2f} s (python-level model {t_nb_build:.2f} s); "
          f"ratio notebook/runner {theirs / ours:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
