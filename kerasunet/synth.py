"""Synthetic liver phantoms written in the real on-disk layouts (LiTS CT and FZMC MRI).

There is no real data in this project, so it makes its own. Each case is first built as
a 3D tissue map in physical millimetres (body wall with fat and muscle, spine and ribs,
bowel, aorta, kidneys, spleen, a liver of varying shape and 0-4 tumours inside it), then
rendered either as CT in Hounsfield units or as arterial-phase MRI in arbitrary units.
The spleen and kidneys overlap the liver's intensities, so a model has to learn position
and shape, not a threshold; tumours differ from the liver by 15-40 HU only.

Layouts (canonical shape; see ``storage_axcodes`` for cases stored in other orders)::

    OUT/lits/volume-N.nii[.gz]         int16, scl_slope=1, scl_inter=-1024 (HU)
    OUT/lits/segmentation-N.nii[.gz]   uint8: 0 background, 1 liver, 2 tumour
    OUT/mri/FZMC00K/<phase>.nii[.gz]   int16 with a per-case scl_slope (MR units)
    OUT/mri/FZMC00K/label.nii[.gz]     uint8: 0 background, 1 tumour

Deterministic quirks, like the real sets have:

* Orientation: case index ``i`` with ``i % 3 == 2`` is stored reoriented, alternately
  LPS (``volume-2``, ``FZMC003``) and PLI, i.e. x/y swapped and z flipped (``volume-5``,
  ``FZMC006``). The affine is exact, so ``nib.as_closest_canonical`` gives back the
  same voxels as a RAS copy would hold.
* MRI defects when ``n_cases >= 4``: index 1 (``FZMC002``) has a label one slice
  shorter than its image, index 3 (``FZMC004``) has no label file (see ``mri_defects``).
* Tumours: 1-4 per case, except case indices 4, 9, 14, ... which have none.
* Every case draws from its own generator seeded by ``(seed, modality, index)``, so a
  case is the same whatever ``n_cases`` is, and ``ct_phantom``/``mri_phantom`` rebuild
  it in memory. Files are byte-for-byte reproducible (gzip with mtime 0, no file name).

The scan always covers the same anatomy (a CT ~300-360 mm from pelvis to lung bases, an
MRI 240 mm around the liver), so slice thickness follows from the slice count just as
the in-plane spacing follows from ``size`` (0.6-0.9 mm at 512, scaled by 512/size).
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from kerasunet.core.atomic import atomic_path
from kerasunet.core.nifti import NIFTI_SUFFIXES, strip_nifti_suffix

Progress = Callable[[str], None] | None

# Limits of the settings (a 2048-wide or 2048-slice phantom is already several GB).
MIN_SIZE, MAX_SIZE = 32, 2048
MIN_SLICES, MAX_SLICES = 4, 2048
MIN_MRI_SHAPE, MAX_MRI_SHAPE = (16, 16, 4), (1024, 1024, 512)

# Orientation and defects, chosen by case index.
RAS = ("R", "A", "S")
REORIENTED_EVERY = 3
REORIENTED_AXCODES = (("L", "P", "S"), ("P", "L", "I"))
MRI_SHORT_LABEL_CASE = 1
MRI_MISSING_LABEL_CASE = 3
MRI_DEFECTS_FROM = 4
_DEFECT_TEXT = {"short": "label has one slice fewer than the image", "missing": "no label file"}
_MODALITY_KEYS = {"ct": 1, "mri": 2}

# CT intensities in HU. Ranges are drawn per case; *_VS_LIVER are offsets from the liver.
HU_AIR = -1000.0
HU_GAS = -800.0
HU_FAT = -100.0
HU_VISCERAL_FAT = -90.0
HU_VISCERA = 25.0
HU_MUSCLE = 50.0
HU_CSF = 10.0
HU_DISC = 80.0
HU_KIDNEY_SINUS = -20.0
HU_LIVER = (60.0, 100.0)
HU_SPLEEN_VS_LIVER = (-15.0, 15.0)
HU_KIDNEY_VS_LIVER = (0.0, 50.0)
HU_AORTA = (120.0, 200.0)
HU_MARROW = (250.0, 350.0)
HU_CORTEX = (700.0, 1000.0)
HU_RIB = (400.0, 700.0)
HU_TUMOUR_CONTRAST = (15.0, 40.0)
HYPODENSE_FRACTION = 0.7
HU_TEXTURE = 6.0
HU_NOISE = (10.0, 20.0)
HU_LIMITS = (-1024.0, 3071.0)
HU_STORED_INTERCEPT = -1024.0  # stored = HU + 1024, as CT scanners write int16
CT_BLUR_VOXELS = (0.7, 0.7, 0.4)

# MRI (T1 fat-suppressed, arterial phase): intensities relative to the liver.
MR_LIVER = (450.0, 650.0)
MR_SPLEEN_VS_LIVER = (1.1, 1.5)  # arterial spleen is as bright as some tumours
MR_KIDNEY_VS_LIVER = (1.4, 1.9)
MR_AORTA_VS_LIVER = (2.5, 3.5)
MR_TUMOUR_ENHANCEMENT = (1.35, 1.8)
MR_TEXTURE = 0.04
MR_BIAS_LOG = 0.25
MR_NOISE_VS_LIVER = (0.02, 0.04)
MR_GAIN = (0.5, 3.0)
MR_SLOPE = (0.5, 2.0)
MRI_BLUR_VOXELS = (0.6, 0.6, 0.3)

# Geometry in mm (z runs from the pelvis up to the lung bases).
CT_START_MM, CT_COVERAGE_MM = (20.0, 60.0), (300.0, 360.0)
MRI_START_MM, MRI_COVERAGE_MM = (120.0, 145.0), 240.0
CT_SPACING_AT_512 = (0.6, 0.9)
MRI_SPACING_AT_320 = (1.15, 1.3)
BODY_SEMI_MM = ((135.0, 165.0), (100.0, 125.0))
FAT_MM, MUSCLE_MM = (10.0, 25.0), (8.0, 14.0)
SPINE_DEPTH_MM = 50.0
VERTEBRA_RADIUS_MM = (15.0, 19.0)
VERTEBRA_PERIOD_MM, DISC_FRACTION = 32.0, 0.2
RIB_Z_MIN_MM, RIB_PERIOD_MM, RIB_DUTY, RIB_DROP_MM = 190.0, 38.0, 0.3, 40.0
LIVER_SEMI_MM = ((70.0, 95.0), (65.0, 85.0), (75.0, 100.0))
LIVER_Z_MM = (230.0, 270.0)
LEFT_LOBE_PROBABILITY = 0.75
TUMOUR_RADIUS_MM = (18.0, 32.0)
TUMOUR_COUNT_P = (0.4, 0.3, 0.2, 0.1)  # P(1..4 tumours) in a case that has tumours
TUMOUR_FREE_EVERY = 5  # case indices 4, 9, 14, ... have no tumour: a minority, for any seed
TUMOUR_REACH = 0.45  # tumour centres lie within this fraction of the liver's semi-axes
TUMOUR_TRIES = 5


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class Tissue(IntEnum):
    """Tissue codes of the anatomy map; rendering looks each one up in a per-case table."""

    AIR = 0
    GAS = 1
    FAT = 2
    VISCERAL_FAT = 3
    VISCERA = 4
    MUSCLE = 5
    CSF = 6
    DISC = 7
    KIDNEY_SINUS = 8
    KIDNEY = 9
    SPLEEN = 10
    AORTA = 11
    LIVER = 12
    MARROW = 13
    CORTEX = 14
    RIB = 15


# Fixed MR intensities relative to the liver (fat-suppressed, so fat is dark; cortical
# bone has no signal). Organs that vary per case have ranges above.
MR_VS_LIVER = {Tissue.FAT: 0.35, Tissue.VISCERAL_FAT: 0.3, Tissue.VISCERA: 0.65, Tissue.MUSCLE: 0.5,
               Tissue.CSF: 0.3, Tissue.DISC: 0.45, Tissue.KIDNEY_SINUS: 0.4, Tissue.LIVER: 1.0,
               Tissue.MARROW: 0.6, Tissue.CORTEX: 0.08, Tissue.RIB: 0.1}


@dataclass(frozen=True)
class CtSettings:
    """CT phantom settings.

    Attributes:
        size: in-plane size (size x size voxels).
        slices: inclusive (min, max) of the per-case slice count.
    """

    size: int = 512
    slices: tuple[int, int] = (75, 160)

    def __post_init__(self):
        if not _is_int(self.size) or not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"Expected {MIN_SIZE} <= size <= {MAX_SIZE}. Received: size={self.size!r}")
        ok = len(self.slices) == 2 and all(_is_int(s) for s in self.slices)
        if not ok or not MIN_SLICES <= self.slices[0] <= self.slices[1] <= MAX_SLICES:
            raise ValueError(f"Expected slices=(min, max) with {MIN_SLICES} <= min <= max <= "
                             f"{MAX_SLICES}. Received: slices={self.slices!r}")


@dataclass(frozen=True)
class MriSettings:
    """MRI phantom settings.

    Attributes:
        shape: canonical (H, W, D) = (x, y, z) voxels.
        phase: name of the image file (``<phase>.nii``); the image is arterial-phase-like.
    """

    shape: tuple[int, int, int] = (320, 260, 72)
    phase: str = "artery"

    def __post_init__(self):
        ok = len(self.shape) == 3 and all(_is_int(s) for s in self.shape)
        if not ok or not all(lo <= s <= hi for lo, s, hi in zip(MIN_MRI_SHAPE, self.shape, MAX_MRI_SHAPE)):
            raise ValueError(f"Expected shape=(H, W, D) with {MIN_MRI_SHAPE} <= shape <= "
                             f"{MAX_MRI_SHAPE}. Received: shape={self.shape!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(self.phase)) or self.phase == "label":
            raise ValueError("Expected phase to be a file name of letters, digits, '-' or '_', "
                             f"other than 'label'. Received: phase={self.phase!r}")


@dataclass(frozen=True)
class Grid:
    """Voxel grid in canonical RAS+ order: +x patient right, +y anterior, +z superior (mm)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, i: int) -> np.ndarray:
        return (self.origin[i] + np.arange(self.shape[i]) * self.spacing[i]).astype(np.float32)

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine


