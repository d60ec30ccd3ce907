"""NIfTI volume I/O shared by the builder, predict and the serving client.

Every volume is brought to the closest canonical (RAS+) voxel order through its affine,
so code downstream never assumes an axis order: axial slices are ``data[:, :, k]``.
Outputs (masks, probability maps) go back to the input's own voxel order and affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from kerasunet.core.atomic import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RAS = np.array([[0, 1], [1, 1], [2, 1]])


class VolumeError(ValueError):
    """A volume file that cannot be used. The message starts with the file's path."""


@dataclass(frozen=True)
class Volume:
    """A volume in canonical (RAS+) voxel order.

    Attributes:
        data: float32 array ``(x, y, z)``; axial slices are ``data[:, :, k]``.
        spacing: voxel size in mm, in the canonical axis order.
        image: the image as stored on disk (original affine, header and voxel order).
        path: the file it came from.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    image: nib.Nifti1Image
    path: Path

    @property
    def affine(self) -> np.ndarray:
        return self.image.affine


def strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def load_volume(path: str | Path, dtype=np.float32) -> Volume:
    """Loads a 3D NIfTI file and reorients it to canonical RAS+ voxel order.

    Scaled integer storage (``scl_slope``/``scl_inter``) is applied by nibabel.

    Raises:
        VolumeError: the file is missing, unreadable, truncated or not 3D.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    try:
        return volume_from_image(nib.load(str(path)), path, dtype)
    except VolumeError:
        raise
    except Exception as exc:  # nibabel raises many types for broken files
        raise VolumeError(f"{path}: unreadable or truncated NIfTI ({type(exc).__name__}: {exc})") from None


def volume_from_image(image: nib.Nifti1Image, path: str | Path, dtype=np.float32) -> Volume:
    """The canonical ``Volume`` of an image in memory (a NIfTI file, or a DICOM series' twin).

    Args:
        image: the image in its stored voxel order, with its RAS affine.
        path: where it came from (a file, or a DICOM series' folder), for messages.
        dtype: dtype of ``Volume.data``.

    Raises:
        VolumeError: the image is not 3D.
    """
    path = Path(path)
    canonical = nib.as_closest_canonical(image)
    data = np.asarray(canonical.dataobj, dtype=dtype)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {data.shape}")
    zooms = canonical.header.get_zooms()[:3]
    spacing = tuple(float(z) for z in zooms)
    return Volume(data=data, spacing=spacing, image=image, path=path)


def to_original_order(canonical: np.ndarray, reference: nib.Nifti1Image) -> np.ndarray:
    """Maps an array in canonical voxel order back to ``reference``'s own voxel order.

    Extra trailing axes (e.g. channels) are carried along unchanged.
    """
    ornt = nib.io_orientation(reference.affine)
    transform = nib.orientations.ornt_transform(_RAS, ornt)
    return nib.orientations.apply_orientation(canonical, transform)


def save_like(array_canonical: np.ndarray, reference: Volume | nib.Nifti1Image,
              path: str | Path, dtype=np.uint8) -> Path:
    """Writes an array given in canonical order with the reference's affine and voxel order.

    The file is written under a temporary name and renamed, so it is never half-written.
    """
    ref_img = reference.image if isinstance(reference, Volume) else reference
    data = to_original_order(np.asarray(array_canonical), ref_img).astype(dtype)
    header = ref_img.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(data, ref_img.affine, header)
    out.header.set_slope_inter(1.0, 0.0)
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(out, str(tmp))
    return path
