"""The case registry: listing, summaries, and refusal of ids that are not case folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmat_core import cases


def test_synthetic_case_is_listed_with_a_summary(portpy_dir: Path) -> None:
    assert cases.DEFAULT_CASE_ID in cases.list_case_ids()
    info = cases.case_info(cases.DEFAULT_CASE_ID)
    assert info.beam_ids == tuple(range(72))
    assert info.gantry_angles_deg[11] == pytest.approx(55.0)
    for name in ("GTV", "PTV", "ESOPHAGUS", "HEART", "LUNG_L", "LUNG_R", "CORD", "SKIN", "BODY"):
        assert name in info.structure_names
        assert info.structure_volumes_cc[name] > 0
    assert info.has_reference_dose
    assert "Lung_2Gy_30Fx" in info.protocols
    assert "Phantom" not in str(info.path)
    assert info.path.is_relative_to(portpy_dir.resolve())


@pytest.mark.parametrize(
    "bad",
    ["..", "../etc", "/etc/passwd", "Lung_Synth_Patient_1/../..", "a/b", "..%2F..%2Fetc", "", " ", "Nope_Patient_9",
     "Lung_Synth_Patient_1\x00", "~root"],
)
def test_malformed_or_unknown_case_ids_are_refused(portpy_dir: Path, bad: str) -> None:
    with pytest.raises(cases.CaseError, match="case_id"):
        cases.resolve_case_dir(bad)


def test_non_string_case_id_is_refused() -> None:
    with pytest.raises(cases.CaseError, match="case_id"):
        cases.resolve_case_dir(None)  # type: ignore[arg-type]


def test_symlink_escaping_the_data_directory_is_not_a_case(tmp_path: Path, portpy_dir: Path) -> None:
    root = tmp_path / "portpy"
    root.mkdir()
    (root / "Evil_Patient_1").symlink_to(portpy_dir / cases.DEFAULT_CASE_ID, target_is_directory=True)
    with pytest.raises(cases.CaseError, match="inside the data directory"):
        cases.resolve_case_dir("Evil_Patient_1", root)


def test_folders_without_patient_in_the_name_or_metadata_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "Lung_Case_1").mkdir()  # PortPy lists only names containing "Patient"
    (tmp_path / "Lung_Patient_2").mkdir()  # no metadata files: half-copied folder
    assert cases.list_case_ids(tmp_path) == []
