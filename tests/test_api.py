"""The HTTP JSON API, over real HTTP against the real server (``python -m app.server``) on 127.0.0.1.

One server process serves the whole module from the session data directory (its ``portpy`` folder links to the
built synthetic case); a tiny optimisation runs through the real job worker and solver once, and the run it
writes is then read back through every run endpoint.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import MISSING, fields
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app import api
from vmat_core import cases
from vmat_core.config import ConfigError, RunConfig, default_config, validate_config
from vmat_core.store import RunStore

CASE = "Lung_Synth_Patient_1"
TINY = {
    "case_id": CASE,
    "overrides": ["beam_ids=0,36", "voxel_down_sample_factors=12,12,2", "solver.time_limit_s=10"],
}
REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 300
UNKNOWN_RUN = "20000101T000000Z-0123456789"
UNKNOWN_JOB = "j-20000101-000000-abcdef"


# ------------------------------------------------------------------------------------------------ helpers


def strict_json(resp: httpx.Response):
    """The body as JSON, refusing NaN/Infinity (a browser's JSON.parse would) and non-JSON content types."""
    assert resp.headers["content-type"].startswith("application/json"), resp.headers["content-type"]

    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token} in {resp.request.url}")

    return json.loads(resp.text, parse_constant=refuse)


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = strict_json(resp)
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


class Server:
    """A ``python -m app.server`` subprocess; the worker pids it reports are stopped with it."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.server", "--port", "0", *args],
            cwd=REPO, env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self.worker_pids: list[int] = []
        self._url: Future = Future()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._url.result(timeout=120)
        self.port = int(self.url.rsplit(":", 1)[1])
        # The server prints its address before it listens: wait until it answers.
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{self.url}/api/openapi.json", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("server did not start:\n" + "\n".join(self.lines)) from None
                time.sleep(0.2)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if m := re.search(r"Started \d+ job worker\(s\): pid ([\d, ]+)", line):
                self.worker_pids += [int(p) for p in m.group(1).split(",")]
            if (m := re.search(r"VMAT Planner on (http://127\.0\.0\.1:\d+)/", line)) and not self._url.done():
                self._url.set_result(m.group(1))
        if not self._url.done():
            self._url.set_exception(RuntimeError("server exited:\n" + "\n".join(self.lines)))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in self.worker_pids:  # detached workers outlive the server by design
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def server(session_data_dir, case_dir):
    srv = Server("--workers", "1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference_reply(server) -> Future:
    """The reference-dose request, started early: its first evaluation takes a while and runs meanwhile."""
    pool = ThreadPoolExecutor(max_workers=1)
    fut = pool.submit(httpx.get, f"{server.url}/api/cases/{CASE}/reference_dose", timeout=JOB_TIMEOUT_S)
    yield fut
    pool.shutdown(wait=True)


def job_count(client: httpx.Client) -> int:
    return strict_json(client.get("/api/jobs", params={"limit": api.MAX_LIMIT}))["count"]


def wait_for_job(client: httpx.Client, url: str, timeout_s: float = JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = strict_json(client.get(url))
        if body["job"]["status"] in ("done", "failed", "cancelled", "lost"):
            return body
        assert time.monotonic() < deadline, f"job still {body['job']['status']} after {timeout_s} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def submitted(client) -> httpx.Response:
    """The tiny optimisation, submitted (the first test requests it, so the worker starts on it early)."""
    return client.post("/api/jobs", json=TINY)


@pytest.fixture(scope="module")
def done_job(client, submitted) -> dict:
    """The tiny optimisation, run by the worker and finished."""
    assert submitted.status_code == 202, submitted.text
    body = strict_json(submitted)
    assert re.fullmatch(api.JOB_ID_RE, body["job_id"])
    assert submitted.headers["location"] == f"/api/jobs/{body['job_id']}" == body["url"]
    final = wait_for_job(client, submitted.headers["location"])
    assert final["job"]["status"] == "done", final["job"].get("error")
    return final


def raw_get(server: Server, path: str, headers: dict | None = None) -> tuple[int, str, str]:
    """GET with the path sent byte for byte (httpx would normalise dot segments away)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        headers = {"Host": f"127.0.0.1:{server.port}", **(headers or {})}
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------- cases


