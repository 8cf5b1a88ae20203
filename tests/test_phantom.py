"""The synthetic lung case, read back through PortPy's own loaders, and the physics of its dose model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from vmat_core import cases, phantom

NOTEBOOK_BEAM_IDS = [0, 11, 22, 33, 44, 55, 66]
PROTOCOL = "Lung_2Gy_30Fx"


# ---------------------------------------------------------------------------------------------------------
# PortPy objects, loaded once per module (PortPy prints a lot; that is its way)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pp():
    import portpy.photon as pp

    return pp


@pytest.fixture(scope="module")
def data(pp, case_dir: Path):
    d = pp.DataExplorer(data_dir=str(case_dir.parent))
    d.patient_id = case_dir.name
    return d


@pytest.fixture(scope="module")
def ct(pp, data):
    return pp.CT(data)


@pytest.fixture(scope="module")
def structs(pp, data):
    s = pp.Structures(data)
    criteria = pp.ClinicalCriteria(data, protocol_name=PROTOCOL)
    s.create_opt_structures(opt_params=data.load_config_opt_params(protocol_name=PROTOCOL),
                            clinical_criteria=criteria)
    return s


@pytest.fixture(scope="module")
def beams(pp, data):
    return pp.Beams(data, beam_ids=NOTEBOOK_BEAM_IDS)


@pytest.fixture(scope="module")
def inf_matrix(pp, ct, structs, beams):
    return pp.InfluenceMatrix(ct=ct, structs=structs, beams=beams)


@pytest.fixture(scope="module")
def inf_matrix_notebook(ct, beams, inf_matrix):
    """The notebook's down-sampling: voxels 6 x 6 x 1 CT voxels, beamlets 6 x 2.5 mm squares."""
    res = [r * f for r, f in zip(ct.get_ct_res_xyz_mm(), (6, 6, 1), strict=True)]
    return inf_matrix.create_down_sample(beamlet_width_mm=beams.get_finest_beamlet_width() * 6,
                                         beamlet_height_mm=beams.get_finest_beamlet_height() * 6,
                                         opt_vox_xyz_res_mm=res)


# ---------------------------------------------------------------------------------------------------------
# The folder as PortPy sees it
# ---------------------------------------------------------------------------------------------------------


def test_portpy_lists_the_case(data, case_dir: Path) -> None:
    df = data.display_list_of_patients(return_df=True)
    row = df[df["patient_id"] == phantom.CASE_ID]
    assert len(row) == 1
    assert row["disease_site"].item() == "Lung"
    assert row["num_beams"].item() == 72
    assert 70.0 < row["ptv_vol_cc"].item() < 105.0
    assert "Phantom" not in str(case_dir.resolve())


def test_ct_has_realistic_grid_and_hounsfield_units(ct, structs) -> None:
    hu = ct.ct_dict["ct_hu_3d"][0]
    assert hu.shape == phantom.CT_SHAPE_ZYX
    assert ct.get_ct_res_xyz_mm() == pytest.approx([0.9765625, 0.9765625, 3.0])
    body = structs.get_structure_mask_3d("BODY").astype(bool)
    assert np.all(hu[~body] == -1000)
    lungs = (structs.get_structure_mask_3d("LUNG_L") | structs.get_structure_mask_3d("LUNG_R")).astype(bool)
    lungs &= ~structs.get_structure_mask_3d("GTV").astype(bool)
    assert -880 < np.median(hu[lungs]) < -720
    assert 0 < np.median(hu[structs.get_structure_mask_3d("HEART").astype(bool)]) < 80
    assert np.count_nonzero(hu > 500) * np.prod(ct.get_ct_res_xyz_mm()) / 1000.0 > 50  # > 50 cc of bone: spine, ribs, sternum


