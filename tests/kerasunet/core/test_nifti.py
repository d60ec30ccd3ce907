import nibabel as nib
import numpy as np
import pytest

from kerasunet.core.nifti import VolumeError, load_volume, save_like

LPS = np.diag([-0.8, -0.8, 2.5, 1.0])
FLIPPED_SWAPPED = np.array([[0, 0.7, 0, 10], [-0.7, 0, 0, 5], [0, 0, -3.0, 2], [0, 0, 0, 1]], float)


@pytest.mark.parametrize("affine", [np.diag([0.8, 0.8, 2.5, 1.0]), LPS, FLIPPED_SWAPPED])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_save_like_round_trips_affine_shape_and_voxels(tmp_path, affine, suffix):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8)
    path = tmp_path / f"in{suffix}"
    nib.save(nib.Nifti1Image(stored, affine), str(path))
    vol = load_volume(path)
    # canonical order: the world axes increase along x, y, z
    assert np.all(np.diag(nib.as_closest_canonical(vol.image).affine)[:3] > 0)
    out = save_like(vol.data, vol, tmp_path / f"out{suffix}")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), stored)


def test_scaled_int16_storage_is_applied(tmp_path):
    raw = np.array([-2000, 0, 1024, 2048], np.int16).reshape(4, 1, 1)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, -1024.0)
    nib.save(img, str(tmp_path / "v.nii"))
    stored = nib.load(str(tmp_path / "v.nii"))
    assert stored.get_data_dtype() == np.int16 and stored.dataobj.slope == 0.5
    np.testing.assert_allclose(load_volume(tmp_path / "v.nii").data[:, 0, 0], [-2024, -1024, -512, 0])


def test_truncated_file_gives_one_line_error(tmp_path):
    path = tmp_path / "volume-1.nii"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(VolumeError, match=r"volume-1\.nii: unreadable or truncated NIfTI"):
        load_volume(path)