@dataclass(frozen=True)
class Anatomy:
    """Tissue map and tumour ids (0 none, k for tumour k) of one case, both ``grid.shape``."""

    tissue: np.ndarray
    tumour_id: np.ndarray
    n_tumours: int

    @property
    def liver(self) -> np.ndarray:
        """The liver region, tumours included (tumours are carved out of liver voxels)."""
        return self.tissue == Tissue.LIVER


@dataclass(frozen=True)
class Phantom:
    """One case in canonical (RAS+) voxel order, exactly as it reads back from disk.

    Attributes:
        stored: int16 voxels as written; ``image`` applies ``slope``/``inter``.
        slope: scl_slope as stored (float32 precision).
        inter: scl_inter.
        label: uint8 label map (CT: 0/1/2, MRI: tumour 0/1).
        liver: bool liver region including tumours (labelled in CT, not in MRI).
        tissue: uint8 tissue map (``Tissue`` codes), for tests and inspection.
        grid: voxel grid (shape, spacing, origin).
        n_tumours: tumours placed (each keeps at least half its volume after clipping,
            unless every try failed).
    """

    stored: np.ndarray
    slope: float
    inter: float
    label: np.ndarray
    liver: np.ndarray
    tissue: np.ndarray
    grid: Grid
    n_tumours: int

    @property
    def image(self) -> np.ndarray:
        return (self.stored * np.float64(self.slope) + self.inter).astype(np.float32)