@pytest.mark.parametrize(
    ("name", "lo_cc", "hi_cc"),
    [("GTV", 9, 15), ("PTV", 70, 105), ("ESOPHAGUS", 40, 75), ("HEART", 500, 850), ("LUNG_L", 1300, 1950),
     ("LUNG_R", 1750, 2550), ("CORD", 55, 90), ("SKIN", 300, 1500), ("BODY", 10000, 25000)],
)
def test_structure_volumes_are_plausible(structs, name: str, lo_cc: float, hi_cc: float) -> None:
    mask = structs.get_structure_mask_3d(name)
    volume = np.count_nonzero(mask) * np.prod(structs.get_ct_voxel_resolution_xyz_mm()) / 1000.0
    assert lo_cc < volume < hi_cc
    assert structs.get_volume_cc(name) == pytest.approx(volume, rel=1e-3)


def _min_distance_mm(a: np.ndarray, b: np.ndarray, res_xyz: list[float]) -> float:
    from scipy.spatial import cKDTree

    scale = np.array([res_xyz[2], res_xyz[1], res_xyz[0]])
    pa, pb = np.argwhere(a) * scale, np.argwhere(b) * scale
    return float(cKDTree(pb).query(pa)[0].min())


def test_anatomy_nests_and_the_tumour_sits_near_the_organs_at_risk(structs) -> None:
    m = {n: structs.get_structure_mask_3d(n).astype(bool) for n in phantom.STRUCTURE_NAMES}
    assert not np.any(m["GTV"] & ~m["PTV"])
    assert not np.any(m["GTV"] & ~m["LUNG_R"])  # a right-lung tumour
    assert not np.any(m["PTV"] & ~m["BODY"]) and not np.any(m["SKIN"] & ~m["BODY"])
    assert not np.any(m["LUNG_L"] & m["LUNG_R"]) and not np.any(m["HEART"] & (m["LUNG_L"] | m["LUNG_R"]))
    res = structs.get_ct_voxel_resolution_xyz_mm()
    for oar, lo, hi in (("ESOPHAGUS", 8, 50), ("HEART", 8, 60), ("CORD", 20, 90)):
        assert lo < _min_distance_mm(m["PTV"], m[oar], res) < hi, oar


def test_protocol_structures_all_have_dose_voxels(structs) -> None:
    names = structs.get_structures()
    for extra in ("LUNGS_NOT_GTV", "RIND_0", "RIND_1", "RIND_2", "RIND_3", "RIND_4"):
        assert extra in names
    for name in names:
        assert structs.opt_voxels_dict["voxel_idx"][names.index(name)].size > 0, name
    assert structs.get_fraction_of_vol_in_calc_box("PTV") == 1.0


def test_all_control_points_exist_with_their_gantry_angles(case_dir: Path, beams) -> None:
    metas = [json.loads(p.read_text()) for p in (case_dir / "Beams").glob("Beam_*_MetaData.json")]
    assert sorted(m["ID"] for m in metas) == list(range(72))
    for m in metas:
        assert m["gantry_angle"] == 5.0 * m["ID"]
        assert m["collimator_angle"] == 0.0 and m["couch_angle"] == 0.0
        assert m["SAD_mm"] == 1000.0 and 700.0 < m["SSD_mm"] < 1000.0
        assert m["influenceMatrixSparse_tol"] > 0
    assert beams.get_gantry_angle(NOTEBOOK_BEAM_IDS) == [5.0 * b for b in NOTEBOOK_BEAM_IDS]
    planner = json.loads((case_dir / "PlannerBeams.json").read_text())["IDs"]
    assert len(planner) == 7 and set(planner) <= set(range(72))


