"""Fetching a PortPy dataset patient: ids checked, offline fails fast and leaves nothing behind."""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from vmat_core import fetch
from vmat_core.fetch import FetchError, check_patient_id, fetch_patient

BAD_IDS = [
    "",
    "Lung_Patient_",
    "Lung_Patient_six",
    "Patient_6",
    "Lung_Synth_Patient_1",
    "../Lung_Patient_6",
    "Lung_Patient_6/..",
    "Lung_Patient_6/../../etc",
    "/etc/Lung_Patient_6",
    "Lung_Patient_6\n",
    "Lung_Patient_6\\x",
    "Lung Patient 6",
    "Lung_Patient_6;rm -rf",
    "Phantom_Patient_1",
    "L" * 60 + "_Patient_1",
    None,
    6,
    ["Lung_Patient_6"],
]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_invalid_ids_refused_before_anything_happens(bad, tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.HUB_URL_ENV, f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ValueError, match="patient_id"):
        fetch_patient(bad, tmp_path)
    assert entries(tmp_path) == []


@pytest.mark.parametrize("good", ["Lung_Patient_6", "Prostate_Patient_12", "HN_Patient_1"])
def test_dataset_ids_accepted(good):
    assert check_patient_id(good) == good


def test_offline_fails_fast_and_leaves_nothing(tmp_path, monkeypatch):
    # A hub address where nothing listens: the connection is refused, as on a machine without a network.
    monkeypatch.setenv(fetch.HUB_URL_ENV, f"http://127.0.0.1:{closed_port()}")
    data = tmp_path / "portpy"
    t = time.monotonic()
    with pytest.raises(FetchError, match="offline") as info:
        fetch_patient("Lung_Patient_6", data, timeout_s=5)
    assert time.monotonic() - t < 15
    assert "Lung_Patient_6" not in entries(data) and entries(data) == []
    assert "PortPy-Project/PortPy_Dataset" in str(info.value)


def test_unanswered_hub_times_out(tmp_path, monkeypatch):
    # 192.0.2.1 (TEST-NET-1) is never routed: either refused at once or silent until the timeout.
    monkeypatch.setenv(fetch.HUB_URL_ENV, "https://192.0.2.1")
    t = time.monotonic()
    with pytest.raises(FetchError, match="cannot reach 192.0.2.1:443"):
        fetch_patient("Lung_Patient_6", tmp_path, timeout_s=2)
    assert time.monotonic() - t < 15
    assert entries(tmp_path) == []


def test_real_hub_offline_here(tmp_path, monkeypatch):
    monkeypatch.delenv(fetch.HUB_URL_ENV, raising=False)
    try:
        fetch.check_hub_reachable(timeout_s=5)
    except FetchError:
        pass
    else:
        pytest.skip("huggingface.co is reachable from this machine: the offline path cannot be observed")
    t = time.monotonic()
    with pytest.raises(FetchError, match="huggingface.co"):
        fetch_patient("Lung_Patient_6", tmp_path, timeout_s=5)
    assert time.monotonic() - t < 15
    assert entries(tmp_path) == []


def test_hf_offline_switch_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError, match="HF_HUB_OFFLINE"):
        fetch_patient("Lung_Patient_6", tmp_path)
    assert entries(tmp_path) == []


@pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is not None,
                    reason="huggingface_hub is installed here")
def test_missing_huggingface_hub_is_named(tmp_path, monkeypatch):
    # A listening socket passes the reachability check; the missing library is then reported by name.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        threading.Thread(target=lambda: srv.accept()[0].close(), daemon=True).start()
        monkeypatch.setenv(fetch.HUB_URL_ENV, f"http://127.0.0.1:{srv.getsockname()[1]}")
        with pytest.raises(FetchError, match="huggingface_hub is not installed.*pip install huggingface_hub"):
            fetch_patient("Lung_Patient_6", tmp_path)
    assert entries(tmp_path) == []


def test_complete_case_is_returned_without_network(tmp_path, monkeypatch, case_dir):
    monkeypatch.setenv(fetch.HUB_URL_ENV, f"http://127.0.0.1:{closed_port()}")
    patient = tmp_path / "Lung_Patient_9"
    patient.mkdir()
    for name in fetch.REQUIRED_FILES:
        (patient / name).symlink_to(case_dir / name)
    assert fetch_patient("Lung_Patient_9", tmp_path) == patient.resolve()


def test_incomplete_folder_in_the_way_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.HUB_URL_ENV, f"http://127.0.0.1:{closed_port()}")
    partial = tmp_path / "Lung_Patient_9"
    partial.mkdir()
    (partial / "CT_MetaData.json").write_text("{}")
    with pytest.raises(FetchError, match="not a complete PortPy patient folder"):
        fetch_patient("Lung_Patient_9", tmp_path)
    assert entries(partial) == ["CT_MetaData.json"]


def test_incomplete_download_is_refused(tmp_path, case_dir):
    # What PortPy leaves when some files failed (it only prints): the check names what is missing.
    got = tmp_path / "Lung_Patient_9"
    (got / "Beams").mkdir(parents=True)
    for name in fetch.REQUIRED_FILES[1:]:
        (got / name).symlink_to(case_dir / name)
    (got / "Beams" / "Beam_0_MetaData.json").symlink_to(case_dir / "Beams" / "Beam_0_MetaData.json")
    with pytest.raises(FetchError, match=r"incomplete \(missing CT_Data.h5, Beams/Beam_0_Data.h5, "
                                         r"Beams/Beam_11_MetaData.json\)"):
        fetch._check_downloaded(got, "Lung_Patient_9", [0, 11], "")
    (got / "CT_Data.h5").symlink_to(case_dir / "CT_Data.h5")
    (got / "Beams" / "Beam_0_Data.h5").symlink_to(case_dir / "Beams" / "Beam_0_Data.h5")
    assert fetch._check_downloaded(got, "Lung_Patient_9", [0], "") == [0]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="beam_ids"):
        fetch_patient("Lung_Patient_6", tmp_path, beam_ids=["0"])
    with pytest.raises(ValueError, match="timeout_s"):
        fetch_patient("Lung_Patient_6", tmp_path, timeout_s=0)
    assert entries(tmp_path) == []


def test_stale_download_folders_are_cleaned(tmp_path):
    old = tmp_path / ".fetch-0123456789ab"
    (old / "data").mkdir(parents=True)
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    fresh = tmp_path / ".fetch-ba9876543210"
    fresh.mkdir()
    assert fetch.cleanup_stale_downloads(tmp_path) == [old]
    assert entries(tmp_path) == [fresh.name]


def test_cli_command(tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="vmat-planner")
    fetch.add_cli_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["fetch-patient", "Lung_Patient_6", "--beams", "0,11", "--timeout", "3"])
    assert (args.patient_id, args.beams, args.timeout) == ("Lung_Patient_6", "0,11", 3.0)
    monkeypatch.setenv(fetch.HUB_URL_ENV, f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("VMAT_DATA_DIR", str(tmp_path))
    assert args.func(args) == 1
    assert "offline" in capsys.readouterr().err
    assert entries(tmp_path) == []