def test_cases_list_and_detail(client, submitted, reference_reply):
    listed = strict_json(client.get("/api/cases"))["cases"]
    assert CASE in [c["case_id"] for c in listed]
    info = cases.case_info(CASE)
    detail = strict_json(client.get(f"/api/cases/{CASE}"))
    assert detail["case_id"] == CASE
    assert detail["structure_names"] == list(info.structure_names)
    assert detail["beam_ids"] == list(info.beam_ids)
    assert detail["ct_shape_zyx"] == list(info.ct_shape_zyx)
    # The Lung_2Gy_30Fx protocol: 30 fractions of 2 Gy.
    assert (detail["protocol"], detail["num_fractions"], detail["prescription_gy"]) == ("Lung_2Gy_30Fx", 30, 60.0)
    assert "path" not in detail  # the server's file system is none of a client's business


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/cases/Lung_Nobody_Patient_9", 404),
        ("/api/cases/..", 400),
        ("/api/cases/%2e%2e", 400),
        ("/api/cases/..%2F..%2Fetc", 400),
        ("/api/cases/%2Fetc%2Fpasswd", 400),
        ("/api/cases/a%5C..%5Cb", 400),
        ("/api/cases/.hidden/reference_dose", 400),
        ("/api/cases/Lung_Nobody_Patient_9/reference_dose", 404),
    ],
)
def test_case_ids_refused(server, path, status):
    code, ctype, text = raw_get(server, path)
    assert (code, ctype.split(";")[0]) == (status, "application/json"), text
    assert json.loads(text)["error"]["field"] == "case_id"


def test_reference_dose(client, reference_reply):
    resp = reference_reply.result(timeout=JOB_TIMEOUT_S)
    assert resp.status_code == 200, resp.text[:500]
    ref = strict_json(resp)
    assert ref["prescription_gy"] == 60.0
    assert ref["dose_shape_zyx"] == list(cases.case_info(CASE).ct_shape_zyx)
    structures = {r["structure"] for r in ref["dvh"]}
    assert {"PTV", "CORD", "HEART"} <= structures
    ptv = next(m for m in ref["metrics"] if m["structure"] == "PTV")
    # The shipped reference plan covers its target: PTV D95 near the prescription.
    assert 50 < ptv["d95_gy"] < 66
    assert {c["status"] for c in ref["criteria"]} <= {"pass", "goal_missed", "fail", "not_evaluated"}
    # The same dose on every dose voxel: its own tables, close to the optimisation grid's but not the same.
    full = ref["full_resolution"]
    full_ptv = next(m for m in full["metrics"] if m["structure"] == "PTV")
    assert abs(full_ptv["d95_gy"] - ptv["d95_gy"]) < 3
    assert len(full["dvh"]) > 0 and full["dvh"] != ref["dvh"]
    assert [(c["structure"], c["criterion"]) for c in full["criteria"]] == \
        [(c["structure"], c["criterion"]) for c in ref["criteria"]]


# -------------------------------------------------------------------------------------------------- jobs


