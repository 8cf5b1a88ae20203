"""The run config: PortPy defaults, strict parsing, validation, hashing, overrides, and PortPy's acceptance of
the opt_params it produces (real PortPy code on a small in-memory structure set)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import pickle
import signal
from pathlib import Path
from types import SimpleNamespace

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmat_core.cases import CaseInfo
from vmat_core.config import (
    OBJECTIVE_TYPES,
    ROLES,
    SOLVER_NAMES,
    ConfigError,
    ConstraintRow,
    ObjectiveRow,
    RunConfig,
    SolverSettings,
    apply_overrides,
    default_config,
    objectives_table,
    shipped_protocols,
    structure_def_names,
    to_portpy_opt_params,
    validate_config,
)

pp = pytest.importorskip("portpy.photon")  # installed in the project's environment; import is slow, so once

PROTOCOL = "Lung_2Gy_30Fx"
CASE_STRUCTURES = ("GTV", "PTV", "ESOPHAGUS", "HEART", "LUNG_L", "LUNG_R", "CORD", "SKIN", "BODY")


def fake_case(**changes) -> CaseInfo:
    info = {
        "case_id": "Lung_Synth_Patient_1",
        "path": Path("/nonexistent/Lung_Synth_Patient_1"),
        "disease_site": "Lung",
        "structure_names": CASE_STRUCTURES,
        "structure_volumes_cc": {s: 1.0 for s in CASE_STRUCTURES},
        "beam_ids": tuple(range(72)),
        "gantry_angles_deg": {b: 5.0 * b for b in range(72)},
        "planner_beam_ids": tuple(range(72)),
        "ct_shape_zyx": (8, 24, 24),
        "ct_resolution_xyz_mm": (5.0, 5.0, 5.0),
        "has_reference_dose": False,
        "protocols": (PROTOCOL,),
    }
    info.update(changes)
    return CaseInfo(**info)


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return default_config()


@pytest.fixture(scope="module")
def portpy_opt_params() -> dict:
    return pp.DataExplorer.load_config_opt_params(protocol_name=PROTOCOL)


@pytest.fixture(scope="module")
def clinical_criteria(tmp_path_factory):
    data = pp.DataExplorer(data_dir=str(tmp_path_factory.mktemp("no_patients")))
    return pp.ClinicalCriteria(data, protocol_name=PROTOCOL)


def portpy_resolver(clinical_criteria):
    """PortPy's own reader of dose entries (numbers or 'k*prescription_gy' expressions)."""
    opt = pp.Optimization.__new__(pp.Optimization)
    opt.clinical_criteria = clinical_criteria
    return opt


def key_index(cfg: RunConfig, key: str) -> int:
    return [r.key for r in cfg.objectives].index(key)


# ---------------------------------------------------------------------------------------------------- defaults


def test_default_run_settings_are_the_notebooks(cfg):
    assert cfg.case_id == "Lung_Synth_Patient_1"
    assert cfg.protocol == PROTOCOL
    assert cfg.beam_ids == [0, 11, 22, 33, 44, 55, 66]
    assert cfg.voxel_down_sample_factors == [6, 6, 1]
    assert cfg.beamlet_down_sample_factor == 6
    assert cfg.mu_bound == 2.0
    assert cfg.solver == SolverSettings()
    assert (cfg.prescription_gy, cfg.num_fractions) == (60.0, 30)
    assert cfg.label == "" and cfg.warm_start_run_id is None


def test_defaults_equal_portpys_protocol_file(cfg, portpy_opt_params, clinical_criteria):
    resolver = portpy_resolver(clinical_criteria)
    assert cfg.prescription_gy == clinical_criteria.get_prescription()
    assert cfg.num_fractions == clinical_criteria.get_num_of_fractions()
    ours = to_portpy_opt_params(cfg)
    theirs = portpy_opt_params["objective_functions"]
    assert len(ours["objective_functions"]) == len(theirs) == len(cfg.objectives) == 15
    for mine, orig in zip(ours["objective_functions"], theirs, strict=True):
        assert mine["type"] == orig["type"]
        assert mine.get("structure_name") == orig.get("structure_name")
        assert mine.get("structure_def") == orig.get("structure_def")
        if orig["type"] == "smoothness-quadratic":
            assert orig["weight"] == 100 and mine["weight"] == 0.0  # the notebook zeroes it
        else:
            assert mine["weight"] == orig["weight"]
        if "dose_gy" in orig:
            assert mine["dose_gy"] == resolver.get_num(orig["dose_gy"])
        else:
            assert "dose_gy" not in mine
    assert len(ours["constraints"]) == len(portpy_opt_params["constraints"]) == 5
    for mine, orig in zip(ours["constraints"], portpy_opt_params["constraints"], strict=True):
        assert mine["type"] == orig["type"]
        assert mine["parameters"] == orig["parameters"]
        (limit_key, limit), = orig["constraints"].items()
        assert mine["constraints"]["limit_dose_gy"] == pytest.approx(resolver.dose_to_gy(limit_key, limit))
    assert ours["prescription_gy"] == 60.0


def test_default_rows_keep_the_protocols_units_and_roles(cfg):
    rows = {r.key: r for r in cfg.objectives}
    assert rows["PTV/quadratic-overdose"].dose_perc == 100.0 and rows["PTV/quadratic-overdose"].dose_gy is None
    assert rows["CORD/linear-overdose"].dose_gy == 50.0
    assert not rows["CORD/linear-overdose"].used_by_model
    assert not rows["smoothness-quadratic"].used_by_model and rows["smoothness-quadratic"].structure_name is None
    assert rows["HEART/quadratic"].used_by_model
    assert {k: r.role for k, r in rows.items() if r.role != "oar"} == {
        "PTV/quadratic-overdose": "target",
        "PTV/quadratic-underdose": "target",
        "RIND_0/quadratic": "rind",
        "RIND_1/quadratic": "rind",
        "RIND_2/quadratic": "rind",
        "RIND_3/quadratic": "rind",
        "RIND_4/quadratic": "rind",
        "smoothness-quadratic": "other",
    }
    assert [c.limit_dose_perc for c in cfg.constraints] == [110.0, 105.0, 90.0, 85.0, 75.0]
    assert {r.role for r in cfg.objectives} <= set(ROLES)


