"""Generation cost and size of the synthetic lung case, and the problem PortPy makes of it.

    python bench/bench_phantom.py [--seed N] [--keep DIR]

Builds the case into a temporary folder (never the project's data directory), then loads it with PortPy the way
the notebook does (control points 0, 11, ..., 66; voxels 6 x 6 x 1 CT voxels, beamlets 6 x 2.5 mm) and prints
figures, not verdicts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmat_core import phantom

NOTEBOOK_BEAM_IDS = [0, 11, 22, 33, 44, 55, 66]


def _row(name: str, value: str) -> None:
    print(f"| {name:<54} | {value:<60} |")


def _portpy_problem(case_dir: Path) -> dict:
    """Timings and sizes of PortPy's notebook pipeline on the case (its chatter is swallowed)."""
    import portpy.photon as pp

    out: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        data = pp.DataExplorer(data_dir=str(case_dir.parent))
        data.patient_id = case_dir.name
        ct, structs = pp.CT(data), pp.Structures(data)
        beams = pp.Beams(data, beam_ids=NOTEBOOK_BEAM_IDS)
        out["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        criteria = pp.ClinicalCriteria(data, protocol_name="Lung_2Gy_30Fx")
        structs.create_opt_structures(opt_params=data.load_config_opt_params(protocol_name="Lung_2Gy_30Fx"),
                                      clinical_criteria=criteria)
        out["opt_structures_s"] = time.perf_counter() - t
        t = time.perf_counter()
        inf = pp.InfluenceMatrix(ct=ct, structs=structs, beams=beams)
        out["influence_matrix_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res = [r * f for r, f in zip(ct.get_ct_res_xyz_mm(), (6, 6, 1), strict=True)]
        db = inf.create_down_sample(beamlet_width_mm=beams.get_finest_beamlet_width() * 6,
                                    beamlet_height_mm=beams.get_finest_beamlet_height() * 6,
                                    opt_vox_xyz_res_mm=res)
        out["down_sample_s"] = time.perf_counter() - t
    out["full_shape"] = inf.A.shape
    out["full_nnz"] = inf.A.nnz
    out["shape"] = db.A.shape
    out["nnz"] = db.A.nnz
    dose = db.A @ np.ones(db.A.shape[1])
    out["uniform_ptv_gy"] = float(dose[db.get_opt_voxels_idx("PTV")].mean())
    out["uniform_cord_gy"] = float(dose[db.get_opt_voxels_idx("CORD")].mean())
    out["ptv_voxels"] = len(db.get_opt_voxels_idx("PTV"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="build here and keep the folder")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vmat-case-bench-") as tmp:
        root = args.keep or Path(tmp)
        case_dir = root / phantom.CASE_ID
        if "Phantom" in str(case_dir):
            raise SystemExit(f"--keep: {case_dir} contains 'Phantom', which PortPy's RT Dose reader mishandles")
        cpu0 = time.process_time()
        s = phantom.build_phantom(case_dir, seed=args.seed)
        cpu_main = time.process_time() - cpu0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        p = _portpy_problem(case_dir)

    t = s["timings_s"]
    bl = s["beamlets_per_beam"]
    rp = s["reference_plan"]
    box = s["calc_box_xyz_mm"]
    line = "|" + "-" * 56 + "|" + "-" * 62 + "|"
    print(line)
    _row("figure", "value")
    print(line)
    _row("generation wall, total (s)", f"{t['total_s']:.1f}")
    for k in ("anatomy_s", "write_ct_structures_s", "beams_s", "reference_plan_s"):
        _row(f"  phase {k[:-2]} (s)", f"{t[k]:.1f}")
    _row("  per beam: compute / write, mean (s)", f"{s['beam_compute_s_mean']:.2f} / {s['beam_write_s_mean']:.2f}")
    _row("CPU time: main / beam workers (s)", f"{cpu_main:.1f} / {children.ru_utime + children.ru_stime:.1f}")
    _row("peak RSS: main / largest worker (MB)", f"{s['peak_rss_mb']['self']:.0f} / {s['peak_rss_mb']['workers']:.0f}")
    _row("CT grid (x, y, z voxels)", "{2} x {1} x {0}".format(*s["ct_shape_zyx"]))
    _row("CT resolution (mm)", " x ".join(f"{v:.3f}" for v in s["ct_resolution_xyz_mm"]))
    _row("dose voxels (3 x 3 x 1 CT blocks)", f"{s['dose_voxels']:,}")
    _row("calc box x / y / z (mm)", " / ".join(f"{a:.0f}..{b:.0f}" for a, b in box))
    _row("control points", f"{s['num_beams']}")
    _row("beamlets per beam min / mean / max", f"{bl['min']} / {bl['mean']:.1f} / {bl['max']}")
    _row("influence matrix nnz (all beams)", f"{s['nnz_total']:,}")
    _row("sparse tolerance (Gy/fx per unit intensity)", f"{s['influence_matrix_sparse_tol_gy']:.3g}")
    _row("folder size (MB)", f"{s['folder_size_mb']:.0f}")
    _row("structure volumes (cc)", ", ".join(f"{k} {v:.0f}" for k, v in s["structure_volumes_cc"].items()
                                             if k not in ("SKIN", "BODY")))
    _row("reference plan: PTV D95 / mean / max (Gy)",
         f"{rp['ptv_d95_gy']:.1f} / {rp['ptv_mean_gy']:.1f} / {rp['ptv_max_gy']:.1f}")
    _row("reference plan: cord max, eso mean, heart mean (Gy)",
         f"{rp['cord_max_gy']:.1f}, {rp['esophagus_mean_gy']:.1f}, {rp['heart_mean_gy']:.1f}")
    _row("reference plan: lungs-not-GTV mean in box (Gy)", f"{rp['lungs_not_gtv_mean_gy']:.1f}")
    print(line)
    _row("PortPy, notebook beams: load / opt structures (s)", f"{p['load_s']:.1f} / {p['opt_structures_s']:.1f}")
    _row("PortPy: InfluenceMatrix / create_down_sample (s)",
         f"{p['influence_matrix_s']:.1f} / {p['down_sample_s']:.1f}")
    _row("PortPy full matrix (voxels x beamlets, nnz)",
         f"{p['full_shape'][0]:,} x {p['full_shape'][1]:,}, {p['full_nnz']:,}")
    _row("PortPy 6/6: optimisation voxels x beamlets", f"{p['shape'][0]:,} x {p['shape'][1]:,}")
    _row("PortPy 6/6: nnz / PTV voxels", f"{p['nnz']:,} / {p['ptv_voxels']:,}")
    _row("uniform intensity 1: PTV / CORD mean (Gy/fx)", f"{p['uniform_ptv_gy']:.2f} / {p['uniform_cord_gy']:.2f}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
