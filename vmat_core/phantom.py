"""The synthetic lung patient ``Lung_Synth_Patient_1``, written in PortPy 1.2.0's on-disk format.

PortPy reads a patient folder of JSON metadata plus HDF5 arrays. This module generates such a folder from an
analytic thorax and a pencil-beam dose model, so the whole planning workflow (PortPy's loaders, structure
operations, influence-matrix down-sampling, optimisation, evaluation and RT Dose conversion) runs on it exactly
as on PortPy's own dataset. The generator is deterministic for a seed.

Grid
    CT 378 x 264 x 90 voxels (x, y, z) of 0.977 x 0.977 x 3 mm (a 369 x 258 x 270 mm field of view cropped to
    the body; arrays are stored (z, y, x)). Dose voxels are blocks of 3 x 3 x 1 CT voxels (2.93 x 2.93 x 3 mm),
    kept where the block touches BODY inside the calculation box; every other CT voxel maps to -1 in
    ``ct_to_dose_voxel_map``. The box is the PTV's bounding box grown by 20 mm (15 mm in z), extended across
    the midline to x = +30 mm and back to the posterior skin, so it holds the PTV and part of every organ at
    risk (about 60 000 dose voxels; PortPy's 6 x 6 x 1 down-sampling gives about 15 000 optimisation voxels).
    Dose-volume figures of organs that leave the box (lungs, heart, cord) refer to their part inside it, as
    PortPy reports through ``fraction_of_vol_in_calc_box``.

Anatomy (HU)
    Air -1000 outside, a superelliptic thorax (340 x 224 mm) of soft tissue 40 with a subcutaneous fat layer
    (-90) and a 3 mm SKIN shell, sloping ribs and a sternum (bone 700), a vertebral column around the CORD
    with intervertebral discs, ESOPHAGUS, descending aorta, trachea (air) down to the carina, HEART, and two
    lungs (about -800 with smooth texture) whose lateral axes are tuned to the reference volumes. The GTV is
    a lobulated nodule of about 12 cc in the medial right lung, a few cm from the esophagus, heart and cord.
    The PTV follows the conventional-fractionation recipe GTV -> CTV -> ITV -> PTV: the GTV swept by
    +/- 4 mm of breathing motion (superior-inferior), grown by one isotropic margin (CTV extension + a 5 mm
    set-up margin) tuned so the PTV is about 87 cc, the size of the reference patient's PTV.

Beams
    72 coplanar control points, gantry 0-355 deg in 5 deg steps (IEC 61217, patient head-first supine,
    collimator and couch 0), SAD 1000 mm, isocentre at the PTV centroid. Each beam carries a complete
    rectangular grid of 2.5 mm (leaf direction, BEV x) by 5 mm (BEV y, one 5 mm leaf of a 120-leaf MLC)
    beamlets covering the PTV's divergent projection plus 5 mm, with corners on the 2.5 / 5 mm grid (about 370
    beamlets per beam). The sparse matrices (float32 rows [dose voxel, beamlet, Gy]) hold about 40 million
    non-zeros in all; with gzip the folder is about 300 MB. Generation takes roughly 25 s of CPU on each of two
    worker processes plus 15 s in the main one, with under 0.5 GB resident per process.

Dose model (per beamlet, Gy per fraction per unit intensity)
    d(v) = K * PDD(z_rad) * (SAD / s)^2 * Px * Py
    - z_rad: radiological (water-equivalent) depth along the divergent ray from the source to the voxel,
      integrated by ray marching (2 mm steps) through relative electron density from HU
      (rho = 1 + HU/1000 below 0 HU, 1 + 0.00055 HU above; bone 700 HU -> 1.39).
    - PDD(z) = (1 - 0.6 exp(-0.23 z)) exp(-0.0045 z): 6 MV-like, 40 % surface dose, maximum near 15 mm,
      then exponential attenuation.
    - (SAD / s)^2: inverse square, s = distance from the source along the central axis.
    - Px, Py: the beamlet aperture (projected to the voxel's distance) convolved with a Gaussian penumbra,
      i.e. differences of erf over the 2.5 x 5 mm aperture; sigma = (2.0 mm + 0.006 z_rad) *
      (1 + 0.8 (1 - rho_local)) for rho_local < 1, so the penumbra widens in lung.
    - K is set so that intensity 1 on every beamlet over the PTV from the seven beams 0, 11, ..., 66 gives
      about 2 Gy per fraction at the PTV centre.
    - Entries below ``influenceMatrixSparse_tol`` (1 % of the nominal peak beamlet dose at dmax) are dropped.
    Scatter beyond the penumbra, heterogeneity effects on lateral electron transport other than the lung
    widening, and leaf transmission are not modelled.

Reference plan
    ``DicomFiles/rt_dose_echo_imrt.dcm``: a fluence-map (IMRT) plan over the planner beams, optimised at
    generation by non-negative weighted least squares (400 L-BFGS-B iterations on the normal equations) with the
    Lung_2Gy_30Fx protocol's structure weights (PTV to prescription; CORD, ESOPHAGUS, HEART, lungs and
    rings around the PTV towards zero) and a fluence-smoothness term, normalised so 95 % of the PTV receives
    the 60 Gy prescription, and written as an RT Dose on the dose-voxel grid aligned to the CT.

The case folder is built in a hidden temporary sibling (a name without ``Patient``, so PortPy never lists a
half-built case) and renamed into place; a marker file written last records the generator version and seed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import resource
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CASE_ID = "Lung_Synth_Patient_1"
GENERATOR_VERSION = "2"
MARKER_FILE = ".complete.json"
PRESCRIPTION_GY = 60.0
NUM_FRACTIONS = 30

# CT grid. The in-plane pixel is PortPy's real 500/512 mm (exact in binary floating point).
CT_RES_XY_MM = 0.9765625
CT_RES_Z_MM = 3.0
CT_SHAPE_ZYX = (90, 264, 378)
DOSE_BLOCK_YX = 3  # a dose voxel is 3 x 3 x 1 CT voxels, as in PortPy's data
# The dose calculation box: the PTV's bounding box grown by 20 mm (15 mm in z), extended across the midline to
# x = +30 mm (esophagus, aorta, cord and the medial left lung) and back to the posterior skin.
CALC_BOX_MARGIN_MM = 20.0
CALC_BOX_Z_MARGIN_MM = 15.0
CALC_BOX_MIN_LEFT_X_MM = 30.0

# Beams.
NUM_CONTROL_POINTS = 72
GANTRY_STEP_DEG = 5.0
SAD_MM = 1000.0
BEAMLET_WIDTH_MM = 2.5
BEAMLET_HEIGHT_MM = 5.0
BEAMLET_MARGIN_MM = 5.0
NOTEBOOK_BEAM_IDS = (0, 11, 22, 33, 44, 55, 66)
PLANNER_BEAM_IDS = (0, 36, 42, 48, 54, 60, 66)  # gantry 0, 180-330: the tumour's (right) side
# Leaf boundaries (mm at the isocentre plane, top to bottom) of a 120-leaf MLC: 10 mm outer, 5 mm inner leaves.
MLC_LEAF_BOUNDARIES_Y_MM = tuple(
    [200.0 - 10.0 * i for i in range(10)] + [100.0 - 5.0 * i for i in range(40)] + [-100.0 - 10.0 * i for i in range(11)]
)

# Dose model.
PDD_MU_PER_MM = 0.0045
PDD_BUILDUP_PER_MM = 0.23
PDD_SURFACE_FRACTION = 0.4
SIGMA0_MM = 2.0
SIGMA_PER_DEPTH = 0.006
SIGMA_LUNG_WIDENING = 0.8
SPARSE_TOL_FRACTION = 0.01
RAY_STEP_MM = 2.0
CALIBRATION_DOSE_GY = 2.0

# Reference structure volumes (cc) the anatomy is tuned to.
TARGET_VOLUMES_CC = {"GTV": 12.0, "PTV": 87.0, "LUNG_L": 1617.0, "LUNG_R": 2156.0}
BREATHING_AMPLITUDE_MM = 4.0
SETUP_MARGIN_MM = 5.0

STRUCTURE_NAMES = ("GTV", "PTV", "ESOPHAGUS", "HEART", "LUNG_L", "LUNG_R", "CORD", "SKIN", "BODY")

HU_AIR, HU_LUNG, HU_FAT, HU_SOFT, HU_BONE = -1000, -800, -90, 40, 700


class PhantomError(RuntimeError):
    """The synthetic case cannot be built where asked."""


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """The CT grid: voxel centres are ``origin + index * resolution`` (x, y, z in mm)."""

    shape_zyx: tuple[int, int, int]
    res_xyz_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]

    @classmethod
    def centred(cls, shape_zyx: tuple[int, int, int]) -> Grid:
        nz, ny, nx = shape_zyx
        res = (CT_RES_XY_MM, CT_RES_XY_MM, CT_RES_Z_MM)
        origin = (-(nx - 1) / 2 * res[0], -(ny - 1) / 2 * res[1], -(nz - 1) / 2 * res[2])
        return cls(shape_zyx, res, origin)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates (x, y, z) of voxel centres along each axis, float32."""
        nz, ny, nx = self.shape_zyx
        return tuple(  # type: ignore[return-value]
            (o + np.arange(n) * r).astype(np.float32)
            for o, n, r in zip(self.origin_xyz_mm, (nx, ny, nz), self.res_xyz_mm, strict=True)
        )

    @property
    def voxel_cc(self) -> float:
        return float(np.prod(self.res_xyz_mm)) / 1000.0


