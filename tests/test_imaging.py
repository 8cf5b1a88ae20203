"""vmat_core.imaging: CT, masks, contours and isodose lines against ground truth; the reference dose via PortPy.

Geometry is checked on a small synthetic case written here with h5py (anisotropic voxels and an off-centre
origin, so a swapped axis or a half-voxel shift shows), and reading is checked on the real synthetic patient.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from vmat_core import imaging, paths
from vmat_core.cases import CaseError

TINY_ID = "Tiny_Patient_1"
# x, y, z spacing and origin deliberately different per axis.
RES = (0.8, 1.25, 3.0)
ORIGIN = (-40.0, -25.0, 100.0)
SHAPE_ZYX = (6, 64, 96)
DISK_CENTRE = (-2.0, 12.0)  # x, y mm
DISK_RADIUS_MM = 14.0


def _xy_mm() -> tuple[np.ndarray, np.ndarray]:
    _nz, ny, nx = SHAPE_ZYX
    x = ORIGIN[0] + RES[0] * np.arange(nx)
    y = ORIGIN[1] + RES[1] * np.arange(ny)
    return np.meshgrid(x, y)  # (ny, nx) each


def write_tiny_case(portpy_root: Path) -> Path:
    """A minimal PortPy case: CT with a ramp, a disk structure on slices 1..4 and a box structure."""
    case = portpy_root / TINY_ID
    case.mkdir(parents=True)
    nz, ny, nx = SHAPE_ZYX
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 1500, size=SHAPE_ZYX, dtype=np.int16)
    X, Y = _xy_mm()
    disk2d = (X - DISK_CENTRE[0]) ** 2 + (Y - DISK_CENTRE[1]) ** 2 <= DISK_RADIUS_MM**2
    disk = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    disk[1:5] = disk2d
    box = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    box[2:4, 5:20, 10:30] = 1
    (case / "CT_MetaData.json").write_text(json.dumps({
        "origin_xyz_mm": list(ORIGIN), "resolution_xyz_mm": list(RES), "size_xyz_mm": [nx, ny, nz],
        "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "ct_hu_3d_File": "CT_Data.h5/ct_hu_3d",
    }))
    with h5py.File(case / "CT_Data.h5", "w") as f:
        f["ct_hu_3d"] = hu
    (case / "StructureSet_MetaData.json").write_text(json.dumps([
        {"name": "DISK", "volume_cc": 1.0, "structure_mask_3d_File": "StructureSet_Data.h5/DISK"},
        {"name": "BOX", "volume_cc": 1.0, "structure_mask_3d_File": "StructureSet_Data.h5/BOX"},
    ]))
    with h5py.File(case / "StructureSet_Data.h5", "w") as f:
        f["DISK"] = disk
        f["BOX"] = box
    (case / "OptimizationVoxels_MetaData.json").write_text("{}")
    return case


@pytest.fixture()
def tiny_case(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    case = write_tiny_case(root / "portpy")
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(root))
    imaging.clear_caches()
    yield case
    imaging.clear_caches()


def test_ct_and_masks_match_the_files(tiny_case):
    hu, geom = imaging.ct_volume(TINY_ID)
    with h5py.File(tiny_case / "CT_Data.h5") as f:
        np.testing.assert_array_equal(hu, f["ct_hu_3d"][()])
    assert geom.shape_zyx == SHAPE_ZYX
    assert geom.x_mm[0] == ORIGIN[0] and geom.x_mm[1] - geom.x_mm[0] == pytest.approx(RES[0])
    assert geom.y_mm[-1] == pytest.approx(ORIGIN[1] + RES[1] * (SHAPE_ZYX[1] - 1))
    assert geom.z_mm[2] == pytest.approx(ORIGIN[2] + 2 * RES[2])
    assert not hu.flags.writeable  # shared cache: callers cannot corrupt it

    masks = imaging.structure_masks(TINY_ID, ["BOX", "DISK"])
    assert list(masks) == ["BOX", "DISK"]
    with h5py.File(tiny_case / "StructureSet_Data.h5") as f:
        for name, mask in masks.items():
            assert mask.dtype == bool
            np.testing.assert_array_equal(mask, f[name][()] > 0)


def test_cache_follows_the_files(tiny_case):
    hu, _ = imaging.ct_volume(TINY_ID)
    assert imaging.ct_volume(TINY_ID)[0] is hu  # cached
    new = np.full(SHAPE_ZYX, 7, dtype=np.int16)
    with h5py.File(tiny_case / "CT_Data.h5", "w") as f:
        f["ct_hu_3d"] = new
    import os

    st = (tiny_case / "CT_Data.h5").stat()
    os.utime(tiny_case / "CT_Data.h5", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(imaging.ct_volume(TINY_ID)[0], new)


def test_disk_contour_has_the_right_radius_and_centre(tiny_case):
    lines = imaging.slice_contours(TINY_ID, "DISK", 2)
    assert len(lines) == 1
    line = lines[0]
    assert line.shape[1] == 2
    np.testing.assert_allclose(line[0], line[-1])  # closed
    cx, cy = DISK_CENTRE
    r = np.hypot(line[:, 0] - cx, line[:, 1] - cy)
    # marching squares at 0.5 runs between the last voxel in and the first out: within half a voxel
    assert abs(r.mean() - DISK_RADIUS_MM) < 0.5
    assert r.max() - r.min() < 2 * max(RES[:2])
    assert abs(line[:, 0].mean() - cx) < 0.3 and abs(line[:, 1].mean() - cy) < 0.3
    assert imaging.slice_contours(TINY_ID, "DISK", 0) == []  # no structure on this slice
    assert imaging.structure_centroid_slice(TINY_ID, "DISK") in (2, 3)


def test_box_contour_edges_are_half_a_voxel_out(tiny_case):
    (line,) = imaging.slice_contours(TINY_ID, "BOX", 2)
    x, y = line[:, 0], line[:, 1]
    assert x.min() == pytest.approx(ORIGIN[0] + RES[0] * (10 - 0.5), abs=1e-6)
    assert x.max() == pytest.approx(ORIGIN[0] + RES[0] * (29 + 0.5), abs=1e-6)
    assert y.min() == pytest.approx(ORIGIN[1] + RES[1] * (5 - 0.5), abs=1e-6)
    assert y.max() == pytest.approx(ORIGIN[1] + RES[1] * (19 + 0.5), abs=1e-6)


def test_isodose_lines_of_known_gradients(tiny_case):
    _, geom = imaging.ct_volume(TINY_ID)
    X, Y = _xy_mm()
    ramp = (X - X.min()).astype(np.float32)  # dose rises 1 Gy per mm along x
    lines = imaging.isodose_contours(ramp, [10.0, 30.0, 500.0], geom)
    assert set(lines) == {10.0, 30.0, 500.0}
    assert lines[500.0] == []  # never reached
    for level in (10.0, 30.0):
        (line,) = lines[level]  # one straight line across the slice, ending at its borders
        np.testing.assert_allclose(line[:, 0], X.min() + level, atol=1e-4)
        assert {line[:, 1].min(), line[:, 1].max()} == {geom.y_mm[0], geom.y_mm[-1]}

    cone = np.clip(40.0 - np.hypot(X - DISK_CENTRE[0], Y - DISK_CENTRE[1]), 0, None).astype(np.float32)
    (circle,) = imaging.isodose_contours(cone, [25.0], geom)[25.0]
    r = np.hypot(circle[:, 0] - DISK_CENTRE[0], circle[:, 1] - DISK_CENTRE[1])
    np.testing.assert_allclose(r, 15.0, atol=0.15)

    with pytest.raises(imaging.ImagingError, match="levels_gy"):
        imaging.isodose_contours(cone, [0.0], geom)
    with pytest.raises(imaging.ImagingError, match="dose_2d"):
        imaging.isodose_contours(cone[:10], [5.0], geom)


def test_hu_and_dose_readout(tiny_case):
    hu, geom = imaging.ct_volume(TINY_ID)
    dose = np.arange(np.prod(SHAPE_ZYX), dtype=np.float32).reshape(SHAPE_ZYX)
    # a point 0.3 voxel off the centre of voxel (z=3, row=7, col=11) reads that voxel
    x = geom.x_mm[11] + 0.3 * RES[0]
    y = geom.y_mm[7] - 0.3 * RES[1]
    assert imaging.hu_dose_at(TINY_ID, dose, 3, x, y) == (float(hu[3, 7, 11]), float(dose[3, 7, 11]))
    assert imaging.hu_dose_at(TINY_ID, None, 3, x, y) == (float(hu[3, 7, 11]), None)
    assert imaging.hu_dose_at(TINY_ID, dose, 3, geom.x_mm[0] - 5, y) == (None, None)
    with pytest.raises(imaging.ImagingError, match="z_index"):
        imaging.hu_dose_at(TINY_ID, dose, SHAPE_ZYX[0], x, y)
    with pytest.raises(imaging.ImagingError, match="dose_3d"):
        imaging.hu_dose_at(TINY_ID, dose[:2], 0, x, y)


def test_bad_requests_are_refused_clearly(tiny_case):
    bad_ids = ("../Tiny_Patient_1", str(tiny_case), "portpy/Tiny_Patient_1", "/etc/passwd", "", "No_Such_Patient")
    for bad in bad_ids:
        with pytest.raises(CaseError, match="case_id"):
            imaging.ct_volume(bad)
        with pytest.raises(CaseError, match="case_id"):
            imaging.slice_contours(bad, "DISK", 0)
    with pytest.raises(imaging.ImagingError, match="structure: unknown structure 'LIVER'.*DISK, BOX"):
        imaging.structure_masks(TINY_ID, ["LIVER"])
    with pytest.raises(imaging.ImagingError, match="z_index: 6 is outside"):
        imaging.slice_contours(TINY_ID, "DISK", 6)
    with pytest.raises(imaging.ImagingError, match="names"):
        imaging.structure_masks(TINY_ID, "DISK")
    assert imaging.reference_dose(TINY_ID) is None  # no DicomFiles


# ------------------------------------------------------------------------------------------------ real case


def test_real_case_ct_and_masks(portpy_dir):
    from vmat_core.phantom import CASE_ID

    hu, geom = imaging.ct_volume(CASE_ID)
    case = portpy_dir / CASE_ID
    with h5py.File(case / "CT_Data.h5") as f:
        np.testing.assert_array_equal(hu, f["ct_hu_3d"][()])
    meta = json.loads((case / "CT_MetaData.json").read_text())
    assert geom.shape_zyx == tuple(reversed(meta["size_xyz_mm"]))
    assert geom.origin_xyz_mm == tuple(meta["origin_xyz_mm"])
    names = [s["name"] for s in json.loads((case / "StructureSet_MetaData.json").read_text())]
    masks = imaging.structure_masks(CASE_ID, names)
    with h5py.File(case / "StructureSet_Data.h5") as f:
        for name in ("PTV", "CORD"):
            np.testing.assert_array_equal(masks[name], f[name][()] > 0)
    z = imaging.structure_centroid_slice(CASE_ID, "PTV")
    assert masks["PTV"][z].any()
    lines = imaging.slice_contours(CASE_ID, "PTV", z)
    assert lines
    pts = np.vstack(lines)
    rows = np.flatnonzero(masks["PTV"][z].any(axis=1))
    cols = np.flatnonzero(masks["PTV"][z].any(axis=0))
    assert pts[:, 0].min() == pytest.approx(geom.x_mm[cols[0]] - geom.resolution_xyz_mm[0] / 2, abs=1e-6)
    assert pts[:, 1].max() == pytest.approx(geom.y_mm[rows[-1]] + geom.resolution_xyz_mm[1] / 2, abs=1e-6)


def test_reference_dose_via_portpy_is_on_the_ct_grid_and_highest_in_the_ptv(portpy_dir, monkeypatch):
    from vmat_core.phantom import CASE_ID

    imaging.clear_caches()
    dose = imaging.reference_dose(CASE_ID)
    _, geom = imaging.ct_volume(CASE_ID)
    assert dose.shape == geom.shape_zyx and dose.dtype == np.float32
    masks = imaging.structure_masks(CASE_ID, imaging.structure_names(CASE_ID))
    ptv = masks["PTV"]
    ptv_mean = float(dose[ptv].mean())
    for name, mask in masks.items():
        if name not in ("PTV", "GTV") and mask.any() and not name.upper().startswith(("CTV", "ITV")):
            assert float(dose[mask].mean()) < ptv_mean, name
    assert 50.0 < float(np.median(dose[ptv])) < 70.0  # a 60 Gy plan
    hottest = np.unravel_index(np.argmax(dose), dose.shape)
    zs, ys, xs = np.nonzero(ptv)
    # the hottest voxel lies in the PTV or within a centimetre of it
    d_mm = np.min(np.sqrt(((xs - hottest[2]) * geom.resolution_xyz_mm[0]) ** 2
                          + ((ys - hottest[1]) * geom.resolution_xyz_mm[1]) ** 2
                          + ((zs - hottest[0]) * geom.resolution_xyz_mm[2]) ** 2))
    assert d_mm <= 10.0

    # cached on disk: a fresh process reads the .npy and never calls PortPy again
    cached = paths.cache_dir() / "reference_dose" / f"{CASE_ID}.npy"
    assert cached.is_file() and (cached.with_suffix(".json")).is_file()
    imaging.clear_caches()
    monkeypatch.setattr(imaging, "_convert_with_portpy", lambda *a: pytest.fail("converted again"))
    np.testing.assert_array_equal(imaging.reference_dose(CASE_ID), dose)
    # a torn cache (array not matching its sidecar) is converted again, not served
    imaging.clear_caches()
    np.save(cached, np.zeros_like(dose))
    calls = []
    monkeypatch.setattr(imaging, "_convert_with_portpy", lambda *a: calls.append(1) or dose.copy())
    np.testing.assert_array_equal(imaging.reference_dose(CASE_ID), dose)
    assert calls == [1]
