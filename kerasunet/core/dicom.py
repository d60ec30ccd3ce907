"""DICOM series in and out, through SimpleITK's GDCM reader and writer (TensorFlow-free).

A series is read into a NIfTI image in memory (its "twin"), so it goes through the one
canonicalisation of ``kerasunet.core.nifti`` like a file would, and outputs written "like"
it (``nifti.save_like``) land in the series' own world geometry:

* GDCM's scanner groups the folder's DICOM files by SeriesInstanceUID from their tags
  (other files are skipped); a series whose objects GDCM cannot read as an image (SR, KO,
  presentation states) or that are not slices of a volume (SEG, RT objects, multi-frame
  objects: :data:`NON_SLICE_MODALITIES`, no position) is ignored; a folder with several
  image series needs ``series``;
* the chosen series' files are read once: SimpleITK's series reader returns the pixels and
  every file's header, on which the grid is checked; the voxels are copied once, into slice order;
* slices are ordered by their position along the slice normal, not by file name or
  instance number;
* rescale slope and intercept are applied (GDCM), voxels are float32;
* the affine comes from ImageOrientationPatient, PixelSpacing and the sorted
  ImagePositionPatient, and is turned from DICOM's LPS into NIfTI's RAS.

A series that is not one regular grid fails with one :class:`DicomError` line: slices of
mixed sizes, spacings or orientations, two slices at one position, a gap in the positions
(missing slices), uneven steps, or positions sheared off the slice normal (gantry tilt).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from kerasunet.core.atomic import atomic_path
from kerasunet.core.nifti import VolumeError

DICOM_MAGIC = b"DICM"  # bytes 128..131 of a DICOM Part 10 file
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# image modalities whose objects are not slices of the series' volume
NON_SLICE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG", "DOC"})
GEOMETRY_TOLERANCE = 1e-4  # orientation cosines and pixel spacings (mm) that count as equal
STEP_TOLERANCE = 0.01  # slice steps may differ by this fraction of the median step
TILT_TOLERANCE = 1e-3  # sideways shift per mm along the normal that still counts as no tilt
MIN_STEP_MM = 1e-3  # closer slice positions are the same position
SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}

_TAGS = {"uid": "0020|000e", "description": "0008|103e", "modality": "0008|0060", "position": "0020|0032",
         "orientation": "0020|0037", "spacing": "0028|0030", "rows": "0028|0010", "columns": "0028|0011",
         "frames": "0028|0008"}


class DicomError(VolumeError):
    """A DICOM folder that cannot be read as one volume; the message starts with the folder."""


@dataclass(frozen=True)
class Slice:
    """The header facts of one image file."""

    path: Path
    uid: str
    description: str
    modality: str
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    size: tuple[int, int]  # (rows, columns)


@dataclass(frozen=True)
class Series:
    """One image series of a folder: its identity and its files (in GDCM's scan order)."""

    uid: str
    description: str
    modality: str
    files: tuple[Path, ...]

    def describe(self) -> str:
        return f"{self.uid} ({self.description or 'no description'}, {self.modality}, {len(self.files)} slices)"


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (the ``DICM`` marker after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == DICOM_MAGIC
    except OSError:
        return False


def holds_dicom(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one DICOM file.

    A DICOM Part 10 file says so in its preamble; older files without one (ACR-NEMA style,
    usually named without extension or ``.dcm``/``.ima``) are found by GDCM's scanner.
    """
    import SimpleITK as sitk

    try:
        files = sorted(Path(e.path) for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
    except OSError:
        return False
    if any(is_dicom_file(f) for f in files):
        return True
    if any(f.suffix.lower() in ("", ".dcm", ".ima") for f in files):
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    return False


def _slice(path: Path, tag) -> Slice | None:
    """The slice facts of one file from ``tag(name) -> value``, or None for what is not a volume's slice."""
    modality = tag("modality").upper()
    if modality in NON_SLICE_MODALITIES or not tag("position") or not tag("orientation"):
        return None
    try:
        if tag("frames") and int(float(tag("frames"))) > 1:
            return None
        spacing = tuple(float(v) for v in tag("spacing").split("\\"))
        return Slice(path, tag("uid"), tag("description"), modality,
                     np.array([float(v) for v in tag("position").split("\\")]),
                     np.array([float(v) for v in tag("orientation").split("\\")]),
                     (spacing[0], spacing[1]), (int(tag("rows")), int(tag("columns"))))
    except (ValueError, IndexError):
        return None


def _read_header(path: Path) -> Slice | None:
    """The slice facts of ``path`` read alone, or None when it is not a single-frame image slice."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:  # not DICOM, or a DICOM object without an image (SR, KO, PR)
        return None
    return _slice(path, lambda name: reader.GetMetaData(_TAGS[name]).strip()
                  if reader.HasMetaDataKey(_TAGS[name]) else "")


def list_series(folder: str | Path) -> list[Series]:
    """The image series a folder directly holds, in order of SeriesInstanceUID.

    GDCM's scanner groups the DICOM files by SeriesInstanceUID (reading tags only; other files
    are skipped); a series whose first file is not an image slice (SR, SEG, ...) is left out.

    Raises:
        DicomError: the folder is missing or unreadable.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(f"{folder}: not a readable folder")
    found = []
    for uid in sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))):
        files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]
        files = [f for f in files if not f.name.startswith(".")]
        first = _read_header(files[0]) if files else None
        if first is not None:
            found.append(Series(uid, first.description, first.modality, tuple(files)))
    return found


