"""``vmat-planner reindex``: bring every run folder to the current layout and rebuild the history index.

Run folder layouts, by ``schema_version``:

- **0** (the first prototype, before the run store): ``<runs>/<run_id>/`` holds ``config.json`` (the run's
  configuration), ``metrics.json`` (per-structure metrics: a list of ``{"structure", "mean_gy", "max_gy",
  "d95_gy", ...}`` rows, or a dict keyed by structure) and ``dvh.json`` (``{structure: {"dose_gy": [...],
  "volume_pct": [...]}}``, or a list of ``{"structure", "dose_gy", "volume_pct"}`` rows), optionally
  ``result.json`` (``solver``, ``status``, ``objective``, ``bound``, ``gap``, ``solve_time_s``, ``created_at``),
  ``criteria.json`` (criteria rows with a ``status``) and ``dose.npz``; there is no ``run.parquet``, so the store
  cannot list such a run.
- **1** (:data:`vmat_core.store.SCHEMA_VERSION`): ``run.parquet`` (one flat metadata row), ``config.json``,
  ``dvh.parquet``/``metrics.parquet``/``criteria.parquet``/``progress.parquet``, ``dose.npz``, ``solver.log``,
  ``objective_terms.json``, ``timings.json``.

Migrating 0 → 1 derives the metadata row and the tables from the old files, the way the runner derives them from
a fresh plan, and keeps every old file unchanged beside them. The new folder is built aside (with the store's own
atomic writer) and swapped in by two renames, so a folder is either still the old one or completely the new one.
A folder that cannot be read is reported and left alone; the others are migrated and indexed regardless.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vmat_core import store as store_mod
from vmat_core.store import RunStore

LEGACY_FILES = ("config.json", "metrics.json", "dvh.json")
TARGET_METRICS = ("d95_gy", "d98_gy", "d2_gy", "v100_pct")
METRIC_COLUMNS = ("structure", "is_target", "volume_cc", "mean_gy", "max_gy", "d2cc_gy", *TARGET_METRICS)
_RESULT_KEYS = ("solver", "status", "objective", "bound", "gap", "solve_time_s")


class MigrationError(Exception):
    """A run folder whose old layout cannot be read; the message says which file and why."""


@dataclass
class ReindexReport:
    """What ``reindex`` did: runs in the rebuilt index, folders migrated, folders skipped with the reason."""

    indexed: int = 0
    migrated: list[tuple[str, int]] = field(default_factory=list)  # (run_id, from schema_version)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (folder name, reason)
    to_migrate: list[tuple[str, int]] = field(default_factory=list)  # dry run: what would be migrated

    def to_dict(self) -> dict:
        return {
            "indexed": self.indexed,
            "migrated": [{"run_id": r, "from_schema_version": v} for r, v in self.migrated],
            "skipped": [{"folder": f, "reason": why} for f, why in self.skipped],
            "to_migrate": [{"run_id": r, "from_schema_version": v} for r, v in self.to_migrate],
        }


# ------------------------------------------------------------------------------------------- layout detection


def folder_schema_version(run_dir: Path) -> int:
    """The layout version of a run folder; MigrationError when it is none of the known ones."""
    meta = run_dir / store_mod.METADATA_FILE
    if meta.is_file():
        try:
            pf = pq.ParquetFile(meta)
            if "schema_version" not in pf.schema_arrow.names:
                raise MigrationError(f"{store_mod.METADATA_FILE} has no schema_version column")
            table = pf.read(columns=["schema_version"])  # one column: reindex reads every run's file
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise MigrationError(f"{store_mod.METADATA_FILE} is unreadable: {exc}") from exc
        if table.num_rows != 1:
            raise MigrationError(f"{store_mod.METADATA_FILE} has {table.num_rows} rows, expected 1")
        version = table.column("schema_version")[0].as_py()
        if not isinstance(version, int):
            raise MigrationError(f"{store_mod.METADATA_FILE}: schema_version {version!r} is not an integer")
        return version
    missing = [name for name in LEGACY_FILES if not (run_dir / name).is_file()]
    if missing:
        raise MigrationError(
            f"neither {store_mod.METADATA_FILE} (schema 1) nor the schema-0 files; missing {', '.join(missing)}"
        )
    return 0


# ---------------------------------------------------------------------------------------------- schema 0 → 1


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MigrationError(f"{path.name} ({what}) is not readable JSON: {exc}") from exc


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _rows(value: Any, what: str, key: str = "structure") -> list[dict]:
    """``[{key: name, ...}, ...]`` from either a list of rows or a dict keyed by ``key``."""
    if isinstance(value, list) and all(isinstance(r, dict) for r in value):
        return [dict(r) for r in value]
    if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
        return [{key: name, **row} for name, row in value.items()]
    raise MigrationError(f"{what}: expected a list of rows or a dict of rows keyed by {key}")


def _metrics_table(raw: Any) -> pd.DataFrame:
    from vmat_core.evaluation import is_target

    rows = []
    for r in _rows(raw, "metrics.json"):
        name = r.get("structure")
        if not isinstance(name, str) or not name:
            raise MigrationError("metrics.json: a row has no structure name")
        row: dict[str, Any] = {"structure": name, "is_target": bool(r.get("is_target", is_target(name)))}
        for col in METRIC_COLUMNS[2:]:
            v = _number(r.get(col))
            row[col] = np.nan if v is None else v
        rows.append(row)
    if not rows:
        raise MigrationError("metrics.json: no structures")
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def _dvh_table(raw: Any) -> pd.DataFrame:
    parts = []
    for r in _rows(raw, "dvh.json"):
        name = r.get("structure")
        try:
            dose = np.asarray(r["dose_gy"], dtype=float).ravel()
            volume = np.asarray(r["volume_pct"], dtype=float).ravel()
        except (KeyError, TypeError, ValueError) as exc:
            raise MigrationError(f"dvh.json: structure {name!r} needs numeric dose_gy and volume_pct") from exc
        if dose.shape != volume.shape:
            raise MigrationError(f"dvh.json: structure {name!r} has {dose.size} doses but {volume.size} volumes")
        parts.append(pd.DataFrame({"structure": str(name), "dose_gy": dose, "volume_pct": volume}))
    if not parts:
        return pd.DataFrame({"structure": pd.Series([], dtype=str), "dose_gy": [], "volume_pct": []})
    # A structure's rows stay together and in dose order, as the runner writes them.
    return pd.concat(parts, ignore_index=True)


def _created_at(run_id: str, result: dict) -> datetime:
    text = result.get("created_at")
    if isinstance(text, str):
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            parsed = None
        if parsed is not None:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    # The run id starts with its UTC creation time, to the second.
    return datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def _objective_weights(config: dict) -> dict[str, float]:
    from vmat_core.runner import weight_column

    out: dict[str, float] = {}
    for row in config.get("objectives") or []:
        if not isinstance(row, dict) or not row.get("type"):
            continue
        weight = _number(row.get("weight"))
        enabled = row.get("enabled", True) is not False
        column = store_mod.safe_column_name(
            weight_column(SimpleNamespace(structure_name=row.get("structure_name"), type=str(row["type"])))
        )
        out[column] = (weight if weight is not None else 0.0) if enabled else 0.0
    return out


def _config_hash(config: dict) -> str:
    from vmat_core.config import ConfigError, RunConfig

    try:
        return RunConfig.from_dict(config).content_hash()
    except (ConfigError, TypeError, ValueError, KeyError):
        # An old config the current schema no longer accepts still gets a stable hash of what it says.
        return store_mod.config_hash(config)


def _int_or_none(value: Any) -> int | None:
    v = _number(value)
    return None if v is None else int(v)


def schema0_metadata(run_id: str, config: dict, metrics: pd.DataFrame, result: dict,
                     criteria: pd.DataFrame | None) -> dict:
    """The metadata row of a schema-0 run, with the columns the runner writes for a new run."""
    beams = [int(b) for b in config.get("beam_ids") or [] if _number(b) is not None]
    factors = list(config.get("voxel_down_sample_factors") or [])
    factors += [None] * (3 - len(factors))
    solver_cfg = config.get("solver") if isinstance(config.get("solver"), dict) else {}
    status = result.get("status")
    md: dict[str, Any] = {
        "created_at": _created_at(run_id, result),
        "case_id": str(config.get("case_id") or ""),
        "protocol": config.get("protocol"),
        "label": config.get("label") or "",
        "config_hash": _config_hash(config),
        "beam_ids": beams,
        "n_beams": len(beams),
        "voxel_ds_x": _int_or_none(factors[0]),
        "voxel_ds_y": _int_or_none(factors[1]),
        "voxel_ds_z": _int_or_none(factors[2]),
        "beamlet_ds": _int_or_none(config.get("beamlet_down_sample_factor")),
        "mu_bound": _number(config.get("mu_bound")),
        "solver": result.get("solver"),
        "solver_requested": solver_cfg.get("solver"),
        "time_limit_s": _number(solver_cfg.get("time_limit_s")),
        "mip_gap_requested": _number(solver_cfg.get("mip_gap")),
        "status": str(status) if status is not None else "unknown",
        "objective": _number(result.get("objective")),
        "bound": _number(result.get("bound")),
        "gap": _number(result.get("gap")),
        "solve_time_s": _number(result.get("solve_time_s")),
        "prescription_gy": _number(config.get("prescription_gy")),
        "criteria_passed": None if criteria is None else int((criteria["status"] == "pass").sum()),
        "criteria_failed": None if criteria is None else int((criteria["status"] == "fail").sum()),
        "migrated_from_schema": 0,
        "migrated_at": datetime.now(UTC),
    }
    md.update(_objective_weights(config))
    for _, m in metrics.iterrows():
        s = store_mod.safe_column_name(m["structure"])
        for col in ("mean_gy", "max_gy"):
            md[f"{s}_{col}"] = _number(m[col])
        if m["is_target"]:
            for col in TARGET_METRICS:
                md[f"{s}_{col}"] = _number(m[col])
    return md


def migrate_schema0(store: RunStore, run_id: str) -> Path:
    """Rewrite the schema-0 folder ``run_id`` as a current run folder (the old files are kept in it)."""
    store_mod.check_run_id(run_id)
    old = store.root / run_id
    config = _read_json(old / "config.json", "the run's configuration")
    if not isinstance(config, dict):
        raise MigrationError("config.json: expected a JSON object")
    metrics = _metrics_table(_read_json(old / "metrics.json", "metrics"))
    dvh = _dvh_table(_read_json(old / "dvh.json", "dose-volume histograms"))
    result = _read_json(old / "result.json", "solver result") or {}
    if not isinstance(result, dict):
        raise MigrationError("result.json: expected a JSON object")
    raw_criteria = _read_json(old / "criteria.json", "clinical criteria")
    criteria = None
    if raw_criteria is not None:
        criteria = pd.DataFrame(_rows(raw_criteria, "criteria.json", key="criterion"))
        if "status" not in criteria:
            raise MigrationError("criteria.json: rows need a status (pass/goal_missed/fail/not_evaluated)")
    metadata = schema0_metadata(run_id, config, metrics, result, criteria)
    tables = {"dvh": dvh, "metrics": metrics}
    if criteria is not None:
        tables["criteria"] = criteria

    staging = store.root / f"{store_mod._TMP_PREFIX}migrate-{run_id}-{os.getpid()}-{secrets.token_hex(3)}"
    doomed = store.root / f"{store_mod._DEL_PREFIX}{run_id}-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        new = RunStore(staging, fsync=store.fsync).write_run(run_id, config=config, metadata=metadata, tables=tables)
        for entry in os.scandir(old):
            target = new / entry.name
            if entry.is_file(follow_symlinks=False) and not target.exists():
                shutil.copy2(entry.path, target)
        # Old folder away, new one in: readers see either layout complete, never a mixture.
        os.rename(old, doomed)
        try:
            os.rename(new, old)
        except OSError:
            os.rename(doomed, old)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(doomed, ignore_errors=True)
    return old


# Each migration takes a folder from version n to n + 1.
MIGRATIONS: dict[int, Callable[[RunStore, str], Path]] = {0: migrate_schema0}


# ------------------------------------------------------------------------------------------------- reindex

_HIDDEN = (store_mod._TMP_PREFIX, store_mod._DEL_PREFIX, ".", store_mod.INDEX_DIR)


def reindex(store: RunStore | None = None, *, dry_run: bool = False) -> ReindexReport:
    """Migrate every run folder written by an older layout, then rebuild the store's index.

    Folders that cannot be read or migrated are listed in ``skipped`` with the reason and left untouched; the
    rest are migrated and indexed. With ``dry_run`` nothing is written: ``to_migrate`` lists what would change.
    """
    store = store or RunStore()
    report = ReindexReport()
    if not store.root.is_dir():
        return report
    skipped: dict[str, str] = {}
    for entry in sorted(os.scandir(store.root), key=lambda e: e.name):
        name = entry.name
        if name.startswith(_HIDDEN) or not entry.is_dir(follow_symlinks=False):
            continue
        if not store_mod.is_run_id(name):
            skipped[name] = f"not a run folder name (expected e.g. {store_mod.RUN_ID_EXAMPLE})"
            continue
        try:
            version = folder_schema_version(Path(entry.path))
        except MigrationError as exc:
            skipped[name] = str(exc)
            continue
        if version > store_mod.SCHEMA_VERSION:
            skipped[name] = (f"written by a newer version (schema_version {version}; this program reads up to "
                             f"{store_mod.SCHEMA_VERSION}); left as it is")
            continue
        if version == store_mod.SCHEMA_VERSION:
            continue
        if dry_run:
            report.to_migrate.append((name, version))
            continue
        try:
            for step in range(version, store_mod.SCHEMA_VERSION):
                MIGRATIONS[step](store, name)
        except (MigrationError, ValueError, TypeError, OSError) as exc:
            skipped[name] = f"migration from schema_version {version} failed: {exc}"
            continue
        report.migrated.append((name, version))
    if dry_run:
        report.skipped = sorted(skipped.items())
        return report
    result = store.reindex()
    report.indexed = int(result["indexed"])
    for rid, reason in result["skipped"]:
        skipped.setdefault(rid, reason)
    report.skipped = sorted(skipped.items())
    return report


# --------------------------------------------------------------------------------------------- command line


def cmd_reindex(args) -> int:
    report = reindex(RunStore(), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    if args.dry_run:
        print(f"Dry run: {len(report.to_migrate)} folder(s) would be migrated, {len(report.skipped)} skipped.")
        for rid, version in report.to_migrate:
            print(f"  migrate {rid} (schema_version {version} -> {store_mod.SCHEMA_VERSION})")
    else:
        print(f"Indexed {report.indexed} run(s); migrated {len(report.migrated)}; skipped {len(report.skipped)}.")
        for rid, version in report.migrated:
            print(f"  migrated {rid} (schema_version {version} -> {store_mod.SCHEMA_VERSION})")
    for name, reason in report.skipped:
        print(f"  skipped {name}: {reason}")
    return 0


def add_cli_commands(subparsers) -> None:
    """``reindex`` for the ``vmat-planner`` command."""
    s = subparsers.add_parser(
        "reindex",
        help="migrate run folders of older layouts and rebuild the run history index (corrupt folders are "
             "reported and skipped)",
    )
    s.add_argument("--dry-run", action="store_true", help="only list what would be migrated or skipped")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_reindex)