def test_submit_poll_done_and_read_the_run(client, done_job, case_dir):
    job = done_job["job"]
    run_id = job["run_id"]
    assert job["case_id"] == CASE and run_id and job["run_url"] == f"/api/runs/{run_id}"
    assert done_job["events"], "the worker reported no progress"
    assert {e.get("phase") for e in done_job["events"]} >= {"load", "solve"}

    listed = strict_json(client.get("/api/jobs", params={"status": "done", "case_id": CASE}))
    assert job["job_id"] in [j["job_id"] for j in listed["jobs"]]

    run = strict_json(client.get(f"/api/runs/{run_id}"))
    assert run["metadata"]["case_id"] == CASE and run["metadata"]["n_beams"] == 2
    assert run["config"]["beam_ids"] == [0, 36]
    assert run["config"]["voxel_down_sample_factors"] == [12, 12, 2]
    assert {"config.json", "dose.npz", "dvh.parquet"} <= set(run["artifacts"])

    dvh = strict_json(client.get(f"/api/runs/{run_id}/dvh"))
    assert dvh["columns"] == ["structure", "dose_gy", "volume_pct"]
    ptv = [r for r in dvh["records"] if r["structure"] == "PTV"]
    assert ptv and max(r["volume_pct"] for r in ptv) == pytest.approx(100.0)
    metrics = strict_json(client.get(f"/api/runs/{run_id}/metrics"))["records"]
    assert any(m["structure"] == "PTV" and m["is_target"] for m in metrics)
    criteria = strict_json(client.get(f"/api/runs/{run_id}/criteria"))["records"]
    assert criteria and all(c["status"] in ("pass", "goal_missed", "fail", "not_evaluated") for c in criteria)
    progress = strict_json(client.get(f"/api/runs/{run_id}/progress"))
    assert progress["columns"] == ["elapsed_s", "incumbent", "bound", "gap", "nodes"] and progress["records"]

    cfg_file = client.get(f"/api/runs/{run_id}/artifacts/config.json")
    assert strict_json(cfg_file) == run["config"]
    dose_resp = client.get(f"/api/runs/{run_id}/dose.npz")
    assert dose_resp.status_code == 200 and "attachment" in dose_resp.headers["content-disposition"]
    import io

    with np.load(io.BytesIO(dose_resp.content), allow_pickle=False) as npz:
        assert npz.files == ["dose_3d_gy"]
        dose = npz["dose_3d_gy"]
    assert dose.shape == cases.case_info(CASE).ct_shape_zyx
    assert dose.max() == pytest.approx(max(m["max_gy"] for m in metrics), rel=0.05)


def test_full_resolution_dose_of_a_run(client, done_job, case_dir):
    run_id = done_job["job"]["run_id"]
    url = f"/api/runs/{run_id}/full_dose"
    before = strict_json(client.get(url))
    assert before["status"] == "not_computed" and f"POST /api/runs/{run_id}/full_dose" in before["message"]
    err = error_of(client.get(f"{url}.npz"), 404)
    assert err["field"] == "run_id" and "not computed" in err["message"]

    queued = client.post(url)
    assert queued.status_code == 202, queued.text
    body = strict_json(queued)
    assert queued.headers["location"] == body["url"] == f"/api/jobs/{body['job_id']}"
    assert strict_json(client.post(url)).get("job_id") in (body["job_id"], None)  # the same job, or done already
    if strict_json(client.get(url))["status"] == "pending":
        assert strict_json(client.get(url))["job_url"] == body["url"]
    final = wait_for_job(client, body["url"])
    assert final["job"]["status"] == "done" and final["job"]["kind"] == "dose", final["job"].get("error")

    ready = strict_json(client.get(url))
    assert ready["status"] == "ready" and ready["dose_url"] == f"{url}.npz"
    opt_metrics = strict_json(client.get(f"/api/runs/{run_id}/metrics"))["records"]
    full_ptv = next(m for m in ready["metrics"] if m["structure"] == "PTV")
    opt_ptv = next(m for m in opt_metrics if m["structure"] == "PTV")
    assert full_ptv["mean_gy"] == pytest.approx(opt_ptv["mean_gy"], rel=0.15)
    assert ready["dvh"] != strict_json(client.get(f"/api/runs/{run_id}/dvh"))["records"]
    import io

    with np.load(io.BytesIO(client.get(f"{url}.npz").content), allow_pickle=False) as npz:
        assert npz["dose_3d_gy"].shape == cases.case_info(CASE).ct_shape_zyx
    again = client.post(url)
    assert again.status_code == 200 and strict_json(again)["status"] == "ready"
    error_of(client.get(f"/api/runs/{UNKNOWN_RUN}/full_dose"), 404)


