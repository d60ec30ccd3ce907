"""Object-based clean-up of predicted label volumes, after Chlebus et al. 2018 in a simple form.

Chlebus G. et al., "Automatic liver tumor segmentation in CT with fully convolutional neural
networks and object-based postprocessing", Scientific Reports 8, 15497 (2018) filter the
network's tumour candidates by object features and keep them only inside the liver. Here the
same idea is reduced to four switchable rules on the label map (canonical ``(x, y, z)``):

CT (labels 0 background, 1 liver, 2 tumour; tumour counts as liver):
  1. ``largest_liver_component``: keep only the largest 3D connected component of
     ``label >= 1``; everything else becomes background. A liver is one organ, so smaller
     components are false positives (spleen, heart, bowel).
  2. ``fill_liver_holes``: background enclosed by the kept liver within an axial slice becomes
     liver (``scipy.ndimage.binary_fill_holes`` per slice). The liver is a solid organ and
     the LiTS references label the vessels inside it as liver; holes are where the network
     hesitated, e.g. at a low-contrast tumour's rim or an intrahepatic vessel.
  3. ``tumour_in_liver``: tumour voxels farther than ``liver_dilation_mm`` (in mm, using the
     voxel spacing) from the kept liver are dropped. The margin keeps tumours at the liver
     edge that the network cut off from the organ. Without rule 1 every tumour voxel is part
     of ``label >= 1``, so this rule then changes nothing.
  4. ``min_tumour_voxels``: tumour components with fewer voxels are dropped (they become
     liver where they lie in the kept liver, background elsewhere).

MRI (labels 0 background, 1 tumour): there is no liver label, so only rule 4 applies.

Components use full 3D connectivity (26 neighbours), so diagonally touching voxels are one
object, as in ``scipy.ndimage.label`` with a 3x3x3 structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FULL_CONNECTIVITY = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class PostprocessSettings:
    """Switches and sizes of the post-processing rules (see the module docstring).

    Attributes:
        enabled: False returns the labels unchanged.
        largest_liver_component: CT: keep only the largest 3D component of label >= 1.
        fill_liver_holes: CT: background enclosed by liver in an axial slice becomes liver.
        tumour_in_liver: CT: drop tumour farther than ``liver_dilation_mm`` from the kept liver.
        liver_dilation_mm: margin around the liver, in millimetres (spacing-aware).
        min_tumour_voxels: tumour components smaller than this are dropped; 0 keeps all.
    """

    enabled: bool = True
    largest_liver_component: bool = True
    fill_liver_holes: bool = True
    tumour_in_liver: bool = True
    liver_dilation_mm: float = 5.0
    min_tumour_voxels: int = 10

    def __post_init__(self):
        if self.liver_dilation_mm < 0:
            raise ValueError(f"Expected liver_dilation_mm >= 0. Received: liver_dilation_mm={self.liver_dilation_mm}")
        if self.min_tumour_voxels < 0:
            raise ValueError(f"Expected min_tumour_voxels >= 0. Received: min_tumour_voxels={self.min_tumour_voxels}")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (all False if the mask is empty)."""
    components, count = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    if count <= 1:
        return components > 0
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``mask`` with the holes of each axial slice (last axis) filled."""
    filled = mask.copy()
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        filled[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return filled


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` without its 26-connected components of fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask
    components, _ = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[components]


def within_distance(region: np.ndarray, candidates: np.ndarray, spacing, distance_mm: float) -> np.ndarray:
    """Which ``candidates`` voxels lie within ``distance_mm`` of ``region`` (both boolean, same shape).

    Each candidate component is checked in its own bounding box grown by the distance (in
    voxels per axis): a region voxel outside that box is farther than ``distance_mm`` from every
    voxel of the component, so the small distance transforms give the exact answer without a
    transform of the whole volume.
    """
    out = np.zeros_like(candidates)
    if not candidates.any() or not region.any():
        return out
    grow = [int(np.ceil(distance_mm / s)) for s in spacing]
    components, _ = ndimage.label(candidates, structure=FULL_CONNECTIVITY)
    for index, box in enumerate(ndimage.find_objects(components), 1):
        box = tuple(slice(max(b.start - g, 0), min(b.stop + g, n)) for b, g, n in zip(box, grow, region.shape))
        near = region[box]
        if not near.any():
            continue
        distance = ndimage.distance_transform_edt(~near, sampling=spacing)
        out[box] |= (components[box] == index) & (distance <= distance_mm)
    return out


def postprocess(labels: np.ndarray, outputs, spacing, settings: PostprocessSettings) -> np.ndarray:
    """Applies the post-processing rules of the module docstring to a label volume.

    Args:
        labels: uint8 label volume ``(x, y, z)`` in the dataset's convention.
        outputs: The structures the labels hold (``labels.label_values``): ``("liver",
            "tumour")`` (1 liver, 2 tumour), ``("tumour",)`` (1 tumour) or ``("liver",)``.
        spacing: voxel size in mm, same axis order as ``labels``.
        settings: which rules run.

    Returns:
        A new uint8 label volume; the input is not modified.
    """
    if not settings.enabled:
        return labels.copy()
    outputs = tuple(outputs)
    if outputs == ("tumour",):
        return remove_small_components(labels >= 1, settings.min_tumour_voxels).astype(np.uint8)
    liver = labels >= 1
    if settings.largest_liver_component:
        liver = largest_component(liver)
    if settings.fill_liver_holes:
        liver = fill_holes_per_slice(liver)
    tumour = labels == 2
    if settings.tumour_in_liver:
        outside = tumour & ~liver
        tumour = (tumour & liver) | within_distance(liver, outside, spacing, settings.liver_dilation_mm)
    tumour = remove_small_components(tumour, settings.min_tumour_voxels)
    out = liver.astype(np.uint8)
    out[tumour] = 2
    return out