@dataclass(frozen=True)
class _Body:
    cx: float
    cy: float
    a: float
    b: float
    fat: float
    muscle: float
    wave_phase: float

    @property
    def spine(self) -> tuple[float, float]:
        return self.cx, self.cy - self.b + SPINE_DEPTH_MM


@dataclass(frozen=True)
class _Frame:
    """An organ's centre, semi-axes (mm) and in-plane rotation, to place things inside it."""

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    angle: float

    def to_world(self, u: np.ndarray) -> tuple[float, float, float]:
        x, y, z = np.asarray(u) * self.semi
        c, s = np.cos(self.angle), np.sin(self.angle)
        return (self.centre[0] + c * x - s * y, self.centre[1] + s * x + c * y, self.centre[2] + z)


# --------------------------------------------------------------------------- public API


def storage_axcodes(index: int) -> tuple[str, str, str]:
    """Axis codes case ``index`` is stored in (the same rule for CT and MRI)."""
    if index % REORIENTED_EVERY != REORIENTED_EVERY - 1:
        return RAS
    return REORIENTED_AXCODES[(index // REORIENTED_EVERY) % len(REORIENTED_AXCODES)]


def mri_case_id(index: int) -> str:
    return f"FZMC{index + 1:03d}"


def mri_defects(n_cases: int) -> dict[str, str]:
    """Case id -> defect of the MRI cases that builders must skip (none below 4 cases)."""
    kinds = {i: _mri_defect(i, n_cases) for i in range(n_cases)}
    return {mri_case_id(i): _DEFECT_TEXT[kind] for i, kind in kinds.items() if kind}


def _mri_defect(index: int, n_cases: int) -> str | None:
    """The defect of case ``index`` in a set of ``n_cases``: "short", "missing" or None."""
    if n_cases < MRI_DEFECTS_FROM:
        return None
    return {MRI_SHORT_LABEL_CASE: "short", MRI_MISSING_LABEL_CASE: "missing"}.get(index)


def ct_phantom(index: int, seed: int = 0, settings: CtSettings = CtSettings()) -> Phantom:
    """Builds CT case ``index`` in memory (what ``synth_lits`` writes as ``volume-<index>``)."""
    rng = _case_rng(seed, "ct", index)
    lo, hi = settings.slices
    grid = _ct_grid(rng, settings.size, int(rng.integers(lo, hi + 1)))
    anatomy = build_anatomy(rng, grid, tumour_count(rng, index))
    hu = np.clip(_render_ct(rng, anatomy, grid), *HU_LIMITS)
    stored = np.rint(hu - HU_STORED_INTERCEPT).astype(np.int16)
    label = anatomy.liver.astype(np.uint8)
    label[anatomy.tumour_id > 0] = 2
    return Phantom(stored, 1.0, HU_STORED_INTERCEPT, label, anatomy.liver, anatomy.tissue, grid,
                   anatomy.n_tumours)


def mri_phantom(index: int, seed: int = 0, settings: MriSettings = MriSettings()) -> Phantom:
    """Builds MRI case ``index`` in memory (what ``synth_mri`` writes as ``FZMC<index+1>``)."""
    rng = _case_rng(seed, "mri", index)
    grid = _mri_grid(rng, settings.shape)
    anatomy = build_anatomy(rng, grid, tumour_count(rng, index))
    signal = _render_mri(rng, anatomy, grid)
    slope = float(np.float32(round(rng.uniform(*MR_SLOPE), 4)))  # the header holds float32
    stored = np.clip(np.rint(signal / slope), 0, np.iinfo(np.int16).max).astype(np.int16)
    label = (anatomy.tumour_id > 0).astype(np.uint8)
    return Phantom(stored, slope, 0.0, label, anatomy.liver, anatomy.tissue, grid, anatomy.n_tumours)


def synth_lits(out_dir: str | Path, n_cases: int, size: int = 512, seed: int = 0,
               compress: bool | Collection[int] = False, slices: tuple[int, int] = (75, 160),
               progress: Progress = None) -> list[Path]:
    """Writes CT phantoms in the LiTS layout: ``volume-N.nii`` and ``segmentation-N.nii``.

    Args:
        out_dir: folder to write into (created if missing). Files of the same names are
            replaced; other files are left alone.
        n_cases: number of cases, N = 0 .. n_cases - 1.
        size: in-plane size in voxels.
        seed: makes the output byte-for-byte reproducible.
        compress: ``.nii.gz`` for all cases (True), none (False) or the given case indices.
        slices: inclusive (min, max) of the per-case slice count.
        progress: called with one line per case.

    Returns:
        The volume files written, in case order.

    Raises:
        ValueError: a setting is out of range.
    """
    settings = CtSettings(size, tuple(slices))
    gzipped = _check_run(n_cases, seed, compress)
    out_dir, volumes = Path(out_dir), []
    for i in range(n_cases):
        phantom, codes = ct_phantom(i, seed, settings), storage_axcodes(i)
        suffix = ".nii.gz" if i in gzipped else ".nii"
        volume = _save(_nifti(phantom.stored, phantom, codes), out_dir / f"volume-{i}{suffix}")
        _save(_nifti(phantom.label, phantom, codes, dtype=np.uint8), out_dir / f"segmentation-{i}{suffix}")
        _report(progress, f"[ct {i + 1}/{n_cases}] {volume.name} {_describe(volume, phantom, codes)}")
        volumes.append(volume)
    return volumes


def synth_mri(out_dir: str | Path, n_cases: int, shape: tuple[int, int, int] = (320, 260, 72),
              seed: int = 0, phase: str = "artery", compress: bool | Collection[int] = False,
              progress: Progress = None) -> list[Path]:
    """Writes MRI phantoms in the FZMC layout: ``FZMC001/<phase>.nii`` and ``label.nii``.

    From 4 cases on, ``FZMC002``'s label is one slice short and ``FZMC004`` has no label
    (see ``mri_defects``), as in the real set; downstream builders must skip both.

    Args:
        out_dir: folder to write the case folders into (created if missing).
        n_cases: number of cases, FZMC001 .. FZMC<n_cases>.
        shape: canonical (H, W, D) in voxels.
        seed: makes the output byte-for-byte reproducible.
        phase: image file name (``artery`` -> ``artery.nii``).
        compress: ``.nii.gz`` for all cases (True), none (False) or the given case indices.
        progress: called with one line per case.

    Returns:
        The image files written, in case order.

    Raises:
        ValueError: a setting is out of range.
    """
    settings = MriSettings(tuple(shape), phase)
    gzipped = _check_run(n_cases, seed, compress)
    images = []
    for i in range(n_cases):
        phantom, codes, case_id = mri_phantom(i, seed, settings), storage_axcodes(i), mri_case_id(i)
        suffix, folder = (".nii.gz" if i in gzipped else ".nii"), Path(out_dir) / case_id
        image = _save(_nifti(phantom.stored, phantom, codes), folder / f"{phase}{suffix}")
        defect = _mri_defect(i, n_cases)
        _write_mri_label(phantom, codes, folder / f"label{suffix}", defect)
        note = f" ({_DEFECT_TEXT[defect]})" if defect else ""
        _report(progress, f"[mri {i + 1}/{n_cases}] {case_id}/{image.name} "
                          f"{_describe(image, phantom, codes)}{note}")
        images.append(image)
    return images


def synth_dataset(out: str | Path, ct_cases: int, mri_cases: int, size: int = 512,
                  mri_shape: tuple[int, int, int] = (320, 260, 72), seed: int = 0,
                  phase: str = "artery", compress: bool | Collection[int] = False,
                  ct_slices: tuple[int, int] = (75, 160), progress: Progress = None) -> dict[str, list[Path]]:
    """Writes CT phantoms to ``out/lits`` and MRI phantoms to ``out/mri``.

    All settings are checked before anything is written. A modality with 0 cases is skipped.

    Args:
        out: root folder.
        ct_cases: number of CT cases (``synth_lits``).
        mri_cases: number of MRI cases (``synth_mri``).
        size, mri_shape, seed, phase, ct_slices, progress: as for ``synth_lits``/``synth_mri``.
        compress: as for ``synth_lits``; applies to both modalities.

    Returns:
        ``{"lits": volume files, "mri": image files}``.

    Raises:
        ValueError: a setting is out of range, or both case counts are 0.
    """
    CtSettings(size, tuple(ct_slices))
    MriSettings(tuple(mri_shape), phase)
    if ct_cases < 0 or mri_cases < 0 or ct_cases + mri_cases == 0:
        raise ValueError("Expected ct_cases >= 0, mri_cases >= 0 and at least one case. "
                         f"Received: ct_cases={ct_cases}, mri_cases={mri_cases}")
    for n_cases in (n for n in (ct_cases, mri_cases) if n):
        _check_run(n_cases, seed, compress)
    out = Path(out)
    written = {"lits": [], "mri": []}
    if ct_cases:
        written["lits"] = synth_lits(out / "lits", ct_cases, size, seed, compress, ct_slices, progress)
    if mri_cases:
        written["mri"] = synth_mri(out / "mri", mri_cases, mri_shape, seed, phase, compress, progress)
    return written


# --------------------------------------------------------------------------- anatomy


def build_anatomy(rng: np.random.Generator, grid: Grid, n_tumours: int) -> Anatomy:
    """Paints one case's tissues; later organs overwrite earlier ones, bone last of all."""
    body = _draw_body(rng, grid)
    outline, under_fat, cavity = _body_layers(grid, body)
    tissue = np.full(grid.shape, Tissue.AIR, np.uint8)
    tissue[outline] = Tissue.FAT
    tissue[under_fat] = Tissue.MUSCLE
    tissue[cavity] = Tissue.VISCERA
    _paint_bowel(rng, tissue, grid, cavity)
    _paint_kidneys(rng, tissue, grid, body, cavity)
    tissue[_spleen(rng, grid, body) & cavity] = Tissue.SPLEEN
    liver, frame = _liver(rng, grid, body)
    tissue[liver & cavity] = Tissue.LIVER
    _paint_back(rng, tissue, grid, body)
    _paint_ribs(tissue, grid, body, under_fat & ~cavity)
    tumour_id = _tumours(rng, grid, frame, tissue == Tissue.LIVER, n_tumours)
    return Anatomy(tissue, tumour_id, n_tumours)


def _draw_body(rng, grid: Grid) -> _Body:
    # Cap the outline to the field of view: at 0.6 mm x 512 the FOV is only ~307 mm.
    half_fov = 0.47 * min(grid.shape[0] * grid.spacing[0], grid.shape[1] * grid.spacing[1])
    return _Body(cx=rng.uniform(-10, 10), cy=rng.uniform(-10, 10),
                 a=min(rng.uniform(*BODY_SEMI_MM[0]), half_fov),
                 b=min(rng.uniform(*BODY_SEMI_MM[1]), half_fov),
                 fat=rng.uniform(*FAT_MM), muscle=rng.uniform(*MUSCLE_MM),
                 wave_phase=rng.uniform(0, 2 * np.pi))


def _body_layers(grid: Grid, body: _Body):
    """Outline, inside of the fat layer and abdominal cavity; the girth varies slowly with z."""
    x = grid.axis(0)[:, None, None] - body.cx
    y = grid.axis(1)[None, :, None] - body.cy
    wave = 1.0 + 0.02 * np.sin(2 * np.pi * grid.axis(2)[None, None, :] / 250.0 + body.wave_phase)

    def inside(depth):
        return (x / (body.a * wave - depth)) ** 2 + (y / (body.b * wave - depth)) ** 2 <= 1.0

    return inside(0.0), inside(body.fat), inside(body.fat + body.muscle)


def _paint_bowel(rng, tissue, grid: Grid, cavity) -> None:
    # Mesenteric fat and gas pockets give the cavity a structure that is not liver-like.
    fat = _smooth_field(rng, grid.shape, (10, 10, 8)) > 0.6
    gas = _smooth_field(rng, grid.shape, (12, 12, 10)) > 1.8
    low = grid.axis(2)[None, None, :] < LIVER_Z_MM[0] - 20
    tissue[cavity & fat] = Tissue.VISCERAL_FAT
    tissue[cavity & gas & low] = Tissue.GAS


def _paint_kidneys(rng, tissue, grid: Grid, body: _Body, cavity) -> None:
    sx, sy = body.spine
    z_left = rng.uniform(165, 190)
    for side, z in ((1.0, z_left - rng.uniform(5, 20)), (-1.0, z_left)):  # the right sits lower
        centre = (sx + side * rng.uniform(55, 68), sy + rng.uniform(0, 15), z)
        semi = (rng.uniform(26, 32), rng.uniform(20, 25), rng.uniform(45, 55))
        angle = side * rng.uniform(0.2, 0.5)
        tissue[_blob(rng, grid, centre, semi, angle, 0.1) & cavity] = Tissue.KIDNEY
        sinus = tuple(0.45 * s for s in semi)
        tissue[_blob(rng, grid, centre, sinus, angle, 0.0) & cavity] = Tissue.KIDNEY_SINUS


def _spleen(rng, grid: Grid, body: _Body) -> np.ndarray:
    centre = (body.cx - body.a * rng.uniform(0.45, 0.6), body.cy - body.b * rng.uniform(0.05, 0.25),
              rng.uniform(235, 270))
    semi = (rng.uniform(28, 38), rng.uniform(45, 60), rng.uniform(45, 60))
    return _blob(rng, grid, centre, semi, rng.uniform(0.5, 0.9), 0.15)


def _liver(rng, grid: Grid, body: _Body) -> tuple[np.ndarray, _Frame]:
    """A wobbly right lobe and, usually, a left lobe reaching across the midline.

    Returns the liver mask and the right lobe's frame (tumours are placed in it).
    """
    centre = (body.cx + body.a * rng.uniform(0.22, 0.36), body.cy + body.b * rng.uniform(-0.05, 0.15),
              rng.uniform(*LIVER_Z_MM))
    frame = _Frame(centre, tuple(rng.uniform(*r) for r in LIVER_SEMI_MM), rng.uniform(-0.3, 0.3))
    liver = _blob(rng, grid, frame.centre, frame.semi, frame.angle, rng.uniform(0.1, 0.2))
    has_left_lobe = rng.random() < LEFT_LOBE_PROBABILITY
    # The left lobe stays within the right lobe's z-range, so liver slices stay contiguous.
    lobe_centre = frame.to_world(np.array([-0.85, 0.3, 0.2]))
    lobe_semi = (0.6 * frame.semi[0], 0.45 * frame.semi[1], 0.45 * frame.semi[2])
    lobe = _blob(rng, grid, lobe_centre, lobe_semi, frame.angle, 0.15)
    return (liver | lobe) if has_left_lobe else liver, frame


def _paint_back(rng, tissue, grid: Grid, body: _Body) -> None:
    """Paraspinal muscles, aorta, vertebral body with discs, arch, canal and spinous process."""
    sx, sy = body.spine
    radius = rng.uniform(*VERTEBRA_RADIUS_MM)
    aorta_radius = rng.uniform(10, 13)
    inside_body = tissue != Tissue.AIR
    for side in (-1.0, 1.0):
        tissue[_ellipse(grid, (sx + side * 28, sy - 38), (20, 16))[:, :, None] & inside_body] = Tissue.MUSCLE
    tissue[_ellipse(grid, (sx - 10, sy + radius + aorta_radius + 4), (aorta_radius,) * 2)] = Tissue.AORTA
    tissue[_ellipse(grid, (sx, sy - 25), (13, 10))] = Tissue.CORTEX
    tissue[_ellipse(grid, (sx, sy - 25), (7, 6))] = Tissue.CSF
    tissue[_ellipse(grid, (sx, sy - 40), (4, 9))[:, :, None] & inside_body] = Tissue.CORTEX
    tissue[_ellipse(grid, (sx, sy), (radius, radius))] = Tissue.CORTEX
    tissue[_ellipse(grid, (sx, sy), (radius - 2.5, radius - 2.5))] = Tissue.MARROW
    disc = (grid.axis(2) / VERTEBRA_PERIOD_MM) % 1.0 < DISC_FRACTION
    tissue[_ellipse(grid, (sx, sy), (radius, radius))[:, :, None] & disc[None, None, :]] = Tissue.DISC


def _paint_ribs(tissue, grid: Grid, body: _Body, wall) -> None:
    # An axial slice cuts the slanted ribs into short arcs within the body wall: a wall
    # voxel is rib where its (arc angle from the spine, height) lies on a descending band.
    ix, iy, iz = np.nonzero(wall)
    x = (grid.axis(0)[ix] - body.cx) / body.a
    y = (grid.axis(1)[iy] - body.cy) / body.b
    arc = np.abs(np.arctan2(x, -y))  # 0 at the spine, pi at the sternum
    z = grid.axis(2)[iz]
    band = ((z + RIB_DROP_MM * arc) / RIB_PERIOD_MM) % 1.0 < RIB_DUTY
    rib = band & (z > RIB_Z_MIN_MM) & (arc > 0.35) & (arc < 2.4)
    tissue[ix[rib], iy[rib], iz[rib]] = Tissue.RIB


def tumour_count(rng: np.random.Generator, index: int) -> int:
    """0 for every ``TUMOUR_FREE_EVERY``-th case, else 1-4 drawn from ``TUMOUR_COUNT_P``."""
    n = 1 + int(rng.choice(len(TUMOUR_COUNT_P), p=TUMOUR_COUNT_P))
    return 0 if index % TUMOUR_FREE_EVERY == TUMOUR_FREE_EVERY - 1 else n


def _tumours(rng, grid: Grid, frame: _Frame, liver, n: int) -> np.ndarray:
    """``n`` tumours placed in the liver's frame and clipped to the liver minus its surface.

    Clipping to the eroded liver keeps a rim of liver around every tumour voxel. A tumour
    that would lose over half its volume to clipping is moved (a few tries), so tumours
    stay of decent size.
    """
    core = _erode(liver)
    tumour_id = np.zeros(grid.shape, np.uint8)
    for k in range(1, n + 1):
        for _ in range(TUMOUR_TRIES):
            blob = _tumour_blob(rng, grid, frame)
            kept = blob & core
            if kept.sum() >= 0.5 * blob.sum():
                break
        tumour_id[kept] = k
    return tumour_id


def _tumour_blob(rng, grid: Grid, frame: _Frame) -> np.ndarray:
    direction = rng.standard_normal(3)
    u = direction / np.linalg.norm(direction) * TUMOUR_REACH * rng.random() ** (1 / 3)
    radius = rng.uniform(*TUMOUR_RADIUS_MM)
    semi = tuple(radius * rng.uniform(0.8, 1.2, size=3))
    return _blob(rng, grid, frame.to_world(u), semi, rng.uniform(0, np.pi), 0.15)


# --------------------------------------------------------------------------- shapes and fields


def _blob(rng, grid: Grid, centre, semi, angle: float, wobble: float) -> np.ndarray:
    """Voxels inside a rotated ellipsoid whose radius wobbles smoothly with direction.

    The wobble depends on direction only, so the blob is star-shaped around its centre
    and its slices form one contiguous range. Only the bounding box is computed.
    """
    freqs = rng.normal(0, 1.2, size=(3, 3)).tolist()
    phases, weights = rng.uniform(0, 2 * np.pi, size=3).tolist(), rng.uniform(0.5, 1.0, size=3).tolist()
    reach = max(semi) * (1 + wobble)
    box = tuple(_span(grid.axis(i), centre[i] - reach, centre[i] + reach) for i in range(3))
    mask = np.zeros(grid.shape, bool)
    if any(b.start >= b.stop for b in box):
        return mask
    x = grid.axis(0)[box[0]][:, None, None] - float(centre[0])
    y = grid.axis(1)[box[1]][None, :, None] - float(centre[1])
    c, s = float(np.cos(angle)), float(np.sin(angle))  # Python floats keep the maths float32
    u, v = (c * x + s * y) / float(semi[0]), (-s * x + c * y) / float(semi[1])
    w = (grid.axis(2)[box[2]][None, None, :] - float(centre[2])) / float(semi[2])
    r = np.sqrt(u * u + v * v + w * w)
    d = [comp / np.maximum(r, np.float32(1e-6)) for comp in (u, v, w)]
    noise = sum(wt * np.cos(np.pi * (f[0] * d[0] + f[1] * d[1] + f[2] * d[2]) + p)
                for wt, f, p in zip(weights, freqs, phases)) / sum(weights)
    mask[box] = r <= 1.0 + wobble * noise
    return mask


def _ellipse(grid: Grid, centre, semi) -> np.ndarray:
    """In-plane (x, y) ellipse; indexing a 3D array with it selects every slice."""
    x = (grid.axis(0)[:, None] - centre[0]) / semi[0]
    y = (grid.axis(1)[None, :] - centre[1]) / semi[1]
    return x * x + y * y <= 1.0


def _span(axis: np.ndarray, lo: float, hi: float) -> slice:
    return slice(int(np.searchsorted(axis, lo)), int(np.searchsorted(axis, hi, side="right")))


def _erode(mask: np.ndarray) -> np.ndarray:
    """One-voxel 6-connected erosion, computed on the mask's bounding box only."""
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1)
                for idx in (np.nonzero(mask.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1))))
    out[box] = ndimage.binary_erosion(np.pad(mask[box], 1), border_value=0)[1:-1, 1:-1, 1:-1]
    return out


