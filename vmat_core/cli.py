"""The ``vmat-planner`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from vmat_core import paths


def _set_data_dir(args: argparse.Namespace) -> None:
    # One switch for the whole process (and the workers it starts): the environment variable.
    if getattr(args, "data_dir", None):
        os.environ[paths.DATA_DIR_ENV] = str(Path(args.data_dir).expanduser().resolve())


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True))

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def cmd_cases(args: argparse.Namespace) -> int:
    from vmat_core import cases

    infos = cases.list_cases()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    if not infos:
        print(f"No cases under {paths.portpy_data_dir()}. Build the synthetic case with: vmat-planner phantom")
        return 0
    rows = [
        {
            "case_id": i.case_id,
            "site": i.disease_site,
            "PTV_cc": f"{i.structure_volumes_cc.get('PTV', float('nan')):.1f}",
            "structures": len(i.structure_names),
            "beams": len(i.beam_ids),
            "CT (z,y,x)": "x".join(map(str, i.ct_shape_zyx)),
            "reference dose": "yes" if i.has_reference_dose else "no",
            "protocols": ",".join(i.protocols),
        }
        for i in infos
    ]
    print(_table(rows, list(rows[0])))
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from vmat_core import phantom

    path = phantom.ensure_phantom(force=args.force, seed=args.seed)
    print(f"Synthetic case ready: {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # The app is a separate layer on top of the core: start it as its own program rather than importing it.
    argv = [sys.executable, "-m", "app.server", "--host", args.host, "--port", str(args.port), *args.server_args]
    os.execv(sys.executable, argv)
    return 0  # not reached


def _load_config(args: argparse.Namespace):
    from vmat_core import config as cfgmod

    if args.config:
        text = Path(args.config).read_text()
        try:
            cfg = cfgmod.RunConfig.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"--config: {args.config} is not valid JSON ({e})") from e
    else:
        cfg = cfgmod.default_config(args.case or "Lung_Synth_Patient_1")
    overrides = list(args.set or [])
    if args.case:
        overrides.append(f"case_id={args.case}")
    if args.solver:
        overrides.append(f"solver.solver={args.solver}")
    if args.time_limit is not None:
        overrides.append(f"solver.time_limit_s={args.time_limit}")
    if args.gap is not None:
        overrides.append(f"solver.mip_gap={args.gap}")
    if args.beams:
        overrides.append(f"beam_ids={args.beams}")
    return cfgmod.apply_overrides(cfg, overrides) if overrides else cfg


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def cmd_run(args: argparse.Namespace) -> int:
    from vmat_core.runner import run_vmat_global_optimal

    cfg = _load_config(args)
    last = {"t": 0.0}

    def on_progress(ev: dict) -> None:
        # One status line, refreshed at most twice a second, so long solves show they are alive.
        now = ev.get("elapsed_s", 0.0)
        if ev.get("phase") == "solve" and now - last["t"] < 0.5 and ev.get("incumbent") is not None:
            return
        last["t"] = now
        msg = f"[{now:7.1f}s] {ev.get('phase', ''):<11}"
        if ev.get("phase") == "solve" and "reason" in ev:
            msg += f" {ev.get('solver')}: {ev.get('reason')}"
        elif ev.get("phase") == "solve":
            msg += f" incumbent {_fmt(ev.get('incumbent'))}  bound {_fmt(ev.get('bound'))}  gap {_fmt(ev.get('gap'), '.2%')}"
        print(msg, file=sys.stderr, flush=True)

    res = run_vmat_global_optimal(cfg, on_progress=on_progress)
    md = res.metadata
    print(f"run        {res.run_id}")
    print(f"folder     {res.run_dir}")
    print(f"solver     {md['solver']} ({md['solver_reason']})")
    print(f"status     {md['status']}   objective {_fmt(md['objective'])}   bound {_fmt(md['bound'])}   "
          f"gap {_fmt(md['gap'], '.2%')}")
    print(f"time       solve {md['solve_time_s']:.1f} s, total {md['t_total_s']:.1f} s")
    print(f"PTV        D95 {_fmt(md.get('PTV_d95_gy'), '.2f')} Gy   V100 {_fmt(md.get('PTV_v100_pct'), '.1f')} %   "
          f"Dmax {_fmt(md.get('PTV_max_gy'), '.2f')} Gy")
    for s in ("CORD", "ESOPHAGUS", "HEART"):
        if f"{s}_mean_gy" in md:
            print(f"{s:<10} Dmean {md[f'{s}_mean_gy']:.2f} Gy   Dmax {md[f'{s}_max_gy']:.2f} Gy")
    print(f"criteria   {md['criteria_passed']} passed, {md['criteria_failed']} failed")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from vmat_core.store import RunStore

    df = RunStore().list_runs(where=args.where, limit=args.limit)
    if df.empty:
        print("No runs" + (" match" if args.where else " yet"))
        return 0
    cols = [c for c in ("run_id", "created_at", "case_id", "n_beams", "solver", "status", "objective", "gap",
                        "solve_time_s", "PTV_d95_gy", "CORD_max_gy", "criteria_passed", "criteria_failed") if c in df]
    rows = [{c: (_fmt(r[c]) if isinstance(r[c], float) else r[c]) for c in cols} for _, r in df.iterrows()]
    print(_table(rows, cols))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmat-planner", description="VMAT Planner: PortPy VMAT global optimal planning")
    p.add_argument("--data-dir", help=f"data directory (default ${paths.DATA_DIR_ENV} or ./data)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("cases", help="list the cases in the data directory")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_cases)

    s = sub.add_parser("phantom", help="build (or rebuild) the synthetic lung patient")
    s.add_argument("--force", action="store_true", help="rebuild even if it exists")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_phantom)

    s = sub.add_parser("serve", help="serve the app (and its HTTP API)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=5006)
    s.add_argument("server_args", nargs=argparse.REMAINDER,
                   help="further server options: --basic-auth, --cookie-secret, --allow-websocket-origin, --workers")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("run", help="run the VMAT global-optimal plan and store it")
    s.add_argument("--config", help="config JSON file (default: the notebook's defaults)")
    s.add_argument("--case", help="case id")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override, e.g. CORD/quadratic.weight=20, solver.time_limit_s=30 (repeatable)")
    s.add_argument("--solver", choices=["auto", "MOSEK", "HIGHS", "SCIP"])
    s.add_argument("--time-limit", type=float, help="solver time limit in seconds")
    s.add_argument("--gap", type=float, help="relative MIP gap at which to stop, in [0, 1)")
    s.add_argument("--beams", help="comma-separated beam ids")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("runs", help="list stored runs")
    s.add_argument("--where", help="SQL condition over the runs' columns, e.g. \"gap < 0.1 AND n_beams = 7\"")
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=cmd_runs)

    from vmat_core import fetch, jobs, migrate

    jobs.add_cli_commands(sub)
    fetch.add_cli_commands(sub)
    migrate.add_cli_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_data_dir(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:  # validation errors carry the field name; a traceback would hide it
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
