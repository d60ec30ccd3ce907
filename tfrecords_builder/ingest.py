"""Find, load and validate cases; the worker-side steps of a build (TensorFlow-free).

A case that cannot be used is skipped with a one-line reason, never a crash: missing
label, image/label shape mismatch, unreadable or truncated file, NaN/Inf voxels, non-integer
labels, or label values outside the dataset's set (LiTS {0, 1, 2}, MRI {0, 1}).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kerasunet.core.labels import LABEL_VALUES, VALID_LABELS
from kerasunet.core.nifti import CaseFiles, VolumeError, find_lits_cases, find_mri_cases, load_volume
from kerasunet.core.preprocessing import NormSettings, case_stats
from kerasunet.core.stacking import stack_slices
from tfrecords_builder.selection import SelectionSettings, select_slices

DATASETS = {"lits": "ct", "mri": "mri"}
# label value that marks tumour, per modality (CT: LiTS 2; MRI: 1)
TUMOUR_VALUE = {"ct": LABEL_VALUES["tumour"], "mri": 1}
LABEL_ROUNDING_TOLERANCE = 1e-3


class SkipCase(Exception):
    """A case that cannot be used; ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class CaseTask:
    """Everything a worker needs to process one case (picklable, TensorFlow-free)."""

    files: CaseFiles
    norm: NormSettings
    selection: SelectionSettings


def find_dataset_cases(source: str | Path, dataset: str, phase: str = "artery") -> list[CaseFiles]:
    """Lists the cases of a LiTS or MRI folder in natural order.

    Raises:
        VolumeError: the folder is missing or holds no case.
    """
    source = Path(source)
    if not source.is_dir():
        raise VolumeError(f"{source}: not a folder")
    if dataset == "lits":
        cases = find_lits_cases(source)
        expected = "volume-N.nii[.gz] files"
    else:
        cases = find_mri_cases(source, phase)
        expected = f"case folders holding {phase}.nii[.gz]"
    if not cases:
        raise VolumeError(f"{source}: no {dataset} cases found (expected {expected})")
    return cases


def _check_label(label: np.ndarray, modality: str) -> np.ndarray:
    if not np.isfinite(label).all():
        raise SkipCase("label contains NaN/Inf")
    rounded = np.rint(label)
    if np.abs(label - rounded).max(initial=0.0) > LABEL_ROUNDING_TOLERANCE:
        raise SkipCase("label has non-integer values")
    bad = sorted(set(np.unique(rounded).astype(int).tolist()) - set(VALID_LABELS[modality]))
    if bad:
        raise SkipCase(f"label values {bad} outside the expected set {list(VALID_LABELS[modality])}")
    return rounded.astype(np.uint8)


def load_case(files: CaseFiles, modality: str):
    """Loads and validates one case in canonical orientation.

    Returns:
        ``(image Volume, label uint8 array)``.

    Raises:
        SkipCase: the case cannot be used; the message is the reason.
    """
    if files.label is None:
        raise SkipCase("label missing")
    try:
        image = load_volume(files.image)
        label = load_volume(files.label)
    except VolumeError as exc:
        raise SkipCase(str(exc)) from None
    if image.data.shape != label.data.shape:
        raise SkipCase(f"image shape {image.data.shape} differs from label shape {label.data.shape}")
    if not np.isfinite(image.data).all():
        raise SkipCase("image contains NaN/Inf")
    return image, _check_label(label.data, modality)


def inspect_case(task: CaseTask) -> dict:
    """Worker step 1: validates a case and chooses its slices; returns JSON-ready facts.

    Returns:
        ``{"case_id", "skip": reason}`` for an unusable case, else the case's image and
        label paths, shape, spacing, norm stats, selected slices and label counts over
        those slices (for the manifest's class statistics).
    """
    files = task.files
    try:
        image, label = load_case(files, task.norm.modality)
    except SkipCase as exc:
        return {"case_id": files.case_id, "skip": str(exc)}
    slices = select_slices(label, task.selection)
    chosen = label[:, :, slices]
    tumour = chosen == TUMOUR_VALUE[task.norm.modality]
    return {
        "case_id": files.case_id,
        "image": str(Path(files.image).resolve()),
        "label": str(Path(files.label).resolve()),
        "shape": list(image.data.shape),
        "spacing": list(image.spacing),
        "norm_stats": case_stats(image.data, task.norm).tolist(),
        "slices": slices.tolist(),
        "voxels": int(chosen.size),
        "foreground_voxels": int((chosen > 0).sum()),
        "tumour_voxels": int(tumour.sum()),
        "tumour_slices": int(tumour.any(axis=(0, 1)).sum()),
    }


def extract_case(task: CaseTask, slices: list[int]) -> dict:
    """Worker step 2: reloads a validated case and cuts out its chosen slices.

    Returns:
        ``images`` float32 ``(n, H, W, C)`` raw intensities, ``labels`` uint8 ``(n, H, W)``
        and ``has_tumour`` bool ``(n,)``.

    Raises:
        SkipCase: the files changed since they were validated and are no longer usable.
    """
    image, label = load_case(task.files, task.norm.modality)
    labels = np.ascontiguousarray(np.moveaxis(label[:, :, slices], 2, 0))
    return {
        "images": stack_slices(image.data, slices, task.selection.context),
        "labels": labels,
        "has_tumour": (labels == TUMOUR_VALUE[task.norm.modality]).any(axis=(1, 2)),
    }