def slice_headers(series: Series) -> list[Slice]:
    """The slice facts of every file of a series, each read alone (diagnostics and tests)."""
    return [h for h in map(_read_header, series.files) if h is not None]


def choose_series(folder: str | Path, series: str | None = None) -> Series:
    """The one image series of ``folder``, or the one whose SeriesInstanceUID is ``series``.

    Raises:
        DicomError: no image series, several and none chosen, or no series ``series``.
    """
    found = list_series(folder)
    if not found:
        raise DicomError(f"{folder}: no DICOM image series (non-image objects and other files are ignored)")
    listing = "; ".join(s.describe() for s in found)
    if series is not None:
        chosen = [s for s in found if s.uid == series]
        if not chosen:
            raise DicomError(f"{folder}: no series {series}; it holds {listing}")
        return chosen[0]
    if len(found) > 1:
        raise DicomError(f"{folder}: holds {len(found)} image series; choose one with --series UID: {listing}")
    return found[0]


def _check_grid(folder: Path, slices: Sequence[Slice]) -> list[Slice]:
    """The slices sorted along the normal; raises unless they form one regular grid."""
    first = slices[0]
    sizes = sorted({s.size for s in slices})
    if len(sizes) > 1:
        raise DicomError(f"{folder}: mixed slice sizes {' and '.join(f'{r}x{c}' for r, c in sizes)} in one series")
    if any(np.abs(s.orientation - first.orientation).max() > GEOMETRY_TOLERANCE for s in slices):
        raise DicomError(f"{folder}: the slices of the series have different orientations")
    if any(np.abs(np.subtract(s.spacing, first.spacing)).max() > GEOMETRY_TOLERANCE for s in slices):
        raise DicomError(f"{folder}: the slices of the series have different pixel spacings")
    if len(slices) < 2:
        raise DicomError(f"{folder}: the series has one slice, not a volume")
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    ordered = sorted(slices, key=lambda s: float(s.position @ normal))
    depth = np.array([s.position @ normal for s in ordered])
    steps = np.diff(depth)
    if steps.min() < MIN_STEP_MM:
        k = int(np.argmin(steps))
        raise DicomError(f"{folder}: two slices at one position ({ordered[k].path.name} and "
                         f"{ordered[k + 1].path.name}); is it two acquisitions in one series?")
    step = float(np.median(steps))
    if np.abs(steps - step).max() > STEP_TOLERANCE * step:
        k = int(np.argmax(np.abs(steps - step)))
        kind = "missing slices: a gap" if steps[k] > 1.5 * step else "uneven slice spacing: a step"
        raise DicomError(f"{folder}: {kind} of {steps[k]:.3g} mm between {ordered[k].path.name} and "
                         f"{ordered[k + 1].path.name} (the series steps {step:.3g} mm)")
    shift = ordered[-1].position - ordered[0].position
    sideways = shift - (shift @ normal) * normal
    if np.linalg.norm(sideways) > TILT_TOLERANCE * abs(shift @ normal):
        angle = np.degrees(np.arctan2(np.linalg.norm(sideways), abs(shift @ normal)))
        raise DicomError(f"{folder}: gantry tilt: slice positions run {angle:.2f} degrees off the slice normal; "
                         "resample the series to an untilted grid first (e.g. dcm2niix)")
    return ordered


def ordered_slices(folder: str | Path, series: str | None = None) -> list[Slice]:
    """The slices of the folder's series (``series`` when it holds several) in :func:`read_series`'s
    order, each header read alone: slice ``k`` of the volume is ``ordered_slices(...)[k].path``.

    Raises:
        DicomError: as :func:`read_series`.
    """
    folder = Path(folder)
    return _check_grid(folder, slice_headers(choose_series(folder, series)))


def series_affine(ordered: Sequence[Slice]) -> np.ndarray:
    """The RAS affine of sorted slices: voxel (column, row, slice) -> world mm."""
    first, last = ordered[0], ordered[-1]
    row_spacing, column_spacing = first.spacing  # PixelSpacing: between rows, between columns
    lps = np.eye(4)
    lps[:3, 0] = first.orientation[:3] * column_spacing  # along a row: the column index grows
    lps[:3, 1] = first.orientation[3:] * row_spacing
    lps[:3, 2] = (last.position - first.position) / (len(ordered) - 1)
    lps[:3, 3] = first.position
    return LPS_TO_RAS @ lps


