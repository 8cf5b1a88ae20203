"""The HTTP JSON API served beside the app, under ``/api/``.

Every endpoint is a thin shell over ``vmat_core`` (cases, config, jobs, store, runner): the API holds no planning
logic of its own. One table, :data:`ROUTES`, declares each route's method, path, handler, parameters and
responses; the Tornado URL patterns (:func:`url_patterns`) and the OpenAPI 3.1 document (:func:`openapi_document`,
served at ``/api/openapi.json``) are both generated from it, so the documentation cannot drift from the routes.

Ids in paths are checked before anything touches the disk (case ids against the case registry, run ids by the
run store's format, job ids by :data:`JOB_ID_RE`), so no request can name a path outside the data directory.
Malformed requests get 400, unknown ids 404, well-formed but invalid configs 422; every error is JSON
``{"error": {"field"?, "message"}}``. Handlers run on a small thread pool so that slow disk or solver-library
calls never stall the Panel server's event loop.

Authentication is Panel's: when the server runs with basic auth, API handlers consult the same auth provider as
the pages (the login cookie set by ``/login``), and also accept the same credentials as an HTTP ``Authorization:
Basic`` header for scripts. Unauthenticated requests get 401.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import math
import os
import re
import threading
import time
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, dataclass, field, fields
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from bokeh.server.views.auth_request_handler import AuthRequestHandler
from tornado.web import HTTPError

log = logging.getLogger(__name__)

API_PREFIX = "/api"
API_VERSION = "1"
MAX_BODY_BYTES = 1_000_000
MAX_LIMIT = 1000
DEFAULT_RUNS_LIMIT = 100
DEFAULT_JOBS_LIMIT = 200
DEFAULT_LOG_LINES = 200
MAX_LOG_LINES = 2000
# Job ids as vmat_core.jobs.new_job_id makes them: j-<YYYYMMDD>-<HHMMSS>-<6 hex digits>.
JOB_ID_RE = re.compile(r"^j-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
_SEGMENT_RE = re.compile(r"\{([a-z_]+)\}")
_ORDER_RE = re.compile(r"^\s*(-)?([A-Za-z_][A-Za-z0-9_]{0,127})(?:\s+(asc|desc))?\s*$", re.IGNORECASE)
# Columns every run has, so they can be ordered by even before a run exists.
_BASE_ORDER_COLUMNS = ("created_at", "run_id", "case_id", "status")
_PARTIAL_KEYS = ("case_id", "overrides")
_CONTENT_TYPES = {
    ".json": "application/json",
    ".log": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".parquet": "application/vnd.apache.parquet",
    ".npz": "application/octet-stream",
}

_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vmat-api")


# --------------------------------------------------------------------------------------------------------------
# Requests, replies, errors


class ApiError(Exception):
    """An error reply: HTTP ``status`` with a message and, when one input is to blame, its ``field``."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict:
        err: dict[str, Any] = {"message": self.message}
        if self.field is not None:
            err = {"field": self.field, **err}
        return {"error": err}


@dataclass
class ApiRequest:
    """What a route handler sees: decoded path arguments, query values and the parsed JSON body."""

    args: dict[str, str]
    query: dict[str, list[str]]
    body: Any = None

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def int_param(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self.param(name)
        if raw is None:
            return default
        if not re.fullmatch(r"[0-9]{1,9}", raw.strip()):
            raise ApiError(400, f"must be an integer in [{lo}, {hi}], got {raw[:40]!r}", name)
        value = int(raw)
        if not lo <= value <= hi:
            raise ApiError(400, f"must be an integer in [{lo}, {hi}], got {value}", name)
        return value


@dataclass
class Reply:
    """A non-default reply: another status, headers, or raw bytes instead of JSON."""

    body: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    content_type: str = "application/json"


def to_jsonable(value: Any) -> Any:
    """Plain JSON data: DataFrames as records, numpy values as Python ones, NaN/inf/NaT/NA as null."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, (datetime, date, pd.Timestamp)):
        return value.isoformat()
    if isinstance(value, pd.DataFrame):
        return [to_jsonable(r) for r in value.to_dict(orient="records")]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    return str(value)


def json_bytes(value: Any) -> bytes:
    return json.dumps(to_jsonable(value), allow_nan=False, separators=(",", ":")).encode("utf-8")


def _message(exc: BaseException, prefix: str | None = None) -> str:
    text = str(exc)
    if prefix and text.startswith(f"{prefix}: "):
        text = text[len(prefix) + 2:]
    return text


def scrub_paths(text: str) -> str:
    """``text`` without the server's data-directory paths, which are no business of a remote client."""
    from vmat_core import paths

    root = paths.data_dir()
    cases_dir = paths.portpy_data_dir()
    for p, label in ((cases_dir.resolve(), "<cases>"), (cases_dir, "<cases>"), (root, "<data>")):
        text = text.replace(str(p), label)
    return text


def _map_exception(exc: BaseException) -> ApiError:
    """Domain errors of vmat_core as HTTP errors; anything else is a 500 (logged with its traceback)."""
    from vmat_core.cases import CaseError
    from vmat_core.config import ConfigError
    from vmat_core.jobs import JobError, JobNotFound
    from vmat_core.store import ArtifactNotFound, CorruptRun, InvalidName, InvalidRunId, QueryError, RunNotFound

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ConfigError):
        return ApiError(422, exc.message, exc.field)
    if isinstance(exc, InvalidRunId):
        return ApiError(400, _message(exc, "run_id"), "run_id")
    if isinstance(exc, RunNotFound):
        return ApiError(404, _message(exc, "run_id"), "run_id")
    if isinstance(exc, InvalidName):
        return ApiError(400, _message(exc, "filename"), "name" if str(exc).startswith("filename: ") else None)
    if isinstance(exc, (ArtifactNotFound, CorruptRun)):
        return ApiError(404, str(exc))
    if isinstance(exc, QueryError):
        name, _, rest = str(exc).partition(": ")
        known = name in ("where", "order_by", "limit", "offset", "columns", "params")
        return ApiError(400, rest if known else str(exc), name if known else None)
    if isinstance(exc, CaseError):
        return ApiError(404, _message(exc, "case_id"), "case_id")
    if isinstance(exc, JobNotFound):
        return ApiError(404, _message(exc, "job_id"), "job_id")
    if isinstance(exc, JobError):
        return ApiError(409, _message(exc, "job_id"), "job_id")
    log.exception("API request failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}; the server log has the details")