def test_beamlets_form_complete_grids_on_the_mlc(beams) -> None:
    for bid in NOTEBOOK_BEAM_IDS:
        b = beams.get_beamlets(bid)
        x, y = b["position_x_mm"][0], b["position_y_mm"][0]
        w, h = b["width_mm"][0], b["height_mm"][0]
        assert np.all(w == 2.5) and np.all(h == 5.0)
        xs, ys = np.unique(x), np.unique(y)
        assert xs.size * ys.size == x.size  # a complete rectangle
        assert np.all(np.mod(x - w / 2, 2.5) == 0) and np.all(np.mod(y + h / 2, 2.5) == 0)
        grid = beams.get_beamlet_idx_2d_grid(beam_id=bid)
        assert grid.shape == (ys.size, xs.size) and np.all(grid >= 0)
        # MLC leaf pairs: 5 mm inner leaves, numbered from the bottom; one leaf per beamlet row.
        leaf = b["MLC_leaf_idx"][0]
        assert np.all(np.diff(leaf[np.argsort(-y, kind="stable")]) <= 0)
        assert np.unique(leaf).size == ys.size
        jaw = beams.get_jaw_positions(bid)
        assert jaw["top_left_x_mm"] == x.min() - 1.25 and jaw["bottom_right_y_mm"] == y.min() - 2.5


def test_influence_matrix_loads_and_down_samples_like_the_notebook(inf_matrix, inf_matrix_notebook,
                                                                  structs) -> None:
    n_dose = int(structs.opt_voxels_dict["ct_to_dose_voxel_map"][0].max()) + 1
    assert inf_matrix.A.shape[0] == n_dose
    assert 150 < inf_matrix.A.shape[1] / len(NOTEBOOK_BEAM_IDS) < 600
    rows, cols = inf_matrix_notebook.A.shape
    assert 8_000 < rows < 30_000  # optimisation voxels
    assert 80 < cols < 250  # 15 x 15 mm beamlets over the PTV from 7 control points
    maps = inf_matrix_notebook.get_bev_2d_grid(beam_id=NOTEBOOK_BEAM_IDS)
    assert sum(int(np.count_nonzero(np.unique(m) >= 0)) for m in maps) == cols


def test_uniform_fluence_over_the_ptv_gives_about_two_gray_there(inf_matrix, inf_matrix_notebook) -> None:
    for im in (inf_matrix, inf_matrix_notebook):
        dose = im.A @ np.ones(im.A.shape[1])
        ptv = float(np.mean(dose[im.get_opt_voxels_idx("PTV")]))
        assert 1.6 < ptv < 2.4
        for far in ("CORD", "LUNG_L", "SKIN", "ESOPHAGUS"):
            assert np.mean(dose[im.get_opt_voxels_idx(far)]) < 0.35 * ptv, far


def test_reference_rt_dose_round_trips_through_portpy(pp, ct, structs, case_dir: Path) -> None:
    import pydicom

    path = case_dir / "DicomFiles" / "rt_dose_echo_imrt.dcm"
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTDOSE" and ds.DoseUnits == "GY" and ds.DoseSummationType == "PLAN"
    assert float(ds.PixelSpacing[0]) == float(ds.PixelSpacing[1])  # immune to PortPy's x/y swap
    written = ds.pixel_array * float(ds.DoseGridScaling)
    assert written.shape == (ct.ct_dict["ct_hu_3d"][0].shape[0], 88, 126)

    dose = pp.convert_dose_rt_dicom_to_portpy(ct=ct, dose_file_name=str(path))
    assert dose.shape == phantom.CT_SHAPE_ZYX
    ptv = structs.get_structure_mask_3d("PTV").astype(bool)
    assert np.mean(dose[ptv]) == pytest.approx(phantom.PRESCRIPTION_GY, rel=0.04)
    assert np.percentile(dose[ptv], 5) == pytest.approx(phantom.PRESCRIPTION_GY, abs=2.0)  # D95
    on_ct = np.repeat(np.repeat(written, 3, axis=1), 3, axis=2)
    diff = np.abs(dose[ptv] - on_ct[ptv])
    assert diff.mean() < 0.5 and diff.max() < 4.0
    assert np.max(dose[structs.get_structure_mask_3d("CORD").astype(bool)]) < 45.0


