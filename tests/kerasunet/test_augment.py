import numpy as np
import pytest
import tensorflow as tf

from kerasunet.augment import MILD_INTENSITY, AugmentSettings, augment, intensity, with_intensity

NO_INTENSITY = dict(intensity_prob=0.0)
FLIPS = dict(flip_prob=0.5, rot90=True)


def blob_image(shape):
    """A smooth image whose mask ``image > 0`` is a few blobs (channels: image copies)."""
    h, w, c = shape
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.sin(yy / 3.0 + 0.3) * np.cos(xx / 4.0) + 0.2 * (yy / h)
    image = np.repeat(image[..., None], c, -1).astype(np.float32)
    return image, (image[..., :1] > 0).astype(np.float32)


def run(settings, shape, seed):
    image, target = blob_image(shape)
    x, y = augment(tf.constant(image), tf.constant(target), settings, tf.constant([seed, 7]))
    return image, target, x.numpy(), y.numpy()


@pytest.mark.parametrize("shape", [(16, 16, 1), (16, 12, 3), (15, 9, 1)])
@pytest.mark.parametrize("seed", range(6))
def test_flips_and_rot90_move_image_and_mask_together(shape, seed):
    settings = AugmentSettings(affine_prob=0.0, **FLIPS, **NO_INTENSITY)
    image, target, x, y = run(settings, shape, seed)
    assert x.shape == image.shape and y.shape == target.shape
    np.testing.assert_array_equal(y, (x[..., :1] > 0).astype(np.float32))
    assert sorted(x.ravel()) == pytest.approx(sorted(image.ravel()))  # a permutation of the pixels


def test_geometry_is_applied_for_some_seeds():
    settings = AugmentSettings(affine_prob=0.0, **FLIPS, **NO_INTENSITY)
    changed = [not np.array_equal(run(settings, (16, 16, 1), s)[2], blob_image((16, 16, 1))[0]) for s in range(6)]
    assert any(changed)


@pytest.mark.parametrize("kw", [dict(affine_prob=1.0), dict(affine_prob=0.0, elastic_prob=1.0)])
def test_rotation_scaling_and_elastic_keep_masks_binary_and_aligned(kw):
    settings = AugmentSettings(flip_prob=0.0, rot90=False, **kw, **NO_INTENSITY)
    for seed in range(4):
        image, _, x, y = run(settings, (32, 32, 1), seed)
        assert set(np.unique(y)) <= {0.0, 1.0}
        assert not np.array_equal(x, image)
        assert np.mean(y == (x[..., :1] > 0)) > 0.93  # only boundary pixels may disagree


def test_intensity_changes_image_only_and_seed_is_reproducible():
    settings = AugmentSettings(flip_prob=0.0, rot90=False, affine_prob=0.0, intensity_prob=1.0)
    image, target, x, y = run(settings, (16, 16, 2), 3)
    np.testing.assert_array_equal(y, target)
    assert not np.allclose(x, image)
    np.testing.assert_array_equal(x, run(settings, (16, 16, 2), 3)[2])


@pytest.mark.parametrize("kw, match", [
    ({"flip_prob": 1.5}, r"Expected 0 <= flip_prob <= 1. Received: flip_prob=1.5"),
    ({"scale_range": (1.2, 0.8)}, r"Expected 0 < lo <= hi. Received: scale_range=\(1.2, 0.8\)"),
])
def test_invalid_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        AugmentSettings(**kw)


def test_defaults_keep_left_and_right():
    # Liver (patient's right) and spleen (left) overlap in intensity: no flips by default.
    settings = AugmentSettings(affine_prob=0.0, **NO_INTENSITY)
    for seed in range(6):
        image, _, x, _ = run(settings, (16, 16, 1), seed)
        np.testing.assert_array_equal(x, image)


def test_brightness_shifts_tissue_and_leaves_the_clipped_floor():
    # Contrast phases and scanners move tissue by tens of HU; air stays below the window.
    settings = AugmentSettings(brightness=0.2, contrast_range=(1.0, 1.0), gamma_range=(1.0, 1.0), noise_std=0.0,
                               intensity_prob=1.0)
    image = np.full((16, 16, 3), -1.0, np.float32)  # the window's floor (air)
    image[4:12, 3:13] = np.linspace(-0.5, 0.8, 10, dtype=np.float32)[None, :, None]
    tissue = image > -1.0
    shifts = set()
    for seed in range(4):
        seeds = tf.unstack(tf.random.experimental.stateless_split(tf.constant([seed, 7]), 9))
        x = intensity(tf.constant(image), seeds, settings).numpy()
        np.testing.assert_array_equal(x[~tissue], -1.0)
        shift = x[tissue] - image[tissue]
        np.testing.assert_allclose(shift, shift[0], atol=1e-5)  # one shift for the whole slice
        assert 0 < abs(shift[0]) <= 0.2
        shifts.add(round(float(shift[0]), 4))
    assert len(shifts) == 4


def test_mild_intensity_keeps_the_geometry_and_weakens_only_the_intensity_transforms():
    base = AugmentSettings(flip_prob=0.5, affine_prob=0.3)
    assert with_intensity(base, "standard") == base
    mild = with_intensity(base, "mild")
    assert (mild.brightness, mild.contrast_range, mild.intensity_prob) == (0.1, (0.9, 1.1), 0.15)
    assert mild.brightness < base.brightness and mild.intensity_prob < base.intensity_prob
    assert (mild.flip_prob, mild.affine_prob, mild.gamma_range) == (0.5, 0.3, base.gamma_range)
    assert set(MILD_INTENSITY) == {"brightness", "contrast_range", "intensity_prob"}
    with pytest.raises(ValueError, match=r"Expected intensity in \('standard', 'mild'\). Received: intensity='x'"):
        with_intensity(base, "x")
