"""kerasunet.patches: 3D patches of volume records, on a phantom whose voxels hold their own coordinates."""

import re

import numpy as np
import pytest

from kerasunet.augment import AugmentSettings
from kerasunet.data import RecordsError
from kerasunet.patches import augment_patch, get_patch_dataset, parse_patch_size, records_spacing, volume_manifest
from tests.helpers import RAS, build_settings, save_nifti
from tfrecords_builder.build import build_records

SHAPE = (32, 32, 16)  # canonical x, y, z: stored (D, H, W) = (16, 32, 32)
PATCH = (8, 16, 16)
SCALE = 2.0**20  # CT window (-SCALE, SCALE): normalised = HU / SCALE exactly


def code(d, h, w):
    return d * 10000 + h * 100 + w


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """Volume records of one case whose voxel (d, h, w) holds ``code(d, h, w)`` HU.

    Liver: a box in the middle; tumour: the one voxel (0, 0, 0), so a patch holds tumour
    only when it was centred on it (a uniform patch starts at (0, 0, 0) with p = 1/2601).
    """
    root = tmp_path_factory.mktemp("coded")
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    label = np.zeros(SHAPE, np.uint8)
    label[10:20, 10:20, 4:12] = 1
    label[0, 0, 0] = 2
    (root / "src").mkdir()
    save_nifti(root / "src" / "volume-0.nii", code(z, x, y).astype(np.float32), RAS)
    save_nifti(root / "src" / "segmentation-0.nii", label, RAS)
    build_records(build_settings(root / "src", root / "out", volumes=True, crop_margin_mm=100.0,
                                 hu_window=(-SCALE, SCALE), val_fraction=0, test_fraction=0))
    return root / "out"


def codes(image):
    return np.rint(image[..., 0] * SCALE).astype(np.int64)


def batches(records, n, **kw):
    kw = {"training": True, "seed": 0, "repeat": True, **kw}
    ds = get_patch_dataset(records, "train", 8, patch_size=PATCH, **kw)
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def test_patches_lie_inside_the_volume_with_the_contracted_shapes(coded):
    ds = get_patch_dataset(coded, "train", 8, True, PATCH, seed=0, repeat=True)
    assert ds.element_spec[0].shape.as_list() == [8, *PATCH, 1] and ds.element_spec[0].dtype.name == "float32"
    assert ds.element_spec[1].shape.as_list() == [8, *PATCH] and ds.element_spec[1].dtype.name == "uint8"
    d, h, w = np.meshgrid(*(np.arange(n) for n in PATCH), indexing="ij")
    for x, y in batches(coded, 4):
        for patch, label in zip(codes(x), y):
            start = np.array([patch[0, 0, 0] // 10000, patch[0, 0, 0] // 100 % 100, patch[0, 0, 0] % 100])
            assert np.all(start >= 0) and np.all(start + PATCH <= (16, 32, 32))
            np.testing.assert_array_equal(patch, code(d + start[0], h + start[1], w + start[2]))
            assert (label == 2).any() == (tuple(start) == (0, 0, 0))


@pytest.mark.parametrize("share, lo, hi", [(1 / 3, 0.25, 0.42), (0.0, 0.0, 0.02), (1.0, 1.0, 1.0)])
def test_share_of_foreground_centred_patches(coded, share, lo, hi):
    labels = np.concatenate([y for _, y in batches(coded, 30, foreground_share=share)])
    with_tumour = (labels == 2).any(axis=(1, 2, 3)).mean()
    assert lo <= with_tumour <= hi


def test_validation_patches_are_fixed_centre_then_tumour(coded):
    ds = get_patch_dataset(coded, "train", 4, False, PATCH)
    (x, y), = [(x.numpy(), y.numpy()) for x, y in ds]
    assert x.shape == (2, *PATCH, 1)  # a volume with tumour: its centre and its tumour
    assert codes(x)[0, 0, 0, 0] == code(4, 8, 8) and codes(x)[1, 0, 0, 0] == code(0, 0, 0)
    again = next(iter(ds))[0].numpy()
    np.testing.assert_array_equal(x, again)


def test_volumes_smaller_than_the_patch_are_padded_with_background(coded):
    ds = get_patch_dataset(coded, "train", 1, False, (24, 32, 32))
    x, y = (t.numpy() for t in next(iter(ds)))
    np.testing.assert_array_equal(codes(x[0, :16]), code(*np.meshgrid(*map(np.arange, (16, 32, 32)), indexing="ij")))
    assert np.all(x[0, 16:] == -1.0) and np.all(y[0, 16:] == 0)  # the window floor, normalised


def test_augmentation_flips_all_three_axes_and_keeps_labels():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(*PATCH, 1)).astype(np.float32)
    label = rng.integers(0, 3, size=PATCH).astype(np.uint8)
    flips = AugmentSettings(flip_prob=1.0, affine_prob=0.0, intensity_prob=0.0)
    x, y = augment_patch(image, label, flips, np.array([1, 2], np.int32))
    np.testing.assert_array_equal(x.numpy(), image[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(y.numpy(), label[::-1, ::-1, ::-1])
    rotate = AugmentSettings(affine_prob=1.0, intensity_prob=1.0)
    x, y = augment_patch(image, label, rotate, np.array([3, 4], np.int32))
    assert x.shape == image.shape and y.dtype.name == "uint8" and set(np.unique(y.numpy())) <= {0, 1, 2}
    # the same in-plane rotation on every slice: a label constant along D stays so
    column = np.broadcast_to(label[:1], PATCH).copy()
    _, y = augment_patch(image, column, AugmentSettings(affine_prob=1.0, intensity_prob=0.0), np.array([5, 6], np.int32))
    assert np.all(y.numpy() == y.numpy()[:1]) and not np.array_equal(y.numpy(), column)


def test_slice_records_are_refused(tiny_records):
    records = tiny_records("lits")
    message = (f"{records}: holds slice records; 3D training reads volume records "
               "(build them with `kerasunet build-records --volumes`)")
    with pytest.raises(RecordsError, match=f"^{re.escape(message)}$"):
        get_patch_dataset(records, "train", 2, True, PATCH)


def test_median_spacing_and_patch_size_text(coded):
    assert records_spacing(volume_manifest(coded)) == (2.5, 0.8, 0.7)
    assert parse_patch_size("48x128X128") == (48, 128, 128)
    with pytest.raises(ValueError, match=re.escape("Expected a patch size DxHxW of three positive integers. "
                                                   "Received: patch_size='48x128'")):
        parse_patch_size("48x128")
