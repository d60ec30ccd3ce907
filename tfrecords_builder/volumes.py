"""Volume records (``build-records --volumes``): one example per case, cropped around the liver.

The per-case steps of a :class:`tfrecords_builder.build.RecordKind`; finding and validating
cases, splits, shards, the manifest, checksums, resuming and skipping bad cases with a
reason are :mod:`tfrecords_builder.build`'s, as for slice records.

Each example (:data:`tfrecords_builder.features.VOLUME_FEATURES`) holds:

* the image, raw intensities, cropped to the liver's bounding box plus ``crop_margin_mm``
  on every side (clipped at the volume's edges), then optionally resampled to
  ``spacing`` (linear for the image, nearest for the label);
* the uint8 label map in the project's values for the structures the dataset's labels hold
  (the manifest's ``outputs``, ``kerasunet.core.labels.label_values``);
* the stored volume's spacing, the crop's offset in the canonical source, the case's
  normalisation statistics (of the whole source image, as for slices);
* per structure, :data:`~tfrecords_builder.features.VOLUME_POINTS` voxel indices of the
  stored volume drawn from that structure (seeded by the case id), so the patch reader
  can centre patches on tumour without scanning the volume.

Axis order is ``(D, H, W)`` throughout (``spacing``, ``crop_offset``, shapes and points): D
the axial slice axis (canonical z), H and W the canonical x and y of the 2D slices, the
order of :mod:`kerasunet.planner` and :func:`kerasunet.model.build_unet` with ``dims=3``.
A stored volume is ``np.moveaxis(canonical[x0:x1, y0:y1, z0:z1], 2, 0)`` (before
resampling) with ``crop_offset = (z0, x0, y0)``.

Structure masks follow :func:`kerasunet.core.labels.targets_from_labels_np`: liver is every
labelled voxel (tumours lie inside the liver), tumour the tumour value. Labels without a
liver (FZMC MRI holds tumour only) give no liver box, so those volumes are kept whole, and
no liver points.

In a volumes manifest (``"kind": "volumes"``) each case's ``shape`` and ``spacing`` are the
stored volume's, in ``(D, H, W)`` order; ``source_shape`` and ``source_spacing`` the canonical
source's ``(x, y, z)``; ``crop_offset`` and ``crop_shape`` the crop in source voxels
``(D, H, W)``; ``slices`` the source's axial slices the crop covers.
"""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np

from kerasunet.core.cases import CaseError, case_entry, load_case
from kerasunet.core.labels import STRUCTURES, label_values
from kerasunet.core.preprocessing import case_stats, resample, resampled_shape
from tfrecords_builder.features import VOLUME_FEATURES, VOLUME_POINTS, volume_example
from tfrecords_builder.ingest import CaseTask


def check_volume_settings(settings) -> None:
    """Checks the settings of a ``--volumes`` build (a :class:`tfrecords_builder.build.BuildSettings`).

    Raises:
        ValueError: the Beam engine, a context, a negative margin or a bad spacing.
    """
    checks = (
        (settings.engine == "local", "engine='local' with volumes (the Beam engine writes slices)",
         "engine", settings.engine),
        (settings.context == 0, "context=0 with volumes (a volume holds its neighbouring slices)",
         "context", settings.context),
        (settings.crop_margin_mm >= 0, "crop_margin_mm >= 0", "crop_margin_mm", settings.crop_margin_mm),
        (settings.spacing is None or (len(settings.spacing) == 3
                                      and all(math.isfinite(s) and s > 0 for s in settings.spacing)),
         "spacing of 3 positive numbers in mm, (D, H, W)", "spacing", settings.spacing),
    )
    for ok, expected, name, value in checks:
        if not ok:
            raise ValueError(f"Expected {expected}. Received: {name}={value!r}")


def volume_kind(settings):
    """The :class:`tfrecords_builder.build.RecordKind` of volume records for ``settings``."""
    from tfrecords_builder.build import RecordKind

    spacing = settings.spacing
    return RecordKind("volumes", VOLUME_FEATURES,
                      functools.partial(inspect_volume, settings.crop_margin_mm, spacing),
                      functools.partial(extract_volume, spacing), volume_examples,
                      ("shape", "spacing", "norm_stats", "slices", "crop_offset", "crop_shape",
                       "source_shape", "source_spacing"))


def structure_masks(label: np.ndarray, outputs) -> dict[str, np.ndarray | None]:
    """Each structure's mask in a label map holding ``outputs`` (valued by ``labels.label_values``);
    None for a structure it does not hold."""
    values = label_values(outputs)
    return {name: (label >= values[name]) if name in values else None for name in STRUCTURES}


