"""The run configuration: everything one VMAT optimisation run is asked to do.

A :class:`RunConfig` names the case, the protocol, the beams, the down-sampling, the MU bound of the mixed-integer
program, the solver settings, and the objective and constraint rows in PortPy's vocabulary. The defaults reproduce
section 1 of PortPy's ``vmat_global_optimal`` example: PortPy's own optimisation parameters for the protocol, with
the smoothness weight set to 0, seven beams ``0, 11, …, 66``, voxel factors ``[6, 6, 1]``, beamlet factor 6, U = 2.

Configs travel as JSON (run folders, the HTTP API), so :meth:`RunConfig.from_dict` is strict: unknown fields,
wrong types and non-finite numbers are rejected with a :class:`ConfigError` naming the field. :func:`validate_config`
adds range checks and, given a :class:`~vmat_core.cases.CaseInfo`, checks structures and beams against the case.
Validation is pure: it reads PortPy's shipped protocol list and nothing else, and writes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from vmat_core.cases import CASE_ID_RE, DEFAULT_CASE_ID, DEFAULT_PROTOCOL, CaseInfo

OBJECTIVE_TYPES = (
    "quadratic-overdose",
    "quadratic-underdose",
    "quadratic",
    "linear-overdose",
    "smoothness-quadratic",
)
# The only types the example's MIP loop turns into (linearised) objective terms; the others stay in the schema
# so that PortPy's protocol files load unchanged, but they do not shape the plan.
MODEL_OBJECTIVE_TYPES = ("quadratic-overdose", "quadratic-underdose", "quadratic")
DOSE_OBJECTIVE_TYPES = ("quadratic-overdose", "quadratic-underdose", "linear-overdose")
CONSTRAINT_TYPES = ("max_dose", "mean_dose")
ROLES = ("target", "oar", "rind", "other")
SOLVER_NAMES = ("auto", "MOSEK", "HIGHS", "SCIP")
# Where the MIP search starts: "auto" is the previous run when warm_start_run_id is set, else the heuristic plan.
WARM_START_STRATEGIES = ("auto", "heuristic", "none")

DEFAULT_BEAM_IDS = tuple(range(0, 72, 11))
DEFAULT_VOXEL_DOWN_SAMPLE_FACTORS = (6, 6, 1)
DEFAULT_BEAMLET_DOWN_SAMPLE_FACTOR = 6
DEFAULT_MU_BOUND = 2.0

MAX_DOSE_PERC = 150.0
MAX_TIME_LIMIT_S = 7 * 24 * 3600.0
# Beyond these the run is meaningless or PortPy/the solvers misbehave (a 64-fold coarser grid is already a few
# dose voxels per organ; solver options are C integers).
MAX_DOWN_SAMPLE_FACTOR = 64
MAX_NUM_FRACTIONS = 100
MAX_THREADS = 256
MAX_BEAM_ID = 99_999
MAX_MARGIN_MM = 500  # PortPy itself reads the margin "inf" as 500 mm
_MAX_INT64 = 2**63 - 1
_MAX_NAME_LEN = 128
_MAX_DEF_LEN = 300
_MAX_LABEL_LEN = 200
_MAX_OPTION_STR_LEN = 1000


class ConfigError(ValueError):
    """An invalid configuration; ``field`` is a path such as ``objectives[3:CORD/quadratic].weight``."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # keeps both parts when the error crosses a process boundary
        return (type(self), (self.field, self.message))


def derive_role(structure_name: str | None, objective_type: str | None = None) -> str:
    """``target`` for PTV/GTV/CTV*, ``rind`` for RIND_*, ``other`` for rows without a structure, else ``oar``."""
    if structure_name is None or objective_type == "smoothness-quadratic":
        return "other"
    if not isinstance(structure_name, str):
        return "oar"
    upper = structure_name.upper()
    if upper.startswith(("PTV", "GTV", "CTV")):
        return "target"
    if upper.startswith("RIND_"):
        return "rind"
    return "oar"


def _resolve_perc(value_gy: float | None, value_perc: float | None, prescription_gy: float) -> float | None:
    if value_gy is not None:
        return value_gy
    if value_perc is not None:
        return prescription_gy * value_perc / 100.0
    return None


@dataclass
class ObjectiveRow:
    """One objective term. ``dose_perc`` is a percentage of the prescription; over/underdose types take exactly
    one of ``dose_gy``/``dose_perc``, the others none. ``structure_def`` defines an optimisation structure
    (e.g. ``"(PTV+5) - PTV"``) that PortPy creates when the case does not have it."""

    structure_name: str | None
    type: str
    weight: float
    dose_gy: float | None = None
    dose_perc: float | None = None
    role: str = ""
    enabled: bool = True
    structure_def: str | None = None

    def __post_init__(self) -> None:
        if not self.role:
            self.role = derive_role(self.structure_name, self.type)

    @property
    def key(self) -> str:
        return self.type if self.structure_name is None else f"{self.structure_name}/{self.type}"

    @property
    def used_by_model(self) -> bool:
        """False for types the notebook's MIP ignores (``linear-overdose``, ``smoothness-quadratic``)."""
        return self.type in MODEL_OBJECTIVE_TYPES

    @property
    def takes_dose(self) -> bool:
        return self.type in DOSE_OBJECTIVE_TYPES

    def dose_gy_resolved(self, prescription_gy: float) -> float | None:
        return _resolve_perc(self.dose_gy, self.dose_perc, prescription_gy)


@dataclass
class ConstraintRow:
    """A hard dose limit in PortPy's opt_params format (``max_dose`` or ``mean_dose`` on one structure)."""

    type: str
    structure_name: str
    structure_def: str | None = None
    limit_dose_gy: float | None = None
    limit_dose_perc: float | None = None
    enabled: bool = True

    @property
    def key(self) -> str:
        return f"{self.structure_name}/{self.type}"

    @property
    def used_by_model(self) -> bool:
        """PortPy's problem builder skips ``max_dose`` limits on GTV and CTV."""
        return not (self.type == "max_dose" and self.structure_name in ("GTV", "CTV"))

    def limit_gy_resolved(self, prescription_gy: float) -> float | None:
        return _resolve_perc(self.limit_dose_gy, self.limit_dose_perc, prescription_gy)


