"""DVHs, dose metrics and clinical criteria of a plan.

Definitions follow PortPy's ``Evaluation`` exactly (voxel-volume-weighted DVH scaled by the structure's fraction
of volume inside the calculation box, linear interpolation for Dv/Vd) but each structure's DVH is computed once,
vectorised, and every metric is read from it: PortPy recomputes the DVH with a Python loop for every query.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

TARGET_PREFIXES = ("PTV", "GTV", "CTV", "ITV")
# Structures that describe geometry only; no planner reads their DVH.
_SKIP_PREFIXES = ("RIND_",)
# The protocol file has no target-coverage criterion; planners judge a plan by it first, so the project adds one.
COVERAGE_CRITERION = {
    "type": "dose_volume_V",
    "parameters": {"structure_name": "PTV", "dose_perc": 100},
    "constraints": {"min_limit_volume_perc": 95},
    "source": "VMAT Planner (PTV minimum coverage)",
}


def is_target(name: str) -> bool:
    return name.upper().startswith(TARGET_PREFIXES)


@dataclass(frozen=True)
class StructureDVH:
    """Cumulative DVH: ``volume_frac[i]`` of the structure receives at least ``dose_gy[i]``."""

    structure: str
    dose_gy: np.ndarray
    volume_frac: np.ndarray
    volume_cc: float

    def dose_at_volume_pct(self, volume_pct: float) -> float:
        """D_v: the dose that ``volume_pct`` % of the structure receives (PortPy's get_dose)."""
        if self.dose_gy.size <= 1:
            return 0.0
        vol_axis = 100.0 * self.volume_frac
        if volume_pct > 100.1 or volume_pct > vol_axis.max():
            return 0.0
        if volume_pct < vol_axis.min():
            return float(self.dose_gy.max())
        # volume decreases with dose; np.interp needs increasing x
        return float(np.interp(volume_pct, vol_axis[::-1], self.dose_gy[::-1]))

    def volume_pct_at_dose(self, dose_gy: float) -> float:
        """V_d: percentage of the structure receiving at least ``dose_gy`` (PortPy's get_volume)."""
        if self.dose_gy.size <= 1:
            return 0.0
        x, idx = np.unique(self.dose_gy, return_index=True)
        y = 100.0 * self.volume_frac[idx]
        if dose_gy > x.max():
            return 0.0
        if dose_gy < x.min():
            return float(y.max())
        return float(np.interp(dose_gy, x, y))


def structure_dvh(inf_matrix, structure: str, dose_1d: np.ndarray) -> StructureDVH:
    vox = inf_matrix.get_opt_voxels_idx(structure)
    vol_cc = float(np.sum(inf_matrix.get_opt_voxels_volume_cc(structure))) if len(vox) else 0.0
    if len(vox) == 0:
        return StructureDVH(structure, np.array([0.0]), np.array([0.0]), 0.0)
    d = dose_1d[vox]
    order = np.argsort(d, kind="stable")
    x = np.append(d[order], d[order][-1] + 0.01)
    w = np.asarray(inf_matrix.get_opt_voxels_volume_cc(structure), dtype=float)[order]
    frac = inf_matrix.get_fraction_of_vol_in_calc_box(structure)
    frac = 1.0 if frac is None else float(frac)
    y = np.concatenate([[frac], frac - np.cumsum(w / w.sum()) * frac])
    y[-1] = 0.0
    return StructureDVH(structure, x, y, vol_cc)


def mean_dose_gy(inf_matrix, structure: str, dose_1d: np.ndarray) -> float:
    vox = inf_matrix.get_opt_voxels_idx(structure)
    if len(vox) == 0:
        return 0.0
    w = np.asarray(inf_matrix.get_opt_voxels_volume_cc(structure), dtype=float)
    frac = inf_matrix.get_fraction_of_vol_in_calc_box(structure)
    return float(np.sum(w * dose_1d[vox]) / w.sum() * (1.0 if frac is None else frac))


def dvh_table(dvhs: dict[str, StructureDVH], max_points: int = 300) -> pd.DataFrame:
    """Long table (structure, dose_gy, volume_pct), thinned to ``max_points`` per structure for storage/plots."""
    parts = []
    for name, h in dvhs.items():
        n = h.dose_gy.size
        idx = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
        parts.append(
            pd.DataFrame({"structure": name, "dose_gy": h.dose_gy[idx], "volume_pct": 100.0 * h.volume_frac[idx]})
        )
    if not parts:
        return pd.DataFrame({"structure": [], "dose_gy": [], "volume_pct": []})
    return pd.concat(parts, ignore_index=True)


def structure_metrics(dvhs: dict[str, StructureDVH], means: dict[str, float], prescription_gy: float) -> pd.DataFrame:
    rows = []
    for name, h in dvhs.items():
        row = {
            "structure": name,
            "is_target": is_target(name),
            "volume_cc": h.volume_cc,
            "mean_gy": means[name],
            "max_gy": float(h.dose_gy[:-1].max()) if h.dose_gy.size > 1 else 0.0,
            # D2cc only means something when the structure is well over 2 cc
            "d2cc_gy": h.dose_at_volume_pct(200.0 / h.volume_cc) if h.volume_cc > 4.0 else math.nan,
        }
        if row["is_target"]:
            row.update(
                d95_gy=h.dose_at_volume_pct(95),
                d98_gy=h.dose_at_volume_pct(98),
                d2_gy=h.dose_at_volume_pct(2),
                v100_pct=h.volume_pct_at_dose(prescription_gy),
            )
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("d95_gy", "d98_gy", "d2_gy", "v100_pct"):
        if col not in df:
            df[col] = math.nan
    return df


def _resolve(value, prescription_gy: float) -> float:
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9.\s*+/()-]*prescription_gy[0-9.\s*+/()-]*", value):
            raise ValueError(f"unsupported dose expression {value!r}")
        return float(eval(value, {"__builtins__": {}}, {"prescription_gy": prescription_gy}))  # only prescription_gy and literals
    return float(value)