# --------------------------------------------------------------------------------------------------------------
# Checks of path arguments and bodies


def _check_case_id(case_id: str):
    """CaseInfo of an existing case; 400 for a malformed id, 404 for an unknown one."""
    from vmat_core import cases

    if not cases.CASE_ID_RE.fullmatch(case_id) or ".." in case_id:
        raise ApiError(400, f"{case_id[:80]!r} is not a case id (letters, digits, '_', '-', '.'; no separators)",
                       "case_id")
    try:
        return cases.case_info(case_id)
    except cases.CaseError as exc:
        raise ApiError(404, _message(exc, "case_id"), "case_id") from None


def _check_run_id(run_id: str):
    """The run store, once ``run_id`` is well formed and exists (400 / 404 otherwise)."""
    from vmat_core.store import RunStore, check_run_id

    check_run_id(run_id)
    store = RunStore()
    store.run_path(run_id)
    return store


def _check_job_id(job_id: str) -> str:
    if not JOB_ID_RE.fullmatch(job_id):
        raise ApiError(400, f"{job_id[:80]!r} is not a job id; expected j-YYYYMMDD-HHMMSS-<6 hex digits>",
                       "job_id")
    return job_id


def _reject_constant(name: str):
    raise ApiError(400, f"malformed JSON: {name} is not valid JSON (numbers must be finite)", "body")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ApiError(400, f"malformed JSON: key {k[:60]!r} appears twice in one object", "body")
        out[k] = v
    return out