def _smooth_field(rng, shape, knots) -> np.ndarray:
    """Zero-mean, unit-variance float32 field varying on the scale ``shape / knots``.

    Separable Gaussian interpolation of a coarse random grid: vectorised and cheap.
    """
    field = rng.standard_normal(knots).astype(np.float32)
    # Last axis first: the final product then comes out contiguous in (x, y, z) order.
    for axis in (2, 1, 0):
        n, k = shape[axis], knots[axis]
        centres = np.linspace(0.0, 1.0, k)
        u = (np.arange(n) + 0.5) / n
        weights = np.exp(-0.5 * ((u[:, None] - centres[None, :]) * (k - 1)) ** 2).astype(np.float32)
        weights /= weights.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(weights, field, axes=(1, axis)), 0, axis)
    sample = field[::4, ::4, ::2]  # statistics of a smooth field need not visit every voxel
    return (field - sample.mean()) / max(float(sample.std()), 1e-6)


# --------------------------------------------------------------------------- rendering


def _render_ct(rng, anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Tissue map -> HU: per-case values, low-contrast tumours, texture, blur, noise."""
    liver = rng.uniform(*HU_LIVER)
    table = np.zeros(len(Tissue), np.float32)
    for tissue, hu in ((Tissue.AIR, HU_AIR), (Tissue.GAS, HU_GAS), (Tissue.FAT, HU_FAT),
                       (Tissue.VISCERAL_FAT, HU_VISCERAL_FAT), (Tissue.VISCERA, HU_VISCERA),
                       (Tissue.MUSCLE, HU_MUSCLE), (Tissue.CSF, HU_CSF), (Tissue.DISC, HU_DISC),
                       (Tissue.KIDNEY_SINUS, HU_KIDNEY_SINUS), (Tissue.LIVER, liver),
                       (Tissue.SPLEEN, liver + rng.uniform(*HU_SPLEEN_VS_LIVER)),
                       (Tissue.KIDNEY, liver + rng.uniform(*HU_KIDNEY_VS_LIVER)),
                       (Tissue.AORTA, rng.uniform(*HU_AORTA)), (Tissue.MARROW, rng.uniform(*HU_MARROW)),
                       (Tissue.CORTEX, rng.uniform(*HU_CORTEX)), (Tissue.RIB, rng.uniform(*HU_RIB))):
        table[tissue] = hu
    hu = table[anatomy.tissue]
    for k in range(1, anatomy.n_tumours + 1):
        sign = -1.0 if rng.random() < HYPODENSE_FRACTION else 1.0
        hu[anatomy.tumour_id == k] += sign * rng.uniform(*HU_TUMOUR_CONTRAST)
    hu += HU_TEXTURE * _smooth_field(rng, grid.shape, (24, 24, 12)) * (anatomy.tissue != Tissue.AIR)
    hu = ndimage.gaussian_filter(hu, CT_BLUR_VOXELS)
    hu += rng.uniform(*HU_NOISE) * rng.standard_normal(grid.shape, dtype=np.float32)
    return hu


def _render_mri(rng, anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Tissue map -> MR signal: enhancing tumours, bias field, Rician noise, scanner gain."""
    liver = rng.uniform(*MR_LIVER)
    relative = {**MR_VS_LIVER, Tissue.SPLEEN: rng.uniform(*MR_SPLEEN_VS_LIVER),
                Tissue.KIDNEY: rng.uniform(*MR_KIDNEY_VS_LIVER),
                Tissue.AORTA: rng.uniform(*MR_AORTA_VS_LIVER)}
    table = np.zeros(len(Tissue), np.float32)  # air and gas give no signal
    for tissue, value in relative.items():
        table[tissue] = liver * value
    signal = table[anatomy.tissue]
    for k in range(1, anatomy.n_tumours + 1):
        signal[anatomy.tumour_id == k] *= rng.uniform(*MR_TUMOUR_ENHANCEMENT)
    signal *= 1.0 + MR_TEXTURE * _smooth_field(rng, grid.shape, (24, 24, 12))
    signal = ndimage.gaussian_filter(signal, MRI_BLUR_VOXELS)
    signal *= np.exp(MR_BIAS_LOG * _smooth_field(rng, grid.shape, (3, 3, 3)))
    sigma = liver * rng.uniform(*MR_NOISE_VS_LIVER)
    real = signal + sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary) * rng.uniform(*MR_GAIN)