def test_every_shipped_protocol_gives_a_valid_default():
    assert PROTOCOL in shipped_protocols()
    for protocol in shipped_protocols():
        opt = pp.DataExplorer.load_config_opt_params(protocol_name=protocol)
        crit = pp.DataExplorer.load_config_clinical_criteria(protocol_name=protocol)
        c = validate_config(default_config(protocol=protocol))
        assert c.prescription_gy == pytest.approx(crit["pres_per_fraction_gy"] * crit["num_of_fractions"])
        # Rows PortPy repeats (Paraspinal lists ESOPHAGUS/quadratic twice) merge by adding weights: the same sum.
        expected: dict[str, float] = {}
        for o in opt["objective_functions"]:
            key = o["type"] if "structure_name" not in o else f"{o['structure_name']}/{o['type']}"
            expected[key] = expected.get(key, 0.0) + (0.0 if o["type"] == "smoothness-quadratic" else o["weight"])
        assert {r.key: r.weight for r in c.objectives} == expected


def test_default_config_rejects_a_protocol_portpy_does_not_ship():
    with pytest.raises(ConfigError) as e:
        default_config(protocol="Lung_2Gy_30Fx_vmat")  # opt params exist, clinical criteria do not
    assert e.value.field == "protocol" and PROTOCOL in e.value.message


# ----------------------------------------------------------------------------------------------- serialisation


def test_dict_and_json_round_trip(cfg):
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    text = cfg.to_json()
    assert RunConfig.from_json(text) == cfg
    assert json.dumps(json.loads(text), sort_keys=True, indent=2) == text  # keys sorted
    edited = apply_overrides(cfg, ["label=trial 3", "warm_start_run_id=run-0001", "solver.options.presolve=off"])
    assert RunConfig.from_json(edited.to_json()) == edited
    assert edited.to_dict()["solver"]["options"] == {"presolve": "off"}


def test_to_dict_returns_independent_copies(cfg):
    d = cfg.to_dict()
    d["beam_ids"].append(71)
    d["objectives"][0]["weight"] = -5
    d["solver"]["options"]["x"] = 1
    assert cfg.beam_ids == [0, 11, 22, 33, 44, 55, 66]
    assert cfg.objectives[0].weight == 10000.0 and cfg.solver.options == {}


def test_from_json_rejects_nan_duplicates_and_garbage(cfg):
    text = cfg.to_json().replace('"mu_bound": 2.0', '"mu_bound": NaN')
    with pytest.raises(ConfigError, match="NaN"):
        RunConfig.from_json(text)
    with pytest.raises(ConfigError) as e:
        RunConfig.from_json('{"mu_bound": 1, "mu_bound": 2}')
    assert e.value.field == "mu_bound"
    with pytest.raises(ConfigError) as e:
        RunConfig.from_json("{not json")
    assert e.value.field == "config"
    with pytest.raises(ConfigError):
        RunConfig.from_json("1" * 5000)  # beyond Python's int-string limit


def test_config_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ConfigError("objectives[3:CORD/quadratic].weight", "must be ≥ 0")))
    assert isinstance(err, ConfigError)
    assert (err.field, err.message) == ("objectives[3:CORD/quadratic].weight", "must be ≥ 0")
    assert str(err) == "objectives[3:CORD/quadratic].weight: must be ≥ 0"


def _reverse_keys(v):
    if isinstance(v, dict):
        return {k: _reverse_keys(v[k]) for k in reversed(list(v))}
    if isinstance(v, list):
        return [_reverse_keys(x) for x in v]
    return v


def test_content_hash_is_stable_and_sensitive(cfg):
    h = cfg.content_hash()
    assert len(h) == 64 and int(h, 16) >= 0
    d = cfg.to_dict()
    assert RunConfig.from_dict(_reverse_keys(d)).content_hash() == h
    d_int = copy.deepcopy(d)
    d_int["prescription_gy"] = 60
    d_int["mu_bound"] = 2
    d_int["objectives"][0]["weight"] = 10000
    assert RunConfig.from_dict(d_int).content_hash() == h
    direct = RunConfig(**{**vars(cfg), "prescription_gy": 60, "mu_bound": 2})  # ints straight into the object
    assert direct.content_hash() == h
    assert apply_overrides(cfg, ["label=anything else"]).content_hash() == h
    assert apply_overrides(cfg, ["HEART/quadratic.weight=21"]).content_hash() != h
    assert apply_overrides(cfg, ["solver.time_limit_s=30"]).content_hash() != h
    with_int_option = apply_overrides(cfg, ["solver.options.mip_heuristic_effort=1"])
    with_float_option = apply_overrides(cfg, ["solver.options.mip_heuristic_effort=1.0"])
    assert with_int_option.content_hash() == with_float_option.content_hash() != h