def parse_json_body(raw: bytes, content_type: str | None) -> Any:
    """The request body as JSON data; 413/415/400 for oversize, non-JSON or malformed bodies."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted", "body")
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    # Requiring a JSON content type also keeps plain HTML forms of other sites from posting here: a cross-site
    # JSON request needs a CORS preflight, which this server never grants.
    if mime != "application/json" and not mime.endswith("+json"):
        raise ApiError(415, f"Content-Type must be application/json, got {mime or 'none'!r}", "body")
    if not raw.strip():
        raise ApiError(400, "malformed JSON: the request body is empty", "body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"malformed JSON: body is not UTF-8 ({exc.reason} at byte {exc.start})",
                       "body") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except ApiError:
        raise
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply", "body") from None
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON: {str(exc)[:200]}", "body") from None


def default_protocol(info) -> str:
    from vmat_core.cases import DEFAULT_PROTOCOL

    if not info.protocols or DEFAULT_PROTOCOL in info.protocols:
        return DEFAULT_PROTOCOL
    return info.protocols[0]


def config_from_body(body: Any):
    """A validated RunConfig from a submission body (a complete config, or ``{case_id, overrides}``).

    Raises ConfigError (→ 422) naming the field; nothing is queued when it does."""
    from vmat_core import cases
    from vmat_core.config import ConfigError, RunConfig, apply_overrides, default_config, validate_config

    if not isinstance(body, dict):
        raise ConfigError("config", f"must be a JSON object (a run config, or {{\"case_id\": ..., \"overrides\": "
                                    f"[...]}}), got {type(body).__name__}")
    if "overrides" in body or set(body) <= {"case_id"}:
        for key in body:
            if key not in _PARTIAL_KEYS:
                raise ConfigError(str(key)[:60], "unknown field in a partial submission; allowed: case_id, "
                                                 "overrides (or send a complete config)")
        case_id = body.get("case_id")
        if not isinstance(case_id, str) or not case_id:
            raise ConfigError("case_id", "required: a case id string, e.g. Lung_Synth_Patient_1")
        try:
            info = cases.case_info(case_id)
        except cases.CaseError as exc:
            raise ConfigError("case_id", _message(exc, "case_id")) from None
        cfg = default_config(case_id, protocol=default_protocol(info))
        overrides = body.get("overrides", [])
        if not isinstance(overrides, list):
            raise ConfigError("overrides", "must be a list of 'name=value' strings, e.g. "
                                           "[\"CORD/quadratic.weight=20\"]")
        if len(overrides) > 500:
            raise ConfigError("overrides", f"at most 500 overrides, got {len(overrides)}")
        cfg = apply_overrides(cfg, overrides)
    else:
        cfg = RunConfig.from_dict(body)
    try:
        info = cases.case_info(cfg.case_id)
    except cases.CaseError as exc:
        raise ConfigError("case_id", _message(exc, "case_id")) from None
    return validate_config(cfg, info)


# --------------------------------------------------------------------------------------------------------------
# Handlers: cases


def _case_summary(info) -> dict:
    return {
        "case_id": info.case_id,
        "disease_site": info.disease_site,
        "n_structures": len(info.structure_names),
        "n_beams": len(info.beam_ids),
        "ct_shape_zyx": list(info.ct_shape_zyx),
        "has_reference_dose": info.has_reference_dose,
        "protocols": list(info.protocols),
        "url": f"{API_PREFIX}/cases/{info.case_id}",
    }


def list_cases(req: ApiRequest) -> dict:
    from vmat_core import cases

    out = []
    for case_id in cases.list_case_ids():
        try:
            out.append(_case_summary(cases.case_info(case_id)))
        except (cases.CaseError, OSError, ValueError, KeyError) as exc:  # one broken folder must not hide the rest
            out.append({"case_id": case_id, "error": str(exc)})
    return {"cases": out}


def get_case(req: ApiRequest) -> dict:
    from vmat_core.config import ConfigError, portpy_protocol_params

    info = _check_case_id(req.args["case_id"])
    d = info.to_dict()
    d.pop("path", None)  # a server path is of no use to a client
    protocol_details = {}
    for p in info.protocols:
        try:
            _, criteria = portpy_protocol_params(p)
            nf = int(criteria["num_of_fractions"])
            protocol_details[p] = {
                "num_fractions": nf,
                "prescription_gy": round(float(criteria["pres_per_fraction_gy"]) * nf, 9),
            }
        except (ConfigError, KeyError, TypeError, ValueError):
            protocol_details[p] = {"num_fractions": None, "prescription_gy": None}
    protocol = default_protocol(info)
    detail = protocol_details.get(protocol, {})
    d.update(
        protocol=protocol,
        prescription_gy=detail.get("prescription_gy"),
        num_fractions=detail.get("num_fractions"),
        protocol_details=protocol_details,
    )
    return d


_REFERENCE_LOCKS: dict[str, threading.Lock] = {}
_REFERENCE_LOCKS_GUARD = threading.Lock()


def _reference_lock(case_id: str) -> threading.Lock:
    with _REFERENCE_LOCKS_GUARD:
        return _REFERENCE_LOCKS.setdefault(case_id, threading.Lock())


def get_reference_dose(req: ApiRequest) -> dict:
    from vmat_core.runner import reference_plan

    info = _check_case_id(req.args["case_id"])
    if not info.has_reference_dose:
        raise ApiError(404, f"case {info.case_id} ships no reference dose", "case_id")
    with _reference_lock(info.case_id):  # a second request waits for the first evaluation and reads its cache
        try:
            ref = reference_plan(info.case_id)
        except FileNotFoundError as exc:
            raise ApiError(404, _message(exc, "case_id"), "case_id") from None
    dose = ref.get("dose_3d_gy")
    return {
        "case_id": info.case_id,
        "prescription_gy": ref.get("prescription_gy"),
        "source": ref.get("source"),
        "dose_shape_zyx": list(np.shape(dose)) if dose is not None else None,
        "dose_max_gy": float(np.nanmax(dose)) if dose is not None and np.size(dose) else None,
        "dvh": ref.get("dvh"),
        "metrics": ref.get("metrics"),
        "criteria": ref.get("criteria"),
        # The same tables on every dose voxel (the grid of a run's reconstructed full-resolution dose).
        "full_resolution": ref.get("full"),
    }


# --------------------------------------------------------------------------------------------------------------
# Handlers: jobs


def _job_client():
    from vmat_core.jobs import get_job_client

    return get_job_client()


def _job_view(rec) -> dict:
    d = rec.to_dict()
    d["url"] = f"{API_PREFIX}/jobs/{rec.job_id}"
    if rec.run_id:
        d["run_url"] = f"{API_PREFIX}/runs/{rec.run_id}"
    return d


def submit_job(req: ApiRequest) -> Reply:
    cfg = config_from_body(req.body)
    client = _job_client()
    job_id = client.submit(cfg)
    rec = client.status(job_id)
    location = f"{API_PREFIX}/jobs/{job_id}"
    return Reply(
        body={"job_id": job_id, "status": rec.status, "url": location, "config_hash": rec.config_hash},
        status=202,
        headers={"Location": location},
    )


def list_jobs(req: ApiRequest) -> dict:
    from vmat_core.jobs import JOB_STATES

    status = req.param("status")
    if status is not None and status not in JOB_STATES:
        raise ApiError(400, f"must be one of {', '.join(JOB_STATES)}, got {status[:40]!r}", "status")
    case_id = req.param("case_id")
    if case_id is not None:
        _check_case_id(case_id)
    limit = req.int_param("limit", DEFAULT_JOBS_LIMIT, 1, MAX_LIMIT)
    jobs = _job_client().list_jobs(status=status, case_id=case_id, limit=limit)
    return {"jobs": [_job_view(r) for r in jobs], "count": len(jobs), "limit": limit}


def get_job(req: ApiRequest) -> dict:
    job_id = _check_job_id(req.args["job_id"])
    lines = req.int_param("log_lines", DEFAULT_LOG_LINES, 0, MAX_LOG_LINES)
    client = _job_client()
    rec = client.status(job_id)
    prog = client.progress(job_id, log_tail=lines)
    return {
        "job": _job_view(rec),
        "events": prog.get("events", []),
        "latest": prog.get("latest", {}),
        "log": prog.get("log", []),
    }


def patch_job(req: ApiRequest) -> dict:
    job_id = _check_job_id(req.args["job_id"])
    body = req.body
    if not isinstance(body, dict) or not body:
        raise ApiError(422, 'must be {"action": "cancel"} or {"status": "cancelled"}', "body")
    for key in body:
        if key not in ("action", "status"):
            raise ApiError(422, "unknown field; allowed: action, status", str(key)[:60])
    if "action" in body and body["action"] != "cancel":
        raise ApiError(422, f"the only action is 'cancel', got {str(body['action'])[:40]!r}", "action")
    if "status" in body and body["status"] != "cancelled":
        raise ApiError(422, f"a job can only be set to 'cancelled', got {str(body['status'])[:40]!r}", "status")
    rec = _job_client().cancel(job_id)
    return {"job": _job_view(rec)}


def list_workers(req: ApiRequest) -> dict:
    client = _job_client()
    return {"backend": getattr(client, "backend", None), "workers": client.workers()}


# --------------------------------------------------------------------------------------------------------------
# Handlers: runs


def _order_by(raw: str | None, store) -> str:
    if raw is None or not raw.strip():
        return "created_at DESC"
    allowed = set(_BASE_ORDER_COLUMNS) | set(store.columns())
    items = []
    for part in raw.split(",")[:4]:
        m = _ORDER_RE.match(part)
        if not m:
            raise ApiError(400, f"{part.strip()[:60]!r} is not 'column', 'column asc|desc' or '-column'",
                           "order_by")
        desc, column, direction = m.groups()
        if column not in allowed:
            shown = ", ".join(sorted(allowed)[:40])
            raise ApiError(400, f"cannot order by {column!r}; columns: {shown}", "order_by")
        items.append(f"{column} {'DESC' if desc or (direction or '').lower() == 'desc' else 'ASC'}")
    return ", ".join(items)


def list_runs(req: ApiRequest) -> dict:
    from vmat_core.store import QueryError, RunStore, validate_where

    store = RunStore()
    where = req.param("where")
    if where is not None and not where.strip():
        where = None
    if where is not None:
        validate_where(where)
    limit = req.int_param("limit", DEFAULT_RUNS_LIMIT, 1, MAX_LIMIT)
    offset = req.int_param("offset", 0, 0, 10**9)
    order_by = _order_by(req.param("order_by"), store)
    try:
        df = store.list_runs(where, order_by=order_by, limit=limit, offset=offset)
        total = store.count_runs(where)
    except QueryError as exc:
        # A filter that passed the checks but fails in DuckDB (an unknown column, a type clash) is the filter's
        # fault, so the error names it.
        if where is not None and str(exc).startswith("query: "):
            raise ApiError(400, _message(exc, "query"), "where") from None
        raise
    return {"runs": df, "total": total, "limit": limit, "offset": offset, "order_by": order_by}


def get_run(req: ApiRequest) -> dict:
    run_id = req.args["run_id"]
    store = _check_run_id(run_id)
    return {
        "run_id": run_id,
        "metadata": store.read_metadata(run_id),
        "config": store.read_config(run_id),
        "artifacts": store.list_artifacts(run_id),
    }


def _table_handler(name: str) -> Callable[[ApiRequest], dict]:
    def handler(req: ApiRequest) -> dict:
        run_id = req.args["run_id"]
        store = _check_run_id(run_id)
        df = store.read_table(run_id, name)
        return {"run_id": run_id, "table": name, "columns": [str(c) for c in df.columns], "records": df}

    handler.__name__ = f"get_run_{name}"
    return handler


def get_artifact(req: ApiRequest) -> Reply:
    run_id, name = req.args["run_id"], req.args["name"]
    store = _check_run_id(run_id)
    path = store.artifact_path(run_id, name)
    data = path.read_bytes()
    ctype = _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    headers = {"Content-Security-Policy": "default-src 'none'; sandbox"}
    if not ctype.startswith(("application/json", "text/plain")):
        headers["Content-Disposition"] = f'attachment; filename="{run_id}_{name}"'
    return Reply(raw=data, content_type=ctype, headers=headers)


def get_dose_npz(req: ApiRequest) -> Reply:
    run_id = req.args["run_id"]
    store = _check_run_id(run_id)
    dose = store.read_arrays(run_id, ["dose_3d_gy"])["dose_3d_gy"]
    buf = io.BytesIO()
    np.savez_compressed(buf, dose_3d_gy=dose)
    return Reply(
        raw=buf.getvalue(),
        content_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{run_id}_dose.npz"'},
    )


def _active_dose_job(run_id: str):
    """The queued or running full-resolution dose job of ``run_id``, if any."""
    client = _job_client()
    for job_id in client.ledger.active_ids():
        d = client.ledger.get(job_id)
        if d and d.get("kind") == "dose" and (d.get("config") or {}).get("run_id") == run_id:
            return client.status(job_id)
    return None


def get_full_dose(req: ApiRequest) -> dict:
    from vmat_core import runner

    run_id = req.args["run_id"]
    store = _check_run_id(run_id)
    full = runner.read_full_dose(run_id, store=store, with_dose=False)
    if full is not None:
        return {"run_id": run_id, "status": "ready", "dvh": full["dvh"], "metrics": full["metrics"],
                "criteria": full["criteria"], "dose_url": f"{API_PREFIX}/runs/{run_id}/full_dose.npz"}
    job = _active_dose_job(run_id)
    return {"run_id": run_id, "status": "pending" if job else "not_computed",
            "job_url": f"{API_PREFIX}/jobs/{job.job_id}" if job else None,
            "message": "being computed" if job else f"not computed; POST {API_PREFIX}/runs/{run_id}/full_dose"}


def post_full_dose(req: ApiRequest) -> Reply:
    from vmat_core import runner

    run_id = req.args["run_id"]
    store = _check_run_id(run_id)
    here = f"{API_PREFIX}/runs/{run_id}/full_dose"
    if runner.read_full_dose(run_id, store=store, with_dose=False) is not None:
        return Reply(body={"run_id": run_id, "status": "ready", "url": here}, status=200)
    job_id = _job_client().submit_dose(run_id)
    location = f"{API_PREFIX}/jobs/{job_id}"
    return Reply(body={"run_id": run_id, "status": "pending", "job_id": job_id, "url": location}, status=202,
                 headers={"Location": location})


def get_full_dose_npz(req: ApiRequest) -> Reply:
    from vmat_core import runner

    run_id = req.args["run_id"]
    store = _check_run_id(run_id)
    full = runner.read_full_dose(run_id, store=store)
    if full is None:
        raise ApiError(404, f"the full-resolution dose of run {run_id} is not computed; "
                            f"POST {API_PREFIX}/runs/{run_id}/full_dose", "run_id")
    buf = io.BytesIO()
    np.savez_compressed(buf, dose_3d_gy=full["dose_3d_gy"])
    return Reply(
        raw=buf.getvalue(),
        content_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{run_id}_full_dose.npz"'},
    )


def get_openapi(req: ApiRequest) -> dict:
    return openapi_document()


# --------------------------------------------------------------------------------------------------------------
# The route table


@dataclass(frozen=True)
class QueryParam:
    name: str
    description: str
    schema: dict


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI template, e.g. /api/runs/{run_id}/dvh
    handler: Callable[[ApiRequest], Any]
    summary: str
    tag: str
    query: tuple[QueryParam, ...] = ()
    body: dict | None = None  # JSON schema of the request body
    ok_status: int = 200
    ok_schema: dict | None = None
    ok_content_type: str = "application/json"
    errors: tuple[int, ...] = ()
    also_ok: dict[int, str] = field(default_factory=dict)  # other success codes and what they mean

    @property
    def path_params(self) -> list[str]:
        return _SEGMENT_RE.findall(self.path)

    @property
    def operation_id(self) -> str:
        return f"{self.method.lower()}_" + self.handler.__name__.removeprefix("get_")


_PATH_PARAMS = {
    "case_id": ("A case id: a PortPy patient folder name, e.g. Lung_Synth_Patient_1.",
                {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"}),
    "run_id": ("A run id, YYYYMMDDTHHMMSSZ-<10 hex digits>.",
               {"type": "string", "pattern": r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{10}$"}),
    "job_id": ("A job id, j-YYYYMMDD-HHMMSS-<6 hex digits>.", {"type": "string", "pattern": JOB_ID_RE.pattern}),
    "name": ("A file name directly inside the run folder (see the run's `artifacts`).",
             {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"}),
}

_OBJ = {"type": "object"}
_RECORDS = {"type": "array", "items": {"type": "object"}}


def _table_schema() -> dict:
    return {"type": "object", "properties": {"run_id": {"type": "string"}, "table": {"type": "string"},
                                             "columns": {"type": "array", "items": {"type": "string"}},
                                             "records": _RECORDS}}


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/openapi.json", get_openapi, "This document: OpenAPI 3.1 description of the API.", "meta"),
    Route("GET", "/api/cases", list_cases, "Cases in the data directory.", "cases",
          ok_schema={"type": "object", "properties": {"cases": _RECORDS}}),
    Route("GET", "/api/cases/{case_id}", get_case,
          "One case: structures, beams, CT grid, protocols, and the default protocol's prescription and "
          "fractions.",
          "cases", ok_schema={"$ref": "#/components/schemas/Case"}, errors=(400, 404)),
    Route("GET", "/api/cases/{case_id}/reference_dose", get_reference_dose,
          "The case's shipped reference dose evaluated like a run: DVH, metrics and clinical criteria.",
          "cases", ok_schema={"$ref": "#/components/schemas/ReferenceDose"}, errors=(400, 404)),
    Route("POST", "/api/optimize", submit_job,
          "Queue a VMAT global-optimal optimisation (same as POST /api/jobs).", "jobs",
          body={"$ref": "#/components/schemas/Submission"}, ok_status=202,
          ok_schema={"$ref": "#/components/schemas/Submitted"}, errors=(400, 413, 415, 422)),
    Route("POST", "/api/jobs", submit_job,
          "Queue a VMAT global-optimal optimisation; the reply's Location header is the job's URL.", "jobs",
          body={"$ref": "#/components/schemas/Submission"}, ok_status=202,
          ok_schema={"$ref": "#/components/schemas/Submitted"}, errors=(400, 413, 415, 422)),
    Route("GET", "/api/jobs", list_jobs, "Jobs, newest first.", "jobs",
          query=(
              QueryParam("status", "Only jobs in this state.",
                         {"type": "string", "enum": ["queued", "running", "cancelling", "cancelled", "done",
                                                     "failed", "lost"]}),
              QueryParam("case_id", "Only jobs of this case.", {"type": "string"}),
              QueryParam("limit", f"At most this many jobs (default {DEFAULT_JOBS_LIMIT}).",
                         {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
          ),
          ok_schema={"type": "object", "properties": {"jobs": {"type": "array", "items": {
              "$ref": "#/components/schemas/Job"}}, "count": {"type": "integer"}}}, errors=(400, 404)),
    Route("GET", "/api/jobs/{job_id}", get_job,
          "A job: its record, its progress events (incumbent, bound, gap over time) and the tail of its log.",
          "jobs",
          query=(QueryParam("log_lines", f"Log lines to return (default {DEFAULT_LOG_LINES}).",
                            {"type": "integer", "minimum": 0, "maximum": MAX_LOG_LINES}),),
          ok_schema={"type": "object", "properties": {"job": {"$ref": "#/components/schemas/Job"},
                                                      "events": _RECORDS, "latest": _OBJ,
                                                      "log": {"type": "array", "items": {"type": "string"}}}},
          errors=(400, 404)),
    Route("PATCH", "/api/jobs/{job_id}", patch_job,
          "Cancel a job: a queued one at once, a running one as soon as its worker stops the solver.", "jobs",
          body={"$ref": "#/components/schemas/JobPatch"},
          ok_schema={"type": "object", "properties": {"job": {"$ref": "#/components/schemas/Job"}}},
          errors=(400, 404, 415, 422)),
    Route("GET", "/api/workers", list_workers, "Job workers and their state.", "jobs",
          ok_schema={"type": "object", "properties": {"backend": {"type": "string"}, "workers": _RECORDS}}),
    Route("GET", "/api/runs", list_runs, "Stored runs (one metadata row each), filtered, ordered and paged.",
          "runs",
          query=(
              QueryParam("where", "A SQL condition over the runs' columns, e.g. `gap < 0.05 AND n_beams = 7`.",
                         {"type": "string"}),
              QueryParam("order_by", "`column`, `column asc|desc` or `-column` (comma-separated, up to 4); "
                                     "columns of the runs table only. Default `created_at desc`.",
                         {"type": "string"}),
              QueryParam("limit", f"Page size (default {DEFAULT_RUNS_LIMIT}).",
                         {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
              QueryParam("offset", "Rows to skip.", {"type": "integer", "minimum": 0}),
          ),
          ok_schema={"type": "object", "properties": {"runs": _RECORDS, "total": {"type": "integer"},
                                                      "limit": {"type": "integer"}, "offset": {"type": "integer"},
                                                      "order_by": {"type": "string"}}},
          errors=(400,)),
    Route("GET", "/api/runs/{run_id}", get_run, "A run's metadata, config and list of files.", "runs",
          ok_schema={"type": "object", "properties": {
              "run_id": {"type": "string"}, "metadata": _OBJ, "config": {"$ref": "#/components/schemas/RunConfig"},
              "artifacts": {"type": "array", "items": {"type": "string"}}}},
          errors=(400, 404)),
    Route("GET", "/api/runs/{run_id}/dvh", _table_handler("dvh"),
          "The run's DVH: structure, dose_gy, volume_pct.", "runs", ok_schema=_table_schema(), errors=(400, 404)),
    Route("GET", "/api/runs/{run_id}/metrics", _table_handler("metrics"),
          "The run's dose metrics per structure.", "runs", ok_schema=_table_schema(), errors=(400, 404)),
    Route("GET", "/api/runs/{run_id}/criteria", _table_handler("criteria"),
          "The run's clinical criteria and whether each passes.", "runs", ok_schema=_table_schema(),
          errors=(400, 404)),
    Route("GET", "/api/runs/{run_id}/progress", _table_handler("progress"),
          "The solver's progress trace: elapsed_s, incumbent, bound, gap, nodes.", "runs",
          ok_schema=_table_schema(), errors=(400, 404)),
    Route("GET", "/api/runs/{run_id}/artifacts/{name}", get_artifact,
          "One file of the run folder, as stored.", "runs", ok_content_type="application/octet-stream",
          errors=(400, 404)),
    Route("GET", "/api/runs/{run_id}/dose.npz", get_dose_npz,
          "The run's 3-D dose (total Gy, float32, (z, y, x) on the CT grid) as a NumPy .npz with `dose_3d_gy`.",
          "runs", ok_content_type="application/octet-stream", errors=(400, 404)),
    Route("GET", "/api/runs/{run_id}/full_dose", get_full_dose,
          "The run's full-resolution evaluation (every dose voxel, every original beamlet): status ready with its "
          "DVH, metrics and criteria, or pending / not_computed.", "runs",
          ok_schema={"$ref": "#/components/schemas/FullDose"}, errors=(400, 404)),
    Route("POST", "/api/runs/{run_id}/full_dose", post_full_dose,
          "Queue the run's full-resolution dose reconstruction (a job of kind dose; 200 when already computed). "
          "The reply's Location header is the job's URL.", "runs",
          ok_status=202, ok_schema={"type": "object", "properties": {
              "run_id": {"type": "string"}, "status": {"type": "string"}, "job_id": {"type": "string"},
              "url": {"type": "string"}}}, errors=(400, 404),
          also_ok={200: "Already computed: nothing queued; `url` is the evaluation's."}),
    Route("GET", "/api/runs/{run_id}/full_dose.npz", get_full_dose_npz,
          "The run's full-resolution 3-D dose (total Gy, float32, (z, y, x) on the CT grid) as a NumPy .npz with "
          "`dose_3d_gy`; 404 until computed.", "runs", ok_content_type="application/octet-stream",
          errors=(400, 404)),
)


# --------------------------------------------------------------------------------------------------------------
# OpenAPI document


def _type_schema(hint: Any, refs: dict[type, str]) -> dict:
    """JSON schema of a dataclass field's type (the config dataclasses' own annotations)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint in refs:
        return {"$ref": f"#/components/schemas/{refs[hint]}"}
    if origin in (typing.Union, __import__("types").UnionType):
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1 and len(args) == 2:
            inner = _type_schema(non_null[0], refs)
            if "type" in inner and isinstance(inner["type"], str):
                return {**inner, "type": [inner["type"], "null"]}
            return {"anyOf": [inner, {"type": "null"}]}
        return {"anyOf": [_type_schema(a, refs) for a in args]}
    if origin in (list, tuple):
        return {"type": "array", "items": _type_schema(args[0], refs) if args else {}}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1], refs) if len(args) == 2 else {}}
    return {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
            bool: {"type": "boolean"}}.get(hint, {})