def crop_box(liver: np.ndarray | None, spacing, margin_mm: float, shape) -> tuple[list[int], list[int]]:
    """``(start, stop)`` per canonical axis: the liver's bounding box grown by the margin.

    Args:
        liver: liver mask ``(x, y, z)``, or None (labels without liver: the whole volume).
        spacing: canonical voxel size in mm.
        margin_mm: margin on every side, in mm (rounded up to whole voxels per axis).
        shape: the volume's shape.
    """
    if liver is None or not liver.any():
        return [0, 0, 0], [int(n) for n in shape]
    where = np.nonzero(liver)
    start, stop = [], []
    for axis, n in enumerate(shape):
        margin = math.ceil(margin_mm / spacing[axis] - 1e-9)
        start.append(max(0, int(where[axis].min()) - margin))
        stop.append(min(int(n), int(where[axis].max()) + 1 + margin))
    return start, stop


def inspect_volume(margin_mm: float, target_spacing, task: CaseTask) -> dict:
    """Worker step 1: validates a case and plans its crop; returns JSON-ready facts.

    Returns:
        ``{"case_id", "skip": reason}`` for an unusable case, else the case's files, the
        stored volume's ``shape`` and ``spacing`` ``(D, H, W)``, the crop, the source's
        shape and spacing, norm stats, and label counts over the crop (class statistics).
    """
    files = task.files
    try:
        image, label = load_case(files, task.label_outputs)
    except CaseError as exc:
        return {"case_id": files.case_id, "skip": str(exc)}
    masks = structure_masks(label, task.label_outputs)
    start, stop = crop_box(masks["liver"], image.spacing, margin_mm, image.data.shape)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    crop = label[box]
    to_dhw = [2, 0, 1]  # canonical (x, y, z) -> (D, H, W)
    spacing = [float(image.spacing[i]) for i in to_dhw]
    crop_shape = [stop[i] - start[i] for i in to_dhw]
    tumour = masks["tumour"][box] if masks["tumour"] is not None else np.zeros(crop.shape, bool)
    return {
        "case_id": files.case_id,
        **case_entry(files),
        "shape": resampled_shape(crop_shape, spacing, target_spacing),
        "spacing": list(target_spacing) if target_spacing else spacing,
        "crop_offset": [start[i] for i in to_dhw],
        "crop_shape": crop_shape,
        "source_shape": list(image.data.shape),
        "source_spacing": [float(s) for s in image.spacing],
        "norm_stats": case_stats(image.data, task.norm).tolist(),
        "slices": list(range(start[2], stop[2])),
        "voxels": int(crop.size),
        "foreground_voxels": int((crop > 0).sum()),
        "tumour_voxels": int(tumour.sum()),
        "tumour_slices": int(tumour.any(axis=(0, 1)).sum()),
    }


def sample_points(mask: np.ndarray | None, seed: int) -> tuple[np.ndarray, int]:
    """``VOLUME_POINTS`` voxel indices of ``mask`` and how many of them are distinct.

    Drawn without replacement and sorted; repeated in turn when the mask has fewer
    voxels; all -1 when it has none.
    """
    where = np.argwhere(mask) if mask is not None else np.zeros((0, 3), np.int64)
    if len(where) == 0:
        return np.full((VOLUME_POINTS, 3), -1, np.int64), 0
    count = min(len(where), VOLUME_POINTS)
    chosen = np.sort(np.random.default_rng(seed).choice(len(where), count, replace=False))
    return np.resize(where[chosen], (VOLUME_POINTS, 3)), count


def extract_volume(target_spacing, task: CaseTask, info: dict) -> dict:
    """Worker step 2: reloads a validated case, crops, resamples and samples its points.

    Returns:
        ``image`` float32 ``(D, H, W)`` raw intensities, ``label`` uint8 ``(D, H, W)`` and
        ``points`` ``{structure: (points, count)}``; or ``{"case_id", "skip": reason}`` when
        the files changed since step 1 and no longer pass the checks or have another shape.
    """
    try:
        image, label = load_case(task.files, task.label_outputs)
    except CaseError as exc:
        return {"case_id": task.files.case_id, "skip": str(exc)}
    if list(image.data.shape) != list(info["source_shape"]):
        return {"case_id": task.files.case_id, "skip": f"image shape {image.data.shape} differs from the "
                                                       f"validated shape {tuple(info['source_shape'])}"}
    d0, h0, w0 = info["crop_offset"]
    d, h, w = info["crop_shape"]
    box = (slice(h0, h0 + h), slice(w0, w0 + w), slice(d0, d0 + d))
    volume = resample(np.moveaxis(image.data[box], 2, 0).astype(np.float32), info["shape"], order=1)
    labels = resample(np.moveaxis(label[box], 2, 0).astype(np.uint8), info["shape"], order=0)
    seed = zlib.crc32(task.files.case_id.encode())
    masks = structure_masks(labels, task.label_outputs)
    return {"image": np.ascontiguousarray(volume), "label": np.ascontiguousarray(labels),
            "points": {name: sample_points(mask, seed) for name, mask in masks.items()}}


def volume_examples(case_id: str, info: dict, data: dict):
    """Serialises the volume of a case. Yields one ``(key, serialised example)``; the key is the case id."""
    yield case_id, volume_example(case_id, data["image"], data["label"], info["spacing"], info["crop_offset"],
                                  info["norm_stats"], data["points"])
