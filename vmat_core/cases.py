"""The case registry: PortPy patient folders under the data directory.

A case id is the name of a PortPy patient folder (it must contain ``Patient``, as PortPy requires). Ids are
checked against the folders that exist, so an id can never become a path outside the data directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from vmat_core import paths

DEFAULT_CASE_ID = "Lung_Synth_Patient_1"
DEFAULT_PROTOCOL = "Lung_2Gy_30Fx"
CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_REQUIRED_FILES = ("CT_MetaData.json", "StructureSet_MetaData.json", "OptimizationVoxels_MetaData.json")


class CaseError(ValueError):
    """A case id that is malformed or names no case folder."""


@dataclass(frozen=True)
class CaseInfo:
    """What the planner needs to know about a case before loading it with PortPy."""

    case_id: str
    path: Path
    disease_site: str
    structure_names: tuple[str, ...]
    structure_volumes_cc: dict[str, float]
    beam_ids: tuple[int, ...]
    gantry_angles_deg: dict[int, float]
    planner_beam_ids: tuple[int, ...]
    ct_shape_zyx: tuple[int, int, int]
    ct_resolution_xyz_mm: tuple[float, float, float]
    has_reference_dose: bool
    protocols: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["gantry_angles_deg"] = {str(k): v for k, v in self.gantry_angles_deg.items()}
        return d


def _root(portpy_dir: Path | None) -> Path:
    return (portpy_dir or paths.portpy_data_dir()).resolve()


def list_case_ids(portpy_dir: Path | None = None) -> list[str]:
    """Case folders PortPy itself would list (name contains ``Patient``) that hold the metadata files."""
    root = _root(portpy_dir)
    if not root.is_dir():
        return []
    ids = [
        p.name
        for p in root.iterdir()
        if p.is_dir() and "Patient" in p.name and all((p / f).is_file() for f in _REQUIRED_FILES)
    ]
    return sorted(ids)


def resolve_case_dir(case_id: str, portpy_dir: Path | None = None) -> Path:
    """The folder of ``case_id``; a clear :class:`CaseError` for anything that is not an existing case."""
    if not isinstance(case_id, str) or not case_id:
        raise CaseError("case_id: must be a non-empty string naming a case folder")
    if not CASE_ID_RE.fullmatch(case_id) or ".." in case_id:
        raise CaseError(
            f"case_id: {case_id!r} is not a valid case id (letters, digits, '_', '-', '.'; no path separators)"
        )
    root = _root(portpy_dir)
    known = list_case_ids(root)
    if case_id not in known:
        raise CaseError(
            f"case_id: unknown case {case_id!r}; available cases under {root}: {', '.join(known) or 'none'}"
        )
    path = (root / case_id).resolve()
    if path.parent != root:  # a symlinked folder pointing elsewhere is not a case of this data directory
        raise CaseError(f"case_id: {case_id!r} does not resolve inside the data directory")
    return path


def available_protocols(disease_site: str) -> tuple[str, ...]:
    """PortPy protocols with both clinical criteria and optimisation parameters for this disease site."""
    import portpy.config_files as cf

    base = Path(cf.__file__).parent
    crit = {p.stem for p in (base / "clinical_criteria" / "Default").glob("*.json")}
    opt = {
        p.stem.removeprefix("optimization_params_")
        for p in (base / "optimization_params").glob("optimization_params_*.json")
    }
    return tuple(sorted(n for n in crit & opt if n.split("_")[0].lower() == disease_site.lower()))


@lru_cache(maxsize=32)
def _case_info_cached(path: str, mtime_ns: int) -> CaseInfo:
    p = Path(path)
    structs = json.loads((p / "StructureSet_MetaData.json").read_text())
    ct = json.loads((p / "CT_MetaData.json").read_text())
    beam_ids: list[int] = []
    angles: dict[int, float] = {}
    beams_dir = p / "Beams"
    if beams_dir.is_dir():
        for f in beams_dir.glob("Beam_*_MetaData.json"):
            meta = json.loads(f.read_text())
            bid = int(meta["ID"])
            beam_ids.append(bid)
            angles[bid] = float(meta.get("gantry_angle", float("nan")))
    planner: list[int] = []
    if (p / "PlannerBeams.json").is_file():
        planner = [int(i) for i in json.loads((p / "PlannerBeams.json").read_text()).get("IDs", [])]
    nx, ny, nz = (int(v) for v in ct["size_xyz_mm"])
    dicom = p / "DicomFiles"
    site = p.name.split("_")[0]
    return CaseInfo(
        case_id=p.name,
        path=p,
        disease_site=site,
        structure_names=tuple(s["name"] for s in structs),
        structure_volumes_cc={s["name"]: float(s.get("volume_cc", float("nan"))) for s in structs},
        beam_ids=tuple(sorted(beam_ids)),
        gantry_angles_deg=dict(sorted(angles.items())),
        planner_beam_ids=tuple(planner),
        ct_shape_zyx=(nz, ny, nx),
        ct_resolution_xyz_mm=tuple(float(v) for v in ct["resolution_xyz_mm"]),
        has_reference_dose=dicom.is_dir() and any(dicom.glob("rt_dose*.dcm")),
        protocols=available_protocols(site),
    )


def case_info(case_id: str, portpy_dir: Path | None = None) -> CaseInfo:
    """Summary of a case read from its metadata files only (cheap: no HDF5 is opened)."""
    path = resolve_case_dir(case_id, portpy_dir)
    stamp = max((path / f).stat().st_mtime_ns for f in _REQUIRED_FILES)
    return _case_info_cached(str(path), stamp)


def list_cases(portpy_dir: Path | None = None) -> list[CaseInfo]:
    return [case_info(c, portpy_dir) for c in list_case_ids(portpy_dir)]