@dataclass
class SolverSettings:
    """Which MIP solver runs and its limits; ``options`` are passed through to the solver unchanged."""

    solver: str = "auto"
    time_limit_s: float = 120.0
    mip_gap: float = 1e-4
    threads: int | None = None
    options: dict[str, int | float | str | bool] = field(default_factory=dict)
    warm_start: str = "auto"  # one of WARM_START_STRATEGIES
    heuristic_time_s: float | None = None  # seconds of the time limit for the start heuristic; None: automatic


@dataclass(kw_only=True)
class RunConfig:
    case_id: str
    protocol: str
    beam_ids: list[int]
    voxel_down_sample_factors: list[int]  # [x, y, z], multiples of the CT voxel
    beamlet_down_sample_factor: int
    mu_bound: float = DEFAULT_MU_BOUND  # U: largest MU per control point
    solver: SolverSettings = field(default_factory=SolverSettings)
    objectives: list[ObjectiveRow]
    constraints: list[ConstraintRow]
    prescription_gy: float
    num_fractions: int
    label: str = ""
    warm_start_run_id: str | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready data (floats where the schema says float); lists and dicts are fresh copies."""
        return _dump(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Any) -> RunConfig:
        """Strict parse: unknown keys, wrong types, NaN/inf and missing required fields raise ConfigError."""
        values = _parse_fields(d, _RUN_SPEC, "")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunConfig:
        try:
            data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
        except ConfigError:
            raise
        except (ValueError, TypeError, RecursionError) as e:
            raise ConfigError("config", f"not valid JSON: {e}") from None
        return cls.from_dict(data)

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the validated config, without ``label``: independent of key order
        and of 60 vs 60.0; row and beam order count, since they change the problem the solver sees."""
        d = validate_config(self).to_dict()
        d.pop("label", None)
        payload = json.dumps(_canonical_numbers(d), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Strict parsing


def _safe_repr(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except ValueError:  # ints beyond Python's digit limit cannot be printed
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {_safe_repr(value)}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _p_str(v: Any, fp: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(fp, f"must be a string, got {_describe(v)}")
    return v


def _p_int(v: Any, fp: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(fp, f"must be an integer, got {_describe(v)}")
    return int(v)


def _p_float(v: Any, fp: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(fp, f"must be a number, got {_describe(v)}")
    try:
        f = float(v)
    except OverflowError:
        raise ConfigError(fp, f"number too large: {_safe_repr(v)}") from None
    if not math.isfinite(f):
        raise ConfigError(fp, f"must be a finite number, got {_safe_repr(v)}")
    return f


def _p_bool(v: Any, fp: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(fp, f"must be true or false, got {_describe(v)}")
    return v


def _optional(parser):
    def parse(v: Any, fp: str):
        return None if v is None else parser(v, fp)

    return parse


def _p_int_list(v: Any, fp: str) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise ConfigError(fp, f"must be a list of integers, got {_describe(v)}")
    return [_p_int(x, f"{fp}[{i}]") for i, x in enumerate(v)]


def _p_options(v: Any, fp: str) -> dict[str, int | float | str | bool]:
    if not isinstance(v, dict):
        raise ConfigError(fp, f"must be an object mapping option names to values, got {_describe(v)}")
    out: dict[str, int | float | str | bool] = {}
    for k, x in v.items():
        if not isinstance(k, str) or not k or len(k) > _MAX_NAME_LEN:
            raise ConfigError(fp, f"option names must be non-empty strings of at most {_MAX_NAME_LEN} "
                                  f"characters, got {_safe_repr(k)}")
        kp = f"{fp}.{k}"
        if isinstance(x, bool):
            out[k] = x
        elif isinstance(x, int):
            if abs(x) > _MAX_INT64:
                raise ConfigError(kp, f"integer option out of range ±{_MAX_INT64}: {_safe_repr(x)}")
            out[k] = x
        elif isinstance(x, float):
            out[k] = _p_float(x, kp)
        elif isinstance(x, str):
            if len(x) > _MAX_OPTION_STR_LEN:
                raise ConfigError(kp, f"string option longer than {_MAX_OPTION_STR_LEN} characters")
            out[k] = x
        else:
            raise ConfigError(kp, f"option values must be a number, string or boolean, got {_describe(x)}")
    return out


def _p_solver(v: Any, fp: str) -> SolverSettings:
    if isinstance(v, SolverSettings):
        v = _dump(v, coerce=False)
    return SolverSettings(**_parse_fields(v, _SOLVER_SPEC, fp))


def _row_label(i: int, raw: Any, kind: str) -> str:
    """``3:CORD/quadratic`` when the row says what it is, else just the index."""
    if isinstance(raw, (ObjectiveRow, ConstraintRow)):
        raw = {"structure_name": raw.structure_name, "type": raw.type}
    if isinstance(raw, dict):
        name, typ = raw.get("structure_name"), raw.get("type")
        if isinstance(typ, str) and (isinstance(name, str) or (name is None and kind == "objectives")):
            key = typ if name is None else f"{name}/{typ}"
            return f"{i}:{key[:60]}"
    return str(i)


def _p_rows(kind: str, v: Any, fp: str) -> list:
    cls, spec = (ObjectiveRow, _OBJECTIVE_SPEC) if kind == "objectives" else (ConstraintRow, _CONSTRAINT_SPEC)
    if not isinstance(v, (list, tuple)):
        raise ConfigError(fp, f"must be a list of {kind[:-1]} rows, got {_describe(v)}")
    rows = []
    for i, raw in enumerate(v):
        rp = f"{fp}[{_row_label(i, raw, kind)}]"
        if isinstance(raw, cls):
            raw = _dump(raw, coerce=False)
        values = _parse_fields(raw, spec, rp)
        if cls is ObjectiveRow:
            values.setdefault("structure_name", None)  # rows on the fluence (smoothness) name no structure
        rows.append(cls(**values))
    return rows


# name -> (parser, required)
_OBJECTIVE_SPEC: dict[str, tuple[Any, bool]] = {
    "structure_name": (_optional(_p_str), False),
    "type": (_p_str, True),
    "weight": (_p_float, True),
    "dose_gy": (_optional(_p_float), False),
    "dose_perc": (_optional(_p_float), False),
    "role": (_p_str, False),
    "enabled": (_p_bool, False),
    "structure_def": (_optional(_p_str), False),
}
_CONSTRAINT_SPEC: dict[str, tuple[Any, bool]] = {
    "type": (_p_str, True),
    "structure_name": (_p_str, True),
    "structure_def": (_optional(_p_str), False),
    "limit_dose_gy": (_optional(_p_float), False),
    "limit_dose_perc": (_optional(_p_float), False),
    "enabled": (_p_bool, False),
}
_SOLVER_SPEC: dict[str, tuple[Any, bool]] = {
    "solver": (_p_str, False),
    "time_limit_s": (_p_float, False),
    "mip_gap": (_p_float, False),
    "threads": (_optional(_p_int), False),
    "options": (_p_options, False),
    "warm_start": (_p_str, False),
    "heuristic_time_s": (_optional(_p_float), False),
}
_RUN_SPEC: dict[str, tuple[Any, bool]] = {
    "case_id": (_p_str, True),
    "protocol": (_p_str, True),
    "beam_ids": (_p_int_list, True),
    "voxel_down_sample_factors": (_p_int_list, True),
    "beamlet_down_sample_factor": (_p_int, True),
    "mu_bound": (_p_float, False),
    "solver": (_p_solver, False),
    "objectives": (lambda v, fp: _p_rows("objectives", v, fp), True),
    "constraints": (lambda v, fp: _p_rows("constraints", v, fp), True),
    "prescription_gy": (_p_float, True),
    "num_fractions": (_p_int, True),
    "label": (_p_str, False),
    "warm_start_run_id": (_optional(_p_str), False),
}
_FLOAT_FIELDS = frozenset({
    "weight", "dose_gy", "dose_perc", "limit_dose_gy", "limit_dose_perc", "time_limit_s", "mip_gap", "mu_bound",
    "prescription_gy", "heuristic_time_s",
})


def _parse_fields(d: Any, spec: dict[str, tuple[Any, bool]], path: str) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(path or "config", f"must be an object (JSON dict), got {_describe(d)}")
    for k in d:
        if k not in spec:
            name = k if isinstance(k, str) and k.strip() else _safe_repr(k)
            raise ConfigError(_join(path, name[:60]), f"unknown field; allowed: {', '.join(spec)}")
    out = {}
    for name, (parser, required) in spec.items():
        fp = _join(path, name)
        if name not in d:
            if required:
                raise ConfigError(fp, "required field is missing")
            continue
        out[name] = parser(d[name], fp)
    return out


def _dump(obj: Any, coerce: bool = True) -> dict:
    """Dataclass -> plain dict, recursing into rows and solver settings; ``coerce`` turns ints in float fields
    into floats so that equal configs serialise identically."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, SolverSettings):
            v = _dump(v, coerce)
        elif isinstance(v, list) and f.name in ("objectives", "constraints"):
            v = [_dump(r, coerce) if isinstance(r, (ObjectiveRow, ConstraintRow)) else copy.deepcopy(r)
                 for r in v]
        elif isinstance(v, (list, dict)):
            v = copy.deepcopy(v)
        if coerce and f.name in _FLOAT_FIELDS and isinstance(v, int) and not isinstance(v, bool):
            try:
                v = float(v)
            except OverflowError:
                pass  # left as is for validation to report
        out[f.name] = v
    return out


def _canonical_numbers(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _canonical_numbers(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_canonical_numbers(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _reject_constant(name: str):
    raise ConfigError("config", f"{name} is not allowed in a config (numbers must be finite)")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(k[:60] if k.strip() else repr(k), "appears twice in the same JSON object")
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------------------------
# PortPy's shipped protocols


def _portpy_config_dir() -> Path:
    # Located without importing portpy, whose import pulls in the whole photon package (seconds).
    spec = importlib.util.find_spec("portpy")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("protocol", "PortPy is not installed, so no protocol is available")
    return Path(next(iter(spec.submodule_search_locations))) / "config_files"


@lru_cache(maxsize=1)
def shipped_protocols() -> tuple[str, ...]:
    """Protocols for which PortPy ships both clinical criteria and optimisation parameters."""
    base = _portpy_config_dir()
    criteria = {p.stem for p in (base / "clinical_criteria" / "Default").glob("*.json")}
    opt = {
        p.stem.removeprefix("optimization_params_")
        for p in (base / "optimization_params").glob("optimization_params_*.json")
    }
    return tuple(sorted(criteria & opt))


@lru_cache(maxsize=16)
def _portpy_protocol_json(protocol: str) -> tuple[str, str]:
    from portpy.photon import DataExplorer

    opt = DataExplorer.load_config_opt_params(protocol_name=protocol)
    criteria = DataExplorer.load_config_clinical_criteria(protocol_name=protocol)
    # Cached as text so every caller gets its own mutable copy.
    return json.dumps(opt), json.dumps(criteria)


def portpy_protocol_params(protocol: str) -> tuple[dict, dict]:
    """PortPy's own (optimisation parameters, clinical criteria) for a shipped protocol, as fresh dicts."""
    _check_protocol(protocol)
    opt, criteria = _portpy_protocol_json(protocol)
    return json.loads(opt), json.loads(criteria)


def _check_protocol(protocol: Any) -> None:
    known = shipped_protocols()
    if protocol not in known:
        raise ConfigError("protocol", f"unknown protocol {_safe_repr(protocol)}; PortPy ships: {', '.join(known)}")


_PRESCRIPTION_EXPR = re.compile(
    r"^\s*(?:(?P<a>\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?prescription_gy(?:\s*\*\s*(?P<b>\d+(?:\.\d*)?|\.\d+))?\s*$"
)


def _portpy_dose(value: Any, key: str, fp: str) -> tuple[float | None, float | None]:
    """A PortPy dose entry -> (gy, perc). Expressions ``k*prescription_gy`` become ``100k`` percent."""
    if isinstance(value, str):
        m = _PRESCRIPTION_EXPR.match(value)
        if not m or (m["a"] and m["b"]):
            raise ConfigError(fp, f"cannot read dose expression {value!r}; expected 'prescription_gy', "
                                  f"'k*prescription_gy' or a number")
        factor = float(m["a"] or m["b"] or 1.0)
        return None, round(100.0 * factor, 9)
    number = _p_float(value, fp)
    return (number, None) if key.endswith("_gy") else (None, number)


def from_portpy_opt_params(opt_params: dict) -> tuple[list[ObjectiveRow], list[ConstraintRow]]:
    """Objective and constraint rows from a PortPy opt_params dict.

    Rows repeating a structure/type pair with the same dose (PortPy's Paraspinal file lists ESOPHAGUS twice)
    are merged by adding their weights: PortPy sums both identical terms, so the problem is unchanged."""
    if not isinstance(opt_params, dict):
        raise ConfigError("opt_params", f"must be a dict, got {_describe(opt_params)}")
    objectives: list[ObjectiveRow] = []
    by_key: dict[str, ObjectiveRow] = {}
    for i, obj in enumerate(opt_params.get("objective_functions", [])):
        fp = f"opt_params.objective_functions[{i}]"
        if not isinstance(obj, dict):
            raise ConfigError(fp, f"must be a dict, got {_describe(obj)}")
        typ = obj.get("type")
        if typ not in OBJECTIVE_TYPES:
            raise ConfigError(f"{fp}.type", f"unknown objective type {_safe_repr(typ)}; allowed: "
                                            f"{', '.join(OBJECTIVE_TYPES)}")
        gy = perc = None
        dose_keys = [k for k in obj if "dose" in k]
        if len(dose_keys) > 1:
            raise ConfigError(fp, f"several dose entries {dose_keys}; PortPy would read only the last")
        if dose_keys:
            gy, perc = _portpy_dose(obj[dose_keys[0]], dose_keys[0], f"{fp}.{dose_keys[0]}")
        row = ObjectiveRow(
            structure_name=obj.get("structure_name"),
            type=typ,
            weight=_p_float(obj.get("weight"), f"{fp}.weight"),
            dose_gy=gy,
            dose_perc=perc,
            structure_def=obj.get("structure_def"),
        )
        previous = by_key.get(row.key)
        if previous is None:
            by_key[row.key] = row
            objectives.append(row)
        elif (previous.dose_gy, previous.dose_perc) == (row.dose_gy, row.dose_perc) and \
                previous.structure_def == row.structure_def:
            previous.weight += row.weight
        else:
            raise ConfigError(fp, f"repeats {row.key} with a different dose or definition; cannot merge")
    constraints: list[ConstraintRow] = []
    for i, con in enumerate(opt_params.get("constraints", [])):
        fp = f"opt_params.constraints[{i}]"
        if not isinstance(con, dict) or not isinstance(con.get("parameters"), dict) \
                or not isinstance(con.get("constraints"), dict):
            raise ConfigError(fp, "must be a dict with 'type', 'parameters' and 'constraints'")
        limits = {k: v for k, v in con["constraints"].items() if k.startswith("limit_dose")}
        if len(limits) != 1 or len(con["constraints"]) != 1:
            raise ConfigError(f"{fp}.constraints", f"expected exactly one limit_dose_gy or limit_dose_perc, got "
                                                   f"{sorted(con['constraints'])}")
        (limit_key, limit_value), = limits.items()
        gy, perc = _portpy_dose(limit_value, limit_key, f"{fp}.constraints.{limit_key}")
        constraints.append(ConstraintRow(
            type=con.get("type"),
            structure_name=con["parameters"].get("structure_name"),
            structure_def=con["parameters"].get("structure_def"),
            limit_dose_gy=gy,
            limit_dose_perc=perc,
        ))
    return objectives, constraints


def default_config(case_id: str = DEFAULT_CASE_ID, *, protocol: str = DEFAULT_PROTOCOL) -> RunConfig:
    """The example notebook's settings for ``protocol``, from PortPy's shipped files (no case data needed)."""
    opt_params, criteria = portpy_protocol_params(protocol)
    objectives, constraints = from_portpy_opt_params(opt_params)
    for row in objectives:
        if row.type == "smoothness-quadratic":
            row.weight = 0.0  # as the example notebook does before building the MIP
    num_fractions = _p_int(criteria.get("num_of_fractions"), "clinical_criteria.num_of_fractions")
    per_fraction = _p_float(criteria.get("pres_per_fraction_gy"), "clinical_criteria.pres_per_fraction_gy")
    cfg = RunConfig(
        case_id=case_id,
        protocol=protocol,
        beam_ids=list(DEFAULT_BEAM_IDS),
        voxel_down_sample_factors=list(DEFAULT_VOXEL_DOWN_SAMPLE_FACTORS),
        beamlet_down_sample_factor=DEFAULT_BEAMLET_DOWN_SAMPLE_FACTOR,
        mu_bound=DEFAULT_MU_BOUND,
        solver=SolverSettings(),
        objectives=objectives,
        constraints=constraints,
        prescription_gy=round(per_fraction * num_fractions, 9),
        num_fractions=num_fractions,
    )
    return validate_config(cfg)


# --------------------------------------------------------------------------------------------------------------
# Optimisation-structure definitions, read the way PortPy's Structures.evaluate_expression reads them


def structure_def_names(definition: str) -> tuple[str, ...]:
    """Structure names a definition such as ``"(PTV + inf) - (PTV + 50)"`` refers to, in order.

    Raises ValueError for anything PortPy's parser would misread: unbalanced parentheses, a margin that is not a
    whole number of mm (or ``inf``) following ``+``/``-``, characters it skips silently, and a one-character
    word standing between two spaces (PortPy's tokenizer never advances past it and loops forever), and a
    definition without an operator."""
    if not isinstance(definition, str) or not definition.strip():
        raise ValueError("must be a non-empty expression")
    if len(definition) > _MAX_DEF_LEN:
        raise ValueError(f"longer than {_MAX_DEF_LEN} characters")
    tokens: list[tuple[str, str, int]] = []
    i, n = 0, len(definition)
    while i < n:
        ch = definition[i]
        if ch == " ":
            i += 1
        elif ch.isalpha() or ch.isdigit():
            if i > 0 and definition[i - 1].isspace() and i + 1 < n and definition[i + 1].isspace():
                raise ValueError(f"{ch!r} at position {i} stands alone between spaces, which PortPy's parser "
                                 f"cannot read; write it without the surrounding spaces")
            j = i
            while j < n and (definition[j].isalpha() or definition[j].isdigit() or definition[j] in "-_.$^"):
                j += 1
            tokens.append(("word", definition[i:j], i))
            i = j
        elif ch in "+-|&()":
            tokens.append((ch if ch in "()" else "op", ch, i))
            i += 1
        else:
            raise ValueError(f"unexpected character {ch!r} at position {i}; allowed: structure names, whole-mm "
                             f"margins or inf, + - | & ( ) and spaces")
    names: list[str] = []
    pos = 0

    def operand(after: str | None) -> None:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("ends where a structure name or '(' is expected")
        kind, text, at = tokens[pos]
        pos += 1
        if kind == "(":
            expression()
            if pos >= len(tokens) or tokens[pos][0] != ")":
                raise ValueError(f"'(' at position {at} is never closed")
            pos += 1
        elif kind == "word":
            if re.fullmatch(r"[0-9]+", text) or text == "inf":
                if after not in ("+", "-"):
                    raise ValueError(f"margin {text!r} at position {at} must follow '+' (expand) or '-' (shrink)")
                if text != "inf" and int(text) > MAX_MARGIN_MM:
                    raise ValueError(f"margin {text} mm at position {at} exceeds {MAX_MARGIN_MM} mm "
                                     f"(use inf for 'everything beyond')")
            else:
                names.append(text)
        else:
            raise ValueError(f"unexpected {text!r} at position {at}; expected a structure name or '('")

    def expression() -> None:
        nonlocal pos
        operand(None)
        while pos < len(tokens) and tokens[pos][0] == "op":
            op = tokens[pos][1]
            pos += 1
            operand(op)

    expression()
    if pos != len(tokens):
        _, text, at = tokens[pos]
        raise ValueError(f"unexpected {text!r} at position {at}")
    if not names:
        raise ValueError("refers to no structure")
    if not any(kind == "op" for kind, _, _ in tokens):
        # PortPy returns the bare name instead of a mask and then fails to build the structure.
        raise ValueError("needs at least one operator (+ - | &); to use a structure as it is, name it directly")
    return tuple(names)


# --------------------------------------------------------------------------------------------------------------
# Validation


def _describe_ids(ids: list[int] | tuple[int, ...]) -> str:
    ids = sorted(set(ids))
    if not ids:
        return "none"
    parts: list[str] = []
    start = prev = ids[0]
    for x in ids[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        if x is not None:
            start = prev = x
    text = ", ".join(parts)
    return text if len(text) <= 200 else text[:199] + "…"


def _list_names(names) -> str:
    names = list(names)
    text = ", ".join(names)
    return text if len(text) <= 300 else text[:299] + "…"


def _check_structure_name(name: str, fp: str) -> None:
    if not name or name != name.strip():
        raise ConfigError(fp, f"structure name {name!r} must be non-empty without surrounding spaces")
    if len(name) > _MAX_NAME_LEN:
        raise ConfigError(fp, f"structure name longer than {_MAX_NAME_LEN} characters")
    if any(c in name for c in "/=") or any(not c.isprintable() for c in name):
        raise ConfigError(fp, f"structure name {name!r} must not contain '/', '=' or control characters")


def _check_dose(gy: float | None, perc: float | None, pres: float, fp: str, gy_name: str, perc_name: str,
                needed: bool, what: str) -> None:
    if not needed:
        for name, value in ((gy_name, gy), (perc_name, perc)):
            if value is not None:
                raise ConfigError(f"{fp}.{name}", f"{what} takes no dose; remove {name}")
        return
    if gy is not None and perc is not None:
        raise ConfigError(f"{fp}.{gy_name}", f"give either {gy_name} or {perc_name}, not both")
    if gy is None and perc is None:
        raise ConfigError(f"{fp}.{gy_name}", f"{what} needs a dose: give {gy_name} or {perc_name}")
    limit_gy = pres * MAX_DOSE_PERC / 100.0
    if perc is not None:
        if not 0.0 < perc <= MAX_DOSE_PERC:
            raise ConfigError(f"{fp}.{perc_name}", f"{perc:g} % is outside the allowed range (0, "
                                                   f"{MAX_DOSE_PERC:g}] % of the prescription")
    else:
        share = gy / pres * 100.0
        if not 0.0 < share <= MAX_DOSE_PERC:
            raise ConfigError(f"{fp}.{gy_name}", f"{gy:g} Gy is {share:.4g} % of the {pres:g} Gy prescription; "
                                                 f"allowed: above 0 and at most {limit_gy:g} Gy "
                                                 f"({MAX_DOSE_PERC:g} %)")


def _check_def(definition: str, fp: str) -> tuple[str, ...]:
    try:
        return structure_def_names(definition)
    except ValueError as e:
        raise ConfigError(fp, f"cannot use structure definition {definition!r}: {e}") from None


def _check_values(cfg: RunConfig, case: CaseInfo | None) -> None:
    if not CASE_ID_RE.fullmatch(cfg.case_id) or ".." in cfg.case_id:
        raise ConfigError("case_id", f"{_safe_repr(cfg.case_id)} is not a valid case id (letters, digits, '_', "
                                     f"'-', '.'; at most 128 characters; no path separators)")
    _check_protocol(cfg.protocol)

    if not cfg.beam_ids:
        raise ConfigError("beam_ids", "at least one beam is needed")
    seen: dict[int, int] = {}
    for i, b in enumerate(cfg.beam_ids):
        if not 0 <= b <= MAX_BEAM_ID:
            raise ConfigError(f"beam_ids[{i}]", f"beam id {_safe_repr(b)} outside 0..{MAX_BEAM_ID}")
        if b in seen:
            raise ConfigError(f"beam_ids[{i}]", f"beam {b} is listed twice (also beam_ids[{seen[b]}])")
        seen[b] = i

    if len(cfg.voxel_down_sample_factors) != 3:
        raise ConfigError("voxel_down_sample_factors", f"needs 3 integers [x, y, z], got "
                                                       f"{len(cfg.voxel_down_sample_factors)}")
    for i, f in enumerate(cfg.voxel_down_sample_factors):
        if not 1 <= f <= MAX_DOWN_SAMPLE_FACTOR:
            raise ConfigError(f"voxel_down_sample_factors[{i}]", f"{_safe_repr(f)} outside the allowed range "
                                                                 f"1..{MAX_DOWN_SAMPLE_FACTOR}")
    if not 1 <= cfg.beamlet_down_sample_factor <= MAX_DOWN_SAMPLE_FACTOR:
        raise ConfigError("beamlet_down_sample_factor", f"{_safe_repr(cfg.beamlet_down_sample_factor)} outside "
                                                        f"the allowed range 1..{MAX_DOWN_SAMPLE_FACTOR}")
    if cfg.mu_bound <= 0:
        raise ConfigError("mu_bound", f"{cfg.mu_bound:g} must be > 0 (largest MU per control point)")

    s = cfg.solver
    if s.solver not in SOLVER_NAMES:
        raise ConfigError("solver.solver", f"unknown solver {s.solver!r}; allowed: {', '.join(SOLVER_NAMES)}")
    if not 0 < s.time_limit_s <= MAX_TIME_LIMIT_S:
        raise ConfigError("solver.time_limit_s", f"{s.time_limit_s:g} s outside the allowed range (0, "
                                                 f"{MAX_TIME_LIMIT_S:g}] s (7 days)")
    if not 0 <= s.mip_gap < 1:
        raise ConfigError("solver.mip_gap", f"{s.mip_gap:g} outside the allowed range [0, 1)")
    if s.threads is not None and not 1 <= s.threads <= MAX_THREADS:
        raise ConfigError("solver.threads", f"{_safe_repr(s.threads)} outside the allowed range 1..{MAX_THREADS} "
                                            f"(or null for the solver's default)")
    if s.warm_start not in WARM_START_STRATEGIES:
        raise ConfigError("solver.warm_start", f"unknown strategy {_safe_repr(s.warm_start)}; allowed: "
                                               f"{', '.join(WARM_START_STRATEGIES)}")
    if s.heuristic_time_s is not None and not 0 < s.heuristic_time_s < s.time_limit_s:
        raise ConfigError("solver.heuristic_time_s", f"{s.heuristic_time_s:g} s outside the allowed range "
                                                     f"(0, time_limit_s = {s.time_limit_s:g}) s (or null: automatic)")

    if cfg.prescription_gy <= 0:
        raise ConfigError("prescription_gy", f"{cfg.prescription_gy:g} Gy must be > 0")
    if not 1 <= cfg.num_fractions <= MAX_NUM_FRACTIONS:
        raise ConfigError("num_fractions", f"{_safe_repr(cfg.num_fractions)} outside the allowed range "
                                           f"1..{MAX_NUM_FRACTIONS}")
    if len(cfg.label) > _MAX_LABEL_LEN:
        raise ConfigError("label", f"longer than {_MAX_LABEL_LEN} characters")
    if cfg.warm_start_run_id is not None and (not CASE_ID_RE.fullmatch(cfg.warm_start_run_id)
                                              or ".." in cfg.warm_start_run_id):
        raise ConfigError("warm_start_run_id", f"{_safe_repr(cfg.warm_start_run_id)} is not a valid run id "
                                               f"(letters, digits, '_', '-', '.'; no path separators)")

    pres = cfg.prescription_gy
    defs: dict[str, tuple[str, str]] = {}  # structure name -> (definition without spaces, field)
    seen_keys: dict[str, str] = {}
    for i, row in enumerate(cfg.objectives):
        fp = f"objectives[{_row_label(i, row, 'objectives')}]"
        if row.type not in OBJECTIVE_TYPES:
            raise ConfigError(f"{fp}.type", f"unknown objective type {row.type!r}; allowed: "
                                            f"{', '.join(OBJECTIVE_TYPES)}")
        if row.type == "smoothness-quadratic":
            for name in ("structure_name", "structure_def"):
                if getattr(row, name) is not None:
                    raise ConfigError(f"{fp}.{name}", "smoothness-quadratic acts on the fluence and takes no "
                                                      "structure")
        elif row.structure_name is None:
            raise ConfigError(f"{fp}.structure_name", f"{row.type} needs a structure name")
        else:
            _check_structure_name(row.structure_name, f"{fp}.structure_name")
        if row.weight < 0:
            raise ConfigError(f"{fp}.weight", f"{row.weight:g} must be ≥ 0")
        _check_dose(row.dose_gy, row.dose_perc, pres, fp, "dose_gy", "dose_perc", row.takes_dose, row.type)
        if row.role not in ROLES:
            raise ConfigError(f"{fp}.role", f"unknown role {row.role!r}; allowed: {', '.join(ROLES)}")
        if row.key in seen_keys:
            raise ConfigError(fp, f"duplicate row {row.key} (also {seen_keys[row.key]}); each structure/type "
                                  f"pair may appear once — add the weights instead")
        seen_keys[row.key] = fp
        if row.structure_def is not None:
            _check_def(row.structure_def, f"{fp}.structure_def")
            _check_same_def(defs, row.structure_name, row.structure_def, f"{fp}.structure_def")

    seen_keys = {}
    for i, con in enumerate(cfg.constraints):
        fp = f"constraints[{_row_label(i, con, 'constraints')}]"
        if con.type not in CONSTRAINT_TYPES:
            raise ConfigError(f"{fp}.type", f"unknown constraint type {con.type!r}; allowed: "
                                            f"{', '.join(CONSTRAINT_TYPES)}")
        _check_structure_name(con.structure_name, f"{fp}.structure_name")
        _check_dose(con.limit_dose_gy, con.limit_dose_perc, pres, fp, "limit_dose_gy", "limit_dose_perc", True,
                    con.type)
        if con.key in seen_keys:
            raise ConfigError(fp, f"duplicate constraint {con.key} (also {seen_keys[con.key]})")
        seen_keys[con.key] = fp
        if con.structure_def is not None:
            _check_def(con.structure_def, f"{fp}.structure_def")
            _check_same_def(defs, con.structure_name, con.structure_def, f"{fp}.structure_def")

    if case is not None:
        _check_against_case(cfg, case)


def _check_same_def(defs: dict[str, tuple[str, str]], name: str, definition: str, fp: str) -> None:
    squeezed = definition.replace(" ", "")
    if name in defs and defs[name][0] != squeezed:
        raise ConfigError(fp, f"defines {name} differently from {defs[name][1]}; PortPy builds a structure once, "
                              f"from the first definition")
    defs.setdefault(name, (squeezed, fp))


def _check_against_case(cfg: RunConfig, case: CaseInfo) -> None:
    if cfg.case_id != case.case_id:
        raise ConfigError("case_id", f"config is for case {cfg.case_id!r} but was checked against {case.case_id!r}")
    if case.protocols and cfg.protocol not in case.protocols:
        raise ConfigError("protocol", f"{cfg.protocol!r} is not a protocol for this {case.disease_site} case; "
                                      f"allowed: {', '.join(case.protocols)}")
    valid_beams = set(case.beam_ids)
    for i, b in enumerate(cfg.beam_ids):
        if b not in valid_beams:
            raise ConfigError(f"beam_ids[{i}]", f"beam {b} is not in case {case.case_id}; valid ids: "
                                                f"{_describe_ids(case.beam_ids)}")

    in_case = set(case.structure_names)
    known = set(in_case)
    rows: list[tuple[str, Any]] = [
        (f"objectives[{_row_label(i, r, 'objectives')}]", r) for i, r in enumerate(cfg.objectives) if r.enabled
    ] + [
        (f"constraints[{_row_label(i, r, 'constraints')}]", r) for i, r in enumerate(cfg.constraints) if r.enabled
    ]
    uses_defs = False
    # PortPy creates optimisation structures in this order (objectives, then constraints), so a definition may
    # use structures defined by earlier rows.
    for fp, row in rows:
        if row.structure_def is None or row.structure_name in in_case:
            continue  # PortPy ignores a definition for a structure the case already has
        uses_defs = True
        missing = [n for n in structure_def_names(row.structure_def) if n not in known]
        if missing:
            raise ConfigError(f"{fp}.structure_def", f"{row.structure_def!r} refers to {', '.join(missing)}, "
                                                     f"not a structure of case {case.case_id}; case structures: "
                                                     f"{_list_names(case.structure_names)}")
        known.add(row.structure_name)
    if uses_defs and "BODY" not in in_case:
        raise ConfigError("objectives", f"case {case.case_id} has no BODY structure, which PortPy needs to build "
                                        f"optimisation structures from structure_def")
    for fp, row in rows:
        if row.structure_name is not None and row.structure_name not in known:
            raise ConfigError(f"{fp}.structure_name", f"unknown structure {row.structure_name!r} for case "
                                                      f"{case.case_id}; case structures: "
                                                      f"{_list_names(case.structure_names)} (an optimisation "
                                                      f"structure needs a structure_def; or disable the row)")


def _raw_dict(cfg: RunConfig) -> dict:
    return _dump(cfg, coerce=False)


def validate_config(cfg: RunConfig, case: CaseInfo | None = None) -> RunConfig:
    """A checked, normalised copy of ``cfg`` (ints in float fields become floats); ConfigError otherwise.

    With ``case``, structures of enabled rows and beam ids are checked against the case too (disabled rows may
    name structures the case lacks)."""
    if not isinstance(cfg, RunConfig):
        raise ConfigError("config", f"expected a RunConfig, got {type(cfg).__name__}")
    clean = RunConfig.from_dict(_raw_dict(cfg))
    _check_values(clean, case)
    return clean


# --------------------------------------------------------------------------------------------------------------
# Views of a config: PortPy's opt_params, a flat objectives table


def to_portpy_opt_params(cfg: RunConfig) -> dict:
    """PortPy's opt_params for ``create_opt_structures``, ``Optimization`` and the example's MIP loop.

    Doses are numbers in Gy under ``dose_gy`` (the key the example's loop reads) resolved with the config's
    prescription, so the result does not depend on the clinical criteria's prescription; disabled rows are
    dropped; the smoothness row keeps its weight."""
    cfg = validate_config(cfg)
    pres = cfg.prescription_gy
    objectives = []
    for row in cfg.objectives:
        if not row.enabled:
            continue
        entry: dict[str, Any] = {"type": row.type}
        if row.structure_name is not None:
            entry["structure_name"] = row.structure_name
        if row.structure_def is not None:
            entry["structure_def"] = row.structure_def
        entry["weight"] = row.weight
        dose = row.dose_gy_resolved(pres)
        if dose is not None:
            entry["dose_gy"] = dose
        objectives.append(entry)
    constraints = []
    for con in cfg.constraints:
        if not con.enabled:
            continue
        # parameters must hold only these keys: PortPy matches a constraint to a clinical criterion by
        # comparing the parameters dicts for equality.
        parameters = {"structure_name": con.structure_name}
        if con.structure_def is not None:
            parameters["structure_def"] = con.structure_def
        constraints.append({
            "type": con.type,
            "parameters": parameters,
            "constraints": {"limit_dose_gy": con.limit_gy_resolved(pres)},
        })
    return {"prescription_gy": pres, "objective_functions": objectives, "constraints": constraints}


def _finite_or_none(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def objectives_table(cfg: RunConfig) -> list[dict]:
    """One flat dict per objective row for tables and editors, with the protocol's default weight and dose.

    Works on configs being edited (no validation); values that are not numbers show as None. Default doses
    given as a percentage resolve with the config's current prescription."""
    pres = _finite_or_none(cfg.prescription_gy)
    defaults: dict[str, ObjectiveRow] = {}
    if cfg.protocol in shipped_protocols():
        defaults = {r.key: r for r in default_config(protocol=cfg.protocol).objectives}
    table = []
    for row in cfg.objectives:
        gy, perc = _finite_or_none(row.dose_gy), _finite_or_none(row.dose_perc)
        dose_gy = dose_perc = None
        if gy is not None:
            dose_gy = gy
            dose_perc = gy / pres * 100.0 if pres else None
        elif perc is not None:
            dose_perc = perc
            dose_gy = pres * perc / 100.0 if pres is not None else None
        default = defaults.get(row.key) if isinstance(row.type, str) else None
        table.append({
            "key": row.key,
            "structure_name": row.structure_name,
            "role": row.role,
            "type": row.type,
            "weight": _finite_or_none(row.weight),
            "dose_gy": dose_gy,
            "dose_perc": dose_perc,
            "dose_unit": "gy" if gy is not None else "perc" if perc is not None else None,
            "enabled": row.enabled,
            "used_by_model": row.used_by_model,
            "structure_def": row.structure_def,
            "default_weight": default.weight if default else None,
            "default_dose_gy": default.dose_gy_resolved(pres) if default and pres is not None else None,
        })
    return table


# --------------------------------------------------------------------------------------------------------------
# `--set` overrides

_TOP_FIELDS = {
    "case_id": "str",
    "protocol": "str",
    "label": "str",
    "warm_start_run_id": "optstr",
    "beam_ids": "intlist",
    "voxel_down_sample_factors": "intlist",
    "beamlet_down_sample_factor": "int",
    "mu_bound": "float",
    "prescription_gy": "float",
    "num_fractions": "int",
}
_SOLVER_FIELDS = {"solver": "str", "time_limit_s": "float", "mip_gap": "float", "threads": "optint",
                  "warm_start": "str", "heuristic_time_s": "optfloat"}
_OBJECTIVE_FIELDS = {
    "weight": "float",
    "dose_gy": "optfloat",
    "dose_perc": "optfloat",
    "enabled": "bool",
    "role": "str",
    "structure_def": "optstr",
}
_CONSTRAINT_FIELDS = {
    "limit_dose_gy": "optfloat",
    "limit_dose_perc": "optfloat",
    "enabled": "bool",
    "structure_def": "optstr",
}
# Setting one unit of a dose clears the other, so "dose_gy=55" works on a row that held a percentage.
_EXCLUSIVE = {
    "dose_gy": "dose_perc",
    "dose_perc": "dose_gy",
    "limit_dose_gy": "limit_dose_perc",
    "limit_dose_perc": "limit_dose_gy",
}
_NONE_WORDS = ("", "none", "null")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


class _OverrideError(Exception):
    pass


def _parse_value(kind: str, raw: str) -> Any:
    text = raw.strip()
    if kind.startswith("opt") and text.lower() in _NONE_WORDS:
        return None
    base = kind.removeprefix("opt")
    if base == "str":
        return text
    if base == "int":
        if not re.fullmatch(r"[+-]?\d{1,18}", text):
            raise _OverrideError(f"{text!r} is not an integer")
        return int(text)
    if base == "float":
        try:
            return float(text)
        except ValueError:
            raise _OverrideError(f"{text!r} is not a number") from None
    if base == "bool":
        if text.lower() in _TRUE_WORDS:
            return True
        if text.lower() in _FALSE_WORDS:
            return False
        raise _OverrideError(f"{text!r} is not true or false")
    if base == "intlist":
        if not text:
            return []
        return [_parse_value("int", part) for part in text.split(",")]
    raise AssertionError(kind)


def _infer_option(raw: str) -> int | float | str | bool:
    text = raw.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"[+-]?\d{1,18}", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _dict_key(row: dict) -> str:
    name, typ = row.get("structure_name"), row.get("type")
    return str(typ) if name is None else f"{name}/{typ}"


def _apply_one(d: dict, lhs: str, raw: str) -> None:
    if lhs in _TOP_FIELDS:
        d[lhs] = _parse_value(_TOP_FIELDS[lhs], raw)
        return
    if lhs.startswith("solver.options."):
        d["solver"]["options"][lhs.removeprefix("solver.options.")] = _infer_option(raw)
        return
    if lhs.startswith("solver."):
        name = lhs.removeprefix("solver.")
        if name not in _SOLVER_FIELDS:
            raise _OverrideError(f"unknown solver setting {name!r}; allowed: {', '.join(_SOLVER_FIELDS)}, "
                                 f"options.<name>")
        d["solver"][name] = _parse_value(_SOLVER_FIELDS[name], raw)
        return
    if "." not in lhs:
        raise _OverrideError(f"unknown setting {lhs!r}; allowed: {', '.join(_TOP_FIELDS)}, solver.<setting>, "
                             f"STRUCT.field or STRUCT/type.field")
    target, name = lhs.rsplit(".", 1)
    candidates: list[tuple[str, dict]] = []
    for kind in ("objectives", "constraints"):
        for row in d[kind]:
            key = _dict_key(row)
            hit = key == target if "/" in target else (row.get("structure_name") == target or key == target)
            if hit:
                candidates.append((kind, row))
    all_keys = [_dict_key(r) for k in ("objectives", "constraints") for r in d[k]]
    if not candidates:
        raise _OverrideError(f"no objective or constraint row {target!r}; rows: {_list_names(all_keys)}")
    settable = [(k, r) for k, r in candidates
                if name in (_OBJECTIVE_FIELDS if k == "objectives" else _CONSTRAINT_FIELDS)]
    if not settable:
        raise _OverrideError(f"{name!r} cannot be set on {target}; objective fields: {', '.join(_OBJECTIVE_FIELDS)}"
                             f"; constraint fields: {', '.join(_CONSTRAINT_FIELDS)}")
    if len(settable) > 1:
        keys = ", ".join(_dict_key(r) for _, r in settable)
        raise _OverrideError(f"{target!r} is ambiguous: it matches {keys}; name one as STRUCT/type.{name}")
    kind, row = settable[0]
    value = _parse_value((_OBJECTIVE_FIELDS if kind == "objectives" else _CONSTRAINT_FIELDS)[name], raw)
    row[name] = value
    if name in _EXCLUSIVE and value is not None:
        row[_EXCLUSIVE[name]] = None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A new config with CLI ``--set`` strings applied in order, e.g. ``"CORD/quadratic.weight=20"``,
    ``"PTV/quadratic-underdose.dose_perc=98"``, ``"solver.time_limit_s=30"``, ``"beam_ids=0,11,22"``,
    ``"solver.options.presolve=off"``. A bare structure (``"HEART.weight=5"``) must match exactly one row that
    has the field. Each step is validated; errors are ConfigErrors whose field is the override's left side."""
    current = validate_config(cfg)
    if isinstance(overrides, str) or not isinstance(overrides, (list, tuple)):
        raise ConfigError("overrides", f"must be a list of 'name=value' strings, got {_describe(overrides)}")
    for text in overrides:
        if not isinstance(text, str):
            raise ConfigError("overrides", f"each override must be a 'name=value' string, got {_describe(text)}")
        lhs, sep, raw = text.partition("=")
        lhs = lhs.strip()
        if not sep or not lhs:
            raise ConfigError(lhs or "overrides", f"{text!r} is not of the form name=value, e.g. "
                                                  f"'CORD/quadratic.weight=20'")
        d = current.to_dict()
        try:
            _apply_one(d, lhs, raw)
        except _OverrideError as e:
            raise ConfigError(lhs, f"override {text!r}: {e}") from None
        try:
            current = validate_config(RunConfig.from_dict(d))
        except ConfigError as e:
            raise ConfigError(lhs, f"override {text!r} makes the config invalid: {e}") from None
    return current