def _dataclass_schema(cls: type, refs: dict[type, str], extra: dict[str, dict] | None = None) -> dict:
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in fields(cls):
        props[f.name] = {**_type_schema(hints[f.name], refs), **(extra or {}).get(f.name, {})}
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(f.name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def component_schemas() -> dict:
    from vmat_core import config as c

    refs = {c.ObjectiveRow: "ObjectiveRow", c.ConstraintRow: "ConstraintRow", c.SolverSettings: "SolverSettings"}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message"],
        "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}}}
    return {
        "Error": error,
        "RunConfig": _dataclass_schema(c.RunConfig, refs, {
            "protocol": {"enum": list(c.shipped_protocols())},
            "case_id": {"description": "A case id of GET /api/cases."},
        }),
        "ObjectiveRow": _dataclass_schema(c.ObjectiveRow, refs, {
            "type": {"enum": list(c.OBJECTIVE_TYPES)}, "role": {"enum": ["", *c.ROLES]}}),
        "ConstraintRow": _dataclass_schema(c.ConstraintRow, refs, {"type": {"enum": list(c.CONSTRAINT_TYPES)}}),
        "SolverSettings": _dataclass_schema(c.SolverSettings, refs, {"solver": {"enum": list(c.SOLVER_NAMES)}}),
        "PartialSubmission": {
            "type": "object", "required": ["case_id"], "additionalProperties": False,
            "description": "The case's default config (PortPy's example settings) with CLI-style overrides.",
            "properties": {
                "case_id": {"type": "string"},
                "overrides": {"type": "array", "items": {"type": "string"}, "maxItems": 500,
                              "examples": [["CORD/quadratic.weight=20", "solver.time_limit_s=30",
                                            "beam_ids=0,11,22"]]},
            },
        },
        "Submission": {"oneOf": [{"$ref": "#/components/schemas/RunConfig"},
                                 {"$ref": "#/components/schemas/PartialSubmission"}]},
        "FullDose": {"type": "object", "properties": {
            "run_id": {"type": "string"}, "status": {"enum": ["ready", "pending", "not_computed"]},
            "dvh": _RECORDS, "metrics": _RECORDS, "criteria": _RECORDS, "dose_url": {"type": "string"},
            "job_url": {"type": ["string", "null"]}, "message": {"type": "string"}}},
        "Submitted": {"type": "object", "properties": {
            "job_id": {"type": "string"}, "status": {"type": "string"}, "url": {"type": "string"},
            "config_hash": {"type": "string"}}},
        "JobPatch": {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
            "action": {"const": "cancel"}, "status": {"const": "cancelled"}}},
        "Job": {"type": "object", "properties": {
            "job_id": {"type": "string"}, "case_id": {"type": "string"}, "status": {"type": "string"},
            "run_id": {"type": ["string", "null"]}, "error": {"type": ["string", "null"]},
            "created_at": {"type": "number"}, "started_at": {"type": ["number", "null"]},
            "finished_at": {"type": ["number", "null"]}, "config": {"$ref": "#/components/schemas/RunConfig"},
            "progress": _OBJ, "url": {"type": "string"}}},
        "Case": {"type": "object", "properties": {
            "case_id": {"type": "string"}, "disease_site": {"type": "string"},
            "structure_names": {"type": "array", "items": {"type": "string"}},
            "beam_ids": {"type": "array", "items": {"type": "integer"}},
            "protocols": {"type": "array", "items": {"type": "string"}},
            "protocol": {"type": "string"}, "prescription_gy": {"type": ["number", "null"]},
            "num_fractions": {"type": ["integer", "null"]}}},
        "ReferenceDose": {"type": "object", "properties": {
            "case_id": {"type": "string"}, "prescription_gy": {"type": ["number", "null"]},
            "dvh": _RECORDS, "metrics": _RECORDS, "criteria": _RECORDS,
            "full_resolution": {"type": ["object", "null"], "properties": {
                "dvh": _RECORDS, "metrics": _RECORDS, "criteria": _RECORDS}}}},
    }


