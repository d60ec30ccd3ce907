"""The worker-side steps of a build: inspect a case, then extract its slices (TensorFlow-free).

Cases are found and loaded by ``kerasunet.core.cases``, the one loader with the one set of
checks that evaluate and predict use too. A case that fails them is not a crash: each step
returns ``{"case_id", "skip": reason}`` (missing label, image/label shape mismatch,
unreadable or truncated file, NaN/Inf voxels, non-integer labels, or label values outside
the dataset's set), and the build records the reason and goes on with the other cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kerasunet.core.cases import CaseError, CaseFiles, case_entry, load_case
from kerasunet.core.labels import OUTPUTS, label_values
from kerasunet.core.preprocessing import NormSettings, case_stats
from kerasunet.core.stacking import stack_slices
from tfrecords_builder.selection import SelectionSettings, select_slices

@dataclass(frozen=True)
class CaseTask:
    """Everything a worker needs to process one case (picklable, TensorFlow-free).

    Attributes:
        files: the case's files and what its labels hold.
        norm: the normalisation settings (and modality).
        selection: which slices to keep.
        outputs: the structures the records' label maps hold (``kerasunet.core.cases.Dataset.outputs``);
            None: the modality's default (``labels.OUTPUTS``).
    """

    files: CaseFiles
    norm: NormSettings
    selection: SelectionSettings
    outputs: tuple[str, ...] | None = None

    @property
    def label_outputs(self) -> tuple[str, ...]:
        return self.outputs or OUTPUTS[self.norm.modality]

    def is_tumour(self, labels: np.ndarray) -> np.ndarray:
        """Where ``labels`` (valued for :attr:`label_outputs`) hold tumour; all False without a tumour output."""
        value = label_values(self.label_outputs).get("tumour")
        return labels >= value if value is not None else np.zeros(labels.shape, bool)


def inspect_case(task: CaseTask) -> dict:
    """Worker step 1: validates a case and chooses its slices; returns JSON-ready facts.

    Returns:
        ``{"case_id", "skip": reason}`` for an unusable case, else the case's image and
        label paths, shape, spacing, norm stats, selected slices and label counts over
        those slices (for the manifest's class statistics).
    """
    files = task.files
    try:
        image, label = load_case(files, task.label_outputs)
    except CaseError as exc:
        return {"case_id": files.case_id, "skip": str(exc)}
    slices = select_slices(label, task.selection)
    chosen = label[:, :, slices]
    tumour = task.is_tumour(chosen)
    return {
        "case_id": files.case_id,
        **case_entry(files),  # image, label, what the label holds, series
        "shape": list(image.data.shape),
        "spacing": list(image.spacing),
        "norm_stats": case_stats(image.data, task.norm).tolist(),
        "slices": slices.tolist(),
        "voxels": int(chosen.size),
        "foreground_voxels": int((chosen > 0).sum()),
        "tumour_voxels": int(tumour.sum()),
        "tumour_slices": int(tumour.any(axis=(0, 1)).sum()),
    }


def extract_case(task: CaseTask, slices: list[int], shape: list[int]) -> dict:
    """Worker step 2: reloads a validated case and cuts out its chosen slices.

    Args:
        task: the case and settings.
        slices: the slices step 1 chose.
        shape: the image shape step 1 saw.

    Returns:
        ``images`` float32 ``(n, H, W, C)`` raw intensities, ``labels`` uint8 ``(n, H, W)``
        and ``has_tumour`` bool ``(n,)``; or ``{"case_id", "skip": reason}`` when the files
        changed since step 1 and no longer pass the checks or have another shape.
    """
    try:
        image, label = load_case(task.files, task.label_outputs)
    except CaseError as exc:
        return {"case_id": task.files.case_id, "skip": str(exc)}
    if list(image.data.shape) != list(shape):
        return {"case_id": task.files.case_id,
                "skip": f"image shape {image.data.shape} differs from the validated shape {tuple(shape)}"}
    labels = np.ascontiguousarray(np.moveaxis(label[:, :, slices], 2, 0))
    return {
        "images": stack_slices(image.data, slices, task.selection.context),
        "labels": labels,
        "has_tumour": task.is_tumour(labels).any(axis=(1, 2)),
    }


def extract_slices(task: CaseTask, info: dict) -> dict:
    """Worker step 2 of slice records: :func:`extract_case` of the slices step 1 chose."""
    return extract_case(task, info["slices"], info["shape"])