def test_validation_and_hashing_write_nothing(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("VMAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    validate_config(cfg, fake_case())
    cfg.content_hash()
    apply_overrides(cfg, ["beam_ids=0,11"])
    to_portpy_opt_params(cfg)
    objectives_table(cfg)
    with pytest.raises(ConfigError):
        validate_config(apply_overrides(cfg, ["beam_ids=0,80"]), fake_case())
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------- validation


def _obj(d: dict, key: str) -> dict:
    (row,) = [r for r in d["objectives"] if (r["type"] if r["structure_name"] is None else
                                              f"{r['structure_name']}/{r['type']}") == key]
    return row


def _set(path: str, value):
    """A mutation of the config dict: ``"solver.mip_gap"`` or ``"HEART/quadratic:weight"`` style paths."""

    def mutate(d):
        if ":" in path:
            key, name = path.split(":")
            if key.endswith(("/max_dose", "/mean_dose")):
                row = next(c for c in d["constraints"] if f"{c['structure_name']}/{c['type']}" == key)
            else:
                row = _obj(d, key)
            row[name] = value
        elif "." in path:
            outer, name = path.split(".")
            d[outer][name] = value
        else:
            d[path] = value

    return mutate


def _delete(path: str):
    def mutate(d):
        if ":" in path:
            key, name = path.split(":")
            del _obj(d, key)[name]
        elif "." in path:
            outer, name = path.split(".")
            del d[outer][name]
        else:
            del d[path]

    return mutate


def _rename_row(key: str, new_name: str):
    def mutate(d):
        _obj(d, key)["structure_name"] = new_name

    return mutate


def _duplicate_row(key: str):
    def mutate(d):
        d["objectives"].append(copy.deepcopy(_obj(d, key)))

    return mutate


def _duplicate_constraint(i: int):
    def mutate(d):
        d["constraints"].append(copy.deepcopy(d["constraints"][i]))

    return mutate


def _add_unknown_row_field(d):
    d["objectives"][5]["colour"] = "red"


HEART = "objectives[5:HEART/quadratic]"
PTV_OVER = "objectives[0:PTV/quadratic-overdose]"
PTV_UNDER = "objectives[2:PTV/quadratic-underdose]"
RIND0 = "objectives[9:RIND_0/quadratic]"
SMOOTH = "objectives[14:smoothness-quadratic]"
CON0 = "constraints[0:RIND_0/max_dose]"

# (id, mutation, with the fake case?, expected field, expected words in the message)
INVALID = [
    ("unknown-structure", _rename_row("HEART/quadratic", "LIVER"), True, "objectives[5:LIVER/quadratic].structure_name",
     "unknown structure 'LIVER'"),
    ("def-unknown-ref", _set("LUNGS_NOT_GTV/quadratic:structure_def", "(LUNG_L | LUNG_X) - GTV"), True,
     "objectives[8:LUNGS_NOT_GTV/quadratic].structure_def", "LUNG_X"),
    ("def-unclosed", _set("RIND_0/quadratic:structure_def", "(PTV+5 - PTV"), False, f"{RIND0}.structure_def",
     "never closed"),
    ("def-margin-first", _set("RIND_0/quadratic:structure_def", "5 + PTV"), False, f"{RIND0}.structure_def",
     "must follow"),
    ("def-bad-char", _set("RIND_0/quadratic:structure_def", "PTV * 2"), False, f"{RIND0}.structure_def",
     "unexpected character"),
    ("def-hang", _set("RIND_0/quadratic:structure_def", "(PTV + 5 ) - PTV"), False, f"{RIND0}.structure_def",
     "between spaces"),
    ("def-huge-margin", _set("RIND_0/quadratic:structure_def", "(PTV+9999) - PTV"), False,
     f"{RIND0}.structure_def", "500 mm"),
    ("def-no-operator", _set("RIND_0/quadratic:structure_def", "(PTV)"), False, f"{RIND0}.structure_def",
     "operator"),
    ("def-differs", _set("RIND_0/max_dose:structure_def", "(PTV+6) - PTV"), False, f"{CON0}.structure_def",
     "differently"),
    ("unknown-type", _set("HEART/quadratic:type", "quadratic-mean"), False, "objectives[5:HEART/quadratic-mean].type",
     "quadratic-overdose, quadratic-underdose, quadratic, linear-overdose, smoothness-quadratic"),
    ("weight-negative", _set("HEART/quadratic:weight", -1), False, f"{HEART}.weight", "≥ 0"),
    ("weight-nan", _set("HEART/quadratic:weight", math.nan), False, f"{HEART}.weight", "finite"),
    ("weight-inf", _set("HEART/quadratic:weight", math.inf), False, f"{HEART}.weight", "finite"),
    ("weight-string", _set("HEART/quadratic:weight", "20"), False, f"{HEART}.weight", "must be a number"),
    ("weight-bool", _set("HEART/quadratic:weight", True), False, f"{HEART}.weight", "must be a number"),
    ("weight-huge-int", _set("HEART/quadratic:weight", 10**400), False, f"{HEART}.weight", "too large"),
    ("weight-missing", _delete("HEART/quadratic:weight"), False, f"{HEART}.weight", "missing"),
    ("dose-perc-zero", _set("PTV/quadratic-overdose:dose_perc", 0), False, f"{PTV_OVER}.dose_perc", "(0, 150]"),
    ("dose-perc-high", _set("PTV/quadratic-overdose:dose_perc", 151), False, f"{PTV_OVER}.dose_perc", "(0, 150]"),
    ("dose-perc-negative", _set("PTV/quadratic-overdose:dose_perc", -5), False, f"{PTV_OVER}.dose_perc",
     "(0, 150]"),
    ("dose-gy-high", _set("CORD/linear-overdose:dose_gy", 95.0), False, "objectives[1:CORD/linear-overdose].dose_gy",
     "at most 90 Gy"),
    ("dose-gy-zero", _set("CORD/linear-overdose:dose_gy", 0), False, "objectives[1:CORD/linear-overdose].dose_gy",
     "above 0"),
    ("dose-both", _set("PTV/quadratic-underdose:dose_gy", 60.0), False, f"{PTV_UNDER}.dose_gy", "not both"),
    ("dose-neither", _set("PTV/quadratic-underdose:dose_perc", None), False, f"{PTV_UNDER}.dose_gy", "needs a dose"),
    ("dose-not-taken", _set("HEART/quadratic:dose_gy", 20.0), False, f"{HEART}.dose_gy", "takes no dose"),
    ("dose-smoothness", _set("smoothness-quadratic:dose_perc", 50.0), False, f"{SMOOTH}.dose_perc",
     "takes no dose"),
    ("smoothness-structure", _set("smoothness-quadratic:structure_def", "(PTV+5) - PTV"), False,
     f"{SMOOTH}.structure_def", "takes no structure"),
    ("structure-missing", _set("HEART/quadratic:structure_name", None), False,
     "objectives[5:quadratic].structure_name", "needs a structure name"),
    ("structure-slash", _set("HEART/quadratic:structure_name", "HE/ART"), False,
     "objectives[5:HE/ART/quadratic].structure_name", "'/'"),
    ("role-unknown", _set("HEART/quadratic:role", "organ"), False, f"{HEART}.role", "target, oar, rind, other"),
    ("enabled-string", _set("HEART/quadratic:enabled", "yes"), False, f"{HEART}.enabled", "true or false"),
    ("row-unknown-field", _add_unknown_row_field, False, f"{HEART}.colour", "unknown field"),
    ("duplicate-row", _duplicate_row("HEART/quadratic"), False, "objectives[15:HEART/quadratic]", "duplicate"),
    ("duplicate-constraint", _duplicate_constraint(0), False, "constraints[5:RIND_0/max_dose]", "duplicate"),
    ("constraint-type", _set("RIND_0/max_dose:type", "dose_volume_V"), False,
     "constraints[0:RIND_0/dose_volume_V].type", "max_dose, mean_dose"),
    ("constraint-limit-high", _set("RIND_0/max_dose:limit_dose_perc", 200.0), False,
     f"{CON0}.limit_dose_perc", "(0, 150]"),
    ("constraint-no-limit", _set("RIND_0/max_dose:limit_dose_perc", None), False, f"{CON0}.limit_dose_gy",
     "needs a dose"),
    ("constraint-name-missing", lambda d: d["constraints"][0].pop("structure_name"), False,
     "constraints[0].structure_name", "missing"),
    ("beams-empty", _set("beam_ids", []), False, "beam_ids", "at least one"),
    ("beams-duplicate", _set("beam_ids", [0, 11, 0]), False, "beam_ids[2]", "twice"),
    ("beams-not-in-case", _set("beam_ids", [0, 11, 80]), True, "beam_ids[2]", "valid ids: 0..71"),
    ("beams-not-int", _set("beam_ids", [0, 11.0]), False, "beam_ids[1]", "integer"),
    ("beams-bool", _set("beam_ids", [0, True]), False, "beam_ids[1]", "integer"),
    ("beams-string", _set("beam_ids", "0,11"), False, "beam_ids", "list of integers"),
    ("beams-negative", _set("beam_ids", [-1]), False, "beam_ids[0]", "outside"),
    ("beams-missing", _delete("beam_ids"), False, "beam_ids", "missing"),
    ("factors-two", _set("voxel_down_sample_factors", [6, 6]), False, "voxel_down_sample_factors", "3 integers"),
    ("factors-zero", _set("voxel_down_sample_factors", [6, 0, 1]), False, "voxel_down_sample_factors[1]",
     "1..64"),
    ("factors-float", _set("voxel_down_sample_factors", [6, 6, 1.5]), False, "voxel_down_sample_factors[2]",
     "integer"),
    ("factors-dict", _set("voxel_down_sample_factors", {"x": 6}), False, "voxel_down_sample_factors",
     "list of integers"),
    ("beamlet-factor-zero", _set("beamlet_down_sample_factor", 0), False, "beamlet_down_sample_factor", "1..64"),
    ("beamlet-factor-float", _set("beamlet_down_sample_factor", 6.0), False, "beamlet_down_sample_factor",
     "integer"),
    ("beamlet-factor-bool", _set("beamlet_down_sample_factor", True), False, "beamlet_down_sample_factor",
     "integer"),
    ("mu-zero", _set("mu_bound", 0), False, "mu_bound", "> 0"),
    ("mu-inf", _set("mu_bound", math.inf), False, "mu_bound", "finite"),
    ("time-zero", _set("solver.time_limit_s", 0), False, "solver.time_limit_s", "(0, 604800]"),
    ("time-week", _set("solver.time_limit_s", 604801), False, "solver.time_limit_s", "7 days"),
    ("time-nan", _set("solver.time_limit_s", math.nan), False, "solver.time_limit_s", "finite"),
    ("gap-one", _set("solver.mip_gap", 1.0), False, "solver.mip_gap", "[0, 1)"),
    ("gap-negative", _set("solver.mip_gap", -0.1), False, "solver.mip_gap", "[0, 1)"),
    ("threads-zero", _set("solver.threads", 0), False, "solver.threads", "1..256"),
    ("solver-unknown", _set("solver.solver", "GUROBI"), False, "solver.solver", "auto, MOSEK, HIGHS, SCIP"),
    ("solver-list", _set("solver", ["HIGHS"]), False, "solver", "must be an object"),
    ("options-nested", _set("solver.options", {"a": {"b": 1}}), False, "solver.options.a", "number, string"),
    ("options-nan", _set("solver.options", {"a": math.nan}), False, "solver.options.a", "finite"),
    ("options-list", _set("solver.options", [1]), False, "solver.options", "must be an object"),
    ("protocol-unknown", _set("protocol", "Lung_3Gy"), False, "protocol", "Lung_2Gy_30Fx"),
    ("protocol-other-site", _set("protocol", "Prostate_26Fx"), True, "protocol", "allowed: Lung_2Gy_30Fx"),
    ("prescription-zero", _set("prescription_gy", 0), False, "prescription_gy", "> 0"),
    ("prescription-string", _set("prescription_gy", "60"), False, "prescription_gy", "must be a number"),
    ("fractions-zero", _set("num_fractions", 0), False, "num_fractions", "1..100"),
    ("fractions-float", _set("num_fractions", 30.0), False, "num_fractions", "integer"),
    ("case-id-path", _set("case_id", "../etc"), False, "case_id", "not a valid case id"),
    ("case-id-other-case", _set("case_id", "Lung_Patient_6"), True, "case_id", "Lung_Synth_Patient_1"),
    ("warm-start-path", _set("warm_start_run_id", "../runs/x"), False, "warm_start_run_id", "not a valid run id"),
    ("warm-start-unknown", _set("solver.warm_start", "greedy"), False, "solver.warm_start", "auto, heuristic, none"),
    ("heuristic-time-zero", _set("solver.heuristic_time_s", 0), False, "solver.heuristic_time_s", "(0, time_limit_s"),
    ("heuristic-time-too-long", _set("solver.heuristic_time_s", 500.0), False, "solver.heuristic_time_s",
     "time_limit_s = 120"),
    ("label-number", _set("label", 3), False, "label", "must be a string"),
    ("unknown-top-field", _set("colour", "red"), False, "colour", "unknown field"),
    ("objectives-dict", _set("objectives", {"PTV": 1}), False, "objectives", "list of objective rows"),
    ("row-not-dict", lambda d: d["objectives"].__setitem__(3, ["CORD"]), False, "objectives[3]",
     "must be an object"),
]


@pytest.mark.parametrize(("mutate", "with_case", "field", "words"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_configs_name_the_field(cfg, mutate, with_case, field, words):
    d = cfg.to_dict()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        validate_config(RunConfig.from_dict(d), fake_case() if with_case else None)
    assert e.value.field == field
    assert words in e.value.message
    assert str(e.value) == f"{field}: {e.value.message}"
    if with_case:  # these are only wrong for this case
        validate_config(RunConfig.from_dict(d))


def test_validation_of_objects_edited_in_place(cfg):
    edited = copy.deepcopy(cfg)
    edited.objectives[5].weight = "a lot"  # what a careless UI binding might do
    with pytest.raises(ConfigError) as e:
        validate_config(edited)
    assert e.value.field == f"{HEART}.weight"
    edited = copy.deepcopy(cfg)
    edited.solver.threads = 2.5
    with pytest.raises(ConfigError, match="solver.threads"):
        validate_config(edited)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg.to_dict())
    assert e.value.field == "config"


def test_valid_edge_values_pass(cfg):
    d = cfg.to_dict()
    _obj(d, "PTV/quadratic-overdose")["dose_perc"] = 150.0
    _obj(d, "HEART/quadratic")["weight"] = 0
    d["solver"].update(mip_gap=0.0, time_limit_s=7 * 24 * 3600.0, threads=1, solver="SCIP")
    d["beam_ids"] = [71]
    d["voxel_down_sample_factors"] = [1, 1, 1]
    d["beamlet_down_sample_factor"] = 1
    ok = validate_config(RunConfig.from_dict(d), fake_case())
    assert ok.objectives[5].weight == 0.0 and isinstance(ok.objectives[5].weight, float)


def test_disabled_rows_may_name_structures_the_case_lacks(cfg):
    d = cfg.to_dict()
    _obj(d, "HEART/quadratic")["enabled"] = False
    case = fake_case(structure_names=tuple(s for s in CASE_STRUCTURES if s != "HEART"))
    validate_config(RunConfig.from_dict(d), case)
    _obj(d, "HEART/quadratic")["enabled"] = True
    with pytest.raises(ConfigError, match="unknown structure 'HEART'"):
        validate_config(RunConfig.from_dict(d), case)


def test_optimisation_structures_need_body_and_may_build_on_each_other(cfg):
    case_without_body = fake_case(structure_names=tuple(s for s in CASE_STRUCTURES if s != "BODY"))
    with pytest.raises(ConfigError, match="BODY"):
        validate_config(cfg, case_without_body)
    d = cfg.to_dict()
    d["objectives"].append({"structure_name": "RIND_01", "type": "quadratic", "weight": 1.0,
                            "structure_def": "RIND_0 | RIND_1"})
    validate_config(RunConfig.from_dict(d), fake_case())
    d["objectives"][-1]["structure_def"] = "RIND_0 | RIND_9"
    with pytest.raises(ConfigError, match="RIND_9"):
        validate_config(RunConfig.from_dict(d), fake_case())


def test_structure_def_names_reads_portpys_protocol_definitions():
    assert structure_def_names("(LUNG_L | LUNG_R) - GTV") == ("LUNG_L", "LUNG_R", "GTV")
    assert structure_def_names("(PTV+5) - PTV") == ("PTV", "PTV")
    assert structure_def_names("(PTV + inf) - (PTV + 50)") == ("PTV", "PTV")
    with pytest.raises(ValueError, match="between spaces"):
        structure_def_names("PTV - X - PTV")


def test_lists_of_allowed_values_are_the_published_ones():
    assert OBJECTIVE_TYPES == ("quadratic-overdose", "quadratic-underdose", "quadratic", "linear-overdose",
                               "smoothness-quadratic")
    assert SOLVER_NAMES == ("auto", "MOSEK", "HIGHS", "SCIP")
    assert ObjectiveRow("CTV_HIGH", "quadratic", 1.0).role == "target"
    assert ObjectiveRow("RIND_7", "quadratic", 1.0).role == "rind"
    assert ObjectiveRow("LUNGS_NOT_GTV", "quadratic", 1.0).role == "oar"
    assert ObjectiveRow(None, "smoothness-quadratic", 0.0).role == "other"
    assert ObjectiveRow("PTV", "quadratic", 1.0, role="oar").role == "oar"
    assert ObjectiveRow("PTV", "quadratic-overdose", 1.0, dose_perc=105).dose_gy_resolved(60.0) == 63.0
    assert ConstraintRow("max_dose", "GTV", limit_dose_gy=69.0).used_by_model is False


# --------------------------------------------------------------------------------------------------- overrides


def test_overrides_apply_to_a_copy(cfg):
    new = apply_overrides(cfg, [
        "CORD/quadratic.weight=20",
        "HEART.weight=5",
        "PTV/quadratic-underdose.dose_perc=98",
        "PTV/quadratic-overdose.dose_gy=62",
        "PTV/quadratic-overdose.enabled=false",
        "smoothness-quadratic.weight=3",
        "RIND_0/max_dose.limit_dose_gy=64",
        "solver.time_limit_s=30",
        "solver.solver=HIGHS",
        "solver.threads=2",
        "solver.options.presolve=off",
        "beam_ids=0,11,22",
        "voxel_down_sample_factors=12,12,2",
        "beamlet_down_sample_factor=4",
        "mu_bound=1.5",
        "label=my trial",
    ])
    rows = {r.key: r for r in new.objectives}
    assert rows["CORD/quadratic"].weight == 20.0 and rows["CORD/linear-overdose"].weight == 100.0
    assert rows["HEART/quadratic"].weight == 5.0
    assert (rows["PTV/quadratic-underdose"].dose_perc, rows["PTV/quadratic-underdose"].dose_gy) == (98.0, None)
    assert (rows["PTV/quadratic-overdose"].dose_gy, rows["PTV/quadratic-overdose"].dose_perc) == (62.0, None)
    assert rows["PTV/quadratic-overdose"].enabled is False
    assert rows["smoothness-quadratic"].weight == 3.0
    assert (new.constraints[0].limit_dose_gy, new.constraints[0].limit_dose_perc) == (64.0, None)
    assert new.solver == SolverSettings(solver="HIGHS", time_limit_s=30.0, threads=2, options={"presolve": "off"})
    assert new.beam_ids == [0, 11, 22] and new.voxel_down_sample_factors == [12, 12, 2]
    assert (new.beamlet_down_sample_factor, new.mu_bound, new.label) == (4, 1.5, "my trial")
    assert cfg == default_config()  # the input is untouched
    opt = to_portpy_opt_params(new)
    assert "PTV/quadratic-overdose" not in {f"{o.get('structure_name')}/{o['type']}" for o in
                                            opt["objective_functions"]}
    assert opt["constraints"][0]["constraints"] == {"limit_dose_gy": 64.0}


@pytest.mark.parametrize(("override", "field", "words"), [
    ("CORD.weight=20", "CORD.weight", "CORD/linear-overdose, CORD/quadratic"),
    ("RIND_0.enabled=false", "RIND_0.enabled", "RIND_0/quadratic, RIND_0/max_dose"),
    ("LIVER.weight=1", "LIVER.weight", "no objective or constraint row 'LIVER'"),
    ("LIVER/quadratic.weight=1", "LIVER/quadratic.weight", "rows: PTV/quadratic-overdose"),
    ("HEART/quadratic.colour=red", "HEART/quadratic.colour", "objective fields: weight"),
    ("HEART/quadratic.weight=lots", "HEART/quadratic.weight", "'lots' is not a number"),
    ("HEART/quadratic.weight=-1", "HEART/quadratic.weight", "objectives[5:HEART/quadratic].weight"),
    ("HEART/quadratic.enabled=maybe", "HEART/quadratic.enabled", "not true or false"),
    ("solver.time_limit_s=0", "solver.time_limit_s", "(0, 604800]"),
    ("solver.time_limit_s=nan", "solver.time_limit_s", "finite"),
    ("solver.colour=red", "solver.colour", "unknown solver setting"),
    ("beam_ids=0,0", "beam_ids", "twice"),
    ("beam_ids=0,eleven", "beam_ids", "'eleven' is not an integer"),
    ("voxel_down_sample_factors=12,12", "voxel_down_sample_factors", "3 integers"),
    ("num_fractions=2.5", "num_fractions", "not an integer"),
    ("colour=red", "colour", "unknown setting"),
    ("just-text", "just-text", "name=value"),
    ("=5", "overrides", "name=value"),
])
def test_bad_overrides_name_the_override(cfg, override, field, words):
    with pytest.raises(ConfigError) as e:
        apply_overrides(cfg, [override])
    assert e.value.field == field
    assert words in e.value.message
    assert override in e.value.message or field == "overrides"


def test_overrides_must_be_a_list_of_strings(cfg):
    with pytest.raises(ConfigError, match="list"):
        apply_overrides(cfg, "HEART.weight=5")
    with pytest.raises(ConfigError, match="string"):
        apply_overrides(cfg, [5])


# ------------------------------------------------------------------------------------------------ UI table


def test_objectives_table(cfg):
    edited = apply_overrides(cfg, ["HEART/quadratic.weight=40", "PTV/quadratic-underdose.dose_gy=57"])
    table = {r["key"]: r for r in objectives_table(edited)}
    assert list(table) == [r.key for r in cfg.objectives]
    heart = table["HEART/quadratic"]
    assert (heart["weight"], heart["default_weight"], heart["role"], heart["used_by_model"]) == (40.0, 20.0, "oar",
                                                                                             True)
    assert heart["dose_gy"] is None and heart["default_dose_gy"] is None
    under = table["PTV/quadratic-underdose"]
    assert (under["dose_gy"], under["dose_perc"], under["dose_unit"], under["default_dose_gy"]) == (57.0, 95.0, "gy",
                                                                                                60.0)
    assert table["CORD/linear-overdose"]["used_by_model"] is False
    assert table["smoothness-quadratic"]["default_weight"] == 0.0
    assert set(heart) >= {"key", "structure_name", "role", "type", "weight", "dose_gy", "dose_perc", "enabled",
                          "used_by_model", "default_weight", "default_dose_gy"}


# ----------------------------------------------------------------------------- PortPy accepts the opt_params


SHAPE_ZYX = (8, 24, 24)
RES_MM = 5.0


def _box(z, y, x) -> np.ndarray:
    m = np.zeros(SHAPE_ZYX, dtype="uint8")
    m[z[0]:z[1] + 1, y[0]:y[1] + 1, x[0]:x[1] + 1] = 1
    return m


def small_structures():
    """A real PortPy ``Structures`` object on an 8×24×24 grid of 5 mm voxels, built without patient files."""
    body = _box((0, 7), (1, 22), (1, 22))
    inner = _box((0, 7), (2, 21), (2, 21))
    masks = {
        "BODY": body,
        "SKIN": body - inner,
        "LUNG_L": _box((1, 6), (6, 17), (3, 10)),
        "LUNG_R": _box((1, 6), (6, 17), (13, 20)),
        "PTV": _box((3, 4), (10, 13), (6, 9)),
        "GTV": _box((3, 4), (11, 12), (7, 8)),
        "HEART": _box((2, 5), (14, 19), (10, 14)),
        "ESOPHAGUS": _box((0, 7), (8, 9), (11, 12)),
        "CORD": _box((0, 7), (20, 21), (11, 12)),
    }
    index = np.arange(np.prod(SHAPE_ZYX)).reshape(SHAPE_ZYX)
    structs = pp.Structures.__new__(pp.Structures)
    names = list(masks)
    structs.structures_dict = {
        "name": names,
        "structure_mask_3d": [masks[n] for n in names],
        "volume_cc": [float(masks[n].sum()) * RES_MM**3 / 1000 for n in names],
        "fraction_of_vol_in_calc_box": [1.0] * len(names),
    }
    structs.opt_voxels_dict = {
        "ct_to_dose_voxel_map": [np.where(body > 0, index, -1)],
        "ct_voxel_resolution_xyz_mm": [RES_MM] * 3,
        "name": names,
    }
    structs._ct_voxel_resolution_xyz_mm = [RES_MM] * 3
    structs.preprocess_structures()
    return structs


def test_portpy_builds_the_optimisation_structures_and_the_problem(cfg, clinical_criteria):
    opt_params = to_portpy_opt_params(cfg)
    structs = small_structures()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        structs.create_opt_structures(opt_params=opt_params, clinical_criteria=clinical_criteria)
    assert "Cannot evaluate" not in out.getvalue()
    names = structs.get_structures()
    for new in ("LUNGS_NOT_GTV", "RIND_0", "RIND_1", "RIND_2", "RIND_3", "RIND_4"):
        assert new in names
    voxels = dict(zip(names, structs.opt_voxels_dict["voxel_idx"], strict=True))
    assert len(voxels["RIND_0"]) > 0 and not set(voxels["RIND_0"]) & set(voxels["PTV"])

    # PortPy's problem builder on a 4-beamlet influence matrix (one 2×2 beam).
    rng = np.random.default_rng(0)
    n_vox = int(np.prod(SHAPE_ZYX))
    a = rng.uniform(0.0, 0.08, size=(n_vox, 4))
    a[voxels["PTV"], :] += 0.5
    inf = SimpleNamespace(
        A=a,
        beamlets_dict=[{"beamlet_idx_2d_finest_grid": np.array([[0, 1], [2, 3]]), "start_beamlet_idx": 0,
                        "end_beamlet_idx": 3}],
        get_opt_voxels_idx=lambda s: voxels[s],
        get_opt_voxels_volume_cc=lambda s: np.full(len(voxels[s]), RES_MM**3 / 1000),
    )
    plan = SimpleNamespace(structures=structs, inf_matrix=inf, clinical_criteria=clinical_criteria)
    opt = pp.Optimization(plan, opt_params=opt_params)
    with contextlib.redirect_stdout(io.StringIO()):
        opt.create_cvxpy_problem()
    model_rows = [o for o in opt_params["objective_functions"] if o["type"] in
                  ("quadratic-overdose", "quadratic-underdose", "quadratic")]
    assert len(opt.obj) == len(model_rows) + 1  # + the (zero-weight) smoothness term
    # The notebook's linearised loop reads dose_gy through get_num.
    for row in model_rows:
        if "overdose" in row["type"] or "underdose" in row["type"]:
            assert opt.get_num(row["dose_gy"]) == 60.0
    x = opt.vars["x"]
    problem = cp.Problem(cp.Minimize(cp.sum(opt.obj)), opt.constraints)
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == cp.OPTIMAL
    dose_gy = a @ x.value * cfg.num_fractions
    for con in opt_params["constraints"]:  # the rind limits PortPy enforced are ours, in Gy
        name = con["parameters"]["structure_name"]
        if len(voxels[name]):
            assert dose_gy[voxels[name]].max() <= con["constraints"]["limit_dose_gy"] * (1 + 1e-5)
    assert dose_gy[voxels["PTV"]].mean() > 30.0  # the target objectives pulled dose up


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float):
    def on_alarm(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_DEF_PIECES = ["PTV", "GTV", "LUNG_L", "BODY", "HEART", "5", "10", "inf", "+", "-", "|", "&", "(", ")", " ", " ",
               "X", "1"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_DEF_PIECES), min_size=1, max_size=9).map("".join))
def test_definitions_we_accept_portpy_builds(definition):
    """Whatever structure_def validation accepts, PortPy's create_opt_structures turns into a structure (without
    hanging); what it rejects is reported as a ValueError."""
    try:
        names = structure_def_names(definition)
    except ValueError:
        return
    structs = small_structures()
    if not set(names) <= set(structs.get_structures()):
        return  # unknown names are a case check, tested elsewhere
    params = {"objective_functions": [{"type": "quadratic", "structure_name": "NEW", "structure_def": definition,
                                       "weight": 1.0}]}
    out = io.StringIO()
    try:
        with _deadline(10.0), contextlib.redirect_stdout(out):
            structs.create_opt_structures(opt_params=params)
    except _Timeout:
        pytest.fail(f"PortPy hangs on accepted definition {definition!r}")
    assert "Cannot evaluate" not in out.getvalue(), definition
    assert "NEW" in structs.get_structures(), definition


# -------------------------------------------------------------------------------------------- property tests

_json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
                 | st.builds(pow, st.just(10), st.just(5000)) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
_json = st.recursive(_json_scalars, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)


def _accept_or_config_error(data, case=None):
    try:
        parsed = RunConfig.from_dict(data)
        valid = validate_config(parsed, case)
    except ConfigError as e:
        assert e.field and isinstance(e.message, str)
        return None
    assert RunConfig.from_json(valid.to_json()) == valid
    assert len(valid.content_hash()) == 64
    return valid


@settings(max_examples=150, deadline=None)
@given(_json)
def test_random_json_gives_config_error_or_config(data):
    assert _accept_or_config_error(data) is None or isinstance(data, dict)


_paths = st.sampled_from(
    ["case_id", "protocol", "beam_ids", "voxel_down_sample_factors", "beamlet_down_sample_factor", "mu_bound",
     "solver", "objectives", "constraints", "prescription_gy", "num_fractions", "label", "warm_start_run_id",
     "extra"]
    + [f"solver.{k}" for k in ("solver", "time_limit_s", "mip_gap", "threads", "options", "extra")]
    + [f"objectives.{i}.{k}" for i in (0, 1, 3, 14) for k in ("structure_name", "type", "weight", "dose_gy",
                                                                 "dose_perc", "role", "enabled", "structure_def",
                                                                 "extra")]
    + [f"constraints.{i}.{k}" for i in (0, 4) for k in ("type", "structure_name", "structure_def", "limit_dose_gy",
                                                        "limit_dose_perc", "enabled", "extra")]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_paths, st.booleans(), _json), min_size=1, max_size=3), st.booleans())