def test_runs_query(client, done_job):
    run_id = done_job["job"]["run_id"]
    where = f"n_beams = 2 AND case_id = '{CASE}'"
    found = strict_json(client.get("/api/runs", params={"where": where}))
    assert run_id in [r["run_id"] for r in found["runs"]] and found["total"] >= 1
    none = strict_json(client.get("/api/runs", params={"where": "n_beams > 1000"}))
    assert none == {**none, "runs": [], "total": 0}
    ordered = strict_json(client.get("/api/runs", params={"order_by": "-created_at", "limit": 1}))
    assert len(ordered["runs"]) == 1 and ordered["order_by"] == "created_at DESC"
    for params, fld in [
        ({"where": "1; DROP TABLE runs"}, "where"),
        ({"where": "read_csv('/etc/passwd') IS NOT NULL"}, "where"),
        ({"where": "no_such_column > 1"}, "where"),
        ({"order_by": "objective; DROP"}, "order_by"),
        ({"order_by": "no_such_column"}, "order_by"),
        ({"limit": "0"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
    ]:
        assert error_of(client.get("/api/runs", params=params), 400).get("field") == fld, params


def test_cancel(client, done_job):
    # A config of its own (another time limit), so the ledger does not merge it with an earlier job.
    body = {**TINY, "overrides": [*TINY["overrides"], "solver.time_limit_s=60", "beam_ids=0,12,24"]}
    resp = client.post("/api/optimize", json=body)
    assert resp.status_code == 202, resp.text
    url = resp.headers["location"]
    patched = client.patch(url, json={"action": "cancel"})
    assert patched.status_code == 200, patched.text
    assert strict_json(patched)["job"]["status"] in ("cancelled", "cancelling")
    final = wait_for_job(client, url, timeout_s=120)
    assert final["job"]["status"] == "cancelled"
    # Cancelling again changes nothing; {"status": "cancelled"} is the other spelling.
    again = client.patch(url, json={"status": "cancelled"})
    assert strict_json(again)["job"]["status"] == "cancelled"


def test_job_errors(client, server):
    error_of(client.get(f"/api/jobs/{UNKNOWN_JOB}"), 404)
    assert error_of(client.get("/api/jobs/not-a-job"), 400)["field"] == "job_id"
    assert error_of(client.get("/api/jobs", params={"status": "sleeping"}), 400)["field"] == "status"
    error_of(client.patch(f"/api/jobs/{UNKNOWN_JOB}", json={"action": "cancel"}), 404)
    assert error_of(client.patch(f"/api/jobs/{UNKNOWN_JOB}", json={"action": "restart"}), 422)["field"] == "action"
    json_type = {"content-type": "application/json"}
    error_of(client.patch(f"/api/jobs/{UNKNOWN_JOB}", content=b"{oops", headers=json_type), 400)
    for path in ("/api/jobs/..%2F..%2Fledger", "/api/jobs/%2e%2e", "/api/jobs/j-20000101-000000-abcdef%2F.."):
        code, _, text = raw_get(server, path)
        assert code == 400 and json.loads(text)["error"]["field"] == "job_id", (path, text)
    workers = strict_json(client.get("/api/workers"))
    assert workers["backend"] == "embedded" and isinstance(workers["workers"], list)


def test_submission_errors_queue_nothing(client):
    before = job_count(client)
    cases_ = [
        (b"{not json", "application/json", 400, "body"),
        (b"", "application/json", 400, "body"),
        (b'{"case_id": NaN}', "application/json", 400, "body"),
        (b'{"case_id": "a", "case_id": "b"}', "application/json", 400, "body"),
        (b"\xff\xfe{}", "application/json", 400, "body"),
        (b"[" * 100_000, "application/json", 400, "body"),
        (json.dumps(TINY).encode(), "text/plain", 415, "body"),
        (json.dumps(TINY).encode(), "application/x-www-form-urlencoded", 415, "body"),
        (b" " * (api.MAX_BODY_BYTES + 1), "application/json", 413, "body"),
        (b"[]", "application/json", 422, "config"),
        (b'{"case_id": "Lung_Nobody_Patient_9"}', "application/json", 422, "case_id"),
        (json.dumps({**TINY, "overrides": ["CORD/quadratic.weight=-5"]}).encode(), "application/json", 422,
         "CORD/quadratic.weight"),
        (json.dumps({**TINY, "overrides": ["beam_ids=0,500"]}).encode(), "application/json", 422, "beam_ids[1]"),
        (json.dumps({**TINY, "overrides": "beam_ids=0"}).encode(), "application/json", 422, "overrides"),
        (json.dumps({**TINY, "priority": 1}).encode(), "application/json", 422, "priority"),
    ]
    for raw, ctype, status, fld in cases_:
        resp = client.post("/api/optimize", content=raw, headers={"content-type": ctype})
        assert error_of(resp, status).get("field") == fld, (raw[:60], resp.text[:300])
    assert job_count(client) == before


# ------------------------------------------------------------------------------------------------- runs


def test_run_ids_and_artifact_names_refused(client, server, done_job):
    run_id = done_job["job"]["run_id"]
    assert error_of(client.get(f"/api/runs/{UNKNOWN_RUN}"), 404)["field"] == "run_id"
    assert error_of(client.get(f"/api/runs/{UNKNOWN_RUN}/dvh"), 404)["field"] == "run_id"
    assert error_of(client.get("/api/runs/latest"), 400)["field"] == "run_id"
    error_of(client.get(f"/api/runs/{run_id}/artifacts/no_such_file.json"), 404)
    secrets_ = ("root:", "origin_xyz_mm", "ct_hu_3d")  # /etc/passwd, a case's CT metadata
    for path in [
        f"/api/runs/{run_id}/artifacts/..",
        f"/api/runs/{run_id}/artifacts/%2e%2e",
        f"/api/runs/{run_id}/artifacts/..%2F..%2Fportpy%2F{CASE}%2FCT_MetaData.json",
        f"/api/runs/{run_id}/artifacts/%2Fetc%2Fpasswd",
        f"/api/runs/{run_id}/artifacts/..%5C..%5Cconfig.json",
        f"/api/runs/{run_id}/artifacts/.hidden",
        f"/api/runs/{run_id}/../../portpy/{CASE}/CT_MetaData.json",
        f"/api/runs/{run_id}/artifacts/../../../etc/passwd",
        "/api/runs/..%2F..%2Fportpy/dvh",
        "/api/runs/%2e%2e%2f%2e%2e/artifacts/CT_MetaData.json",
        "/api/runs/..",
        "/api/../../etc/passwd",
        "/api/runs/%00",
    ]:
        code, ctype, text = raw_get(server, path)
        assert code in (400, 404), (path, code, text[:200])
        assert ctype.startswith("application/json") and "error" in json.loads(text), path
        assert not any(s in text for s in secrets_), path


def test_symlinked_artifact_not_served(client, done_job, session_data_dir):
    run_id = done_job["job"]["run_id"]
    link = session_data_dir / "runs" / run_id / "escape.json"
    link.symlink_to(session_data_dir / "portpy" / CASE / "CT_MetaData.json")
    try:
        err = error_of(client.get(f"/api/runs/{run_id}/artifacts/escape.json"), 400)
        assert err["field"] == "name" and "origin_xyz_mm" not in err["message"]
    finally:
        link.unlink()


# ------------------------------------------------------------------------------------------ the document


def test_openapi_lists_every_route(client, done_job, reference_reply):
    reference_reply.result(timeout=JOB_TIMEOUT_S)  # so the probe below reads the cached reference
    doc = strict_json(client.get("/api/openapi.json"))
    assert doc["openapi"].startswith("3.1")
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(r.path, r.method) for r in api.ROUTES}
    assert len(documented) == len(api.ROUTES) == 21

    text = json.dumps(doc)
    for ref in set(re.findall(r'"\$ref": "#/components/schemas/(\w+)"', text)):
        assert ref in doc["components"]["schemas"], ref
    cfg_schema = doc["components"]["schemas"]["RunConfig"]
    assert set(cfg_schema["properties"]) == {f.name for f in fields(RunConfig)}
    assert set(cfg_schema["required"]) == {
        f.name for f in fields(RunConfig) if f.default is MISSING and f.default_factory is MISSING
    }

    # Every documented operation is served (none falls through to the catch-all "no API route").
    values = {"case_id": CASE, "run_id": done_job["job"]["run_id"], "job_id": done_job["job"]["job_id"],
              "name": "config.json"}
    for path, ops in doc["paths"].items():
        url = path.format(**values)
        for method, op in ops.items():
            assert {p["name"] for p in op["parameters"] if p["in"] == "path"} == set(re.findall(r"{(\w+)}", path))
            kwargs = {"patch": {"json": {"action": "cancel"}}, "post": {"json": []}}.get(method, {})
            resp = client.request(method.upper(), url, **kwargs)
            assert resp.status_code != 404 or "no API route" not in resp.text, (method, path)
            assert str(resp.status_code) in op["responses"], (method, path, resp.status_code)


def test_unknown_routes_and_methods(client):
    assert "no API route" in error_of(client.get("/api/nope"), 404)["message"]
    err = error_of(client.delete("/api/jobs"), 405)
    assert "GET" in err["message"] and "POST" in err["message"]


def test_host_header_checked_on_loopback(server):
    code, _, text = raw_get(server, "/api/cases", headers={"Host": "rebound.example:80"})
    assert code == 403 and "rebound.example" in json.loads(text)["error"]["message"]


# ----------------------------------------------------------------------------- malformed configs (property)

_VALID = default_config(CASE).to_dict()
_FIELDS = [f.name for f in fields(RunConfig)]
_REQUIRED = [f.name for f in fields(RunConfig) if f.default is MISSING and f.default_factory is MISSING]
_NUMERIC = ["prescription_gy", "num_fractions", "beamlet_down_sample_factor", "mu_bound"]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_not_numbers = (st.none() | st.booleans() | st.text(max_size=12) | st.lists(st.integers(), max_size=3)
                | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return True


@st.composite
def bad_submissions(draw) -> tuple[bytes, int]:
    """(body, expected status) of submissions that are malformed (400) or not a valid config (422)."""
    kind = draw(st.sampled_from(["bytes", "constant", "non_object", "unknown_key", "missing_key", "wrong_type",
                                 "bad_beam", "non_positive", "bad_override", "bad_case"]))
    d = json.loads(json.dumps(_VALID))
    if kind == "bytes":
        return draw(st.binary(max_size=60).filter(lambda b: not _is_json(b))), 400
    if kind == "constant":
        key = draw(st.sampled_from(_FIELDS))
        const = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        return json.dumps({**d, key: "@"}).replace('"@"', const).encode(), 400
    if kind == "non_object":
        return json.dumps(draw(_json_values.filter(lambda v: not isinstance(v, dict)))).encode(), 422
    if kind == "unknown_key":
        d[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in _FIELDS))] = draw(_json_values)
    elif kind == "missing_key":
        del d[draw(st.sampled_from(_REQUIRED))]
    elif kind == "wrong_type":
        d[draw(st.sampled_from(_NUMERIC))] = draw(_not_numbers)
    elif kind == "bad_beam":
        d["beam_ids"] = [0, draw(st.integers(min_value=72, max_value=10**6) | st.integers(max_value=-1))]
    elif kind == "non_positive":
        d[draw(st.sampled_from(["prescription_gy", "num_fractions", "mu_bound"]))] = draw(
            st.integers(max_value=0) | st.floats(max_value=0, allow_nan=False, allow_infinity=False))
    elif kind == "bad_override":
        junk = st.text(max_size=30).filter(lambda s: "=" not in s)
        d = {"case_id": CASE, "overrides": draw(st.lists(junk, min_size=1, max_size=3) | _json_values.filter(
            lambda v: not isinstance(v, list)))}
    elif kind == "bad_case":
        d = {"case_id": draw(_json_values.filter(lambda v: v not in cases.list_case_ids())), "overrides": []}
    return json.dumps(d).encode(), 422