# ---------------------------------------------------------------------------------------------------------
# The dose model in water
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def water_beam():
    """An open 40 x 40 mm field (all beamlets at unit intensity) from gantry 0 into a water block."""
    from scipy.sparse import csr_matrix

    grid = phantom.Grid.centred((24, 180, 132))
    xa, ya, za = grid.axes()
    X, Y, Z = xa[None, None, :], ya[None, :, None], za[:, None, None]
    body = np.broadcast_to((np.abs(X) < 60) & (Y > -60) & (Y < 85) & (np.abs(Z) < 40), grid.shape_zyx)
    ptv = np.broadcast_to((np.abs(X) <= 15) & (Y > -40) & (Y < -10) & (np.abs(Z) <= 15), grid.shape_zyx)
    hu = np.where(body, 0, -1000).astype(np.int16)
    anatomy = phantom.Anatomy(grid=grid, hu=hu, masks={"BODY": body.copy(), "PTV": ptv.copy()})
    dg = phantom.build_dose_grid(anatomy)
    kz, ky, kx = np.nonzero(ptv)
    ptv_xyz = np.column_stack([xa[kx], ya[ky], za[kz]]).astype(float)
    iso = np.array([0.0, -25.0, 0.0])
    r = phantom.compute_beam(dg, 0, iso, ptv_xyz, k_gy=1.0, tol_gy=1e-6)
    a = csr_matrix((r.sparse[:, 2], (r.sparse[:, 0].astype(int), r.sparse[:, 1].astype(int))))
    return dg, r, np.asarray(a.sum(axis=1)).ravel()


def _line(c: np.ndarray, along: int, at: dict[int, float]) -> np.ndarray:
    """Dose voxels on the grid line nearest to ``at`` (axis -> mm), running along axis ``along``."""
    keep = np.ones(len(c), bool)
    for ax, v in at.items():
        nearest = c[np.argmin(np.abs(c[:, ax] - v)), ax]
        keep &= c[:, ax] == nearest
    return np.flatnonzero(keep)[np.argsort(c[keep, along])]


def _falling_crossing(x: np.ndarray, d: np.ndarray, level: float) -> float:
    """Where the profile first drops below ``level`` for x > 0 (linear interpolation)."""
    i = int(np.flatnonzero((x > 0) & (d < level))[0])
    return float(np.interp(level, [d[i], d[i - 1]], [x[i], x[i - 1]]))


def test_depth_dose_builds_up_then_falls(water_beam) -> None:
    dg, r, dose = water_beam
    c = dg.centres_xyz_mm
    idx = _line(c, 1, {0: 0.0, 2: 0.0})
    depth = c[idx, 1] + 60.0  # the water surface is at y = -60 mm
    d = dose[idx]
    assert r.ssd_mm == pytest.approx(1000.0 - 35.0, abs=2.0)
    i_max = int(np.argmax(d))
    assert 9.0 < depth[i_max] < 21.0  # dmax of a 6 MV-like beam
    assert d[0] < 0.75 * d[i_max]  # build-up from the surface
    assert np.all(np.diff(d[i_max:]) < 0)  # attenuation and inverse square beyond dmax
    assert 0.5 < d[np.searchsorted(depth, 100.0)] / d[i_max] < 0.8

    # One 2.5 x 5 mm beamlet on the axis: the same build-up, then a steady fall with depth.
    arrays = r.beamlets.arrays()
    x_axis, z_axis = c[idx[0], 0], c[idx[0], 2]
    central = int(np.argmin(np.hypot(arrays["position_x_mm"] - x_axis, arrays["position_y_mm"] - z_axis)))
    one = r.sparse[r.sparse[:, 1] == central]
    pencil = np.zeros(dg.num_voxels)
    pencil[one[:, 0].astype(int)] = one[:, 2]
    p = pencil[idx]
    j_max = int(np.argmax(p))
    assert 9.0 < depth[j_max] < 21.0 and p[0] < 0.75 * p[j_max]
    assert np.all(np.diff(p[j_max:]) < 0)


