"""Tests of kerasunet.sliding_window: exact reassembly, Gaussian weighting, TTA, bounded batches."""

import math
import re

import numpy as np
import pytest
from scipy import ndimage

from kerasunet.sliding_window import gaussian_importance, sliding_window_predict, window_starts


def identity(batch):
    return batch.copy()


@pytest.mark.parametrize("size, patch", [(10, 4), (11, 4), (13, 5), (4, 4), (100, 32), (9, 8)])
def test_window_starts_cover_the_axis(size, patch):
    starts = window_starts(size, patch, 0.5)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert starts == sorted(set(starts))
    assert all(b - a <= math.ceil(patch / 2) for a, b in zip(starts, starts[1:]))  # at least ~50 % overlap
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered.all()


def test_window_starts_uneven():
    # 7 voxels to cover in steps of at most 2: 5 windows, spread evenly (1.75) and rounded.
    assert window_starts(11, 4, 0.5) == [0, 2, 4, 5, 7]


@pytest.mark.parametrize("shape, patch, batch_size", [
    ((9, 13, 17, 2), (4, 8, 6), 1),  # sizes not multiples of the step: uneven overlaps
    ((9, 13, 17, 2), (4, 8, 6), 5),  # a last batch that is not full
    ((3, 5, 20, 1), (4, 8, 8), 2),  # smaller than the patch on two axes: padded, cropped back
    ((4, 8, 6, 3), (4, 8, 6), 3),  # exactly one patch
])
def test_identity_model_reassembles_exactly(shape, patch, batch_size):
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = sliding_window_predict(identity, volume, patch, batch_size=batch_size)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, volume)


def test_memory_bounded_by_the_patch_batch():
    seen = []

    def model(batch):
        seen.append(batch.shape)
        return batch[..., :1]

    volume = np.ones((9, 13, 17, 1), np.float32)
    sliding_window_predict(model, volume, (4, 8, 6), batch_size=3)
    windows = len(window_starts(9, 4)) * len(window_starts(13, 8)) * len(window_starts(17, 6))
    assert len(seen) == math.ceil(windows / 3)
    assert all(shape[0] <= 3 and shape[1:] == (4, 8, 6, 1) for shape in seen)


def test_overlaps_are_gaussian_weighted():
    # Along W two windows, [0, 8) and [4, 12); each predicts its own mean W coordinate everywhere.
    w = np.broadcast_to(np.arange(12, dtype=np.float32), (4, 4, 12))[..., None]

    def patch_mean(batch):
        return np.broadcast_to(batch.mean(axis=(1, 2, 3, 4), keepdims=True), batch.shape)

    out = sliding_window_predict(patch_mean, w, (4, 4, 8))
    sigma, centre = 8 / 8, 3.5
    g = np.exp(-((np.arange(8) - centre) ** 2) / (2 * sigma**2))
    expected = np.where(np.arange(12) < 4, 3.5, np.where(np.arange(12) >= 8, 7.5, 0.0))
    overlap = np.arange(4, 8)
    expected[overlap] = (g[overlap] * 3.5 + g[overlap - 4] * 7.5) / (g[overlap] + g[overlap - 4])
    np.testing.assert_allclose(out[0, 0, :, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(out, np.broadcast_to(out[:1, :1], out.shape))


def test_gaussian_importance_sigma_is_an_eighth_of_the_patch():
    g = gaussian_importance((8, 16, 24))
    assert g.shape == (8, 16, 24) and g.max() == pytest.approx(1.0) and g.min() > 0
    np.testing.assert_allclose(g, g[::-1, ::-1, ::-1])
    # Along W (24 wide: sigma 3, centre 11.5), g[w] / g[v] = exp(-((w - c)**2 - (v - c)**2) / (2 sigma**2)).
    ratio = g[3, 7, 8] / g[3, 7, 11]
    assert ratio == pytest.approx(math.exp(-(3.5**2 - 0.5**2) / (2 * 3.0**2)))


def box_filter(batch):
    """A 3x3x3 mean filter with zero borders: flip-equivariant on every axis."""
    return ndimage.uniform_filter(batch, size=(1, 3, 3, 3, 1), mode="constant")


def test_tta_with_a_flip_equivariant_model_equals_no_tta():
    volume = np.random.default_rng(1).random((9, 13, 17, 2)).astype(np.float32)
    plain = sliding_window_predict(box_filter, volume, (4, 8, 6), batch_size=4)
    tta = sliding_window_predict(box_filter, volume, (4, 8, 6), batch_size=4, flip_axes=(0, 1, 2))
    np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-6)


def test_tta_averages_the_flipped_predictions():
    def cumulative(batch):  # not flip-equivariant along axis 2 (H)
        return np.cumsum(batch, axis=2)

    volume = np.random.default_rng(2).random((4, 8, 6, 1)).astype(np.float32)  # one window
    out = sliding_window_predict(cumulative, volume, (4, 8, 6), flip_axes=(1,))
    expected = (np.cumsum(volume, axis=1) + np.cumsum(volume[:, ::-1], axis=1)[:, ::-1]) / 2
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert not np.allclose(out, np.cumsum(volume, axis=1))


@pytest.mark.parametrize("kwargs, message", [
    ({"volume": np.zeros((4, 8, 6))}, "Expected a volume [*spatial, C] with 3 spatial axes like "
                                      "patch_size=(4, 8, 6). Received: volume shape=(4, 8, 6)"),
    ({"overlap": 1.0}, "Expected 0 <= overlap < 1. Received: overlap=1.0"),
    ({"batch_size": 0}, "Expected batch_size >= 1. Received: batch_size=0"),
    ({"patch_size": (4, 0, 6)}, "Expected positive integer patch sizes. Received: patch_size=(4, 0, 6)"),
    ({"flip_axes": (3,)}, "Expected distinct spatial axes in range(3). Received: flip_axes=(3,)"),
    ({"predict_fn": lambda b: b[:, :2]}, "Expected predict_fn to return [N, *patch, K] with N, *patch = "
                                         "(1, 4, 8, 6). Received: shape=(1, 2, 8, 6, 1)"),
])
def test_argument_errors(kwargs, message):
    args = {"predict_fn": identity, "volume": np.zeros((4, 8, 6, 1), np.float32), "patch_size": (4, 8, 6),
            **kwargs}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        sliding_window_predict(**args)