_PROPERTY = settings(max_examples=50, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                            HealthCheck.data_too_large])


def test_malformed_configs_get_4xx_and_queue_nothing(client):
    before = job_count(client)
    seen: list[int] = []

    @_PROPERTY
    @given(bad_submissions())
    @example((b"[" * 50_000, 400))
    @example((json.dumps({"case_id": CASE, "overrides": ["solver.time_limit_s=-1"]}).encode(), 422))
    def check(case):
        raw, status = case
        resp = client.post("/api/optimize", content=raw, headers={"content-type": "application/json"})
        error_of(resp, status)
        seen.append(status)

    check()
    assert {400, 422} <= set(seen)
    assert job_count(client) == before
    assert client.get("/api/cases").status_code == 200  # still serving


@_PROPERTY
@given(bad_submissions())
def test_validator_rejects_the_same_configs(case):
    raw, status = case
    if status == 400:
        return  # not JSON at all: there is no config to validate
    body = json.loads(raw)
    with pytest.raises(ConfigError) as info:
        api.config_from_body(body)
    assert info.value.field and info.value.message
    if isinstance(body, dict) and "overrides" not in body and not set(body) <= {"case_id"}:
        with pytest.raises(ConfigError):
            validate_config(RunConfig.from_dict(body), cases.case_info(CASE))


