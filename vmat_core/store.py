"""The run store: one folder per optimisation run, queried as one table with DuckDB.

A run folder ``<root>/<run_id>/`` holds ``config.json``, ``run.parquet`` (one row of flat metadata),
``dose.npz`` (arrays), ``<name>.parquet`` tables, ``<name>.log`` texts and ``<name>.json`` files. A run is
written in a hidden temporary folder and renamed into place, so it is either complete or invisible, and a run
folder is never modified afterwards. The store knows nothing about VMAT: it writes the dicts, tables and arrays
it is given.

History queries see the metadata rows of all runs as one table ``runs``. Reading thousands of one-row parquet
files per query is too slow for a web page, so rows are cached: ``<root>/_index/runs-<generation>.parquet``
holds the rows of many runs, runs written since the index are read one by one, and runs deleted since are
dropped. The folders stay the source of truth; the index is a cache that :meth:`RunStore.reindex` rebuilds.

A user's filter (``where``) is checked by :func:`validate_where` (a single expression over the columns, no
subquery, no file or settings function) and run by DuckDB over an in-memory Arrow table, in a connection whose
file system access is disabled and whose configuration is locked, with a time limit.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vmat_core import paths

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RUN_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{10}$")
RUN_ID_EXAMPLE = "20261126T171502Z-3fa9c01b2e"

CONFIG_FILE = "config.json"
METADATA_FILE = "run.parquet"
ARRAYS_FILE = "dose.npz"
TABLE_SUFFIX = ".parquet"
TEXT_SUFFIX = ".log"
JSON_SUFFIX = ".json"
INDEX_DIR = "_index"

# Unindexed (or deleted) runs that make a query write a new index; below this, reading them one by one is cheap.
COMPACT_AFTER = 64
DEFAULT_QUERY_TIMEOUT_S = 10.0
MAX_WHERE_CHARS = 4000

_TMP_PREFIX = ".tmp-"
_DEL_PREFIX = ".del-"
_INDEX_FILE_RE = re.compile(r"runs-([0-9]{8})\.parquet")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_COLUMN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_ARTIFACT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_RESERVED_TABLES = frozenset({"run"})
_RESERVED_JSON = frozenset({"config"})
_RESERVED_ARRAYS = frozenset({"file", "allow_pickle"})  # keyword names of numpy.savez_compressed
_RESERVED_COLUMNS = frozenset({"run_id", "schema_version"})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class RunNotFound(KeyError):
    """A well-formed run id with no run folder in the store."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class InvalidRunId(ValueError):
    """A run id that is not of the store's format (and so can never name a path)."""


class InvalidName(ValueError):
    """A table, array, text, JSON, artifact or column name the store refuses."""


class ArtifactNotFound(FileNotFoundError):
    """A run exists but has no artifact (file, table or array) of that name."""


class RunExists(FileExistsError):
    """write_run was asked to write a run id that is already in the store."""


class QueryError(ValueError):
    """A history query (filter, columns, order) that is refused or that DuckDB cannot run."""


class CorruptRun(Exception):
    """A run folder whose metadata cannot be read; the reason is the message."""


# ----------------------------------------------------------------------------------------------- ids and names


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_run_id(value: object) -> bool:
    return isinstance(value, str) and RUN_ID_RE.fullmatch(value) is not None


def check_run_id(run_id: object) -> str:
    """``run_id`` itself when it has the store's format, else :class:`InvalidRunId` saying what is expected."""
    if not isinstance(run_id, str):
        raise InvalidRunId(f"run_id: expected a string like {RUN_ID_EXAMPLE}, got {type(run_id).__name__}")
    if not RUN_ID_RE.fullmatch(run_id):
        raise InvalidRunId(
            f"run_id: {_short(run_id)} is not a run id; expected YYYYMMDDTHHMMSSZ-<10 lowercase hex digits>, "
            f"e.g. {RUN_ID_EXAMPLE}"
        )
    return run_id


def _utc(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{what}: expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what}: naive datetime {value.isoformat()}; pass a timezone-aware datetime (UTC)")
    return value.astimezone(UTC)


def new_run_id(config_hash: str, created_at: datetime | None = None) -> str:
    """``<UTC timestamp>-<10 hex digits of hash(config hash, timestamp, nanoseconds, random)>``.

    The random part keeps two ids made in the same second (even for the same config) distinct.
    """
    if not isinstance(config_hash, str) or not config_hash:
        raise ValueError("config_hash: must be a non-empty string (e.g. from config_hash(config))")
    ts = _utc(created_at, "created_at") if created_at is not None else datetime.now(UTC)
    seed = f"{config_hash}|{ts.isoformat()}|{time.time_ns()}|{secrets.token_hex(8)}"
    return f"{ts:%Y%m%dT%H%M%SZ}-{hashlib.sha256(seed.encode()).hexdigest()[:10]}"


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of the config's canonical JSON (sorted keys), so equal configs hash equally."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def safe_column_name(*parts: object) -> str:
    """A metadata column name from parts: ``("w", "LUNG L", "quadratic")`` → ``w_LUNG_L_quadratic``."""
    text = "_".join(str(p) for p in parts if str(p))
    text = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    text = re.sub(r"_+", "_", text)
    if not text:
        raise InvalidName(f"column name: nothing usable in {_short(parts)}")
    if text[0].isdigit():
        text = "_" + text
    return text[:128]


def _check_name(kind: str, name: object, reserved: frozenset[str] = frozenset(), suffix: str = "") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        hint = ""
        if isinstance(name, str) and suffix and name.endswith(suffix) and _NAME_RE.fullmatch(name[: -len(suffix)]):
            hint = f"; pass {name[: -len(suffix)]!r} (it is stored as {name!r})"
        raise InvalidName(
            f"{kind} name: {_short(name)} is not allowed; use letters, digits and '_' (not starting with a digit, "
            f"at most 64 characters){hint}"
        )
    if name in reserved:
        raise InvalidName(f"{kind} name: {name!r} is reserved by the store ({', '.join(sorted(reserved))})")
    return name


def _check_column_name(name: object) -> str:
    if not isinstance(name, str) or not _COLUMN_RE.fullmatch(name):
        raise InvalidName(
            f"metadata column: {_short(name)} is not allowed; use letters, digits and '_' (not starting with a "
            "digit, at most 128 characters); safe_column_name() builds one"
        )
    return name