def test_mutated_configs_give_config_error_or_valid_config(cfg, mutations, with_case):
    d = cfg.to_dict()
    for path, delete, value in mutations:
        parts = path.split(".")
        target = d
        try:
            for p in parts[:-1]:
                target = target[int(p)] if isinstance(target, list) else target[p]
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(target, dict):
            continue
        if delete:
            target.pop(parts[-1], None)
        else:
            target[parts[-1]] = value
    _accept_or_config_error(d, fake_case() if with_case else None)


# ------------------------------------------------------------------------------------ the real synthetic case


def test_default_config_on_the_synthetic_case(portpy_dir, clinical_criteria):
    """The defaults validate against the built case, and PortPy builds every optimisation structure from them."""
    from vmat_core.cases import case_info
    from vmat_core.phantom import CASE_ID

    info = case_info(CASE_ID, portpy_dir)
    cfg = validate_config(default_config(CASE_ID), info)
    with pytest.raises(ConfigError, match="valid ids"):
        validate_config(apply_overrides(cfg, [f"beam_ids=0,{max(info.beam_ids) + 1}"]), info)

    data = pp.DataExplorer(data_dir=str(portpy_dir))
    data.patient_id = CASE_ID
    structs = pp.Structures(data)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        structs.create_opt_structures(opt_params=to_portpy_opt_params(cfg), clinical_criteria=clinical_criteria)
    assert "Cannot evaluate" not in out.getvalue()
    volume_cc = dict(zip(structs.structures_dict["name"], structs.structures_dict["volume_cc"], strict=True))
    for name in ("LUNGS_NOT_GTV", "RIND_0", "RIND_1", "RIND_2", "RIND_3", "RIND_4"):
        assert volume_cc[name] > 0, name
    lungs = volume_cc["LUNG_L"] + volume_cc["LUNG_R"]
    assert lungs - volume_cc["GTV"] - 1.0 <= volume_cc["LUNGS_NOT_GTV"] <= lungs
    rind_0 = structs.get_structure_mask_3d("RIND_0").astype(bool)
    assert not (rind_0 & structs.get_structure_mask_3d("PTV").astype(bool)).any()


def test_warm_start_strategy_defaults_to_auto_and_round_trips_through_overrides(cfg):
    assert cfg.solver.warm_start == "auto" and cfg.solver.heuristic_time_s is None
    edited = apply_overrides(cfg, ["solver.warm_start=none", "solver.heuristic_time_s=12.5"])
    assert (edited.solver.warm_start, edited.solver.heuristic_time_s) == ("none", 12.5)
    again = RunConfig.from_dict(edited.to_dict())
    assert again.solver.warm_start == "none" and again.solver.heuristic_time_s == 12.5
    assert again.content_hash() == edited.content_hash() != cfg.content_hash()
