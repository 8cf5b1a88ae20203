"""Start the Panel server that hosts the app's pages and its HTTP JSON API (``/api/``).

By default the server listens on 127.0.0.1 only. Bound to another address it should run with ``--basic-auth``
(see docs/serving.md): the pages and the API then require the same login.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import sys

BASIC_AUTH_ENV = "VMAT_BASIC_AUTH"
COOKIE_SECRET_ENV = "VMAT_COOKIE_SECRET"


def pages() -> dict:
    """URL → page factory. Every page is a function so that each browser session gets its own objects."""
    from app.history_page import create_history_page
    from app.jobs_page import create_jobs_page
    from app.main import create_app

    return {"/": create_app, "/history": create_history_page, "/jobs": create_jobs_page}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("0.0.0.0", "::") else "", 0))
        return s.getsockname()[1]


def _origins(host: str, port: int, extra: list[str]) -> list[str]:
    names = {host, "localhost", "127.0.0.1"}
    if not is_loopback(host):
        # Browsers on other machines reach a wildcard-bound server by this machine's names.
        names |= {socket.gethostname(), socket.getfqdn()}
        try:
            names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
        except OSError:
            pass
        names.discard("0.0.0.0")
        names.discard("::")
    return sorted({f"{n}:{port}" for n in names if n} | set(extra))


def _start_workers(n: int) -> None:
    from app import main
    from vmat_core import jobs

    # Recorded before any session opens, so that a page does not start workers of its own.
    main.record_workers([])
    if n <= 0:
        return
    if os.environ.get(jobs.SCHEDULER_ENV):
        print(f"Jobs go to the Dask scheduler {os.environ[jobs.SCHEDULER_ENV]}; no local worker started.",
              flush=True)
        return
    started = jobs.start_embedded_workers(n)
    main.record_workers(started)
    if started:
        print(f"Started {len(started)} job worker(s): pid {', '.join(map(str, started))}", flush=True)


def serve(
    host: str = "127.0.0.1",
    port: int = 5006,
    show: bool = False,
    *,
    basic_auth: str | None = None,
    cookie_secret: str | None = None,
    websocket_origins: list[str] | None = None,
    workers: int = 1,
) -> int:
    """Serve the pages and the API until stopped.

    ``basic_auth`` (one password for any user name, or the path of a JSON file ``{"user": "password"}``) turns
    on Panel's login for the pages and the API; ``cookie_secret`` signs the login cookie (random per start when
    not given, so logins then end with the server). ``port=0`` picks a free port. ``workers`` embedded job
    workers are started unless enough are alive (none with a Dask scheduler configured)."""
    import panel as pn

    from app import api

    if port == 0:
        port = _free_port(host)
    basic_auth = basic_auth or os.environ.get(BASIC_AUTH_ENV) or None
    cookie_secret = cookie_secret or os.environ.get(COOKIE_SECRET_ENV) or None
    if basic_auth and not cookie_secret:
        cookie_secret = secrets.token_urlsafe(32)
    if not basic_auth and not is_loopback(host):
        print(f"WARNING: serving on {host} without authentication: anyone who can reach this port can run "
              f"optimisations and read every run. Add --basic-auth (see docs/serving.md).", file=sys.stderr,
              flush=True)
    settings = api.ApiSettings(
        basic_auth=basic_auth,
        # Bound to this machine only, the API also checks the Host header, so a web page whose domain
        # re-resolves to 127.0.0.1 (DNS rebinding) cannot use it through a local browser.
        # Names added with --allow-websocket-origin (e.g. a reverse proxy's) are accepted too.
        allowed_hosts=frozenset(
            [f"{n}:{port}" for n in ("localhost", "127.0.0.1", "[::1]")]
            + [o.lower() for o in websocket_origins or []]
        ) if is_loopback(host) else None,
    )
    _start_workers(workers)
    print(f"VMAT Planner on http://{host}:{port}/  (API: http://{host}:{port}{api.API_PREFIX}/openapi.json; "
          f"Ctrl-C to stop)", flush=True)
    pn.serve(
        pages(),
        address=host,
        port=port,
        show=show,
        websocket_origin=_origins(host, port, list(websocket_origins or [])),
        title="VMAT Planner",
        extra_patterns=api.url_patterns(settings),
        basic_auth=basic_auth,
        cookie_secret=cookie_secret,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m app.server", description="Serve VMAT Planner and its HTTP API.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5006, help="port (default 5006; 0 picks a free one)")
    p.add_argument("--show", action="store_true", help="open a browser tab")
    p.add_argument("--basic-auth", metavar="PASSWORD_OR_FILE", default=None,
                   help=f"require a login for pages and API: one password, or a JSON file of "
                        f"{{user: password}} (or set ${BASIC_AUTH_ENV})")
    p.add_argument("--cookie-secret", default=None,
                   help=f"secret that signs login cookies (or ${COOKIE_SECRET_ENV}; default: random per start)")
    p.add_argument("--allow-websocket-origin", action="append", default=[], metavar="HOST[:PORT]",
                   help="another host name browsers use to reach this server (repeatable)")
    p.add_argument("--workers", type=int, default=1,
                   help="job workers to keep running on this machine (default 1)")
    p.add_argument("--dask-scheduler", metavar="ADDRESS", default=None,
                   help="send jobs to this Dask scheduler, e.g. tcp://10.0.0.5:8786 (or set $VMAT_DASK_SCHEDULER); "
                        "no local worker is started then")
    a = p.parse_args(argv)
    if a.dask_scheduler is not None:
        if not re.fullmatch(r"(tcp|tls|ucx|inproc)://[^\s/]+", a.dask_scheduler):
            p.error(f"--dask-scheduler: expected a Dask address like tcp://host:8786, got {a.dask_scheduler!r}")
        from vmat_core import jobs

        os.environ[jobs.SCHEDULER_ENV] = a.dask_scheduler
    if not 0 <= a.port <= 65535:
        p.error(f"--port: must be in [0, 65535], got {a.port}")
    if a.workers < 0:
        p.error(f"--workers: must be >= 0, got {a.workers}")
    return serve(
        host=a.host,
        port=a.port,
        show=a.show,
        basic_auth=a.basic_auth,
        cookie_secret=a.cookie_secret,
        websocket_origins=a.allow_websocket_origin,
        workers=a.workers,
    )


if __name__ == "__main__":
    raise SystemExit(main())
