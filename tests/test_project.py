"""The project's own declarations stay consistent: pyproject, anaconda-project.yml, the core's independence."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _yaml_packages(text: str) -> set[str]:
    names = set()
    section = text.split("\npackages:", 1)[1].split("\nchannels:", 1)[0]
    for line in section.splitlines():
        m = re.match(r"^\s+- ([A-Za-z0-9_.-]+)", line)
        if m and m.group(1) not in ("pip:",):
            names.add(_name(m.group(1)))
    return names - {"python", "pip"}


def test_anaconda_project_lists_the_same_packages_as_pyproject() -> None:
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in py["dependencies"]} | {_name(r) for r in py["optional-dependencies"]["test"]}
    yml = (ROOT / "anaconda-project.yml").read_text()
    assert _yaml_packages(yml) == declared
    assert "serve:" in yml and "test:" in yml and "supports_http_options: true" in yml


def test_core_imports_no_ui_library() -> None:
    for path in (ROOT / "vmat_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in {"panel", "bokeh", "holoviews", "app"}, f"{path.name} imports {n}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make serve" in readme
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