def _limit(constraints: dict, kind: str, prescription_gy: float, volume_cc: float) -> tuple[float | None, str]:
    """The limit (or goal) of a criterion as a number in the criterion's value unit."""
    for key, val in constraints.items():
        if kind not in key or key.startswith("min_"):
            continue
        if "dose_gy" in key:
            return _resolve(val, prescription_gy), "Gy"
        if "dose_perc" in key:
            return float(val) * prescription_gy / 100.0, "Gy"
        if "volume_perc" in key:
            return float(val), "%"
        if "volume_cc" in key:
            return float(val), "cc"
    return None, ""


def evaluate_criteria(
    criteria: list[dict], dvhs: dict[str, StructureDVH], means: dict[str, float], prescription_gy: float
) -> pd.DataFrame:
    """Pass/fail of each clinical criterion: ``pass`` (limit and goal met), ``goal_missed`` (limit met), ``fail``.

    Upper limits (PortPy's limits) pass when value ≤ limit; the coverage criterion (``min_limit_*``) passes when
    value ≥ limit. Criteria on structures the case lacks are reported as ``not_evaluated``.
    """
    rows = []
    for crit in list(criteria) + [COVERAGE_CRITERION]:
        ctype = crit["type"]
        params = crit.get("parameters", {})
        cons = crit.get("constraints", {})
        name = params.get("structure_name", "")
        h = dvhs.get(name)
        label, value, unit = ctype, math.nan, ""
        lower_bound = any(k.startswith("min_") for k in cons)
        if lower_bound:
            lim = next(v for k, v in cons.items() if k.startswith("min_limit"))
            limit, lunit = float(lim), "%"
            goal = None
        else:
            limit, lunit = _limit(cons, "limit", prescription_gy, h.volume_cc if h else 0)
            goal, _ = _limit(cons, "goal", prescription_gy, h.volume_cc if h else 0)
        if ctype == "max_dose":
            label, unit = "Max dose", "Gy"
            value = float(h.dose_gy[:-1].max()) if h is not None and h.dose_gy.size > 1 else math.nan
        elif ctype == "mean_dose":
            label, unit = "Mean dose", "Gy"
            value = means.get(name, math.nan) if h is not None else math.nan
        elif ctype == "dose_volume_V":
            d = (
                _resolve(params["dose_gy"], prescription_gy)
                if "dose_gy" in params
                else float(params.get("dose_perc", 100)) * prescription_gy / 100.0
            )
            label = f"V({d:g}Gy)"
            v_pct = h.volume_pct_at_dose(d) if h is not None else math.nan
            if lunit == "cc" and h is not None:
                value, unit = v_pct * h.volume_cc / 100.0, "cc"
            else:
                value, unit = v_pct, "%"
        elif ctype == "dose_volume_D":
            vol = params.get("volume_perc")
            if vol is None and "volume_cc" in params and h is not None and h.volume_cc > 0:
                vol = float(params["volume_cc"]) / h.volume_cc * 100.0
            label, unit = f"D({vol:g}%)", "Gy"
            value = h.dose_at_volume_pct(float(vol)) if h is not None and vol is not None else math.nan
        if h is None or math.isnan(value) or (limit is None and goal is None):
            status = "not_evaluated"
        elif lower_bound:
            status = "pass" if value >= limit else "fail"
        else:
            ok_limit = limit is None or value <= limit + 1e-9
            ok_goal = goal is None or value <= goal + 1e-9
            status = "pass" if ok_limit and ok_goal else ("goal_missed" if ok_limit else "fail")
        rows.append(
            {
                "criterion": label,
                "structure": name,
                "type": ctype,
                "bound": "min" if lower_bound else "max",
                "limit": limit if limit is not None else math.nan,
                "goal": goal if goal is not None else math.nan,
                "value": value,
                "unit": unit,
                "status": status,
                "source": crit.get("source", "protocol"),
            }
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class PlanEvaluation:
    dvh: pd.DataFrame
    metrics: pd.DataFrame
    criteria: pd.DataFrame

    @property
    def passed(self) -> int:
        return int((self.criteria["status"] == "pass").sum())

    @property
    def failed(self) -> int:
        return int((self.criteria["status"] == "fail").sum())


def evaluate_plan(
    inf_matrix, structure_names: list[str], dose_1d: np.ndarray, prescription_gy: float, criteria: list[dict]
) -> PlanEvaluation:
    """Everything a planner reads off a dose: DVHs, per-structure metrics and the protocol's criteria."""
    names = [s for s in structure_names if not s.upper().startswith(_SKIP_PREFIXES)]
    present = [s for s in names if s in inf_matrix.opt_voxels_dict["name"]]
    dvhs = {s: structure_dvh(inf_matrix, s, dose_1d) for s in present}
    means = {s: mean_dose_gy(inf_matrix, s, dose_1d) for s in present}
    return PlanEvaluation(
        dvh=dvh_table(dvhs),
        metrics=structure_metrics(dvhs, means, prescription_gy),
        criteria=evaluate_criteria(criteria, dvhs, means, prescription_gy),
    )


def coverage_scale(dvh: pd.DataFrame, prescription_gy: float, coverage_pct: float, target: str = "PTV") -> float:
    """Factor that rescales a plan so that ``coverage_pct`` % of the target receives the prescription.

    Scaling is exact for a linear dose model: D_v scales with the fluence. Used only for comparison views, and
    always labelled as normalised there.
    """
    t = dvh[dvh["structure"] == target]
    if t.empty:
        raise ValueError(f"normalisation: the plan has no {target} DVH")
    if not 0 < coverage_pct <= 100:
        raise ValueError(f"coverage_pct: must be in (0, 100], got {coverage_pct}")
    vol = t["volume_pct"].to_numpy()[::-1]
    dose = t["dose_gy"].to_numpy()[::-1]
    d_v = float(np.interp(coverage_pct, vol, dose))
    if d_v <= 0:
        raise ValueError(f"normalisation: {target} D{coverage_pct:g} is 0 Gy; the plan delivers no target dose")
    return prescription_gy / d_v