# ------------------------------------------------------------------------------------------ durable writes


def _fsync_dir(path: Path, enabled: bool = True) -> None:
    if not enabled:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, writer, fsync: bool = True) -> None:
    with open(path, "xb") as fh:
        writer(fh)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_bytes(obj: object, what: str) -> bytes:
    try:
        # Strict JSON (no NaN): these files are also served to browsers, whose JSON.parse refuses NaN.
        return json.dumps(obj, indent=2, default=_json_default, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: cannot be written as JSON: {exc}") from exc


# ------------------------------------------------------------------------------------------- metadata rows


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: object) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


def _list_value(key: str, value: list) -> tuple[pa.DataType, list]:
    items = [v.item() if isinstance(v, np.generic) else v for v in value]
    present = [v for v in items if v is not None]
    if not present:
        return pa.list_(pa.null()), items
    if all(isinstance(v, bool) for v in present):
        return pa.list_(pa.bool_()), items
    if all(_is_int(v) for v in present):
        if any(not _INT64_MIN <= v <= _INT64_MAX for v in present):
            raise ValueError(f"metadata[{key!r}]: integer out of the 64-bit range")
        return pa.list_(pa.int64()), items
    if all(_is_real(v) for v in present):
        return pa.list_(pa.float64()), [None if v is None else float(v) for v in items]
    if all(isinstance(v, str) for v in present):
        return pa.list_(pa.string()), items
    kinds = sorted({type(v).__name__ for v in present})
    raise ValueError(
        f"metadata[{key!r}]: a list must hold only integers, only numbers, only booleans or only strings; "
        f"got {', '.join(kinds)}"
    )


def _metadata_value(key: str, value: object) -> tuple[pa.DataType, object]:
    if value is None:
        return pa.null(), None
    if isinstance(value, (bool, np.bool_)):
        return pa.bool_(), bool(value)
    if _is_int(value):
        value = int(value)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"metadata[{key!r}]: integer {value} is out of the 64-bit range")
        return pa.int64(), value
    if isinstance(value, (float, np.floating)):
        return pa.float64(), float(value)
    if isinstance(value, str):
        return pa.string(), value
    if isinstance(value, Path):
        return pa.string(), str(value)
    if isinstance(value, datetime):
        return pa.timestamp("us", tz="UTC"), _utc(value, f"metadata[{key!r}]")
    if isinstance(value, np.datetime64):  # numpy datetimes carry no zone and are UTC by numpy's convention
        return pa.timestamp("us", tz="UTC"), pd.Timestamp(value).tz_localize("UTC").to_pydatetime()
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(f"metadata[{key!r}]: arrays must be 1-D here (got shape {value.shape}); use arrays=")
        return _list_value(key, value.tolist())
    if isinstance(value, (list, tuple)):
        return _list_value(key, list(value))
    if isinstance(value, Mapping):
        raise TypeError(
            f"metadata[{key!r}]: nested dicts are not allowed; metadata is one flat row (flatten the keys, "
            "or store the dict with json_files=)"
        )
    raise ValueError(
        f"metadata[{key!r}]: unsupported type {type(value).__name__}; use None, bool, int, float, str, "
        "datetime (UTC) or a list of numbers/strings"
    )