_STATUS_TEXT = {
    400: "Malformed request (bad id, query value or JSON).",
    401: "Authentication required (the server runs with basic auth).",
    404: "No such case, run, job, file or route.",
    409: "The job is not in a state that allows this.",
    413: "Request body too large.",
    415: "The body must be application/json.",
    422: "Well-formed JSON that is not a valid config or request; `field` names the culprit.",
    500: "Internal error.",
}


def openapi_document(routes: tuple[Route, ...] = ROUTES) -> dict:
    """OpenAPI 3.1 description generated from the route table."""
    from vmat_core import __version__

    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    paths: dict[str, dict] = {}
    for r in routes:
        params = []
        for name in r.path_params:
            desc, schema = _PATH_PARAMS[name]
            params.append({"name": name, "in": "path", "required": True, "description": desc, "schema": schema})
        for q in r.query:
            params.append({"name": q.name, "in": "query", "required": False, "description": q.description,
                           "schema": q.schema})
        ok: dict[str, Any] = {"description": "OK" if r.ok_status == 200 else "Accepted"}
        if r.ok_content_type == "application/json":
            ok["content"] = {"application/json": {"schema": r.ok_schema or _OBJ}}
        else:
            binary = {"type": "string", "contentMediaType": r.ok_content_type}
            ok["content"] = {r.ok_content_type: {"schema": binary}}
        if r.ok_status == 202:
            ok["headers"] = {"Location": {"description": "URL of the new job.", "schema": {"type": "string"}}}
        responses: dict[str, Any] = {str(r.ok_status): ok}
        for code, meaning in r.also_ok.items():
            responses[str(code)] = {"description": meaning,
                                    "content": {"application/json": {"schema": r.ok_schema or _OBJ}}}
        for code in sorted({*r.errors, 401, 500}):
            responses[str(code)] = {"description": _STATUS_TEXT[code], "content": error_ref}
        op: dict[str, Any] = {"operationId": r.operation_id, "summary": r.summary, "tags": [r.tag],
                              "parameters": params, "responses": responses}
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": r.body}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "VMAT Planner API",
            "version": f"{API_VERSION} (vmat-planner {__version__})",
            "description": "Cases, optimisation jobs and stored runs of VMAT Planner. Errors are "
                           "`{\"error\": {\"field\"?, \"message\"}}`; NaN values are null.",
        },
        "paths": paths,
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                "basicAuth": {"type": "http", "scheme": "basic",
                              "description": "Only when the server runs with --basic-auth."},
                "loginCookie": {"type": "apiKey", "in": "cookie", "name": "user",
                                "description": "Set by the server's /login page when it runs with --basic-auth."},
            },
        },
        "security": [{}, {"basicAuth": []}, {"loginCookie": []}],
    }


