"""Start the Panel server that hosts the app's pages."""

from __future__ import annotations


def serve(host: str = "127.0.0.1", port: int = 5006, show: bool = False) -> int:
    import panel as pn

    from app.main import create_app

    origins = [f"{host}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]
    print(f"VMAT Planner on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    pn.serve(
        {"/": create_app},
        address=host,
        port=port,
        show=show,
        websocket_origin=origins,
        title="VMAT Planner",
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m app.server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5006)
    a = p.parse_args(argv)
    return serve(host=a.host, port=a.port)


if __name__ == "__main__":
    raise SystemExit(main())
