"""Sliding-window inference over a whole volume, as nnU-Net and MONAI do it.

The volume is covered by patches that overlap by about half a patch, the first at the
start and the last at the end of every axis. Each patch's probabilities are weighted by a
Gaussian centred on the patch (sigma = 1/8 of the patch size, nnU-Net's choice), because
a network sees least context at a patch's borders; each voxel's result is the weighted
mean over the patches that cover it. Optional test-time augmentation (TTA) averages the
predictions of the flipped patches, flipped back.

Memory: only ``batch_size`` patches (and their predictions) are held at a time; they are
added into one weighted-sum array and one weight array of the volume's size. Both are
float64, so that the weighted mean of equal values is exactly that value (a model that
returns its input gives the volume back bit for bit): ``8 * (K + 1)`` bytes per voxel.

numpy only: ``predict_fn`` may be a Keras model's ``predict_on_batch``, a TF Serving
client or a test double.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

SIGMA_SCALE = 1 / 8
OVERLAP = 0.5


def window_starts(size: int, patch: int, overlap: float = OVERLAP) -> list[int]:
    """Start offsets of the windows along one axis.

    The first window starts at 0 and the last ends at ``size``; the windows in between
    are spread evenly, with steps of at most ``patch * (1 - overlap)`` before rounding
    (nnU-Net's rule). ``size`` must be at least ``patch``.
    """
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    step = (size - patch) / (count - 1)
    return [round(i * step) for i in range(count)]


def gaussian_importance(patch_size, sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """Importance weights of a patch: a Gaussian with its maximum 1 at the patch centre.

    Per axis ``exp(-(i - c)**2 / (2 * sigma**2))`` with ``c = (p - 1) / 2`` (the centre,
    so the map is symmetric under flips) and ``sigma = sigma_scale * p``; the map is the
    product over axes. Returns float64 of shape ``patch_size``.
    """
    weights = np.ones((), np.float64)
    for p in patch_size:
        i = np.arange(p, dtype=np.float64)
        axis = np.exp(-((i - (p - 1) / 2) ** 2) / (2 * (sigma_scale * p) ** 2))
        weights = np.multiply.outer(weights, axis)
    return weights / weights.max()


def flip_sets(flip_axes) -> list[tuple[int, ...]]:
    """Every subset of ``flip_axes``, the empty one (no flip) first."""
    return [combo for r in range(len(flip_axes) + 1) for combo in itertools.combinations(flip_axes, r)]


def predict_patches(predict_fn, batch: np.ndarray, flip_axes) -> np.ndarray:
    """Predictions for a ``[N, *patch, C]`` batch, averaged over the flips of ``flip_axes``.

    Raises:
        ValueError: ``predict_fn`` returned another shape than ``[N, *patch, K]``.
    """
    total = None
    flips = flip_sets(flip_axes)
    for axes in flips:
        batch_axes = tuple(a + 1 for a in axes)
        probs = np.asarray(predict_fn(np.ascontiguousarray(np.flip(batch, batch_axes)) if axes else batch))
        if probs.ndim != batch.ndim or probs.shape[:-1] != batch.shape[:-1]:
            raise ValueError(f"Expected predict_fn to return [N, *patch, K] with N, *patch = {batch.shape[:-1]}. "
                             f"Received: shape={probs.shape}")
        probs = np.flip(probs, batch_axes) if axes else probs
        total = probs.astype(np.float64) if total is None else total + probs
    return total / len(flips)


def check_args(volume, patch_size, overlap: float, batch_size: int, flip_axes) -> None:
    """Checks :func:`sliding_window_predict` arguments."""
    if volume.ndim != len(patch_size) + 1:
        raise ValueError(f"Expected a volume [*spatial, C] with {len(patch_size)} spatial axes like "
                         f"patch_size={tuple(patch_size)}. Received: volume shape={volume.shape}")
    if any(int(p) != p or p < 1 for p in patch_size):
        raise ValueError(f"Expected positive integer patch sizes. Received: patch_size={tuple(patch_size)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"Expected 0 <= overlap < 1. Received: overlap={overlap}")
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    if any(a not in range(len(patch_size)) for a in flip_axes) or len(set(flip_axes)) != len(flip_axes):
        raise ValueError(f"Expected distinct spatial axes in range({len(patch_size)}). "
                         f"Received: flip_axes={tuple(flip_axes)}")


def sliding_window_predict(predict_fn, volume: np.ndarray, patch_size, overlap: float = OVERLAP,
                           batch_size: int = 1, flip_axes=(), sigma_scale: float = SIGMA_SCALE,
                           pad_value: float = 0.0) -> np.ndarray:
    """Predicts a whole volume patch by patch, with Gaussian-weighted overlaps.

    An axis shorter than the patch is padded with ``pad_value`` on both sides (centred)
    and the result is cropped back to the volume.

    Args:
        predict_fn: ``predict_fn(batch[N, D, H, W, C]) -> probs[N, D, H, W, K]``
            (numpy or anything ``np.asarray`` takes), ``N <= batch_size``.
        volume: ``[D, H, W, C]`` (any number of spatial axes, matching ``patch_size``).
        patch_size: ``(D, H, W)`` of the network's input patches.
        overlap: Fraction of a patch that neighbouring windows share, at least (0.5).
        batch_size: Patches per ``predict_fn`` call; bounds the memory held at once.
        flip_axes: Spatial axes (0 = D) to flip for TTA; every subset of them is
            predicted and averaged (8 calls per batch for ``(0, 1, 2)``). Empty: no TTA.
        sigma_scale: Gaussian sigma as a fraction of the patch size.
        pad_value: Value for padding an axis shorter than the patch.

    Returns:
        float32 probabilities ``[D, H, W, K]``.

    Raises:
        ValueError: an argument is out of range or ``predict_fn`` returns another shape.
    """
    volume = np.asarray(volume)
    patch_size, flip_axes = tuple(patch_size), tuple(flip_axes)
    check_args(volume, patch_size, overlap, batch_size, flip_axes)
    spatial = volume.shape[:-1]
    before = [max(p - s, 0) // 2 for s, p in zip(spatial, patch_size)]
    pads = [(b, max(p - s, 0) - b) for b, s, p in zip(before, spatial, patch_size)]
    padded = np.pad(volume, [*pads, (0, 0)], constant_values=pad_value) if any(map(sum, pads)) else volume
    starts = [window_starts(s, p, overlap) for s, p in zip(padded.shape[:-1], patch_size)]
    corners = list(itertools.product(*starts))
    importance = gaussian_importance(patch_size, sigma_scale)
    weighted, weights = None, np.zeros(padded.shape[:-1], np.float64)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        windows = [tuple(slice(c, c + p) for c, p in zip(corner, patch_size)) for corner in chunk]
        probs = predict_patches(predict_fn, np.stack([padded[w] for w in windows]), flip_axes)
        if weighted is None:
            weighted = np.zeros((*padded.shape[:-1], probs.shape[-1]), np.float64)
        for window, patch_probs in zip(windows, probs):
            weighted[window] += patch_probs * importance[..., None]
            weights[window] += importance
    weighted /= weights[..., None]
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    return weighted[crop].astype(np.float32)