# ------------------------------------------------------------------------------------------ authentication


def test_basic_auth_guards_pages_and_api(session_data_dir, case_dir, tmp_path):
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"planner": "correct horse battery"}))
    srv = Server("--workers", "0", "--basic-auth", str(users), "--cookie-secret", "x" * 40)
    good = ("planner", "correct horse battery")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            def jobs_now() -> int:
                return strict_json(c.get("/api/jobs", params={"limit": api.MAX_LIMIT}, auth=good))["count"]

            jobs_before = jobs_now()
            for method, path, kw in [
                ("GET", "/api/cases", {}),
                ("GET", "/api/openapi.json", {}),
                ("GET", f"/api/runs/{UNKNOWN_RUN}", {}),
                ("POST", "/api/jobs", {"json": TINY}),
                ("PATCH", f"/api/jobs/{UNKNOWN_JOB}", {"json": {"action": "cancel"}}),
            ]:
                resp = c.request(method, path, **kw)
                error_of(resp, 401)
                assert resp.headers["www-authenticate"].startswith("Basic")
            assert c.get("/api/jobs", auth=("planner", "wrong")).status_code == 401
            assert c.get("/api/jobs", auth=("intruder", "correct horse battery")).status_code == 401
            assert c.get("/api/jobs", headers={"Authorization": "Basic !!notbase64"}).status_code == 401
            assert strict_json(c.get("/api/cases", auth=good))["cases"]
            assert jobs_now() == jobs_before
            page = c.get("/")
            assert page.status_code == 302 and "/login" in page.headers["location"]

            # The page's login cookie opens the API too.
            login = c.post("/login", data={"username": "planner", "password": "correct horse battery"})
            assert login.status_code == 302 and "user" in c.cookies
            assert CASE in [x["case_id"] for x in strict_json(c.get("/api/cases"))["cases"]]
            assert c.get("/").status_code == 200
    finally:
        srv.stop()


