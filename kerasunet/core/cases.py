"""What a case is: its files, how each dataset layout lists them, and the one loader with its checks.

Build, evaluate and predict read cases through this module, so a volume one of them accepts
is accepted by the others:

* image checks (:func:`load_image`; predict uses them alone, as its inputs have no label):
  the file is readable, 3D, and every voxel is finite;
* label checks (:func:`load_case`, used by ``build-records`` and ``evaluate``): the label
  file exists and is readable, has the image's shape, is finite, is integer within
  :data:`LABEL_ROUNDING_TOLERANCE`, and holds only the modality's values
  (``labels.VALID_LABELS``: CT/LiTS {0, 1, 2}, MRI {0, 1}).

A failed check raises :class:`CaseError`, whose message is the one-line reason a batch
records for that case before it goes on with the others.

Layouts: :data:`LAYOUTS` maps a layout name to its modality and its finder, a function
``(root, phase) -> [CaseFiles]`` in natural case order. A new layout is a new finder and one
more entry; :func:`find_dataset_cases` and :func:`find_cases` pick it up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kerasunet.core.labels import VALID_LABELS
from kerasunet.core.nifti import NIFTI_SUFFIXES, Volume, VolumeError, load_volume

# stored labels may be floats a little off an integer (resampling, float storage)
LABEL_ROUNDING_TOLERANCE = 1e-3
MISSING_LABEL = "label missing"


class CaseError(VolumeError):
    """A case (or input volume) that cannot be used; ``str(exc)`` is the one-line reason.

    Unreadable files give a reason that starts with the file's path; the content checks give
    a reason alone (``"image contains NaN/Inf"``), reported next to the case or file.
    """


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case. ``label`` is None when the case has no label file."""

    case_id: str
    image: Path
    label: Path | None


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    return None


def find_lits_cases(root: str | Path, phase: str = "artery") -> list[CaseFiles]:
    """Lists LiTS cases: ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]``, in numeric order.

    Args:
        root: the LiTS folder.
        phase: unused; LiTS has one image per case (kept for the common finder signature).
    """
    root = Path(root)
    cases = []
    for image in root.iterdir():
        match = re.fullmatch(r"volume-(\d+)\.nii(\.gz)?", image.name)
        if match:
            label = _find_nifti(root, f"segmentation-{match.group(1)}")
            cases.append(CaseFiles(f"volume-{match.group(1)}", image, label))
    return sorted(cases, key=lambda c: _natural_key(c.case_id))


def find_mri_cases(root: str | Path, phase: str = "artery") -> list[CaseFiles]:
    """Lists MRI cases: one folder per case holding ``<phase>.nii[.gz]`` and ``label.nii[.gz]``.

    Folders without the phase image are not cases and are ignored.
    """
    root = Path(root)
    cases = []
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        image = _find_nifti(folder, phase)
        if image is not None:
            cases.append(CaseFiles(folder.name, image, _find_nifti(folder, "label")))
    return sorted(cases, key=lambda c: _natural_key(c.case_id))


@dataclass(frozen=True)
class Layout:
    """A dataset layout.

    Attributes:
        modality: "ct" or "mri".
        find: ``(root, phase) -> [CaseFiles]`` in natural order.
        expected: what a folder of this layout holds (``{phase}`` is filled in), for errors.
    """

    modality: str
    find: Callable[[Path, str], list[CaseFiles]]
    expected: str


# in detection order: find_cases takes the first layout that finds a case
LAYOUTS = {
    "lits": Layout("ct", find_lits_cases, "volume-N.nii[.gz] files"),
    "mri": Layout("mri", find_mri_cases, "case folders holding {phase}.nii[.gz]"),
}


def _folder(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise VolumeError(f"{root}: not a folder")
    return root


def find_dataset_cases(source: str | Path, dataset: str, phase: str = "artery") -> list[CaseFiles]:
    """Lists the cases of a folder in the layout ``dataset`` (a key of :data:`LAYOUTS`).

    Raises:
        VolumeError: the folder is missing or holds no case.
    """
    source, layout = _folder(source), LAYOUTS[dataset]
    cases = layout.find(source, phase)
    if not cases:
        raise VolumeError(f"{source}: no {dataset} cases found (expected {layout.expected.format(phase=phase)})")
    return cases


def find_cases(root: str | Path, phase: str = "artery") -> tuple[str, list[CaseFiles]]:
    """Detects the layout of ``root`` and lists its cases.

    Returns:
        ``(layout name, cases)``; ``LAYOUTS[name].modality`` is the cases' modality.

    Raises:
        VolumeError: ``root`` is missing or holds no case of any layout.
    """
    root = _folder(root)
    for name, layout in LAYOUTS.items():
        cases = layout.find(root, phase)
        if cases:
            return name, cases
    expected = " or ".join(layout.expected.format(phase=phase) for layout in LAYOUTS.values())
    raise VolumeError(f"{root}: no cases found (expected {expected})")


def _read(path: Path) -> Volume:
    try:
        return load_volume(path)
    except VolumeError as exc:
        raise CaseError(str(exc)) from None


def load_image(path: str | Path) -> Volume:
    """Loads an image volume in canonical order and checks it is usable.

    Raises:
        CaseError: the file is missing, unreadable, truncated or not 3D (the reason starts
            with its path), or it holds NaN/Inf voxels.
    """
    image = _read(Path(path))
    if not np.isfinite(image.data).all():
        raise CaseError("image contains NaN/Inf")
    return image


def check_label(label: np.ndarray, modality: str) -> np.ndarray:
    """Checks a label array's values and returns it as uint8.

    Raises:
        CaseError: NaN/Inf, values further than :data:`LABEL_ROUNDING_TOLERANCE` from an
            integer, or values outside ``VALID_LABELS[modality]``.
    """
    if not np.isfinite(label).all():
        raise CaseError("label contains NaN/Inf")
    rounded = np.rint(label)
    if np.abs(label - rounded).max(initial=0.0) > LABEL_ROUNDING_TOLERANCE:
        raise CaseError("label has non-integer values")
    bad = sorted(set(np.unique(rounded).astype(int).tolist()) - set(VALID_LABELS[modality]))
    if bad:
        raise CaseError(f"label values {bad} outside the expected set {list(VALID_LABELS[modality])}")
    return rounded.astype(np.uint8)


def load_case(files: CaseFiles, modality: str) -> tuple[Volume, np.ndarray]:
    """Loads one labelled case in canonical order and runs every image and label check.

    Args:
        files: the case's image and label paths.
        modality: "ct" or "mri"; selects the allowed label values.

    Returns:
        ``(image Volume, label uint8 array)`` of equal shape.

    Raises:
        CaseError: the case cannot be used; the message is the reason (module docstring).
    """
    if files.label is None:
        raise CaseError(MISSING_LABEL)
    image = load_image(files.image)
    label = _read(Path(files.label))
    if image.data.shape != label.data.shape:
        raise CaseError(f"image shape {image.data.shape} differs from label shape {label.data.shape}")
    return image, check_label(label.data, modality)