# --------------------------------------------------------------------------------------------------------------
# Tornado


@dataclass(frozen=True)
class ApiSettings:
    """Server-wide API options.

    ``basic_auth``: the server's basic-auth secret as Panel takes it (one password, a ``{user: password}`` dict or
    the path of a JSON file holding one), so scripts can send the same credentials as an Authorization header.
    ``allowed_hosts``: Host header values accepted (``host:port``, lower case); None accepts any. A server bound
    to this machine only lists its loopback names, which defeats DNS-rebinding pages in a local browser."""

    basic_auth: str | dict | None = None
    allowed_hosts: frozenset[str] | None = None


def _check_password(secret: str | dict | None, user: str, password: str) -> bool:
    if secret is None:
        return False
    if isinstance(secret, str) and os.path.isfile(secret):
        try:
            with open(secret, encoding="utf-8") as fh:
                secret = json.load(fh)
        except (OSError, ValueError):
            return False
    if isinstance(secret, dict):
        expected = secret.get(user)
        return isinstance(expected, str) and hmac.compare_digest(expected.encode(), password.encode())
    return isinstance(secret, str) and hmac.compare_digest(secret.encode(), password.encode())


class ApiHandler(AuthRequestHandler):
    """Serves the routes of one path template (one Route per HTTP method)."""

    SUPPORTED_METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS")

    def initialize(self, routes: dict[str, Route], settings: ApiSettings) -> None:
        self.routes = routes
        self.api_settings = settings

    def check_xsrf_cookie(self) -> None:
        # Bodies must be application/json (see parse_json_body), which other sites cannot send without CORS.
        return None

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    async def prepare(self) -> None:
        hosts = self.api_settings.allowed_hosts
        if hosts is not None and self.request.host.lower() not in hosts:
            self._send_error(ApiError(403, f"Host {self.request.host[:80]!r} is not served here; use "
                                           f"{', '.join(sorted(hosts))}"))
            return
        await super().prepare()
        if self._auth_enabled() and not self.current_user and not self._authorization_ok():
            self._send_error(ApiError(401, "authentication required: log in at /login, or send the same "
                                           "credentials as HTTP basic auth",
                                      headers={"WWW-Authenticate": 'Basic realm="VMAT Planner", charset="UTF-8"'}))

    def _auth_enabled(self) -> bool:
        provider = self.application.auth_provider
        return bool(provider.get_user or provider.get_user_async)

    def _authorization_ok(self) -> bool:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not token:
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        if sep and _check_password(self.api_settings.basic_auth, user, password):
            self.current_user = user
            return True
        return False

    def _send_error(self, err: ApiError) -> None:
        if self._finished:
            return
        self.clear()
        self.set_status(err.status)
        for k, v in err.headers.items():
            self.set_header(k, v)
        err.message = scrub_paths(err.message)
        self.finish(json_bytes(err.body()))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Errors raised by Tornado itself (undecodable path, unsupported method) are JSON too.
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = exc.log_message if isinstance(exc, HTTPError) and exc.log_message else self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json_bytes(ApiError(status_code, message).body()))

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "path or query is not valid UTF-8") from None

    async def get(self, *args: str) -> None:
        await self._dispatch("GET", args)

    async def post(self, *args: str) -> None:
        await self._dispatch("POST", args)

    async def patch(self, *args: str) -> None:
        await self._dispatch("PATCH", args)

    async def put(self, *args: str) -> None:
        await self._dispatch("PUT", args)

    async def delete(self, *args: str) -> None:
        await self._dispatch("DELETE", args)

    async def head(self, *args: str) -> None:
        await self._dispatch("HEAD", args)

    async def options(self, *args: str) -> None:
        await self._dispatch("OPTIONS", args)

    async def _dispatch(self, method: str, args: tuple[str, ...]) -> None:
        t0 = time.perf_counter()
        route = self.routes.get(method)
        try:
            if route is None:
                if not self.routes:
                    raise ApiError(404, f"no API route {self.request.path[:120]}; see {API_PREFIX}/openapi.json")
                allowed = ", ".join(sorted(self.routes))
                raise ApiError(405, f"{method} is not allowed here; allowed: {allowed}",
                               headers={"Allow": allowed})
            body = None
            if route.body is not None:
                body = parse_json_body(self.request.body, self.request.headers.get("Content-Type"))
            query = {}
            for k, values in self.request.query_arguments.items():
                query[k] = [self.decode_argument(v) for v in values]
            req = ApiRequest(args=dict(zip(route.path_params, args, strict=True)), query=query, body=body)
            result = await asyncio.get_running_loop().run_in_executor(_EXECUTOR, route.handler, req)
        except HTTPError as exc:
            self._send_error(ApiError(exc.status_code, exc.log_message or "bad request"))
            return
        except Exception as exc:  # noqa: BLE001  (every failure becomes a JSON error, never an HTML page)
            self._send_error(_map_exception(exc))
            return
        reply = result if isinstance(result, Reply) else Reply(body=result)
        self.set_status(reply.status)
        for k, v in reply.headers.items():
            self.set_header(k, v)
        if reply.raw is not None:
            self.set_header("Content-Type", reply.content_type)
            self.finish(reply.raw)
        else:
            self.finish(json_bytes(reply.body))
        log.debug("%s %s %.0f ms", method, self.request.path, 1000 * (time.perf_counter() - t0))


def _pattern(template: str) -> str:
    # One path segment per parameter: Tornado matches the still-encoded path, so an encoded slash (%2F) stays
    # inside the segment and is refused by the id checks after decoding.
    return _SEGMENT_RE.sub(r"([^/]+)", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")) + "$"


def url_patterns(settings: ApiSettings | None = None) -> list[tuple]:
    """Tornado URL specs for ``pn.serve(..., extra_patterns=...)``: the routes, then a JSON 404 for the rest."""
    settings = settings or ApiSettings()
    by_path: dict[str, dict[str, Route]] = {}
    for r in ROUTES:
        by_path.setdefault(r.path, {})[r.method] = r
    specs = [
        (_pattern(path), ApiHandler, {"routes": routes, "settings": settings}) for path, routes in by_path.items()
    ]
    specs.append((rf"{API_PREFIX}(?:/.*)?$", ApiHandler, {"routes": {}, "settings": settings}))
    return specs