def _metadata_row(run_id: str, metadata: Mapping[str, Any]) -> pa.Table:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata: expected a dict, got {type(metadata).__name__}")
    for key in _RESERVED_COLUMNS:
        if key in metadata and metadata[key] != (run_id if key == "run_id" else SCHEMA_VERSION):
            raise ValueError(f"metadata[{key!r}]: set by the store; got {_short(metadata[key])}")
    row: dict[str, object] = {"run_id": run_id}
    created_at = metadata.get("created_at")
    if isinstance(created_at, str):
        try:
            created_at = datetime.fromisoformat(created_at)
        except ValueError as exc:
            raise ValueError(f"metadata['created_at']: {created_at!r} is not an ISO timestamp") from exc
    row["created_at"] = datetime.now(UTC) if created_at is None else created_at
    seen: dict[str, str] = {"run_id": "run_id", "created_at": "created_at", "schema_version": "schema_version"}
    for key, value in metadata.items():
        if key in ("run_id", "created_at", "schema_version"):
            continue
        _check_column_name(key)
        if key.lower() in seen:  # SQL column names are case-insensitive
            raise InvalidName(f"metadata column: {key!r} clashes with {seen[key.lower()]!r} (names ignore case)")
        seen[key.lower()] = key
        row[key] = value
    row["schema_version"] = SCHEMA_VERSION
    fields, values = [], []
    for key, value in row.items():
        typ, converted = _metadata_value(key, value)
        fields.append(pa.field(key, typ))
        values.append([converted])
    schema = pa.schema(fields)
    arrays = [pa.array(v, type=f.type) for v, f in zip(values, fields, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


# --------------------------------------------------------------------------------- combining rows of runs


def _is_number_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _merge_types(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if a == b:
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return pa.int64()
    if _is_number_type(a) and _is_number_type(b):
        return pa.float64()
    if pa.types.is_timestamp(a) and pa.types.is_timestamp(b):
        return pa.timestamp("us", tz="UTC")
    if pa.types.is_list(a) and pa.types.is_list(b):
        return pa.list_(_merge_types(a.value_type, b.value_type))
    # Anything else (a column that was a number in one run and text in another) is kept as text, never dropped.
    return pa.string()


def _as_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _cast(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    if column.type == target:
        return column
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        if target != pa.string():
            raise
        return pa.chunked_array([pa.array([_as_text(v) for v in column.to_pylist()], pa.string())])


def _concat_rows(tables: list[pa.Table]) -> pa.Table | None:
    """One table from many, by column name (ignoring case), like DuckDB's ``union_by_name``.

    A column that only later runs have (a new structure's weight) is NULL for earlier runs; a column whose type
    differs between runs is widened (int → float) or, failing that, kept as text.
    """
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    try:
        combined = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        combined = None
    if combined is not None:
        lower = [n.lower() for n in combined.column_names]
        if len(set(lower)) == len(lower):
            return combined.replace_schema_metadata(None).combine_chunks()
    return _unify_rows(tables)


def _unify_rows(tables: list[pa.Table]) -> pa.Table:
    """The slow path of :func:`_concat_rows`: type conflicts and names differing only in case."""
    groups: dict[tuple[str, ...], list[pa.Table]] = {}
    for t in tables:
        groups.setdefault(tuple(t.column_names), []).append(t)
    merged: list[pa.Table] = []
    for group in groups.values():
        try:
            merged.append(pa.concat_tables(group, promote_options="permissive"))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            merged.extend(group)
    tables = merged
    unified: dict[str, list] = {}
    for t in tables:
        for f in t.schema:
            entry = unified.get(f.name.lower())
            if entry is None:
                unified[f.name.lower()] = [f.name, f.type]
            else:
                entry[1] = _merge_types(entry[1], f.type)
    schema = pa.schema([pa.field(name, typ) for name, typ in unified.values()])
    parts = []
    for t in tables:
        by_lower: dict[str, int] = {}
        for i, name in enumerate(t.column_names):
            by_lower.setdefault(name.lower(), i)
        columns = []
        for key, (_, typ) in unified.items():
            i = by_lower.get(key)
            columns.append(pa.chunked_array([pa.nulls(t.num_rows, typ)]) if i is None else _cast(t.column(i), typ))
        parts.append(pa.Table.from_arrays(columns, schema=schema))
    return pa.concat_tables(parts).combine_chunks()


def _read_row(run_dir: Path, run_id: str) -> pa.Table:
    try:
        table = pq.ParquetFile(run_dir / METADATA_FILE).read()  # a third of read_table's overhead per file
    except FileNotFoundError as exc:
        raise CorruptRun(f"{METADATA_FILE} is missing") from exc
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CorruptRun(f"{METADATA_FILE} is unreadable: {exc}") from exc
    if table.num_rows != 1:
        raise CorruptRun(f"{METADATA_FILE} has {table.num_rows} rows, expected 1")
    if "run_id" not in table.column_names or table.column("run_id")[0].as_py() != run_id:
        raise CorruptRun(f"{METADATA_FILE} does not name run {run_id}")
    return table.replace_schema_metadata(None)


# --------------------------------------------------------------------------------------------- the WHERE guard

_BLOCKED_KEYWORDS = frozenset(
    (
        "DROP", "COPY", "ATTACH", "DETACH", "INSTALL", "LOAD", "PRAGMA", "SET", "RESET", "CREATE", "INSERT",
        "UPDATE", "DELETE", "ALTER", "EXPORT", "IMPORT", "CALL", "SELECT", "WITH", "UNION", "INTERSECT",
        "EXCEPT", "TABLE", "VALUES", "PIVOT", "UNPIVOT", "SUMMARIZE", "DESCRIBE", "SHOW", "USE", "VACUUM",
        "CHECKPOINT", "TRUNCATE", "GRANT", "REVOKE", "BEGIN", "COMMIT", "ROLLBACK", "ANALYZE", "EXPLAIN",
        "PREPARE", "EXECUTE", "DEALLOCATE",
    )
)
# Functions reaching files, other tables or settings; and (from range on) functions building huge values from tiny
# input, refused because DuckDB notices a timeout only between chunks of rows, not inside one function call.
_BLOCKED_FUNCTIONS = frozenset(
    (
        "glob", "query", "query_table", "getenv", "current_setting", "sniff_csv", "parquet_scan", "read_csv",
        "read_csv_auto", "read_parquet", "read_json", "read_json_auto", "read_json_objects", "read_ndjson",
        "read_ndjson_auto", "read_ndjson_objects", "read_text", "read_blob", "read_xlsx", "read_duckdb",
        "json_execute_serialized_sql", "json_serialize_sql", "json_deserialize_sql", "which_secret",
        "load_aws_credentials", "set_variable", "getvariable", "checkpoint", "force_checkpoint",
        "enable_profiling", "disable_profiling", "range", "generate_series", "repeat", "lpad", "rpad",
        "list_resize", "array_resize",
    )
)
_BLOCKED_FUNCTION_PREFIXES = (
    "read_", "parquet_", "duckdb_", "pragma_", "sqlite_", "postgres_", "mysql_", "iceberg_", "delta_",
    "json_execute", "test_", "http", "s3", "ducklake",
)
_KEYWORD_RE = re.compile(r"\b(" + "|".join(sorted(_BLOCKED_KEYWORDS)) + r")\b", re.IGNORECASE)
_CALL_RE = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_NODE_TYPES_REFUSED = frozenset({"SUBQUERY", "TABLE_FUNCTION", "SELECT_NODE", "SET_OPERATION_NODE", "CTE_NODE",
                                 "RECURSIVE_CTE_NODE", "JOIN", "EXPRESSION_LIST", "SUBQUERY_REF"})


def _function_blocked(name: str) -> bool:
    name = name.lower()
    return name in _BLOCKED_FUNCTIONS or name.startswith(_BLOCKED_FUNCTION_PREFIXES)


def _code_outside_literals(sql: str) -> str:
    """``sql`` with the insides of string literals and quoted identifiers blanked, for the lexical checks."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"":
            prefix_e = i > 0 and sql[i - 1] in "eE" and (i == 1 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            if ch == "'" and prefix_e:
                # E'...' strings give backslash a meaning: our literal boundaries would differ from DuckDB's.
                raise QueryError(
                    "where: escape string literals (E'...') are not supported; use plain '...' strings"
                )
            j = i + 1
            while True:
                k = sql.find(ch, j)
                if k < 0:
                    what = "string literal" if ch == "'" else "quoted identifier"
                    raise QueryError(f"where: unterminated {what} starting at character {i + 1}")
                if k + 1 < n and sql[k + 1] == ch:  # doubled quote escapes itself
                    j = k + 2
                    continue
                break
            out.append(f" {ch}{ch} ")
            i = k + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _walk_where(node: object) -> None:
    if isinstance(node, dict):
        if node.get("class") == "SUBQUERY" or node.get("type") in _NODE_TYPES_REFUSED:
            raise QueryError(
                "where: subqueries are not allowed; a filter is one expression over the runs' columns"
            )
        if node.get("class") == "FUNCTION" and _function_blocked(str(node.get("function_name", ""))):
            raise QueryError(f"where: function {node['function_name']}() is not allowed in a filter")
        for value in node.values():
            _walk_where(value)
    elif isinstance(node, list):
        for value in node:
            _walk_where(value)


def validate_where(sql: str) -> str:
    """The filter itself, stripped, if it is a single SQL expression over the runs' columns; else QueryError.

    Refused: several statements (';'), comments, statement keywords (DROP, COPY, ATTACH, SET, SELECT, ...),
    subqueries, and functions that read files, tables or settings (read_csv, glob, getenv, current_setting, ...).
    String literals may hold anything (``solver_log LIKE '%/tmp/%'`` is fine). Unknown columns are only detected
    when the query runs. This check is one of two guards: queries also run with file access disabled.
    """
    if not isinstance(sql, str):
        raise QueryError(f"where: expected a string, got {type(sql).__name__}")
    return _validated_where(sql.strip())


@lru_cache(maxsize=512)  # a history page asks for the same filter page after page; refusals are not cached
def _validated_where(sql: str) -> str:
    if not sql:
        raise QueryError("where: empty filter; pass None to select all runs")
    if len(sql) > MAX_WHERE_CHARS:
        raise QueryError(f"where: filter too long ({len(sql)} characters, at most {MAX_WHERE_CHARS})")
    if "\x00" in sql:
        raise QueryError("where: NUL characters are not allowed")
    code = _code_outside_literals(sql)
    if ";" in code:
        raise QueryError("where: ';' is not allowed; a filter is a single expression, not statements")
    if "--" in code or "/*" in code or "*/" in code:
        raise QueryError("where: SQL comments ('--', '/* */') are not allowed")
    if "$" in code:
        raise QueryError("where: '$' (dollar quoting or named parameters) is not allowed; use '...' strings and ?")
    keyword = _KEYWORD_RE.search(code)
    if keyword:
        raise QueryError(f"where: keyword {keyword.group(1).upper()} is not allowed in a filter")
    for call in _CALL_RE.finditer(code):
        if _function_blocked(call.group(1)):
            raise QueryError(f"where: function {call.group(1)}() is not allowed in a filter")
    _check_where_syntax(sql)
    return sql


def _check_where_syntax(sql: str) -> None:
    """Parse ``SELECT * FROM runs WHERE (<sql>)`` with DuckDB and accept only that shape."""
    cur = _cursor()
    try:
        raw = cur.execute("SELECT json_serialize_sql(?)", [f"SELECT * FROM runs WHERE ({sql})"]).fetchone()[0]
    except duckdb.Error as exc:
        raise QueryError(f"where: cannot be parsed: {exc}") from exc
    finally:
        cur.close()
    tree = json.loads(raw)
    if tree.get("error"):
        raise QueryError(f"where: syntax error: {tree.get('error_message', 'unknown error')}")
    statements = tree.get("statements") or []
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    shape_ok = (
        node.get("type") == "SELECT_NODE"
        and [s.get("class") for s in node.get("select_list", [])] == ["STAR"]
        and (node.get("from_table") or {}).get("type") == "BASE_TABLE"
        and (node.get("from_table") or {}).get("table_name") == "runs"
        and not node.get("modifiers")
        and not (node.get("cte_map") or {}).get("map")
        and not node.get("group_expressions")
        and not node.get("group_sets")
        and node.get("having") is None
        and node.get("qualify") is None
        and node.get("sample") is None
        and node.get("where_clause") is not None
    )
    if not shape_ok:
        raise QueryError("where: must be a single expression (unbalanced parentheses or extra clauses)")
    _walk_where(node["where_clause"])


_ORDER_ITEM_RE = re.compile(
    r'\s*(?:"(?P<q>[A-Za-z_][A-Za-z0-9_]{0,127})"|(?P<c>[A-Za-z_][A-Za-z0-9_]{0,127}))'
    r"(?:\s+(?P<dir>ASC|DESC))?(?:\s+NULLS\s+(?P<nulls>FIRST|LAST))?\s*",
    re.IGNORECASE,
)


def _order_sql(order_by: str) -> str:
    if not isinstance(order_by, str) or not order_by.strip():
        raise QueryError("order_by: expected 'column [ASC|DESC] [NULLS FIRST|LAST], ...'")
    items = []
    for part in order_by.split(","):
        m = _ORDER_ITEM_RE.fullmatch(part)
        if not m:
            raise QueryError(
                f"order_by: {_short(part.strip())} is not 'column [ASC|DESC] [NULLS FIRST|LAST]' "
                "(column names only, no expressions)"
            )
        sql = f'"{m.group("q") or m.group("c")}" {(m.group("dir") or "ASC").upper()}'
        if m.group("nulls"):
            sql += f" NULLS {m.group('nulls').upper()}"
        items.append(sql)
    return ", ".join(items)


def _columns_sql(columns: list[str] | None) -> str:
    if columns is None:
        return "*"
    if isinstance(columns, str) or not columns:
        raise QueryError("columns: expected a non-empty list of column names")
    for c in columns:
        if not isinstance(c, str) or not _COLUMN_RE.fullmatch(c):
            raise QueryError(f"columns: {_short(c)} is not a column name (letters, digits, '_')")
    return ", ".join(f'"{c}"' for c in columns)


def _check_count(name: str, value: object, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        expected = "an integer >= 0 or None" if allow_none else "an integer >= 0"
        raise QueryError(f"{name}: expected {expected}, got {_short(value)}")
    return int(value)


# ------------------------------------------------------------------------------------------- DuckDB access

_DB_LOCK = threading.Lock()
_DB: tuple[int, duckdb.DuckDBPyConnection] | None = None
_LOCKDOWN = (
    "SET TimeZone='UTC'",
    "SET memory_limit='1GB'",
    "SET temp_directory=''",
    "SET autoinstall_known_extensions=false",
    "SET autoload_known_extensions=false",
    "SET enable_external_access=false",
    "SET lock_configuration=true",
)


def _cursor() -> duckdb.DuckDBPyConnection:
    """A new cursor on the process's locked-down in-memory database (one per call, so threads never share one)."""
    global _DB
    with _DB_LOCK:
        if _DB is None or _DB[0] != os.getpid():  # a connection inherited through fork() must not be reused
            con = duckdb.connect(":memory:")
            for statement in _LOCKDOWN:
                con.execute(statement)
            _DB = (os.getpid(), con)
        return _DB[1].cursor()


class _Watchdog:
    """One thread interrupting queries that pass their deadline (a timer thread per query would cost more than
    most queries)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[int, tuple[float, duckdb.DuckDBPyConnection]] = {}
        self._next_token = 0
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, cursor: duckdb.DuckDBPyConnection, timeout_s: float) -> int:
        with self._cond:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pending.clear()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="run-store-query-watchdog", daemon=True)
                self._thread.start()
            self._next_token += 1
            self._pending[self._next_token] = (time.monotonic() + timeout_s, cursor)
            self._cond.notify()
            return self._next_token

    def done(self, token: int) -> None:
        with self._cond:
            self._pending.pop(token, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for token, (deadline, cursor) in list(self._pending.items()):
                    if deadline <= now:
                        del self._pending[token]
                        cursor.interrupt()
                next_deadline = min((d for d, _ in self._pending.values()), default=now + 3600)
                self._cond.wait(timeout=max(next_deadline - now, 0.001))


_WATCHDOG = _Watchdog()


def _as_frame(df: pd.DataFrame) -> pd.DataFrame:
    for name in df.columns:
        col = df[name]
        if isinstance(col.dtype, pd.DatetimeTZDtype):
            df[name] = col.dt.tz_convert("UTC")
        elif col.dtype == object:
            first = col.dropna().head(1)
            if len(first) and isinstance(first.iloc[0], np.ndarray):
                df[name] = col.map(lambda a: a.tolist() if isinstance(a, np.ndarray) else a)
    return df


# ---------------------------------------------------------------------------------------- per-root caches


@dataclass
class _RootCache:
    lock: threading.RLock = field(default_factory=threading.RLock)
    listing_mtime_ns: int | None = None
    listing_trusted: bool = False
    folders: frozenset[str] = frozenset()
    index_key: tuple | None = None
    index_table: pa.Table | None = None
    index_ids: frozenset[str] = frozenset()
    extra_rows: dict[str, pa.Table] = field(default_factory=dict)
    bad: dict[str, tuple[tuple, str]] = field(default_factory=dict)
    snapshot_key: tuple | None = None
    snapshot: pa.Table | None = None


_CACHES: dict[str, _RootCache] = {}
_CACHES_LOCK = threading.Lock()


def _root_cache(root: Path) -> _RootCache:
    with _CACHES_LOCK:
        return _CACHES.setdefault(str(root), _RootCache())


def _stat_key(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------------------------------- store


class RunStore:
    """Run folders under ``root`` (default ``vmat_core.paths.runs_dir()``, created on the first write).

    ``query_timeout_s`` bounds a history query. ``fsync=False`` skips flushing files to disk before the rename:
    a write stays atomic for readers and survives the writer being killed, but not a power cut; meant only for
    throw-away stores (bulk test data), where the flushes dominate the writing time.
    """

    def __init__(
        self, root: Path | None = None, *, query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S, fsync: bool = True
    ) -> None:
        self.root = Path(root if root is not None else paths.runs_dir()).expanduser().resolve()
        if not query_timeout_s > 0:
            raise ValueError(f"query_timeout_s: must be > 0 seconds, got {query_timeout_s!r}")
        self.query_timeout_s = float(query_timeout_s)
        self.fsync = bool(fsync)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # --------------------------------------------------------------------------------------------- paths

    def run_path(self, run_id: str) -> Path:
        """The folder of an existing run; InvalidRunId for a malformed id, RunNotFound when absent."""
        check_run_id(run_id)
        path = self.root / run_id
        # Symlinked run folders are refused too, so nothing the store serves can live outside root.
        if path.is_symlink() or not path.is_dir() or path.resolve().parent != self.root:
            raise RunNotFound(f"run_id: no run {run_id} in {self.root}")
        return path

    def exists(self, run_id: str) -> bool:
        try:
            self.run_path(run_id)
        except (RunNotFound, InvalidRunId):
            return False
        return True

    def artifact_path(self, run_id: str, filename: str) -> Path:
        """A regular file directly inside the run folder; refuses separators, '..', hidden names and symlinks."""
        run_dir = self.run_path(run_id)
        if (
            not isinstance(filename, str)
            or not _ARTIFACT_RE.fullmatch(filename)
            or ".." in filename
            or filename in (".", "..")
        ):
            raise InvalidName(
                f"filename: {_short(filename)} is not a file name inside a run folder (letters, digits, '_', '-', "
                "'.'; no separators, no '..', not hidden)"
            )
        path = run_dir / filename
        if path.is_symlink():
            raise InvalidName(f"filename: {filename!r} is a symbolic link; the store serves only regular files")
        if not path.is_file():
            raise ArtifactNotFound(f"filename: run {run_id} has no file {filename!r}")
        if path.resolve().parent != run_dir.resolve():
            raise InvalidName(f"filename: {filename!r} resolves outside run {run_id}")
        return path

    def list_artifacts(self, run_id: str) -> list[str]:
        """Names of the regular files of a run (what :meth:`artifact_path` would serve)."""
        run_dir = self.run_path(run_id)
        return sorted(
            e.name
            for e in os.scandir(run_dir)
            if e.is_file(follow_symlinks=False) and _ARTIFACT_RE.fullmatch(e.name) and ".." not in e.name
        )

    # --------------------------------------------------------------------------------------------- write

    def write_run(
        self,
        run_id: str,
        *,
        config: dict,
        metadata: dict,
        arrays: dict[str, np.ndarray] | None = None,
        tables: dict[str, pd.DataFrame] | None = None,
        texts: dict[str, str] | None = None,
        json_files: dict[str, object] | None = None,
    ) -> Path:
        """Write a complete run folder atomically and return its path.

        Everything is validated first, then written and fsynced inside ``root/.tmp-<run_id>-<pid>-<random>``,
        which is renamed to ``root/<run_id>``: a crash leaves only a hidden temporary folder, which every read
        ignores and :meth:`cleanup_stale_temp` removes. An existing run is never overwritten (:class:`RunExists`).
        ``metadata`` gains ``run_id``, ``schema_version`` and, when missing, ``created_at`` (now, UTC).
        """
        check_run_id(run_id)
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict, got {type(config).__name__}")
        config_bytes = _json_bytes(config, "config")
        row = _metadata_row(run_id, metadata)
        arrays = dict(arrays or {})
        for name, arr in arrays.items():
            _check_name("array", name, _RESERVED_ARRAYS)
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"arrays[{name!r}]: expected a numpy array, got {type(arr).__name__}")
            if arr.dtype.hasobject:
                raise TypeError(f"arrays[{name!r}]: object arrays are not stored (they would need pickle)")
        table_data: dict[str, pa.Table] = {}
        for name, df in (tables or {}).items():
            _check_name("table", name, _RESERVED_TABLES, TABLE_SUFFIX)
            if isinstance(df, pa.Table):
                table_data[name] = df
            elif isinstance(df, pd.DataFrame):
                try:
                    table_data[name] = pa.Table.from_pandas(df)
                except (pa.ArrowException, TypeError, ValueError) as exc:
                    raise ValueError(f"tables[{name!r}]: cannot be stored as parquet: {exc}") from exc
            else:
                raise TypeError(f"tables[{name!r}]: expected a pandas DataFrame, got {type(df).__name__}")
        text_data: dict[str, bytes] = {}
        for name, text in (texts or {}).items():
            _check_name("text", name, suffix=TEXT_SUFFIX)
            if not isinstance(text, str):
                raise TypeError(f"texts[{name!r}]: expected a str, got {type(text).__name__}")
            text_data[name] = text.encode("utf-8")
        json_data = {
            _check_name("json", name, _RESERVED_JSON, JSON_SUFFIX): _json_bytes(obj, f"json_files[{name!r}]")
            for name, obj in (json_files or {}).items()
        }

        def write(tmp: Path, sync: bool) -> None:
            _write_file(tmp / CONFIG_FILE, lambda fh: fh.write(config_bytes), sync)
            _write_file(tmp / METADATA_FILE, lambda fh: pq.write_table(row, fh), sync)
            for name, table in table_data.items():
                _write_file(tmp / f"{name}{TABLE_SUFFIX}", lambda fh, t=table: pq.write_table(t, fh), sync)
            for name, data in text_data.items():
                _write_file(tmp / f"{name}{TEXT_SUFFIX}", lambda fh, d=data: fh.write(d), sync)
            for name, data in json_data.items():
                _write_file(tmp / f"{name}{JSON_SUFFIX}", lambda fh, d=data: fh.write(d), sync)
            if arrays:
                _write_file(
                    tmp / ARRAYS_FILE, lambda fh: np.savez_compressed(fh, allow_pickle=False, **arrays), sync
                )

        return self._commit(run_id, write)

    def _commit(self, run_id: str, write: Callable[[Path, bool], None]) -> Path:
        """Write a run folder through ``write(tmp_dir, fsync)`` in a hidden temporary folder, then rename it into
        place: a crash leaves no partial run visible, and an existing run is never overwritten."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / run_id
        if final.exists() or final.is_symlink():
            raise RunExists(f"run_id: run {run_id} already exists in {self.root}; runs are never overwritten")
        tmp = self.root / f"{_TMP_PREFIX}{run_id}-{os.getpid()}-{secrets.token_hex(3)}"
        tmp.mkdir()
        try:
            sync = self.fsync
            write(tmp, sync)
            _fsync_dir(tmp, sync)
            try:
                # rename() replaces an empty directory silently; the exists() check above covers that case
                # and a non-empty run folder makes rename() fail rather than be overwritten.
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise RunExists(f"run_id: run {run_id} already exists in {self.root}") from exc
                raise
            _fsync_dir(self.root, sync)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    # ------------------------------------------------------------------------------------- moving runs

    def export_run(self, run_id: str) -> dict[str, bytes]:
        """The run folder's files (name -> content), for :meth:`import_run` into another store (a Dask worker
        that does not share the app's data directory sends its runs back this way)."""
        return {name: self.artifact_path(run_id, name).read_bytes() for name in self.list_artifacts(run_id)}

    def import_run(self, run_id: str, files: Mapping[str, bytes]) -> Path:
        """Add a run exported by :meth:`export_run` (atomically, never over an existing run).

        File names are checked like artifact names (no separators, '..' or hidden files); the folder must hold
        a config and a metadata row of this run id, read back before it becomes visible."""
        check_run_id(run_id)
        if not isinstance(files, Mapping) or not files:
            raise ValueError("files: expected the run's files as a non-empty dict of name -> bytes")
        for name, data in files.items():
            if not isinstance(name, str) or not _ARTIFACT_RE.fullmatch(name):
                raise InvalidName(f"files: {_short(name)} is not a file name of a run folder")
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"files[{name!r}]: expected bytes, got {type(data).__name__}")
        for required in (CONFIG_FILE, METADATA_FILE):
            if required not in files:
                raise ValueError(f"files: a run folder needs {required}; got {', '.join(sorted(files))}")

        def write(tmp: Path, sync: bool) -> None:
            for name, data in files.items():
                _write_file(tmp / name, lambda fh, d=data: fh.write(d), sync)
            try:
                json.loads((tmp / CONFIG_FILE).read_text(encoding="utf-8"))
                _read_row(tmp, run_id)
            except (CorruptRun, ValueError) as exc:
                raise ValueError(f"files: not a readable run {run_id}: {exc}") from exc

        return self._commit(run_id, write)

    # ---------------------------------------------------------------------------------------------- read

    def read_metadata(self, run_id: str) -> dict:
        run_dir = self.run_path(run_id)
        try:
            return _read_row(run_dir, run_id).to_pylist()[0]
        except CorruptRun as exc:
            raise ArtifactNotFound(f"run {run_id}: {exc}") from exc

    def read_config(self, run_id: str) -> dict:
        return self._read_json_file(run_id, CONFIG_FILE)

    def read_json(self, run_id: str, name: str):
        _check_name("json", name, suffix=JSON_SUFFIX)
        return self._read_json_file(run_id, f"{name}{JSON_SUFFIX}")

    def _read_json_file(self, run_id: str, filename: str):
        path = self._existing(run_id, filename)
        return json.loads(path.read_text(encoding="utf-8"))

    def read_table(self, run_id: str, name: str) -> pd.DataFrame:
        _check_name("table", name, suffix=TABLE_SUFFIX)
        return pq.read_table(self._existing(run_id, f"{name}{TABLE_SUFFIX}")).to_pandas()

    def read_text(self, run_id: str, name: str) -> str:
        _check_name("text", name, suffix=TEXT_SUFFIX)
        return self._existing(run_id, f"{name}{TEXT_SUFFIX}").read_text(encoding="utf-8")

    def read_arrays(self, run_id: str, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of the run (all, or ``names``); never unpickles."""
        if names is not None:
            if isinstance(names, str):
                raise TypeError("names: expected a list of array names, got a str")
            for name in names:
                _check_name("array", name)
        run_dir = self.run_path(run_id)
        path = run_dir / ARRAYS_FILE
        if path.is_symlink() or not path.is_file():
            if not names:
                return {}
            raise ArtifactNotFound(f"arrays: run {run_id} has no arrays (asked for {', '.join(names)})")
        with np.load(path, allow_pickle=False) as npz:
            available = set(npz.files)
            wanted = list(npz.files) if names is None else list(names)
            missing = [n for n in wanted if n not in available]
            if missing:
                raise ArtifactNotFound(
                    f"arrays: run {run_id} has no array {', '.join(missing)}; "
                    f"available: {', '.join(sorted(available))}"
                )
            return {n: npz[n] for n in wanted}

    def _existing(self, run_id: str, filename: str) -> Path:
        path = self.run_path(run_id) / filename
        if path.is_symlink() or not path.is_file():
            raise ArtifactNotFound(f"run {run_id} has no {filename}")
        return path

    # -------------------------------------------------------------------------------------------- delete

    def delete_run(self, run_id: str) -> None:
        """Remove a run: renamed to a hidden name first (so it vanishes at once), then deleted."""
        path = self.run_path(run_id)
        doomed = self.root / f"{_DEL_PREFIX}{run_id}-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError as exc:
            raise RunNotFound(f"run_id: no run {run_id} in {self.root}") from exc
        _fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def cleanup_stale_temp(self, older_than_s: float = 3600) -> list[str]:
        """Remove temporary folders/files left by crashed writers or deleters, untouched for ``older_than_s``."""
        if older_than_s < 0:
            raise ValueError(f"older_than_s: must be >= 0, got {older_than_s!r}")
        removed: list[str] = []
        cutoff = time.time() - older_than_s
        for folder in (self.root, self.root / INDEX_DIR):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if not entry.name.startswith((_TMP_PREFIX, _DEL_PREFIX)):
                    continue
                path = Path(entry.path)
                if _last_touched(path) > cutoff:
                    continue  # maybe a writer still at work
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(self.root)))
        return sorted(removed)

    # ---------------------------------------------------------------------------------------------- query

    def list_runs(
        self,
        where: str | None = None,
        *,
        columns: list[str] | None = None,
        order_by: str = "created_at DESC",
        limit: int | None = None,
        offset: int = 0,
        params: list | None = None,
    ) -> pd.DataFrame:
        """Metadata rows of the runs matching ``where`` (a SQL expression, ``?`` for ``params``).

        Columns that only some runs have are NULL for the others. Ties in ``order_by`` are broken by run_id so
        pages are stable. Raises QueryError for a refused or failing filter (e.g. an unknown column).
        """
        sql_where = validate_where(where) if where is not None else None
        sql_columns = _columns_sql(columns)
        sql_order = _order_sql(order_by)
        limit = _check_count("limit", limit, allow_none=True)
        offset = _check_count("offset", offset, allow_none=False)
        table = self._snapshot()
        if table is None:
            return pd.DataFrame(columns=list(columns or []))
        sql = f"SELECT {sql_columns} FROM runs"
        if sql_where is not None:
            sql += f" WHERE ({sql_where})"
        sql += f' ORDER BY {sql_order}, "run_id" ASC'
        if limit is not None:
            sql += f" LIMIT {limit}"
        if offset:
            sql += f" OFFSET {offset}"
        return _as_frame(self._query(table, sql, params))

    def count_runs(self, where: str | None = None, *, params: list | None = None) -> int:
        sql_where = validate_where(where) if where is not None else None
        table = self._snapshot()
        if table is None:
            return 0
        sql = "SELECT count(*) AS n FROM runs" + (f" WHERE ({sql_where})" if sql_where is not None else "")
        return int(self._query(table, sql, params)["n"].iloc[0])

    def columns(self) -> dict[str, str]:
        """Column name → DuckDB type of the runs table (what a filter can use)."""
        table = self._snapshot()
        if table is None:
            return {}
        df = self._query(table, "DESCRIBE SELECT * FROM runs", None)
        return dict(zip(df["column_name"], df["column_type"], strict=True))

    def _query(self, table: pa.Table, sql: str, params: list | None) -> pd.DataFrame:
        if params is not None and not isinstance(params, (list, tuple)):
            raise QueryError(
                f"params: expected a list of values for the '?' placeholders, got {type(params).__name__}"
            )
        cur = _cursor()
        token = None
        try:
            cur.register("runs", table)
            token = _WATCHDOG.watch(cur, self.query_timeout_s)
            return cur.execute(sql, list(params or [])).df()
        except duckdb.InterruptException as exc:
            raise QueryError(f"query: stopped after {self.query_timeout_s:g} s; simplify the filter") from exc
        except duckdb.Error as exc:
            raise QueryError(f"query: {exc}") from exc
        finally:
            if token is not None:
                _WATCHDOG.done(token)
            cur.close()

    # ------------------------------------------------------------------------------------ index and cache

    def reindex(self) -> dict:
        """Rebuild the metadata index from every run folder; corrupt folders are skipped and reported.

        Returns ``{"indexed": n, "skipped": [(run_id, reason), ...]}``.
        """
        cache = _root_cache(self.root)
        with cache.lock:
            folders = sorted(self._scan_folders(cache, force=True))
            rows, skipped = self._read_rows(folders)
            table = _concat_rows([rows[r] for r in folders if r in rows])
            if table is not None:
                self._write_index(cache, table)
            else:
                self._drop_index_files(keep=None)
                cache.index_key, cache.index_table, cache.index_ids = None, None, frozenset()
            cache.extra_rows.clear()
            cache.bad = {rid: (_stat_key(self.root / rid / METADATA_FILE), why) for rid, why in skipped}
            cache.snapshot_key = None
        return {"indexed": len(rows), "skipped": skipped}

    def _read_rows(self, run_ids: list[str]) -> tuple[dict[str, pa.Table], list[tuple[str, str]]]:
        def read(rid: str):
            try:
                return rid, _read_row(self.root / rid, rid), None
            except CorruptRun as exc:
                return rid, None, str(exc)

        rows: dict[str, pa.Table] = {}
        skipped: list[tuple[str, str]] = []
        if len(run_ids) > 32:
            with ThreadPoolExecutor(max_workers=2) as pool:  # overlaps one file's I/O with another's decoding
                results = list(pool.map(read, run_ids))
        else:
            results = [read(r) for r in run_ids]
        for rid, table, reason in results:
            if table is None:
                skipped.append((rid, reason))
            else:
                rows[rid] = table
        return rows, skipped

    def _scan_folders(self, cache: _RootCache, force: bool = False) -> frozenset[str]:
        try:
            mtime_ns = os.stat(self.root).st_mtime_ns
        except FileNotFoundError:
            cache.listing_mtime_ns, cache.listing_trusted, cache.folders = None, False, frozenset()
            return cache.folders
        if not force and cache.listing_trusted and cache.listing_mtime_ns == mtime_ns:
            return cache.folders
        started_ns = time.time_ns()
        with os.scandir(self.root) as entries:
            folders = frozenset(
                e.name for e in entries if RUN_ID_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
            )
        cache.folders, cache.listing_mtime_ns = folders, mtime_ns
        # A directory's mtime has coarse ticks: a folder added in the same tick as the one we saw would leave the
        # mtime unchanged, so a listing is reused only when the directory had been quiet for a while before it.
        cache.listing_trusted = started_ns - mtime_ns > 2_000_000_000
        return folders

    def _index_files(self) -> list[tuple[int, Path]]:
        index_dir = self.root / INDEX_DIR
        try:
            names = os.listdir(index_dir)
        except FileNotFoundError:
            return []
        found = [(int(m.group(1)), index_dir / n) for n in names if (m := _INDEX_FILE_RE.fullmatch(n))]
        return sorted(found)

    def _load_index(self, cache: _RootCache) -> None:
        for _ in range(3):  # another process may replace the newest index between listing and reading
            files = self._index_files()
            if not files:
                cache.index_key, cache.index_table, cache.index_ids = None, None, frozenset()
                return
            path = files[-1][1]
            key = (path.name, *_stat_key(path))
            if key == cache.index_key:
                return
            try:
                table = pq.read_table(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError, pa.ArrowException) as exc:
                table, problem = None, str(exc)
            else:
                problem = None if "run_id" in table.column_names else "no run_id column"
            if problem is not None:
                log.warning("run index %s is unreadable (%s); it will be rebuilt", path, problem)
                cache.index_key, cache.index_table, cache.index_ids = key, None, frozenset()
                return
            table = table.replace_schema_metadata(None)
            cache.index_key, cache.index_table = key, table
            cache.index_ids = frozenset(table.column("run_id").to_pylist())
            cache.extra_rows = {k: v for k, v in cache.extra_rows.items() if k not in cache.index_ids}
            return

    def _write_index(self, cache: _RootCache, table: pa.Table) -> None:
        index_dir = self.root / INDEX_DIR
        index_dir.mkdir(exist_ok=True)
        files = self._index_files()
        generation = files[-1][0] + 1 if files else 1
        path = index_dir / f"runs-{generation:08d}.parquet"
        tmp = index_dir / f"{_TMP_PREFIX}runs-{os.getpid()}-{secrets.token_hex(3)}.parquet"
        try:
            _write_file(tmp, lambda fh: pq.write_table(table, fh))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(index_dir)
        self._drop_index_files(keep=generation)
        cache.index_key = (path.name, *_stat_key(path))
        cache.index_table = table
        cache.index_ids = frozenset(table.column("run_id").to_pylist())
        cache.extra_rows = {k: v for k, v in cache.extra_rows.items() if k not in cache.index_ids}

    def _drop_index_files(self, keep: int | None) -> None:
        # The previous generation is kept so that a reader that listed it just before can still open it.
        for generation, path in self._index_files():
            if keep is None or generation < keep - 1:
                path.unlink(missing_ok=True)

    def _snapshot(self) -> pa.Table | None:
        """All runs' metadata rows as one Arrow table (None for an empty store)."""
        cache = _root_cache(self.root)
        with cache.lock:
            folders = self._scan_folders(cache)
            self._load_index(cache)
            key = (cache.index_key, folders)
            if key == cache.snapshot_key:
                return cache.snapshot
            new_ids = folders - cache.index_ids
            gone = cache.index_ids - folders
            to_read = []
            for rid in new_ids - cache.extra_rows.keys():
                known_bad = cache.bad.get(rid)
                if known_bad is None or known_bad[0] != _stat_key(self.root / rid / METADATA_FILE):
                    to_read.append(rid)
            rows, skipped = self._read_rows(sorted(to_read))
            for rid, reason in skipped:
                log.warning("run folder %s skipped: %s", self.root / rid, reason)
                cache.bad[rid] = (_stat_key(self.root / rid / METADATA_FILE), reason)
            cache.extra_rows.update(rows)
            cache.extra_rows = {k: v for k, v in cache.extra_rows.items() if k in new_ids}
            base = cache.index_table
            if base is not None and gone:
                base = base.filter(pc.invert(pc.is_in(base.column("run_id"), value_set=pa.array(sorted(gone)))))
            extras = [cache.extra_rows[k] for k in sorted(cache.extra_rows)]
            table = _concat_rows(([base] if base is not None else []) + extras)
            if len(extras) >= COMPACT_AFTER or len(gone) >= COMPACT_AFTER:
                try:
                    if table is not None:
                        self._write_index(cache, table)
                    else:
                        self._drop_index_files(keep=None)
                except OSError as exc:  # a read-only store still answers queries, just without the cache file
                    log.info("run index not written in %s: %s", self.root, exc)
            cache.snapshot_key = (cache.index_key, folders)
            cache.snapshot = table
            return table


def _last_touched(path: Path) -> float:
    """Newest mtime of a folder and the files in it (a writer busy with one big file only touches that file)."""
    try:
        newest = path.stat().st_mtime
    except FileNotFoundError:
        return time.time()
    if path.is_dir() and not path.is_symlink():
        for entry in os.scandir(path):
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                continue
    return newest