# --------------------------------------------------------------------------- grids and files


def _case_rng(seed: int, modality: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _MODALITY_KEYS[modality], index])


def _ct_grid(rng, size: int, n_slices: int) -> Grid:
    dxy = round(rng.uniform(*CT_SPACING_AT_512) * 512 / size, 4)
    start, coverage = rng.uniform(*CT_START_MM), rng.uniform(*CT_COVERAGE_MM)
    dz = round(coverage / n_slices, 4)
    half = (size - 1) / 2 * dxy
    return Grid((size, size, n_slices), (dxy, dxy, dz), (-half, -half, round(start, 2)))


def _mri_grid(rng, shape) -> Grid:
    base = rng.uniform(*MRI_SPACING_AT_320)
    dx, dy = round(base * 320 / shape[0], 4), round(base * 260 / shape[1], 4)
    dz = round(MRI_COVERAGE_MM / shape[2], 4)
    origin = (-(shape[0] - 1) / 2 * dx, -(shape[1] - 1) / 2 * dy, round(rng.uniform(*MRI_START_MM), 2))
    return Grid(tuple(shape), (dx, dy, dz), origin)


def _nifti(data_ras: np.ndarray, phantom: Phantom, axcodes, dtype=None) -> nib.Nifti1Image:
    """A NIfTI image of canonical data stored in ``axcodes`` order, with an exact affine."""
    image = nib.Nifti1Image(data_ras if dtype is None else data_ras.astype(dtype), phantom.grid.affine)
    if tuple(axcodes) != RAS:
        orientations = nib.orientations
        image = image.as_reoriented(orientations.ornt_transform(orientations.axcodes2ornt(RAS),
                                                                orientations.axcodes2ornt(axcodes)))
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code=1)  # scanner coordinates, as converters write them
    image.set_sform(image.affine, code=1)
    if dtype is None:  # the scaled image; labels stay unscaled
        image.header.set_slope_inter(phantom.slope, phantom.inter)
    return image