def hu_to_relative_electron_density(hu: np.ndarray) -> np.ndarray:
    """Bilinear HU calibration: air/lung/soft tissue on 1 + HU/1000, a shallower slope above water for bone."""
    hu = np.asarray(hu, dtype=np.float32)
    rho = np.where(hu <= 0, 1.0 + hu / 1000.0, 1.0 + 0.00055 * hu)
    return np.clip(rho, 0.0, None).astype(np.float32)


def depth_dose(z_mm: np.ndarray) -> np.ndarray:
    """Relative depth dose (6 MV-like) at water-equivalent depth ``z_mm``."""
    z = np.maximum(z_mm, 0.0)
    return (1.0 - (1.0 - PDD_SURFACE_FRACTION) * np.exp(-PDD_BUILDUP_PER_MM * z)) * np.exp(-PDD_MU_PER_MM * z)


def depth_of_maximum_mm() -> float:
    k = (1.0 - PDD_SURFACE_FRACTION) * (PDD_BUILDUP_PER_MM + PDD_MU_PER_MM) / PDD_MU_PER_MM
    return math.log(k) / PDD_BUILDUP_PER_MM


def penumbra_sigma_mm(z_rad_mm: np.ndarray, rho_local: np.ndarray) -> np.ndarray:
    widening = 1.0 + SIGMA_LUNG_WIDENING * np.clip(1.0 - rho_local, 0.0, 1.0)
    return (SIGMA0_MM + SIGMA_PER_DEPTH * z_rad_mm) * widening