def read_series(folder: str | Path, series: str | None = None) -> nib.Nifti1Image:
    """Reads one DICOM series into a NIfTI image in memory (its voxel order, RAS affine).

    The files are read once, by SimpleITK's series reader, which also returns each file's
    header; the grid is checked on those headers and the slices ordered by position. When the
    reader fails (slices of different sizes), the headers are read one by one to say why.

    Args:
        folder: the folder directly holding the series' files (any names, no extension needed).
        series: the SeriesInstanceUID to read when the folder holds several series.

    Returns:
        float32 voxels ``(column, row, slice)`` with rescale applied, slices ordered by position.

    Raises:
        DicomError: see the module docstring; the message names the folder and the problem.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    chosen = choose_series(folder, series)
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")  # files without a preamble or extension are DICOM too
    reader.SetFileNames([str(f) for f in chosen.files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.MetaDataDictionaryArrayUpdateOn()
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's spacing warnings: the checks below say more
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        headers = slice_headers(chosen)
        if headers:
            _check_grid(folder, headers)  # raises the reason when the series is not one grid
        detail = str(exc).strip().splitlines()[-1]
        raise DicomError(f"{folder}: unreadable DICOM pixel data ({detail})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    headers = [_slice(path, lambda name, i=i: reader.GetMetaData(i, _TAGS[name]).strip()
                      if reader.HasMetaDataKey(i, _TAGS[name]) else "") for i, path in enumerate(chosen.files)]
    if any(h is None for h in headers):
        missing = chosen.files[headers.index(None)].name
        raise DicomError(f"{folder}: {missing} of series {chosen.uid} is not an image slice (no position)")
    ordered = _check_grid(folder, headers)
    index = {h.path: i for i, h in enumerate(headers)}
    order = [index[h.path] for h in ordered]
    # One copy of the voxels, the reordering one: with the reader gone the image owns its buffer,
    # so the view needs no copy (GetArrayFromImage would copy it twice more).
    del reader
    data = sitk.GetArrayViewFromImage(image)[order].transpose(2, 1, 0)  # (slice, row, column) -> NIfTI's order
    out = nib.Nifti1Image(data, series_affine(ordered))
    out.header.set_xyzt_units("mm")
    return out


@dataclass(frozen=True)
class SeriesTags:
    """What :func:`write_series` writes besides the voxels and the geometry.

    Attributes:
        series_uid: SeriesInstanceUID; each file's SOPInstanceUID is ``<series_uid>.<instance>``.
        study_uid: StudyInstanceUID; the FrameOfReferenceUID is ``<study_uid>.1``.
        description: SeriesDescription.
        modality: "CT" or "MR" (sets the SOP class).
        intercept: RescaleIntercept (CT only: GDCM stores ``(value - intercept) / slope``).
        slope: RescaleSlope (CT only).
    """

    series_uid: str
    study_uid: str
    description: str = ""
    modality: str = "CT"
    intercept: float = 0.0
    slope: float = 1.0


def write_series(folder: str | Path, data: np.ndarray, affine: np.ndarray, tags: SeriesTags,
                 names: Sequence[str] | None = None, positions: Sequence[Sequence[float]] | None = None
                 ) -> list[Path]:
    """Writes a volume as a DICOM series, one file per slice (the twin of :func:`read_series`).

    Args:
        folder: where the files go (created if missing).
        data: integer voxels ``(column, row, slice)`` in real-world units (HU for CT).
        affine: the RAS affine of ``data``; its slice axis must run along the slice normal.
        tags: the series' identity and rescale.
        names: file names of the slices in slice order; default ``IM00001`` ... .
        positions: LPS ImagePositionPatient per slice, to write irregular series (tests);
            default from ``affine``.

    Returns:
        The files written, in slice order. Each is written atomically.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, float)
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    cosines = lps[:3, :3] / zooms
    names = names or [f"IM{k + 1:05d}" for k in range(data.shape[2])]
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.KeepOriginalImageUIDOn()
    written = []
    for k in range(data.shape[2]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(data[:, :, k].T[None]))
        image.SetSpacing(tuple(float(z) for z in zooms))
        image.SetDirection(tuple(float(c) for c in cosines.ravel()))
        origin = lps[:3, 3] + k * lps[:3, 2] if positions is None else np.asarray(positions[k], float)
        image.SetOrigin(tuple(float(v) for v in origin))
        for key, value in {**_slice_tags(tags, k), "0018|0050": f"{zooms[2]:.6g}"}.items():  # + SliceThickness
            image.SetMetaData(key, value)
        path = folder / names[k]
        with atomic_path(path) as tmp:
            writer.SetFileName(str(tmp))
            writer.Execute(image)
        written.append(path)
    return written


def _slice_tags(tags: SeriesTags, k: int) -> dict[str, str]:
    out = {"0008|0060": tags.modality, "0008|0016": SOP_CLASSES[tags.modality], "0020|000e": tags.series_uid,
           "0020|000d": tags.study_uid, "0008|103e": tags.description, "0020|0013": str(k + 1),
           "0008|0018": f"{tags.series_uid}.{k + 1}", "0020|0052": f"{tags.study_uid}.1"}
    if tags.modality == "CT":
        out.update({"0028|1052": f"{tags.intercept:g}", "0028|1053": f"{tags.slope:g}"})
    return out
