"""Fetch a real patient of the PortPy dataset into the case registry.

PortPy's own downloader (``DataExplorer(hf_repo_id=...).filter_and_download_hf_dataset``) does the download. It
prints and swallows per-file failures and writes straight into its target folder, so this module wraps it: the
hub host is checked with a short socket timeout first (offline fails in seconds, not after a long retry loop),
the download goes to a hidden temporary folder beside the case folders, the result is checked file by file, and
only a complete patient folder is renamed into place. Any failure removes the temporary folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from vmat_core import paths

HF_REPO_ID = "PortPy-Project/PortPy_Dataset"
DEFAULT_HUB_URL = "https://huggingface.co"
HUB_URL_ENV = "HF_ENDPOINT"  # the variable huggingface_hub itself reads for a mirror
PATIENT_ID_RE = re.compile(r"^[A-Za-z]+_Patient_[0-9]+$")
_MAX_PATIENT_ID_LEN = 64
_TMP_PREFIX = ".fetch-"
# Files PortPy needs to load a patient; beams are checked separately, pair by pair.
REQUIRED_FILES = (
    "CT_Data.h5",
    "CT_MetaData.json",
    "StructureSet_Data.h5",
    "StructureSet_MetaData.json",
    "OptimizationVoxels_Data.h5",
    "OptimizationVoxels_MetaData.json",
)
_BEAM_META_RE = re.compile(r"^Beam_([0-9]+)_MetaData\.json$")


class FetchError(RuntimeError):
    """A patient that could not be fetched; the message says why and what to do."""


def check_patient_id(patient_id: object) -> str:
    """``patient_id`` when it names a dataset patient such as ``Lung_Patient_6``, else :class:`ValueError`."""
    if not isinstance(patient_id, str) or len(patient_id) > _MAX_PATIENT_ID_LEN or not PATIENT_ID_RE.fullmatch(
        patient_id
    ):
        shown = repr(patient_id) if not isinstance(patient_id, str) else repr(patient_id[:80])
        raise ValueError(
            f"patient_id: {shown} is not a PortPy dataset patient id; expected <Site>_Patient_<number>, "
            "e.g. Lung_Patient_6"
        )
    if "phantom" in patient_id.lower():
        # PortPy's RT Dose reader shifts doses when the path contains "Phantom".
        raise ValueError(f"patient_id: {patient_id!r}: names containing 'Phantom' are refused (PortPy misreads "
                         f"their doses)")
    return patient_id


def hub_url() -> str:
    return os.environ.get(HUB_URL_ENV, "").strip() or DEFAULT_HUB_URL


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"{HUB_URL_ENV}: {url!r} is not an http(s) URL")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def check_hub_reachable(url: str | None = None, timeout_s: float = 10.0) -> None:
    """Raise :class:`FetchError` unless a TCP connection to the hub opens within ``timeout_s`` seconds.

    Name resolution has no timeout of its own, so it runs in a daemon thread that is abandoned at the deadline.
    """
    url = url or hub_url()
    host, port = _host_port(url)
    deadline = time.monotonic() + timeout_s
    result: dict[str, object] = {}

    def resolve() -> None:
        try:
            result["addrs"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            result["error"] = exc

    t = threading.Thread(target=resolve, name="hub-dns", daemon=True)
    t.start()
    t.join(timeout_s)
    offline = (f"cannot reach {host}:{port} ({url}); this machine looks offline. Fetching a patient needs "
               f"internet access to the PortPy dataset on Hugging Face ({HF_REPO_ID})")
    if t.is_alive():
        raise FetchError(f"{offline}: name lookup took longer than {timeout_s:g} s")
    if "error" in result:
        raise FetchError(f"{offline}: name lookup failed: {result['error']}")
    last: OSError | None = None
    for family, kind, proto, _, addr in result["addrs"]:  # type: ignore[union-attr]
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(left)
                s.connect(addr)
            return
        except OSError as exc:
            last = exc
    raise FetchError(f"{offline}: {last or f'no answer within {timeout_s:g} s'}")


def _check_downloaded(folder: Path, patient_id: str, beam_ids: list[int] | None, chatter: str) -> list[int]:
    """Beam ids of a complete download; FetchError naming the missing files otherwise."""
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    beams_dir = folder / "Beams"
    found = []
    if beams_dir.is_dir():
        for f in beams_dir.iterdir():
            m = _BEAM_META_RE.match(f.name)
            if m:
                found.append(int(m.group(1)))
                if not (beams_dir / f"Beam_{m.group(1)}_Data.h5").is_file():
                    missing.append(f"Beams/Beam_{m.group(1)}_Data.h5")
    if beam_ids:
        missing += [f"Beams/Beam_{b}_MetaData.json" for b in beam_ids if b not in found]
    elif not found:
        missing.append("Beams/Beam_<id>_MetaData.json (no beam at all)")
    if missing:
        tail = "\n".join(chatter.strip().splitlines()[-8:])
        raise FetchError(
            f"{patient_id}: the download is incomplete (missing {', '.join(missing[:8])}"
            f"{' …' if len(missing) > 8 else ''}); nothing was kept. Is {patient_id} in the dataset?"
            + (f"\nPortPy said:\n{tail}" if tail else "")
        )
    for name in ("CT_MetaData.json", "StructureSet_MetaData.json", "OptimizationVoxels_MetaData.json"):
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError) as exc:
            raise FetchError(f"{patient_id}: downloaded {name} is not valid JSON ({exc}); nothing was kept") \
                from exc
    return sorted(found)


def fetch_patient(
    patient_id: str,
    data_dir: Path | None = None,
    *,
    timeout_s: float = 10,
    beam_ids: list[int] | None = None,
) -> Path:
    """Download PortPy dataset patient ``patient_id`` and return its case folder.

    ``data_dir`` is the folder holding PortPy patient folders (default: the planner's ``portpy`` folder).
    ``beam_ids`` limits the beams downloaded (default: all beams of the patient, as VMAT arcs need them).
    An existing complete case folder is returned as is. Raises ValueError for a malformed id and
    :class:`FetchError` (offline, huggingface_hub missing, incomplete download) otherwise; on any failure no
    trace of the attempt is left in ``data_dir``.
    """
    check_patient_id(patient_id)
    if beam_ids is not None:
        if isinstance(beam_ids, (str, bytes)) or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 99_999 for b in beam_ids
        ):
            raise ValueError(f"beam_ids: expected a list of integers in [0, 99999], got {beam_ids!r}"[:200])
        beam_ids = sorted(set(beam_ids))
    if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s <= 600):
        raise ValueError(f"timeout_s: must be a number of seconds in (0, 600], got {timeout_s!r}")
    root = Path(data_dir or paths.portpy_data_dir()).expanduser().resolve()
    final = root / patient_id
    if final.is_dir() and all((final / f).is_file() for f in REQUIRED_FILES):
        return final
    if final.exists() or final.is_symlink():
        raise FetchError(f"{final} exists but is not a complete PortPy patient folder; move it away and retry")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise FetchError("HF_HUB_OFFLINE is set: Hugging Face downloads are switched off; unset it to fetch")

    check_hub_reachable(hub_url(), timeout_s=timeout_s)
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise FetchError(
            "huggingface_hub is not installed, and PortPy downloads its dataset with it; install it with "
            "`pip install huggingface_hub` (in the planner's environment) and retry"
        ) from None

    import portpy.photon as pp

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}{secrets.token_hex(6)}"
    tmp.mkdir()
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            explorer = pp.DataExplorer(hf_repo_id=HF_REPO_ID, local_download_dir=str(tmp), patient_id=patient_id)
            explorer.filter_and_download_hf_dataset(
                patient_ids=[patient_id],
                beam_ids_to_download=beam_ids,
                use_planner_beams_only=False,
            )
        downloaded = tmp / "data" / patient_id  # where PortPy puts it: <download dir>/data/<patient>
        _check_downloaded(downloaded, patient_id, beam_ids, chatter.getvalue())
        try:
            os.rename(downloaded, final)
        except OSError as exc:
            if final.is_dir() and all((final / f).is_file() for f in REQUIRED_FILES):
                return final  # another fetch of the same patient finished first
            raise FetchError(f"{patient_id}: could not move the download into {final}: {exc}") from exc
        return final
    except FetchError:
        raise
    except Exception as exc:
        tail = "\n".join(chatter.getvalue().strip().splitlines()[-8:])
        raise FetchError(
            f"{patient_id}: download failed: {type(exc).__name__}: {exc}"
            + (f"\nPortPy said:\n{tail}" if tail else "")
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cleanup_stale_downloads(data_dir: Path | None = None, older_than_s: float = 24 * 3600) -> list[Path]:
    """Remove temporary download folders left by a killed process (a normal failure removes its own)."""
    root = Path(data_dir or paths.portpy_data_dir()).expanduser().resolve()
    removed = []
    if not root.is_dir():
        return removed
    cutoff = time.time() - older_than_s
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX) and p.is_dir() and not p.is_symlink() and p.stat().st_mtime < cutoff:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------------- CLI


def _parse_beams(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--beams: {text!r} is not a comma-separated list of beam ids, e.g. 0,11,22") from None


def cmd_fetch_patient(args) -> int:
    import sys

    beams = _parse_beams(args.beams) if args.beams else None
    print(f"Fetching {args.patient_id} from {HF_REPO_ID} …", file=sys.stderr, flush=True)
    try:
        path = fetch_patient(args.patient_id, timeout_s=args.timeout, beam_ids=beams)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Case ready: {path}")
    return 0


def add_cli_commands(subparsers) -> None:
    """Register ``fetch-patient PATIENT_ID`` on the ``vmat-planner`` command line."""
    s = subparsers.add_parser(
        "fetch-patient",
        help="download a patient of the PortPy dataset (e.g. Lung_Patient_6) into the data directory",
    )
    s.add_argument("patient_id", help="dataset patient id, <Site>_Patient_<number>, e.g. Lung_Patient_6")
    s.add_argument("--beams", help="comma-separated beam ids to download (default: all beams of the patient)")
    s.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the dataset host before giving up (default 10)")
    s.set_defaults(func=cmd_fetch_patient)