def _write_mri_label(phantom: Phantom, axcodes, path: Path, defect: str | None) -> None:
    if defect == "missing":
        for suffix in NIFTI_SUFFIXES:  # a label left by an earlier run would hide the defect
            path.with_name("label" + suffix).unlink(missing_ok=True)
        return
    label = _nifti(phantom.label, phantom, axcodes, dtype=np.uint8)
    if defect == "short":  # one slice short, along the stored last axis
        label = nib.Nifti1Image(np.asarray(label.dataobj)[..., :-1], label.affine, label.header)
    _save(label, path)


def _save(image: nib.Nifti1Image, path: Path) -> Path:
    """Writes ``image`` atomically; ``.nii.gz`` with gzip mtime 0 so bytes are reproducible.

    The same name with the other suffix is removed, so a case never has two files.
    """
    data = image.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    stem = strip_nifti_suffix(path.name)
    for suffix in NIFTI_SUFFIXES:
        if path.with_name(stem + suffix) != path:
            path.with_name(stem + suffix).unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def _describe(path: Path, phantom: Phantom, axcodes) -> str:
    shape = "x".join(str(n) for n in nib.load(str(path)).shape)
    orientation = "" if tuple(axcodes) == RAS else f" {''.join(axcodes)}"
    return f"{shape}{orientation}, {phantom.n_tumours} tumour{'s' * (phantom.n_tumours != 1)}"


def _check_run(n_cases: int, seed: int, compress) -> set[int]:
    """Checks the case count and seed; returns the indices of the cases to gzip."""
    if not _is_int(n_cases) or n_cases < 1:
        raise ValueError(f"Expected n_cases >= 1. Received: n_cases={n_cases!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"Expected seed >= 0. Received: seed={seed!r}")
    if isinstance(compress, (bool, np.bool_)):
        return set(range(n_cases)) if compress else set()
    indices = set(compress)
    if not all(_is_int(i) and 0 <= i < n_cases for i in indices):
        raise ValueError(f"Expected compress to be a bool or case indices in [0, {n_cases}). "
                         f"Received: compress={compress!r}")
    return indices



def _report(progress: Progress, line: str) -> None:
    if progress is not None:
        progress(line)