def test_lateral_profile_is_flat_inside_and_falls_off_at_the_field_edge(water_beam) -> None:
    dg, r, dose = water_beam
    c = dg.centres_xyz_mm
    idx = _line(c, 0, {1: -60.0 + 50.0, 2: 0.0})  # 50 mm deep
    x, d = c[idx, 0], dose[idx]
    centre = d[np.argmin(np.abs(x))]
    assert np.all(np.abs(d[np.abs(x) < 10.0] / centre - 1.0) < 0.05)
    s = 1000.0 - 35.0 + 50.0  # distance from the source at 50 mm depth
    edge = r.beamlets.right_mm * s / 1000.0
    assert abs(_falling_crossing(x, d, 0.5 * centre) - edge) < 1.5
    outside = x > edge + 8.0
    assert np.count_nonzero(outside) >= 2 and np.all(d[outside] < 0.05 * centre)
    width = _falling_crossing(x, d, 0.2 * centre) - _falling_crossing(x, d, 0.8 * centre)
    assert 1.5 < width < 9.0  # 80-20 % penumbra of a few mm


# ---------------------------------------------------------------------------------------------------------
# Building, caching and naming
# ---------------------------------------------------------------------------------------------------------


def test_anatomy_is_deterministic_for_a_seed() -> None:
    a0, b0, a1 = phantom.build_anatomy(0), phantom.build_anatomy(0), phantom.build_anatomy(1)
    assert np.array_equal(a0.hu, b0.hu)
    assert all(np.array_equal(a0.masks[k], b0.masks[k]) for k in phantom.STRUCTURE_NAMES)
    assert not np.array_equal(a0.masks["GTV"], a1.masks["GTV"])


def test_ensure_is_a_fast_no_op_for_a_complete_case(case_dir: Path) -> None:
    marker = case_dir / phantom.MARKER_FILE
    before = marker.stat().st_mtime_ns
    t = time.perf_counter()
    assert phantom.ensure_phantom(case_dir.parent) == case_dir
    assert time.perf_counter() - t < 1.0
    assert marker.stat().st_mtime_ns == before
    info = json.loads(marker.read_text())
    assert info["generator_version"] == phantom.GENERATOR_VERSION and info["seed"] == 0


def test_a_stale_or_unfinished_folder_is_not_complete(tmp_path: Path, case_dir: Path) -> None:
    folder = tmp_path / "Lung_Old_Patient_1"
    folder.mkdir()
    assert not phantom.is_complete(folder)
    (folder / phantom.MARKER_FILE).write_text(json.dumps({"generator_version": "0", "seed": 0}))
    assert not phantom.is_complete(folder)
    assert phantom.is_complete(case_dir) and not phantom.is_complete(case_dir, seed=1)


def test_a_half_built_folder_is_not_listed(tmp_path: Path, case_dir: Path, pp) -> None:
    root = tmp_path / "portpy"
    building = root / ".building-12345"
    building.mkdir(parents=True)
    for name in ("CT_MetaData.json", "StructureSet_MetaData.json", "OptimizationVoxels_MetaData.json"):
        shutil.copy(case_dir / name, building / name)
    assert cases.list_case_ids(root) == []
    explorer = pp.DataExplorer(data_dir=str(root))
    assert len(explorer.display_list_of_patients(return_df=True)) == 0


def test_paths_with_phantom_in_them_are_refused(tmp_path: Path) -> None:
    with pytest.raises(phantom.PhantomError, match="Phantom"):
        phantom.ensure_phantom(tmp_path / "Phantom_cases")
    assert not (tmp_path / "Phantom_cases").exists()


def test_bad_arguments_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seed"):
        phantom.build_phantom(tmp_path / "x", seed=-1)
    with pytest.raises(ValueError, match="case_id"):
        phantom.ensure_phantom(tmp_path, case_id="Lung_Synth_1")
    with pytest.raises(SystemExit):
        phantom.main(["--seed", "-3"])