def test_served_with_a_dask_scheduler_jobs_run_on_its_workers(session_data_dir, case_dir):
    """`--dask-scheduler` sends the API's jobs to a real Dask cluster; the server starts no local worker."""
    from distributed import LocalCluster

    bad = subprocess.run([sys.executable, "-m", "app.server", "--dask-scheduler", "host:8786"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "--dask-scheduler" in bad.stderr and "tcp://host:8786" in bad.stderr

    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        env = {k: v for k, v in os.environ.items() if k != "VMAT_DASK_SCHEDULER"}
        srv = Server("--dask-scheduler", cluster.scheduler_address, "--workers", "1", env=env)
        try:
            assert any("Dask scheduler " + cluster.scheduler_address in line for line in srv.lines)
            assert srv.worker_pids == []
            from vmat_core.jobs import Ledger

            ledger = Ledger()
            embedded_before = {w["id"] for w in ledger.worker_records()}
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                # Opening the Plan page starts no local worker either: jobs go to the cluster.
                assert c.get("/").status_code == 200
                time.sleep(1.0)
                assert {w["id"] for w in ledger.worker_records()} == embedded_before
                ledger.close()
                workers = strict_json(c.get("/api/workers"))
                listed = workers["workers"]
                assert workers["backend"] == "dask" and [w["backend"] for w in listed] == ["dask"]
                reply = c.post("/api/jobs", json={**TINY, "overrides": TINY["overrides"] + ["label=via dask"]})
                assert reply.status_code == 202, reply.text
                final = wait_for_job(c, reply.headers["location"])
            job = final["job"]
            assert job["status"] == "done" and job["backend"] == "dask", job.get("error")
            assert job["worker_id"] == listed[0]["id"]
            assert RunStore().read_metadata(job["run_id"])["label"] == "via dask"
        finally:
            srv.stop()
