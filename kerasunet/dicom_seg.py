"""Masks of DICOM series written as DICOM Segmentation objects (``predict --output-format dicom-seg``).

A DICOM SEG is what PACS viewers, 3D Slicer and OHIF open over the series it segments. It is
written with highdicom (the optional ``dicom`` extra: ``pip install kerasunet[dicom]``):

* one segment per output structure of the model (``RunInfo.outputs``: liver, tumour), each
  BINARY; a structure's segment is where the label map holds it (``label >= its value``,
  ``kerasunet.core.labels``), so the liver segment includes the tumours inside it, as the
  LiTS liver label does, and segments may overlap;
* one frame per source slice, every slice (empty ones too), each frame referencing its
  source image (SOPInstanceUID) and sharing the series' Frame of Reference, position and
  orientation, so the SEG lies exactly over the series in world space;
* coded as SNOMED CT: liver "Anatomical Structure / Liver", tumour "Morphologically Abnormal
  Structure / Neoplasm" in the liver; algorithm type AUTOMATIC, family "Artificial Intelligence".

The source images are the slices ``kerasunet.core.dicom`` read, in the same order (by
position along the slice normal), so frame ``k`` of the SEG is slice ``k`` of the NIfTI twin.
The file goes to the mask's path with ``.dcm`` for ``.nii.gz``, written atomically.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from kerasunet import __version__
from kerasunet.core.atomic import atomic_path
from kerasunet.core.dicom import holds_dicom, ordered_slices
from kerasunet.core.labels import label_values
from kerasunet.core.nifti import Volume, VolumeError, strip_nifti_suffix, to_original_order

EXTRA = "pip install kerasunet[dicom]"
SEG_SUFFIX = ".dcm"


def require_highdicom() -> None:
    """Raises a one-line :class:`VolumeError` naming the extra when highdicom is not installed."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise VolumeError(f"--output-format dicom-seg needs highdicom, which is not installed ({EXTRA})") from None


def seg_path(mask_path: Path) -> Path:
    """Where the SEG of a mask goes: the mask's name with ``.dcm`` for ``.nii[.gz]``."""
    return Path(mask_path).with_name(strip_nifti_suffix(Path(mask_path).name) + SEG_SUFFIX)


def seg_jobs(jobs: list) -> list:
    """``predict``'s jobs (``kerasunet.predict.Job``) with SEG outputs, after checking they can have them.

    Raises:
        VolumeError: highdicom is missing, or an input is not a DICOM series folder (one line).
    """
    require_highdicom()
    for job in jobs:
        if not (Path(job.image).is_dir() and holds_dicom(Path(job.image))):
            raise VolumeError(f"{job.image}: --output-format dicom-seg needs DICOM series input (a DICOM "
                              "Segmentation references its source images); this is not a DICOM series folder")
    return [replace(job, output=seg_path(job.output)) for job in jobs]


def segment_description(number: int, structure: str):
    """The highdicom ``SegmentDescription`` of one output structure."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    category, kind, regions = {
        "liver": (codes.SCT.AnatomicalStructure, codes.SCT.Liver, None),
        "tumour": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm, [codes.SCT.Liver]),
    }[structure]
    algorithm = hd.AlgorithmIdentificationSequence(name="kerasunet", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    return hd.seg.SegmentDescription(segment_number=number, segment_label=structure,
                                     segmented_property_category=category, segmented_property_type=kind,
                                     algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                     algorithm_identification=algorithm, anatomic_regions=regions)


def source_images(folder: Path, series: str | None = None) -> list:
    """The series' slices as pydicom datasets, ordered as ``kerasunet.core.dicom.read_series`` orders them."""
    import pydicom

    return [pydicom.dcmread(str(s.path)) for s in ordered_slices(folder, series)]


def write_segmentation(labels: np.ndarray, volume: Volume, outputs, path: Path, series: str | None = None) -> Path:
    """Writes the DICOM SEG of a label map predicted for a DICOM series.

    Args:
        labels: uint8 label map in canonical order (``predict_volume``), valued for ``outputs``.
        volume: the series' volume (``load_image`` of its folder); ``volume.path`` is the folder.
        outputs: the structures of the label map, one segment each.
        path: the SEG file to write (atomically).
        series: the SeriesInstanceUID read, when the folder holds several.

    Returns:
        ``path``.
    """
    import highdicom as hd

    sources = source_images(Path(volume.path), series)
    stored = to_original_order(np.asarray(labels), volume.image)  # (column, row, slice) of the series' twin
    values = label_values(outputs)
    frames = np.stack([stored >= values[name] for name in values], axis=-1)  # (column, row, slice, segment)
    pixel_array = np.ascontiguousarray(frames.transpose(2, 1, 0, 3))  # (slice, row, column, segment)
    first = sources[0]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel_array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(i + 1, name) for i, name in enumerate(values)],
        series_instance_uid=hd.UID(), series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="kerasunet",
        manufacturer_model_name="kerasunet U-Net", software_versions=__version__, device_serial_number="0",
        series_description=f"kerasunet segmentation ({', '.join(values)})", omit_empty_frames=False)
    with atomic_path(Path(path)) as tmp:
        seg.save_as(str(tmp))
    return Path(path)
