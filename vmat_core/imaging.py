"""Images of a case for display: CT, structure masks and contours, isodose lines, the shipped reference dose.

Reads a case's PortPy files directly with h5py (no PortPy objects, cheap) and caches per process, keyed by the
case folder and the files' modification times, so a rebuilt case is never served from a stale cache. Arrays
are (z, y, x) on the CT grid; coordinates are patient millimetres of voxel centres
(``origin_xyz_mm`` is the centre of voxel [0, 0, 0]). Returned arrays are read-only because they are shared
by every caller in the process.

The reference dose is converted by PortPy's own RT Dose reader and cached on disk under
``cache_dir()/reference_dose/<case_id>.npy`` with a JSON sidecar holding the inputs' stamps and the array's
digest, both written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import h5py
import numpy as np

from vmat_core import cases, paths

CT_META_FILE = "CT_MetaData.json"
CT_DATA_FILE = "CT_Data.h5"
CT_DATASET = "ct_hu_3d"
STRUCT_META_FILE = "StructureSet_MetaData.json"
STRUCT_DATA_FILE = "StructureSet_Data.h5"
DICOM_DIR = "DicomFiles"
REFERENCE_DOSE_GLOB = "rt_dose*.dcm"
REFERENCE_CACHE_SUBDIR = "reference_dose"


class ImagingError(ValueError):
    """A request the case cannot answer (unknown structure, slice out of range, malformed file)."""


@dataclass(frozen=True)
class CtGeometry:
    """Where the CT voxels are: centre of voxel [0, 0, 0], spacing, and the array shape (z, y, x)."""

    origin_xyz_mm: tuple[float, float, float]
    resolution_xyz_mm: tuple[float, float, float]
    shape_zyx: tuple[int, int, int]

    @cached_property
    def x_mm(self) -> np.ndarray:
        return self.origin_xyz_mm[0] + self.resolution_xyz_mm[0] * np.arange(self.shape_zyx[2])

    @cached_property
    def y_mm(self) -> np.ndarray:
        return self.origin_xyz_mm[1] + self.resolution_xyz_mm[1] * np.arange(self.shape_zyx[1])

    @cached_property
    def z_mm(self) -> np.ndarray:
        return self.origin_xyz_mm[2] + self.resolution_xyz_mm[2] * np.arange(self.shape_zyx[0])

    @property
    def nz(self) -> int:
        return self.shape_zyx[0]

    def extent_xy_mm(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) of the voxel edges of one axial slice."""
        (x0, y0, _), (dx, dy, _) = self.origin_xyz_mm, self.resolution_xyz_mm
        _, ny, nx = self.shape_zyx
        return (x0 - dx / 2, y0 - dy / 2, x0 + (nx - 0.5) * dx, y0 + (ny - 0.5) * dy)

    def check_z(self, z_index: int) -> int:
        if isinstance(z_index, bool) or not isinstance(z_index, (int, np.integer)):
            raise ImagingError(f"z_index: expected an integer slice index, got {type(z_index).__name__}")
        if not 0 <= int(z_index) < self.nz:
            raise ImagingError(f"z_index: {int(z_index)} is outside the CT's slices 0..{self.nz - 1}")
        return int(z_index)

    def rc_to_mm(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(N, 2) [x_mm, y_mm] of fractional (row, column) positions in a slice."""
        return np.column_stack(
            (self.origin_xyz_mm[0] + cols * self.resolution_xyz_mm[0],
             self.origin_xyz_mm[1] + rows * self.resolution_xyz_mm[1])
        )

    def check_volume(self, volume: np.ndarray, what: str) -> np.ndarray:
        if not isinstance(volume, np.ndarray) or volume.shape != self.shape_zyx:
            shape = getattr(volume, "shape", type(volume).__name__)
            raise ImagingError(f"{what}: expected an array of shape {self.shape_zyx} (the CT grid), got {shape}")
        return volume


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _stamp(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        raise ImagingError(f"case file missing: {path.name} in {path.parent.name}") from None


@lru_cache(maxsize=64)
def _resolved(case_id: str, root: str, root_mtime: int) -> Path:
    return cases.resolve_case_dir(case_id)


def _case_dir(case_id: str) -> Path:
    """The folder of a case id (never a path: resolve_case_dir refuses paths, '..' and unknown folders).

    Memoised per data directory and its listing's mtime, since a viewer asks for every slice it shows.
    """
    if not isinstance(case_id, str):
        return cases.resolve_case_dir(case_id)
    root = paths.portpy_data_dir()
    try:
        mtime = root.stat().st_mtime_ns
    except FileNotFoundError:
        return cases.resolve_case_dir(case_id)
    return _resolved(case_id, str(root), mtime)


# --------------------------------------------------------------------------------------------------------- CT


@lru_cache(maxsize=8)
def _geometry_cached(case_dir: str, meta_mtime: int) -> CtGeometry:
    meta = json.loads((Path(case_dir) / CT_META_FILE).read_text())
    try:
        origin = tuple(float(v) for v in meta["origin_xyz_mm"])
        res = tuple(float(v) for v in meta["resolution_xyz_mm"])
        nx, ny, nz = (int(v) for v in meta["size_xyz_mm"])  # voxel counts despite the key's name
    except (KeyError, TypeError, ValueError) as e:
        raise ImagingError(f"{CT_META_FILE}: missing or malformed geometry ({e})") from None
    if len(origin) != 3 or len(res) != 3 or min(res) <= 0:
        raise ImagingError(f"{CT_META_FILE}: origin_xyz_mm and resolution_xyz_mm need 3 values, spacing > 0")
    return CtGeometry(origin, res, (nz, ny, nx))


def ct_geometry(case_id: str) -> CtGeometry:
    """The CT grid of a case (metadata only)."""
    d = _case_dir(case_id)
    return _geometry_cached(str(d), _stamp(d / CT_META_FILE))


@lru_cache(maxsize=4)
def _ct_cached(case_dir: str, meta_mtime: int, data_mtime: int) -> tuple[np.ndarray, CtGeometry]:
    geom = _geometry_cached(case_dir, meta_mtime)
    with h5py.File(Path(case_dir) / CT_DATA_FILE, "r") as f:
        if CT_DATASET not in f:
            raise ImagingError(f"{CT_DATA_FILE}: no dataset {CT_DATASET!r}")
        hu = f[CT_DATASET][()]
    if hu.shape != geom.shape_zyx:
        raise ImagingError(f"{CT_DATA_FILE}: {CT_DATASET} has shape {hu.shape}, metadata says {geom.shape_zyx}")
    return _frozen(hu), geom


def ct_volume(case_id: str) -> tuple[np.ndarray, CtGeometry]:
    """(HU volume (nz, ny, nx) as stored, usually int16; its geometry)."""
    d = _case_dir(case_id)
    return _ct_cached(str(d), _stamp(d / CT_META_FILE), _stamp(d / CT_DATA_FILE))


# --------------------------------------------------------------------------------------------------- structures


@lru_cache(maxsize=8)
def _structure_datasets(case_dir: str, meta_mtime: int) -> dict[str, str]:
    """Structure name -> dataset name in StructureSet_Data.h5 (from ``structure_mask_3d_File``)."""
    entries = json.loads((Path(case_dir) / STRUCT_META_FILE).read_text())
    out: dict[str, str] = {}
    for e in entries:
        ref = str(e.get("structure_mask_3d_File") or "")
        # "StructureSet_Data.h5/PTV" -> dataset "PTV"; fall back to the name, as PortPy's files do
        out[str(e["name"])] = ref.split("/", 1)[1] if "/" in ref else str(e["name"])
    return out


def structure_names(case_id: str) -> list[str]:
    d = _case_dir(case_id)
    return list(_structure_datasets(str(d), _stamp(d / STRUCT_META_FILE)))


@lru_cache(maxsize=48)
def _mask_cached(case_dir: str, meta_mtime: int, data_mtime: int, name: str) -> np.ndarray:
    dataset = _structure_datasets(case_dir, meta_mtime)[name]
    with h5py.File(Path(case_dir) / STRUCT_DATA_FILE, "r") as f:
        if dataset not in f:
            raise ImagingError(f"{STRUCT_DATA_FILE}: no mask dataset {dataset!r} for structure {name!r}")
        mask = f[dataset][()] > 0
    return _frozen(mask)


def _check_structure(case_dir: Path, name: object) -> tuple[str, int, int]:
    meta_mtime = _stamp(case_dir / STRUCT_META_FILE)
    known = _structure_datasets(str(case_dir), meta_mtime)
    if not isinstance(name, str) or name not in known:
        raise ImagingError(
            f"structure: unknown structure {name!r} in case {case_dir.name}; available: {', '.join(known)}"
        )
    return name, meta_mtime, _stamp(case_dir / STRUCT_DATA_FILE)


def structure_masks(case_id: str, names: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    """Boolean masks (nz, ny, nx) of the named structures, in the order asked."""
    if isinstance(names, str):
        raise ImagingError("names: expected a list of structure names, got a str")
    d = _case_dir(case_id)
    geom = ct_geometry(case_id)
    out: dict[str, np.ndarray] = {}
    for name in names:
        name, meta_mtime, data_mtime = _check_structure(d, name)
        mask = _mask_cached(str(d), meta_mtime, data_mtime, name)
        if mask.shape != geom.shape_zyx:
            raise ImagingError(f"structure {name!r}: mask shape {mask.shape} differs from the CT {geom.shape_zyx}")
        out[name] = mask
    return out


def _trace(image: np.ndarray, level: float, geom: CtGeometry, close: bool) -> list[np.ndarray]:
    """Iso-lines of a 2-D image at ``level`` as (N, 2) [x_mm, y_mm] arrays.

    With ``close`` the image is padded by one voxel of zeros, so that an outline touching the border still
    closes (a structure ends at the image edge); without, lines stop at the border (dose continues beyond it,
    and a closing run along the edge would be a line that is not in the dose).
    """
    from skimage.measure import find_contours

    offset = 1.0 if close else 0.0
    if close:
        image = np.pad(image, 1, mode="constant", constant_values=0.0)
    lines = []
    for rc in find_contours(image, level):
        if len(rc) < 3:
            continue
        lines.append(geom.rc_to_mm(rc[:, 0] - offset, rc[:, 1] - offset))
    return lines


@lru_cache(maxsize=4096)
def _contours_cached(case_dir: str, meta_mtime: int, data_mtime: int, name: str, z: int,
                     geom: CtGeometry) -> tuple[np.ndarray, ...]:
    mask_slice = _mask_cached(case_dir, meta_mtime, data_mtime, name)[z]
    if not mask_slice.any():
        return ()
    return tuple(_frozen(line) for line in _trace(mask_slice.astype(np.float32), 0.5, geom, close=True))


def slice_contours(case_id: str, name: str, z_index: int) -> list[np.ndarray]:
    """Outlines of a structure on one axial slice: (N, 2) arrays of [x_mm, y_mm], each closed (first == last).

    Traced by marching squares at half a voxel, i.e. through the midpoints between inside and outside voxels.
    """
    return slice_contours_many(case_id, [name], z_index)[name]


def slice_contours_many(case_id: str, names, z_index: int) -> dict[str, list[np.ndarray]]:
    """:func:`slice_contours` of several structures on one slice, checking the case's files once."""
    if isinstance(names, str):
        raise ImagingError("names: expected a list of structure names, got a str")
    d = _case_dir(case_id)
    geom = _geometry_cached(str(d), _stamp(d / CT_META_FILE))
    z = geom.check_z(z_index)
    meta_mtime = _stamp(d / STRUCT_META_FILE)
    data_mtime = _stamp(d / STRUCT_DATA_FILE)
    known = _structure_datasets(str(d), meta_mtime)
    out: dict[str, list[np.ndarray]] = {}
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise ImagingError(
                f"structure: unknown structure {name!r} in case {d.name}; available: {', '.join(known)}"
            )
        out[name] = list(_contours_cached(str(d), meta_mtime, data_mtime, name, z, geom))
    return out


def structure_centroid_slice(case_id: str, name: str) -> int:
    """The slice through a structure's centroid (the nearest slice that contains the structure)."""
    mask = structure_masks(case_id, [name])[name]
    per_slice = mask.sum(axis=(1, 2))
    total = per_slice.sum()
    if total == 0:
        raise ImagingError(f"structure: {name!r} is empty in case {case_id}")
    zc = float((per_slice * np.arange(mask.shape[0])).sum() / total)
    occupied = np.flatnonzero(per_slice)
    return int(occupied[np.argmin(np.abs(occupied - zc))])


# ------------------------------------------------------------------------------------------------------- dose


def isodose_contours(dose_2d: np.ndarray, levels_gy, geometry: CtGeometry) -> dict[float, list[np.ndarray]]:
    """Isodose lines of one axial dose slice: {level_gy: [(N, 2) [x_mm, y_mm] arrays]} for each level > 0.

    Lines are closed where the level is enclosed within the slice and end at the slice's border otherwise.
    """
    dose_2d = np.asarray(dose_2d)
    if dose_2d.shape != geometry.shape_zyx[1:]:
        raise ImagingError(f"dose_2d: expected shape {geometry.shape_zyx[1:]} (one CT slice), got {dose_2d.shape}")
    image = np.nan_to_num(dose_2d.astype(np.float32, copy=False), nan=0.0)
    out: dict[float, list[np.ndarray]] = {}
    for level in levels_gy:
        level = float(level)
        if not np.isfinite(level) or level <= 0:
            raise ImagingError(f"levels_gy: isodose levels must be finite and > 0 Gy, got {level!r}")
        out[level] = _trace(image, level, geometry, close=False) if image.max(initial=0.0) >= level else []
    return out


def hu_dose_at(case_id: str, dose_3d: np.ndarray | None, z: int, x_mm: float, y_mm: float
               ) -> tuple[float | None, float | None]:
    """(HU, dose Gy) of the voxel containing (x_mm, y_mm) on slice ``z``; (None, None) outside the CT.

    The dose is None when no dose is given.
    """
    hu, geom = ct_volume(case_id)
    z = geom.check_z(z)
    (x0, y0, _), (dx, dy, _) = geom.origin_xyz_mm, geom.resolution_xyz_mm
    col = int(np.floor((float(x_mm) - x0) / dx + 0.5))
    row = int(np.floor((float(y_mm) - y0) / dy + 0.5))
    _, ny, nx = geom.shape_zyx
    if not (0 <= row < ny and 0 <= col < nx):
        return None, None
    dose = None
    if dose_3d is not None:
        geom.check_volume(dose_3d, "dose_3d")
        dose = float(dose_3d[z, row, col])
    return float(hu[z, row, col]), dose


# ------------------------------------------------------------------------------------------- reference dose


def reference_dose_file(case_id: str) -> Path | None:
    """The case's shipped RT Dose file, or None. With several, the last by name (PortPy's reader also keeps
    the last one it lists)."""
    d = _case_dir(case_id) / DICOM_DIR
    files = sorted(d.glob(REFERENCE_DOSE_GLOB)) if d.is_dir() else []
    return files[-1] if files else None


def _reference_key(case_dir: Path, dicom: Path) -> dict:
    st = dicom.stat()
    return {
        "dicom_file": dicom.name,
        "dicom_mtime_ns": st.st_mtime_ns,
        "dicom_size": st.st_size,
        "ct_meta_mtime_ns": _stamp(case_dir / CT_META_FILE),
        "ct_data_mtime_ns": _stamp(case_dir / CT_DATA_FILE),
    }


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_disk_cache(npy: Path, sidecar: Path, key: dict, shape: tuple[int, int, int]) -> np.ndarray | None:
    try:
        meta = json.loads(sidecar.read_text())
        if meta.get("key") != key:
            return None
        raw = npy.read_bytes()
        if hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
            return None  # the pair was written by two different conversions; redo it
        dose = np.load(io.BytesIO(raw), allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if dose.shape != shape or dose.dtype != np.float32:
        return None
    return dose


def _convert_with_portpy(case_dir: Path, dicom: Path) -> np.ndarray:
    import portpy.photon as pp
    from portpy.photon.utils import convert_dose_rt_dicom_to_portpy

    dose_path = dicom
    with contextlib.ExitStack() as stack:
        # PortPy's reader shifts x by -65.63 mm whenever the dose path contains "Phantom" (a fix for its own
        # phantom dataset); a data directory that happens to contain that word must not trigger it.
        if "Phantom" in str(dicom):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vmat-rtdose-")))
            dose_path = tmp / "rt_dose.dcm"
            dose_path.symlink_to(dicom)
        with contextlib.redirect_stdout(io.StringIO()):  # PortPy prints loading chatter
            data = pp.DataExplorer(data_dir=str(case_dir.parent))
            data.patient_id = case_dir.name
            ct = pp.CT(data)
            dose = convert_dose_rt_dicom_to_portpy(ct=ct, dose_file_name=str(dose_path))
    return np.ascontiguousarray(dose, dtype=np.float32)


_reference_lock = threading.Lock()


@lru_cache(maxsize=4)
def _reference_cached(case_dir: str, key_json: str) -> np.ndarray:
    cdir = Path(case_dir)
    key = json.loads(key_json)
    geom = _geometry_cached(case_dir, key["ct_meta_mtime_ns"])
    cache = paths.cache_dir() / REFERENCE_CACHE_SUBDIR
    npy, sidecar = cache / f"{cdir.name}.npy", cache / f"{cdir.name}.json"
    dose = _read_disk_cache(npy, sidecar, key, geom.shape_zyx)
    if dose is None:
        dose = _convert_with_portpy(cdir, cdir / DICOM_DIR / key["dicom_file"])
        if dose.shape != geom.shape_zyx:
            raise ImagingError(
                f"reference dose: PortPy's conversion has shape {dose.shape}, the CT has {geom.shape_zyx}"
            )
        buf = io.BytesIO()
        np.save(buf, dose, allow_pickle=False)
        raw = buf.getvalue()
        _atomic_write(npy, lambda fh: fh.write(raw))
        meta = {"key": key, "sha256": hashlib.sha256(raw).hexdigest(), "shape_zyx": list(dose.shape)}
        _atomic_write(sidecar, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    return _frozen(dose)


def reference_dose(case_id: str) -> np.ndarray | None:
    """The case's shipped reference dose (total Gy, float32 (nz, ny, nx) on the CT grid), or None if the case
    has none. Converted once by PortPy's RT Dose reader, then served from the disk cache."""
    d = _case_dir(case_id)
    dicom = reference_dose_file(case_id)
    if dicom is None:
        return None
    key_json = json.dumps(_reference_key(d, dicom), sort_keys=True)
    with _reference_lock:  # two sessions asking at once convert once
        return _reference_cached(str(d), key_json)


def clear_caches() -> None:
    """Forget everything cached in this process (the disk cache of reference doses stays)."""
    for fn in (_resolved, _geometry_cached, _ct_cached, _structure_datasets, _mask_cached, _contours_cached,
               _reference_cached):
        fn.cache_clear()