def aperture_fraction(lo: np.ndarray, hi: np.ndarray, centre: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Fraction of a Gaussian (mean ``centre``) falling in [lo, hi]: the blurred 1-D aperture profile."""
    from scipy.special import erf

    s = np.sqrt(2.0) * sigma
    return 0.5 * (erf((hi - centre) / s) - erf((lo - centre) / s))


@dataclass(frozen=True)
class BeamGeometry:
    """Source and beam's-eye-view axes of one coplanar control point (IEC 61217, head-first supine)."""

    gantry_deg: float
    iso_xyz_mm: np.ndarray

    @property
    def _theta(self) -> float:
        return math.radians(self.gantry_deg)

    @property
    def direction(self) -> np.ndarray:  # from source towards isocentre
        t = self._theta
        return np.array([-math.sin(t), math.cos(t), 0.0])

    @property
    def bev_x(self) -> np.ndarray:  # leaf motion direction
        t = self._theta
        return np.array([math.cos(t), math.sin(t), 0.0])

    @property
    def bev_y(self) -> np.ndarray:  # towards the gantry: patient superior
        return np.array([0.0, 0.0, 1.0])

    @property
    def source(self) -> np.ndarray:
        return self.iso_xyz_mm - SAD_MM * self.direction

    def project(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distance along the central axis from the source, and BEV (x, y) at the isocentre plane."""
        w = xyz - self.source[None, :]
        s = w @ self.direction
        a = (w @ self.bev_x) * SAD_MM / s
        b = (w @ self.bev_y) * SAD_MM / s
        return s, a, b


# ----------------------------------------------------------------------------------------------------------
# Anatomy
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Anatomy:
    grid: Grid
    hu: np.ndarray  # int16 (z, y, x)
    masks: dict[str, np.ndarray]  # bool (z, y, x)
    notes: dict[str, float] = field(default_factory=dict)


def _superellipse(x: np.ndarray, y: np.ndarray, a: float, b: float, p: float) -> np.ndarray:
    return (np.abs(x / a) ** p + np.abs(y / b) ** p) <= 1.0


def _bisect(fn, lo: float, hi: float, target: float, iters: int = 18) -> float:
    """Root of the increasing function ``fn(x) = target`` in [lo, hi]."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def build_anatomy(seed: int = 0) -> Anatomy:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    grid = Grid.centred(CT_SHAPE_ZYX)
    nz, ny, nx = grid.shape_zyx
    xa, ya, za = grid.axes()
    X = xa[None, None, :]
    Y = ya[None, :, None]
    Z = za[:, None, None]

    def jit(sd_mm: float) -> float:
        """A small seeded shift of an organ position."""
        return float(rng.normal(0.0, sd_mm))

    # Thorax cross-section, constant along z; y grows towards posterior, flat where the patient lies.
    x2, y2 = xa[None, :], ya[:, None]
    body2d = _superellipse(x2, y2 - 2.0, 170.0, 114.0, 2.4) & (y2 < 104.0)
    depth2d = ndimage.distance_transform_edt(body2d, sampling=(CT_RES_XY_MM, CT_RES_XY_MM)).astype(np.float32)
    body = np.broadcast_to(body2d[None], grid.shape_zyx)
    depth = depth2d[None]

    # Mediastinal and spinal organs (centres in mm, y posterior-positive).
    cord_c = (jit(1.0), 76.0 + jit(1.0))
    cord_r = math.sqrt(71.0e3 / (math.pi * nz * CT_RES_Z_MM))
    cord = ((X - cord_c[0]) ** 2 + (Y - cord_c[1]) ** 2 <= cord_r**2) & np.ones((nz, 1, 1), bool)
    vert_body = ((X - cord_c[0]) / 21.0) ** 2 + ((Y - (cord_c[1] - 29.0)) / 15.0) ** 2 <= 1.0
    vert_arch = ((X - cord_c[0]) ** 2 + (Y - cord_c[1]) ** 2 <= (cord_r + 7.0) ** 2) & (
        (X - cord_c[0]) ** 2 + (Y - cord_c[1]) ** 2 > (cord_r + 1.0) ** 2
    )
    spinous = (np.abs(X - cord_c[0]) < 4.0) & (Y > cord_c[1]) & (Y < cord_c[1] + 24.0)
    disc = np.mod(Z + 7.0, 26.0) < 5.0
    bone_spine = (vert_body & ~disc) | vert_arch | spinous

    eso_r = math.sqrt(57.0e3 / (math.pi * nz * CT_RES_Z_MM))
    eso_x = 7.0 + jit(1.0) + 0.02 * Z  # drifts slightly left going up
    eso_y = 24.0 + jit(1.0)
    esophagus = (X - eso_x) ** 2 + (Y - eso_y) ** 2 <= eso_r**2
    aorta = (X - 31.0) ** 2 + (Y - 30.0) ** 2 <= 11.5**2
    carina_z = 40.0 + jit(3.0)
    trachea_outer = ((X ** 2 + (Y + 2.0) ** 2) <= 10.5**2) & (Z >= carina_z)
    trachea_lumen = ((X ** 2 + (Y + 2.0) ** 2) <= 8.5**2) & (Z >= carina_z)

    heart_c = (30.0 + jit(2.0), -44.0 + jit(2.0), -62.0 + jit(3.0))
    heart_ax = (57.0, 45.0, 62.0)
    heart = (
        ((X - heart_c[0]) / heart_ax[0]) ** 2
        + ((Y - heart_c[1]) / heart_ax[1]) ** 2
        + ((Z - heart_c[2]) / heart_ax[2]) ** 2
    ) <= 1.0
    heart &= body & (depth > 22.0)

    # Ribs slope downwards towards the front; the sternum closes the cage anteriorly.
    rib_band = (depth > 14.0) & (depth < 22.0)
    ribs = rib_band & (np.mod(Z - 0.35 * Y + 3.0 * jit(1.0), 25.0) < 9.0) & ~((np.abs(X) < 30.0) & (Y < 0.0))
    sternum = (np.abs(X) < 14.0) & (depth > 6.0) & (depth < 18.0) & (Y < -60.0)

    # Lungs: ellipsoids inside the rib cage, above a diaphragm dome, clear of the mediastinum.
    excluded = ndimage.binary_dilation(heart | esophagus | aorta | trachea_outer | bone_spine | cord,
                                       iterations=3)
    inside_cage = np.broadcast_to((depth2d > 23.0)[None], grid.shape_zyx)

    def lung(xs: np.ndarray, ys: np.ndarray, excl: np.ndarray, cage: np.ndarray, cx: float, side: float,
             scale: float) -> np.ndarray:
        ax, ay, az, cy, cz = 66.0 * scale, 92.0 * scale, 118.0, 8.0, 12.0
        ell = ((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2 + ((Z - cz) / az) ** 2 <= 1.0
        dome = Z >= -98.0 + 38.0 * np.exp(-((xs - cx) ** 2 + (ys - cy + 15.0) ** 2) / (2.0 * 48.0**2))
        mediastinum = (np.abs(xs - 4.0) < 17.0) & (ys < 40.0)
        return ell & dome & cage & ~excl & ~mediastinum & (side * xs > 8.0)

    def vol_cc(mask: np.ndarray, sub_sampled: bool = False) -> float:
        return float(np.count_nonzero(mask)) * grid.voxel_cc * (4.0 if sub_sampled else 1.0)

    # Tune the lateral scale on every second row and column (cheap); the final masks are full resolution.
    xs2, ys2, ex2, cg2 = X[:, :, ::2], Y[:, ::2, :], excluded[:, ::2, ::2], inside_cage[:, ::2, ::2]
    lr_cx, ll_cx = -80.0 + jit(2.0), 78.0 + jit(2.0)
    s_r = _bisect(lambda s: vol_cc(lung(xs2, ys2, ex2, cg2, lr_cx, -1.0, s), True), 0.5, 1.6,
                  TARGET_VOLUMES_CC["LUNG_R"], 12)
    s_l = _bisect(lambda s: vol_cc(lung(xs2, ys2, ex2, cg2, ll_cx, 1.0, s), True), 0.5, 1.6,
                  TARGET_VOLUMES_CC["LUNG_L"], 12)
    lung_r = lung(X, Y, excluded, inside_cage, lr_cx, -1.0, s_r)
    lung_l = lung(X, Y, excluded, inside_cage, ll_cx, 1.0, s_l)

    # GTV: a lobulated nodule in the medial right lung.
    gtv_c = np.array([-44.0 + jit(2.0), 8.0 + jit(2.0), -18.0 + jit(3.0)])
    lobes = [(np.zeros(3), 1.0)]
    for _ in range(3):
        v = rng.normal(size=3)
        lobes.append((0.55 * v / np.linalg.norm(v), float(rng.uniform(0.5, 0.7))))
    roi = (
        slice(*np.searchsorted(za, [gtv_c[2] - 60, gtv_c[2] + 60])),
        slice(*np.searchsorted(ya, [gtv_c[1] - 60, gtv_c[1] + 60])),
        slice(*np.searchsorted(xa, [gtv_c[0] - 60, gtv_c[0] + 60])),
    )
    Xr, Yr, Zr = xa[roi[2]][None, None, :], ya[roi[1]][None, :, None], za[roi[0]][:, None, None]

    def nodule(r0: float, shift_y: float = 0.0, shift_z: float = 0.0) -> np.ndarray:
        m = np.zeros((Zr.shape[0], Yr.shape[1], Xr.shape[2]), bool)
        for off, rel in lobes:
            c = gtv_c + off * r0 + np.array([0.0, shift_y, shift_z])
            m |= (Xr - c[0]) ** 2 + (Yr - c[1]) ** 2 + (Zr - c[2]) ** 2 <= (rel * r0) ** 2
        return m

    r0 = _bisect(lambda r: vol_cc(nodule(r)), 5.0, 25.0, TARGET_VOLUMES_CC["GTV"])
    gtv_roi = nodule(r0)
    swept = np.zeros_like(gtv_roi)
    for s in np.linspace(-BREATHING_AMPLITUDE_MM, BREATHING_AMPLITUDE_MM, 9):
        swept |= nodule(r0, shift_y=-0.25 * s, shift_z=s)
    dist = ndimage.distance_transform_edt(~swept, sampling=(CT_RES_Z_MM, CT_RES_XY_MM, CT_RES_XY_MM))
    margin = _bisect(lambda m: vol_cc(dist <= m), SETUP_MARGIN_MM, 25.0, TARGET_VOLUMES_CC["PTV"])
    gtv = np.zeros(grid.shape_zyx, bool)
    ptv = np.zeros(grid.shape_zyx, bool)
    gtv[roi] = gtv_roi
    ptv[roi] = dist <= margin
    ptv &= body
    lung_r |= gtv  # the tumour lies within the lung contour, as clinically drawn
    lung_r &= ~(esophagus | heart)
    lung_l &= ~lung_r

    skin = np.broadcast_to((depth2d <= 3.0)[None], grid.shape_zyx) & body
    fat = np.broadcast_to(((depth2d > 3.0) & (depth2d <= 11.0))[None], grid.shape_zyx)

    # Paint HU, later entries overwrite earlier ones.
    hu = np.full(grid.shape_zyx, HU_AIR, np.float32)
    hu[body] = HU_SOFT
    hu[fat & body] = HU_FAT
    hu[skin] = 10.0
    hu[(ribs | sternum) & body] = HU_BONE
    lungs = lung_r | lung_l
    coarse = rng.normal(0.0, 35.0, size=(nz // 3 + 2, ny // 12 + 2, nx // 12 + 2)).astype(np.float32)
    texture = ndimage.zoom(coarse, (3, 12, 12), order=1)[:nz, :ny, :nx]
    hu[lungs] = HU_LUNG + texture[lungs]
    hu[heart | aorta] = HU_SOFT
    hu[esophagus] = HU_SOFT
    hu[trachea_outer] = HU_SOFT
    hu[trachea_lumen] = HU_AIR
    hu[bone_spine] = HU_BONE
    hu[np.broadcast_to(disc & vert_body, grid.shape_zyx)] = 80.0
    hu[cord] = HU_SOFT
    hu[gtv] = 30.0
    hu[body] += rng.normal(0.0, 8.0, size=int(np.count_nonzero(body))).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    masks = {
        "GTV": gtv,
        "PTV": ptv,
        "ESOPHAGUS": np.ascontiguousarray(np.broadcast_to(esophagus & body, grid.shape_zyx)),
        "HEART": heart,
        "LUNG_L": lung_l,
        "LUNG_R": lung_r,
        "CORD": np.ascontiguousarray(np.broadcast_to(cord, grid.shape_zyx)),
        "SKIN": np.ascontiguousarray(skin),
        "BODY": np.ascontiguousarray(body),
    }
    notes = {"gtv_radius_mm": r0, "ptv_margin_mm": margin, "lung_scale_r": s_r, "lung_scale_l": s_l,
             "breathing_amplitude_mm": BREATHING_AMPLITUDE_MM}
    return Anatomy(grid=grid, hu=hu, masks=masks, notes=notes)


# ----------------------------------------------------------------------------------------------------------
# Dose voxels and beam geometry
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DoseGrid:
    """Dose voxels: 3 x 3 x 1 blocks of CT voxels, numbered in (z, y, x) raster order inside the calc box."""

    grid: Grid
    block_index: np.ndarray  # int32 (nz, ny/3, nx/3): influence-matrix row of each block, -1 outside
    centres_xyz_mm: np.ndarray  # float64 (n, 3)
    rho_block: np.ndarray  # float32 (nz, ny/3, nx/3): mean relative electron density of each block
    rho_voxel: np.ndarray  # float32 (n,)
    calc_box_xyz_mm: tuple[tuple[float, float], ...]

    @property
    def num_voxels(self) -> int:
        return int(self.centres_xyz_mm.shape[0])

    @property
    def block_origin_xyz_mm(self) -> np.ndarray:
        o, r = np.array(self.grid.origin_xyz_mm), np.array(self.grid.res_xyz_mm)
        return o + np.array([1.0, 1.0, 0.0]) * r  # centre of the first block

    @property
    def block_res_xyz_mm(self) -> np.ndarray:
        r = np.array(self.grid.res_xyz_mm)
        return r * np.array([DOSE_BLOCK_YX, DOSE_BLOCK_YX, 1.0])

    def ct_to_dose_voxel_map(self) -> np.ndarray:
        b = DOSE_BLOCK_YX
        return np.repeat(np.repeat(self.block_index, b, axis=1), b, axis=2)


def _block_view(a: np.ndarray) -> np.ndarray:
    nz, ny, nx = a.shape
    b = DOSE_BLOCK_YX
    return a.reshape(nz, ny // b, b, nx // b, b)


def calc_box_mm(anatomy: Anatomy) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """(x, y, z) ranges of the dose calculation box in mm."""
    xa, ya, za = anatomy.grid.axes()
    kz, ky, kx = np.nonzero(anatomy.masks["PTV"])
    m, mz = CALC_BOX_MARGIN_MM, CALC_BOX_Z_MARGIN_MM
    x = (float(xa[kx].min()) - m, max(float(xa[kx].max()) + m, CALC_BOX_MIN_LEFT_X_MM))
    y = (float(ya[ky].min()) - m, float(ya[-1]))
    z = (float(za[kz].min()) - mz, float(za[kz].max()) + mz)
    return x, y, z


def build_dose_grid(anatomy: Anatomy) -> DoseGrid:
    grid = anatomy.grid
    xa, ya, za = grid.axes()
    box = calc_box_mm(anatomy)
    (x0, x1), (y0, y1), (z0, z1) = box
    eps = 1e-6
    in_box = (
        ((za >= z0 - eps) & (za <= z1 + eps))[:, None, None]
        & ((ya >= y0 - eps) & (ya <= y1 + eps))[None, :, None]
        & ((xa >= x0 - eps) & (xa <= x1 + eps))[None, None, :]
    )
    # A block is a dose voxel when any of its CT voxels lies in BODY inside the box.
    keep = _block_view(anatomy.masks["BODY"] & in_box).any(axis=(2, 4))
    block_index = np.full(keep.shape, -1, np.int32)
    block_index[keep] = np.arange(int(np.count_nonzero(keep)), dtype=np.int32)
    rho_block = _block_view(hu_to_relative_electron_density(anatomy.hu)).mean(axis=(2, 4)).astype(np.float32)
    kz, ky, kx = np.nonzero(keep)
    dg = DoseGrid(grid, block_index, np.empty((0, 3)), rho_block, rho_block[keep], box)
    o, r = dg.block_origin_xyz_mm, dg.block_res_xyz_mm
    dg.centres_xyz_mm = np.column_stack([o[0] + kx * r[0], o[1] + ky * r[1], o[2] + kz * r[2]])
    return dg


@dataclass(frozen=True)
class BeamletGrid:
    """A complete rectangular beamlet grid in BEV coordinates at the isocentre plane (mm)."""

    left_mm: float
    top_mm: float
    num_cols: int
    num_rows: int

    @property
    def num_beamlets(self) -> int:
        return self.num_cols * self.num_rows

    @property
    def right_mm(self) -> float:
        return self.left_mm + self.num_cols * BEAMLET_WIDTH_MM

    @property
    def bottom_mm(self) -> float:
        return self.top_mm - self.num_rows * BEAMLET_HEIGHT_MM

    def arrays(self) -> dict[str, np.ndarray]:
        """PortPy's beamlet datasets, row by row from the top (largest y), left to right."""
        rows, cols = np.divmod(np.arange(self.num_beamlets), self.num_cols)
        x = self.left_mm + (cols + 0.5) * BEAMLET_WIDTH_MM
        y = self.top_mm - (rows + 0.5) * BEAMLET_HEIGHT_MM
        top_edges = y + BEAMLET_HEIGHT_MM / 2.0
        bounds = np.array(MLC_LEAF_BOUNDARIES_Y_MM)
        leaf_from_top = np.searchsorted(-bounds, -top_edges)  # index of each beamlet's top edge
        num_pairs = len(bounds) - 1
        return {
            "id": np.arange(self.num_beamlets, dtype=np.int64),
            "width_mm": np.full(self.num_beamlets, BEAMLET_WIDTH_MM),
            "height_mm": np.full(self.num_beamlets, BEAMLET_HEIGHT_MM),
            "position_x_mm": x.astype(np.float64),
            "position_y_mm": y.astype(np.float64),
            # PortPy's arc code numbers leaf pairs from the bottom (1) to the top.
            "MLC_leaf_idx": (num_pairs - leaf_from_top).astype(np.int64),
        }


def beam_gantry_deg(beam_id: int) -> float:
    return float(beam_id) * GANTRY_STEP_DEG


def ptv_bev_outline(ptv_xyz: np.ndarray, geom: BeamGeometry, grid: Grid) -> list[np.ndarray]:
    """The PTV's divergent projection on the isocentre plane, slice by slice: a union of rectangles."""
    import shapely

    s, a, b = geom.project(ptv_xyz)
    t = math.radians(geom.gantry_deg)
    half_a = 0.5 * grid.res_xyz_mm[0] * (abs(math.cos(t)) + abs(math.sin(t))) * SAD_MM / s
    half_b = 0.5 * grid.res_xyz_mm[2] * SAD_MM / s
    z = ptv_xyz[:, 2]
    boxes = []
    for zk in np.unique(z):
        m = z == zk
        boxes.append(shapely.box(float((a[m] - half_a[m]).min()), float((b[m] - half_b[m]).min()),
                                 float((a[m] + half_a[m]).max()), float((b[m] + half_b[m]).max())))
    union = shapely.unary_union(boxes)
    polys = list(union.geoms) if hasattr(union, "geoms") else [union]
    return [np.asarray(p.exterior.coords, dtype=np.float64) for p in polys]


def beamlet_grid_for(outline: list[np.ndarray]) -> BeamletGrid:
    pts = np.vstack(outline)
    w, h = BEAMLET_WIDTH_MM, BEAMLET_HEIGHT_MM
    left = math.floor((pts[:, 0].min() - BEAMLET_MARGIN_MM) / w) * w
    right = math.ceil((pts[:, 0].max() + BEAMLET_MARGIN_MM) / w) * w
    bottom = math.floor((pts[:, 1].min() - BEAMLET_MARGIN_MM) / h) * h
    top = math.ceil((pts[:, 1].max() + BEAMLET_MARGIN_MM) / h) * h
    return BeamletGrid(float(left), float(top), round((right - left) / w), round((top - bottom) / h))


# ----------------------------------------------------------------------------------------------------------
# Pencil-beam dose
# ----------------------------------------------------------------------------------------------------------


def radiological_depth_mm(dg: DoseGrid, geom: BeamGeometry, s: np.ndarray, a: np.ndarray, b: np.ndarray,
                          a_range: tuple[float, float], b_range: tuple[float, float]) -> np.ndarray:
    """Water-equivalent depth of points (given in beam coordinates) along divergent rays from the source.

    Density is marched on a fan grid (RAY_STEP_MM along the axis, about 2 x 2.5 mm across at the isocentre),
    integrated cumulatively and interpolated back at the points.
    """
    from scipy.ndimage import map_coordinates

    grid = dg.grid
    nz, ny, nx = grid.shape_zyx
    o = np.array(grid.origin_xyz_mm)
    ext = o + (np.array([nx, ny, nz]) - 1) * np.array(grid.res_xyz_mm)
    corners = np.array([[cx, cy, cz] for cx in (o[0], ext[0]) for cy in (o[1], ext[1]) for cz in (o[2], ext[2])])
    s_start = max(float(((corners - geom.source) @ geom.direction).min()) - RAY_STEP_MM, 1.0)
    s_stop = float(s.max()) + 2 * RAY_STEP_MM
    ts = np.arange(s_start, s_stop, RAY_STEP_MM)
    as_ = np.arange(a_range[0] - 2.0, a_range[1] + 4.0, 2.0)
    bs = np.arange(b_range[0] - 2.5, b_range[1] + 5.0, 2.5)
    T, A, B = np.meshgrid(ts, as_, bs, indexing="ij")
    ray = geom.direction[None, None, None, :] + (A[..., None] * geom.bev_x + B[..., None] * geom.bev_y) / SAD_MM
    pts = geom.source + T[..., None] * ray
    bo, br = dg.block_origin_xyz_mm, dg.block_res_xyz_mm
    coords = [(pts[..., 2] - bo[2]) / br[2], (pts[..., 1] - bo[1]) / br[1], (pts[..., 0] - bo[0]) / br[0]]
    rho = map_coordinates(dg.rho_block, coords, order=1, mode="constant", cval=0.0)
    step = RAY_STEP_MM * np.sqrt(1.0 + (A**2 + B**2) / SAD_MM**2)
    cum = np.cumsum(rho * step, axis=0) - 0.5 * rho * step
    q = [(s - ts[0]) / RAY_STEP_MM, (a - as_[0]) / 2.0, (b - bs[0]) / 2.5]
    return map_coordinates(cum, q, order=1, mode="nearest")


@dataclass
class BeamResult:
    beam_id: int
    gantry_deg: float
    beamlets: BeamletGrid
    outline: list[np.ndarray]
    sparse: np.ndarray  # float32 (nnz, 3): row, local beamlet, Gy per fraction per unit intensity
    ssd_mm: float
    seconds: float


def nominal_peak_beamlet_dose(k_gy: float) -> float:
    """Central value of one beamlet at dmax on the axis (water, isocentre distance): the sparsity reference."""
    zmax = depth_of_maximum_mm()
    sig = float(penumbra_sigma_mm(np.array(zmax), np.array(1.0)))
    px = float(aperture_fraction(np.array(-BEAMLET_WIDTH_MM / 2), np.array(BEAMLET_WIDTH_MM / 2), 0.0, sig))
    py = float(aperture_fraction(np.array(-BEAMLET_HEIGHT_MM / 2), np.array(BEAMLET_HEIGHT_MM / 2), 0.0, sig))
    return k_gy * float(depth_dose(np.array(zmax))) * px * py


def compute_beam(dg: DoseGrid, beam_id: int, iso: np.ndarray, ptv_xyz: np.ndarray, k_gy: float,
                 tol_gy: float) -> BeamResult:
    """Influence matrix of one control point: every beamlet's dose to every dose voxel above the tolerance."""
    t0 = time.perf_counter()
    geom = BeamGeometry(beam_gantry_deg(beam_id), iso)
    outline = ptv_bev_outline(ptv_xyz, geom, dg.grid)
    bg = beamlet_grid_for(outline)
    s, a, b = geom.project(dg.centres_xyz_mm)
    # Reach beyond the field edge: 4 sigma of the widest penumbra (lung at depth), projected to the iso plane.
    reach = 4.0 * float(penumbra_sigma_mm(np.array(250.0), np.array(0.0)))
    sel = (a > bg.left_mm - reach) & (a < bg.right_mm + reach) & (b > bg.bottom_mm - reach) & (b < bg.top_mm + reach)
    rows = np.flatnonzero(sel).astype(np.int64)
    s, a, b = s[sel], a[sel], b[sel]
    a_range = (bg.left_mm - reach, bg.right_mm + reach)
    b_range = (bg.bottom_mm - reach, bg.top_mm + reach)
    z_rad = radiological_depth_mm(dg, geom, s, a, b, a_range, b_range)
    base = (k_gy * depth_dose(z_rad) * (SAD_MM / s) ** 2).astype(np.float32)
    sigma_iso = penumbra_sigma_mm(z_rad, dg.rho_voxel[rows]) * SAD_MM / s

    # Per voxel, only the beamlet columns/rows within the reach can matter: a fixed-width window of them.
    w, h = BEAMLET_WIDTH_MM, BEAMLET_HEIGHT_MM
    kc = math.ceil(2 * reach / w) + 2
    kr = math.ceil(2 * reach / h) + 2
    c0 = np.floor((a - reach - bg.left_mm) / w).astype(np.int64)
    r0 = np.floor((bg.top_mm - (b + reach)) / h).astype(np.int64)
    cols = c0[:, None] + np.arange(kc)[None, :]
    rws = r0[:, None] + np.arange(kr)[None, :]
    x_lo = bg.left_mm + cols * w
    y_hi = bg.top_mm - rws * h
    px = aperture_fraction(x_lo, x_lo + w, a[:, None], sigma_iso[:, None]).astype(np.float32)
    py = aperture_fraction(y_hi - h, y_hi, b[:, None], sigma_iso[:, None]).astype(np.float32)
    px[(cols < 0) | (cols >= bg.num_cols)] = 0.0
    py[(rws < 0) | (rws >= bg.num_rows)] = 0.0
    val = base[:, None, None] * py[:, :, None] * px[:, None, :]  # (voxel, row, col)
    vi, ri, ci = np.nonzero(val >= tol_gy)
    values = val[vi, ri, ci]
    beamlet = rws[vi, ri] * bg.num_cols + cols[vi, ci]
    voxel = rows[vi]
    order = np.lexsort((voxel, beamlet))
    sparse = np.empty((order.size + 1, 3), np.float32)
    sparse[:-1, 0] = voxel[order]
    sparse[:-1, 1] = beamlet[order]
    sparse[:-1, 2] = values[order]
    # PortPy sizes each beam's matrix from its largest indices: pin the last voxel row and beamlet column.
    sparse[-1] = (dg.num_voxels - 1, bg.num_beamlets - 1, 0.0)

    # SSD along the central axis: first body-density sample on the ray.
    ts = np.arange(SAD_MM - 400.0, SAD_MM, 1.0)
    pts = geom.source + ts[:, None] * geom.direction
    from scipy.ndimage import map_coordinates

    bo, br = dg.block_origin_xyz_mm, dg.block_res_xyz_mm
    rho_axis = map_coordinates(dg.rho_block, [(pts[:, 2] - bo[2]) / br[2], (pts[:, 1] - bo[1]) / br[1],
                                              (pts[:, 0] - bo[0]) / br[0]], order=1, cval=0.0)
    hit = np.flatnonzero(rho_axis > 0.5)
    ssd = float(ts[hit[0]]) if hit.size else SAD_MM
    return BeamResult(beam_id, geom.gantry_deg, bg, outline, sparse, ssd, time.perf_counter() - t0)


def calibrate_k_gy(dg: DoseGrid, iso: np.ndarray) -> float:
    """K such that unit intensity over the PTV from the notebook's seven beams gives the calibration dose."""
    total = 0.0
    for bid in NOTEBOOK_BEAM_IDS:
        geom = BeamGeometry(beam_gantry_deg(bid), iso)
        one = np.array([SAD_MM]), np.zeros(1), np.zeros(1)
        z = radiological_depth_mm(dg, geom, *one, (-10.0, 10.0), (-10.0, 10.0))
        total += float(depth_dose(z)[0])
    return CALIBRATION_DOSE_GY / total


# ----------------------------------------------------------------------------------------------------------
# Writing the PortPy folder
# ----------------------------------------------------------------------------------------------------------

_H5_COMPRESSION = {"compression": "gzip", "compression_opts": 1}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def _h5_dataset(f, name: str, data: np.ndarray, **extra) -> None:
    data = np.asarray(data)
    kw = dict(_H5_COMPRESSION) if data.size > 64 else {}
    f.create_dataset(name, data=data, **kw, **extra)


def write_ct(folder: Path, anatomy: Anatomy) -> None:
    import h5py

    g = anatomy.grid
    nz, ny, nx = g.shape_zyx
    with h5py.File(folder / "CT_Data.h5", "w") as f:
        _h5_dataset(f, "ct_hu_3d", anatomy.hu, chunks=(1, ny, nx))
    _write_json(folder / "CT_MetaData.json", {
        "ct_hu_3d_File": "CT_Data.h5/ct_hu_3d",
        "size_xyz_mm": [nx, ny, nz],  # voxel counts, as PortPy's own metadata names them
        "origin_xyz_mm": list(g.origin_xyz_mm),
        "resolution_xyz_mm": list(g.res_xyz_mm),
        "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    })


def write_structures(folder: Path, anatomy: Anatomy, ct_to_dose: np.ndarray) -> dict[str, float]:
    import h5py

    meta, volumes = [], {}
    _, ny, nx = anatomy.grid.shape_zyx
    in_box = ct_to_dose >= 0
    with h5py.File(folder / "StructureSet_Data.h5", "w") as f:
        for name in STRUCTURE_NAMES:
            mask = anatomy.masks[name]
            _h5_dataset(f, name, mask.astype(np.uint8), chunks=(1, ny, nx))
            n = int(np.count_nonzero(mask))
            volumes[name] = round(n * anatomy.grid.voxel_cc, 2)
            meta.append({
                "name": name,
                "volume_cc": volumes[name],
                "dicom_structure_name": name,
                "fraction_of_vol_in_calc_box": round(int(np.count_nonzero(mask & in_box)) / n, 4) if n else 0.0,
                "structure_mask_3d_File": f"StructureSet_Data.h5/{name}",
            })
    _write_json(folder / "StructureSet_MetaData.json", meta)
    return volumes


def write_opt_voxels(folder: Path, dg: DoseGrid, ct_to_dose: np.ndarray) -> None:
    import h5py

    g = dg.grid
    nz, ny, nx = g.shape_zyx
    with h5py.File(folder / "OptimizationVoxels_Data.h5", "w") as f:
        _h5_dataset(f, "ct_to_dose_voxel_map", ct_to_dose, chunks=(1, ny, nx))
        _h5_dataset(f, "voxel_coordinate_XYZ_mm", dg.centres_xyz_mm.astype(np.float32))
    res = dg.block_res_xyz_mm
    kz, ky, kx = (np.flatnonzero((dg.block_index >= 0).any(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1)))
    first = np.array([kx[0], ky[0], kz[0]])
    count = np.array([kx[-1], ky[-1], kz[-1]]) - first + 1
    start = dg.block_origin_xyz_mm + first * res
    _write_json(folder / "OptimizationVoxels_MetaData.json", {
        "ct_origin_xyz_mm": list(g.origin_xyz_mm),
        "ct_voxel_resolution_xyz_mm": list(g.res_xyz_mm),
        "dose_voxel_resolution_xyz_mm": [float(v) for v in res],
        "ct_size_xyz": [nx, ny, nz],
        "cal_box_xyz_start": [float(v) for v in start],
        "cal_box_xyz_end": [float(v) for v in start + res * count],
        "ct_to_dose_voxel_map_File": "OptimizationVoxels_Data.h5/ct_to_dose_voxel_map",
        "voxel_coordinate_XYZ_mm_File": "OptimizationVoxels_Data.h5/voxel_coordinate_XYZ_mm",
        "opt_point_cnt": dg.num_voxels,
    })


def write_beam(beams_dir: Path, r: BeamResult, iso: np.ndarray, tol_gy: float) -> None:
    import h5py

    name = f"Beam_{r.beam_id}_Data.h5"
    bg = r.beamlets
    with h5py.File(beams_dir / name, "w") as f:
        for key, arr in bg.arrays().items():
            _h5_dataset(f, f"beamlets/{key}", arr)
        for i, seg in enumerate(r.outline):
            f.create_dataset(f"BEV_structure_contour_points/PTV/{i}", data=seg)
        _h5_dataset(f, "inf_matrix_sparse", r.sparse, chunks=(min(len(r.sparse), 65536), 3))
        f.create_dataset("MLC_leaves_pos_y_mm", data=np.array(MLC_LEAF_BOUNDARIES_Y_MM))
    files = {k: f"{name}/beamlets/{k}" for k in ("id", "width_mm", "height_mm", "position_x_mm",
                                                    "position_y_mm", "MLC_leaf_idx")}
    _write_json(beams_dir / f"Beam_{r.beam_id}_MetaData.json", {
        "ID": r.beam_id,
        "gantry_angle": r.gantry_deg,
        "collimator_angle": 0.0,
        "couch_angle": 0.0,
        "iso_center": {"x_mm": float(iso[0]), "y_mm": float(iso[1]), "z_mm": float(iso[2])},
        "beamlets": {f"{k}_File": v for k, v in files.items()},
        "jaw_position": {"top_left_x_mm": bg.left_mm, "top_left_y_mm": bg.top_mm,
                         "bottom_right_x_mm": bg.right_mm, "bottom_right_y_mm": bg.bottom_mm},
        "BEV_structure_contour_points_File": f"{name}/BEV_structure_contour_points",
        "MLC_name": "Millennium 120",
        "beam_modality": "Photon",
        "energy_MV": "6X",
        "SSD_mm": r.ssd_mm,
        "SAD_mm": SAD_MM,
        "influenceMatrixSparse_File": f"{name}/inf_matrix_sparse",
        "influenceMatrixSparse_tol": tol_gy,
        # No dense matrix is shipped (it would be ~40 GB): PortPy then reports the beam as sparse-only.
        "influenceMatrixFull_File": None,
        "MLC_leaves_pos_y_mm_File": f"{name}/MLC_leaves_pos_y_mm",
        "machine_name": "Synthetic 6X linac",
    })


# State shared with forked beam workers (read-only, inherited copy-on-write).
_WORKER_STATE: dict = {}


def _beam_task(beam_id: int) -> dict:
    st = _WORKER_STATE
    r = compute_beam(st["dg"], beam_id, st["iso"], st["ptv_xyz"], st["k_gy"], st["tol_gy"])
    t = time.perf_counter()
    write_beam(st["beams_dir"], r, st["iso"], st["tol_gy"])
    return {"beam_id": beam_id, "num_beamlets": r.beamlets.num_beamlets, "nnz": int(r.sparse.shape[0]),
            "compute_s": r.seconds, "write_s": time.perf_counter() - t}


# ----------------------------------------------------------------------------------------------------------
# Reference plan and RT Dose
# ----------------------------------------------------------------------------------------------------------

# Lung_2Gy_30Fx objective weights (per structure, each normalised by its voxel count).
REFERENCE_PTV_WEIGHTS = {"over": 10000.0, "under": 100000.0}
REFERENCE_OAR_WEIGHTS = {"CORD": 10.0, "ESOPHAGUS": 20.0, "HEART": 20.0, "LUNG_L": 10.0, "LUNG_R": 10.0,
                         "LUNGS_NOT_GTV": 10.0, "RIND_0": 5.0, "RIND_1": 5.0, "RIND_2": 3.0, "RIND_3": 3.0,
                         "RIND_4": 3.0}
REFERENCE_RINGS_MM = {"RIND_0": (0.0, 5.0), "RIND_1": (5.0, 10.0), "RIND_2": (10.0, 30.0),
                      "RIND_3": (30.0, 50.0), "RIND_4": (50.0, np.inf)}
REFERENCE_SMOOTHNESS_WEIGHT = 100.0
REFERENCE_PTV_MARGIN_MM = 3.0  # beamlets whose centre lies within the PTV's projection + 3 mm (as PortPy)
REFERENCE_MAX_ITERATIONS = 400


def _rows_and_weights(mask: np.ndarray, ct_to_dose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dose-voxel rows of a structure and the number of its CT voxels in each (PortPy's voxel weights)."""
    rows, counts = np.unique(ct_to_dose[mask], return_counts=True)
    keep = rows >= 0
    return rows[keep], counts[keep].astype(np.float64)


def _weighted_quantile_dose(dose: np.ndarray, weights: np.ndarray, volume_fraction: float) -> float:
    """Dose received by at least ``volume_fraction`` of the structure (e.g. 0.95 for D95)."""
    order = np.argsort(dose)[::-1]
    cum = np.cumsum(weights[order]) / weights.sum()
    return float(dose[order][np.searchsorted(cum, volume_fraction)])


def load_beam_matrix(beams_dir: Path, beam_id: int, num_voxels: int):
    import h5py
    from scipy.sparse import csr_matrix

    with h5py.File(beams_dir / f"Beam_{beam_id}_Data.h5", "r") as f:
        sp = f["inf_matrix_sparse"][:]
        x = f["beamlets/position_x_mm"][:]
        y = f["beamlets/position_y_mm"][:]
        outline = [f[f"BEV_structure_contour_points/PTV/{k}"][:] for k in f["BEV_structure_contour_points/PTV"]]
    a = csr_matrix((sp[:, 2].astype(np.float64), (sp[:, 0].astype(np.int64), sp[:, 1].astype(np.int64))),
                   shape=(num_voxels, x.size))
    return a, x, y, outline


def optimise_reference_plan(beams_dir: Path, anatomy: Anatomy, dg: DoseGrid, ct_to_dose: np.ndarray,
                            beam_ids: tuple[int, ...]) -> tuple[np.ndarray, dict]:
    """A fluence (IMRT) plan over ``beam_ids``; returns the total plan dose per dose voxel (Gy) and metrics."""
    import shapely
    from scipy import ndimage, sparse
    from scipy.optimize import minimize

    blocks, used, smooth_pairs, offset = [], [], [], 0
    for bid in beam_ids:
        a, x, y, outline = load_beam_matrix(beams_dir, bid, dg.num_voxels)
        region = shapely.unary_union([shapely.Polygon(o) for o in outline]).buffer(REFERENCE_PTV_MARGIN_MM)
        inside = shapely.contains_xy(region, x, y)
        idx = np.flatnonzero(inside)
        blocks.append(a[:, idx])
        # Neighbours within a beam (same row, adjacent column / same column, adjacent row) for smoothness.
        pos = {(round(x[i], 3), round(y[i], 3)): k for k, i in enumerate(idx)}
        for (px, py), k in pos.items():
            for q in ((round(px + BEAMLET_WIDTH_MM, 3), py), (px, round(py - BEAMLET_HEIGHT_MM, 3))):
                if q in pos:
                    smooth_pairs.append((offset + k, offset + pos[q]))
        used.append(idx)
        offset += idx.size
    a_all = sparse.hstack(blocks, format="csr")
    n = a_all.shape[1]

    m = anatomy.masks
    structures = {k: m[k] for k in ("CORD", "ESOPHAGUS", "HEART", "LUNG_L", "LUNG_R")}
    structures["LUNGS_NOT_GTV"] = (m["LUNG_L"] | m["LUNG_R"]) & ~m["GTV"]
    ptv_block = _block_view(m["PTV"]).any(axis=(2, 4))
    dist = ndimage.distance_transform_edt(~ptv_block, sampling=(dg.block_res_xyz_mm[2], dg.block_res_xyz_mm[1],
                                                                 dg.block_res_xyz_mm[0]))
    body_rows = dg.block_index >= 0
    omega = np.zeros(dg.num_voxels)
    for name, w in REFERENCE_OAR_WEIGHTS.items():
        if name.startswith("RIND"):
            lo, hi = REFERENCE_RINGS_MM[name]
            rows = dg.block_index[body_rows & (dist > lo) & (dist <= hi)]
        else:
            rows, _ = _rows_and_weights(structures[name], ct_to_dose)
        if rows.size:
            omega[rows] += w / rows.size
    keep = np.flatnonzero(omega > 0)
    a_oar = a_all[keep]
    h_oar = (a_oar.T @ sparse.diags(omega[keep]) @ a_oar).toarray()
    lap = np.zeros((n, n))
    if smooth_pairs:
        i, j = np.array(smooth_pairs).T
        np.add.at(lap, (i, i), 1.0)
        np.add.at(lap, (j, j), 1.0)
        np.add.at(lap, (i, j), -1.0)
        np.add.at(lap, (j, i), -1.0)
    h = h_oar + REFERENCE_SMOOTHNESS_WEIGHT / n * lap

    ptv_rows, ptv_w = _rows_and_weights(m["PTV"], ct_to_dose)
    a_ptv = a_all[ptv_rows]
    target = PRESCRIPTION_GY / NUM_FRACTIONS
    wo = REFERENCE_PTV_WEIGHTS["over"] / ptv_rows.size
    wu = REFERENCE_PTV_WEIGHTS["under"] / ptv_rows.size

    def fun(xv: np.ndarray) -> tuple[float, np.ndarray]:
        r = a_ptv @ xv - target
        over, under = np.maximum(r, 0.0), np.minimum(r, 0.0)
        hx = h @ xv
        f = float(xv @ hx + wo * over @ over + wu * under @ under)
        g = 2.0 * hx + a_ptv.T @ (2.0 * wo * over + 2.0 * wu * under)
        return f, g

    x0 = np.full(n, 0.5)
    res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * n,
                   options={"maxiter": REFERENCE_MAX_ITERATIONS, "ftol": 1e-10, "gtol": 1e-8})
    xv = res.x
    dose_fx = np.asarray(a_all @ xv).ravel()
    scale = target / _weighted_quantile_dose(dose_fx[ptv_rows], ptv_w, 0.95)
    dose_total = dose_fx * scale * NUM_FRACTIONS

    def mean(name: str, mask: np.ndarray) -> float:
        rows, w = _rows_and_weights(mask, ct_to_dose)
        return float(np.average(dose_total[rows], weights=w))

    def dmax(mask: np.ndarray) -> float:
        rows, _ = _rows_and_weights(mask, ct_to_dose)
        return float(dose_total[rows].max())

    metrics = {
        "beam_ids": list(beam_ids),
        "num_beamlets": int(n),
        "solver_iterations": int(res.nit),
        "ptv_d95_gy": _weighted_quantile_dose(dose_total[ptv_rows], ptv_w, 0.95),
        "ptv_mean_gy": mean("PTV", m["PTV"]),
        "ptv_max_gy": dmax(m["PTV"]),
        "cord_max_gy": dmax(m["CORD"]),
        "esophagus_mean_gy": mean("ESOPHAGUS", m["ESOPHAGUS"]),
        "esophagus_max_gy": dmax(m["ESOPHAGUS"]),
        "heart_mean_gy": mean("HEART", m["HEART"]),
        "lungs_not_gtv_mean_gy": mean("LUNGS_NOT_GTV", structures["LUNGS_NOT_GTV"]),
        "mean_intensity": float(xv.mean() * scale),
    }
    return dose_total, metrics


def write_rt_dose(path: Path, dg: DoseGrid, dose_total_gy: np.ndarray, *, seed: int) -> None:
    """The plan dose as a DICOM RT Dose on the dose-voxel grid, aligned with the CT (total Gy)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.tag import Tag
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dose3d = np.zeros(dg.block_index.shape, np.float64)
    inside = dg.block_index >= 0
    dose3d[inside] = dose_total_gy[dg.block_index[inside]]
    scaling = max(float(dose3d.max()), 1e-6) / float(2**32 - 1)
    pixels = np.rint(dose3d / scaling).astype("<u4")


    def uid(what: str) -> str:  # deterministic, so a rebuild writes the same file
        return generate_uid(entropy_srcs=[CASE_ID, GENERATOR_VERSION, str(seed), what])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.2"  # RT Dose Storage
    meta.MediaStorageSOPInstanceUID = uid("rtdose")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTDOSE"
    ds.PatientName = CASE_ID
    ds.PatientID = CASE_ID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.FrameOfReferenceUID = uid("frame")
    ds.SeriesDescription = "Reference IMRT plan (planner beams)"
    nz, ny, nx = dose3d.shape
    o, r = dg.block_origin_xyz_mm, dg.block_res_xyz_mm
    ds.ImagePositionPatient = [float(o[0]), float(o[1]), float(o[2])]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [float(r[1]), float(r[0])]  # DICOM order: row spacing (y), column spacing (x)
    ds.SliceThickness = float(r[2])
    ds.GridFrameOffsetVector = [float(k * r[2]) for k in range(nz)]
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.NumberOfFrames = nz
    ds.Rows, ds.Columns = ny, nx
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 32
    ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = f"{scaling:.10g}"
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


# ----------------------------------------------------------------------------------------------------------
# Building and caching the case
# ----------------------------------------------------------------------------------------------------------


def _folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_phantom(out_dir: Path, *, seed: int = 0, workers: int | None = None) -> dict:
    """Write the complete case folder at ``out_dir`` (created; must not exist or be empty); return a summary."""
    import multiprocessing as mp

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PhantomError(f"out_dir: {out_dir} exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    beams_dir = out_dir / "Beams"
    beams_dir.mkdir()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    anatomy = build_anatomy(seed)
    dg = build_dose_grid(anatomy)
    ct_to_dose = dg.ct_to_dose_voxel_map()
    timings["anatomy_s"] = time.perf_counter() - t

    t = time.perf_counter()
    write_ct(out_dir, anatomy)
    volumes = write_structures(out_dir, anatomy, ct_to_dose)
    write_opt_voxels(out_dir, dg, ct_to_dose)
    _write_json(out_dir / "PlannerBeams.json", {"IDs": list(PLANNER_BEAM_IDS)})
    timings["write_ct_structures_s"] = time.perf_counter() - t

    t = time.perf_counter()
    xa, ya, za = anatomy.grid.axes()
    kz, ky, kx = np.nonzero(anatomy.masks["PTV"])
    ptv_xyz = np.column_stack([xa[kx], ya[ky], za[kz]]).astype(np.float64)
    iso = np.round(ptv_xyz.mean(axis=0), 2)
    k_gy = calibrate_k_gy(dg, iso)
    tol_gy = float(np.float32(SPARSE_TOL_FRACTION * nominal_peak_beamlet_dose(k_gy)))
    _WORKER_STATE.update(dg=dg, iso=iso, ptv_xyz=ptv_xyz, k_gy=k_gy, tol_gy=tol_gy, beams_dir=beams_dir)
    n_workers = workers or min(2, os.cpu_count() or 1)
    try:
        if n_workers > 1:
            with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("fork")) as pool:
                beam_stats = list(pool.map(_beam_task, range(NUM_CONTROL_POINTS)))
        else:
            beam_stats = [_beam_task(b) for b in range(NUM_CONTROL_POINTS)]
    finally:
        _WORKER_STATE.clear()
    timings["beams_s"] = time.perf_counter() - t

    t = time.perf_counter()
    dose_total, plan = optimise_reference_plan(beams_dir, anatomy, dg, ct_to_dose, PLANNER_BEAM_IDS)
    (out_dir / "DicomFiles").mkdir()
    write_rt_dose(out_dir / "DicomFiles" / "rt_dose_echo_imrt.dcm", dg, dose_total, seed=seed)
    timings["reference_plan_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    beamlets = np.array([b["num_beamlets"] for b in beam_stats])
    summary = {
        "case_id": CASE_ID,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "ct_shape_zyx": list(anatomy.grid.shape_zyx),
        "ct_resolution_xyz_mm": list(anatomy.grid.res_xyz_mm),
        "dose_voxels": dg.num_voxels,
        "dose_voxel_resolution_xyz_mm": [float(v) for v in dg.block_res_xyz_mm],
        "calc_box_xyz_mm": [list(r) for r in dg.calc_box_xyz_mm],
        "iso_center_xyz_mm": [float(v) for v in iso],
        "k_gy": k_gy,
        "influence_matrix_sparse_tol_gy": tol_gy,
        "num_beams": len(beam_stats),
        "beamlets_per_beam": {"min": int(beamlets.min()), "mean": float(beamlets.mean()),
                              "max": int(beamlets.max())},
        "nnz_total": int(sum(b["nnz"] for b in beam_stats)),
        "structure_volumes_cc": volumes,
        "anatomy": {k: round(float(v), 3) for k, v in anatomy.notes.items()},
        "reference_plan": plan,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "beam_compute_s_mean": float(np.mean([b["compute_s"] for b in beam_stats])),
        "beam_write_s_mean": float(np.mean([b["write_s"] for b in beam_stats])),
        "peak_rss_mb": {
            "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
        },
        "folder_size_mb": _folder_size_bytes(out_dir) / 1e6,
    }
    return summary


def _read_marker(case_dir: Path) -> dict | None:
    try:
        return json.loads((case_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_complete(case_dir: Path, *, seed: int = 0) -> bool:
    """The folder holds a finished build of this generator version for ``seed``."""
    marker = _read_marker(case_dir)
    return bool(marker) and marker.get("generator_version") == GENERATOR_VERSION and marker.get("seed") == seed


def ensure_phantom(portpy_dir: Path | None = None, *, case_id: str = CASE_ID, force: bool = False,
                   seed: int = 0) -> Path:
    """The case folder under ``portpy_dir``, built (about a minute) unless a complete current build exists."""
    from vmat_core import paths

    root = Path(portpy_dir) if portpy_dir is not None else paths.portpy_data_dir()
    root = root.expanduser().resolve()
    if not isinstance(case_id, str) or "Patient" not in case_id or "/" in case_id or case_id.startswith("."):
        raise ValueError(f"case_id: must be a folder name containing 'Patient' (PortPy lists only those), "
                         f"got {case_id!r}")
    if "Phantom" in str(root / case_id):
        # PortPy's RT Dose reader shifts x by -65.63 mm for any path containing this word.
        raise PhantomError(f"portpy_dir: the path {root / case_id} contains 'Phantom', which PortPy's RT Dose "
                           "reader treats specially; choose another data directory")
    case_dir = root / case_id
    if not force and is_complete(case_dir, seed=seed):
        return case_dir
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".synthetic-case.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; a waiting process then finds the result
        try:
            if not force and is_complete(case_dir, seed=seed):
                return case_dir
            # Under the lock no other builder is running: leftovers of killed builds can go.
            for leftover in [*root.glob(".building-*"), *root.glob(".stale-*")]:
                shutil.rmtree(leftover, ignore_errors=True)
            tmp = root / f".building-{os.getpid()}"
            try:
                summary = build_phantom(tmp, seed=seed)
                summary["case_id"] = case_id
                _write_json(tmp / MARKER_FILE, summary)
                if case_dir.exists():
                    stale = root / f".stale-{os.getpid()}"
                    os.rename(case_dir, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                os.rename(tmp, case_dir)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return case_dir


def main(argv: list[str] | None = None) -> int:
    from vmat_core import paths

    parser = argparse.ArgumentParser(prog="python -m vmat_core.phantom", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="VMAT Planner data directory (the case goes to <data-dir>/portpy/); "
                             f"default ${paths.DATA_DIR_ENV} or data/")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete case exists")
    parser.add_argument("--seed", type=int, default=0, help="anatomy seed (non-negative integer, default 0)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed: must be a non-negative integer")
    portpy_dir = (args.data_dir.expanduser().resolve() / "portpy") if args.data_dir else None
    case_dir = ensure_phantom(portpy_dir, force=args.force, seed=args.seed)
    marker = _read_marker(case_dir) or {}
    print(f"case folder: {case_dir}")
    print(json.dumps(marker, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
