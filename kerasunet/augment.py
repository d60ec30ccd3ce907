"""Training-time augmentation as pure TensorFlow ops (runs inside tf.data, no py_function).

Geometric transforms (flips, 90-degree rotations, small rotation + scaling, optional
elastic deformation) are applied identically to image and target; the image is resampled
bilinearly, the target with nearest neighbour so it stays binary. Intensity transforms
(brightness, contrast, gamma, noise) change the image only and act on normalised values.
Randomness is stateless: the same ``seed`` gives the same augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import tensorflow as tf

from kerasunet.core.choices import AUGMENT_INTENSITIES


@dataclass(frozen=True)
class AugmentSettings:
    """Augmentation settings; each ``*_prob`` is the chance a transform is applied.

    Flips and 90-degree rotations are off by default: in axial abdominal slices they move the
    liver to the patient's left, where the spleen (whose intensity overlaps the liver's) lies,
    so they remove the position cue the network needs. Small rotations and scaling keep it.

    Attributes:
        flip_prob: chance of each flip (up-down, left-right).
        rot90: random multiples of 90 degrees (only 180 on non-square images).
        affine_prob: chance of a small rotation + scaling.
        rotation_deg: rotation drawn from [-rotation_deg, rotation_deg].
        scale_range: zoom factor range.
        elastic_prob: chance of an elastic deformation (off by default: slow-ish).
        elastic_alpha: displacement scale in pixels.
        elastic_grid: control points per side of the coarse displacement grid.
        brightness: additive shift drawn from [-brightness, brightness], of the tissue only:
            voxels at the image's minimum (air below a CT window, the low clip of MRI) keep it,
            as they do when a contrast phase or a scanner moves tissue by tens of HU. 0.15 is
            about 34 HU in the default CT window.
        contrast_range: multiplicative contrast factor around the image mean (nnU-Net's range).
        gamma_range: gamma on the image rescaled to [0, 1] (then scaled back).
        noise_std: Gaussian noise with std drawn from [0, noise_std].
        intensity_prob: chance of each intensity transform.

    The intensity ranges and their chance were raised in the seventh session (from ±0.1,
    0.9-1.1 and 0.15, now :data:`MILD_INTENSITY`): models trained with the old ones lost 0.04
    liver Dice on held-out scans 30 HU darker (docs/quality.md, "Intensity shifts").
    """

    flip_prob: float = 0.0
    rot90: bool = False
    affine_prob: float = 0.5
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    elastic_prob: float = 0.0
    elastic_alpha: float = 8.0
    elastic_grid: int = 6
    brightness: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_range: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.05
    intensity_prob: float = 0.3

    def __post_init__(self):
        for name in ("flip_prob", "affine_prob", "elastic_prob", "intensity_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"Expected 0 <= {name} <= 1. Received: {name}={value}")
        for name in ("scale_range", "contrast_range", "gamma_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"Expected 0 < lo <= hi. Received: {name}={getattr(self, name)}")
        if self.elastic_grid < 2:
            raise ValueError(f"Expected elastic_grid >= 2. Received: elastic_grid={self.elastic_grid}")


MILD_INTENSITY = dict(brightness=0.1, contrast_range=(0.9, 1.1), intensity_prob=0.15)
"""The ``mild`` intensity transforms: the ranges and chance before the seventh session."""


def with_intensity(settings: AugmentSettings, intensity: str) -> AugmentSettings:
    """``settings`` with the intensity transforms of ``intensity`` (``AUGMENT_INTENSITIES``):
    ``standard`` keeps them, ``mild`` sets :data:`MILD_INTENSITY`."""
    if intensity not in AUGMENT_INTENSITIES:
        raise ValueError(f"Expected intensity in {AUGMENT_INTENSITIES}. Received: intensity={intensity!r}")
    return settings if intensity == "standard" else replace(settings, **MILD_INTENSITY)


def _uniform(seed, lo=0.0, hi=1.0, shape=()):
    return tf.random.stateless_uniform(shape, seed, lo, hi)


def maybe(seed, prob: float, fn, *args):
    """``fn(*args)`` with probability ``prob``, else ``args`` unchanged."""
    if prob <= 0:
        return args if len(args) > 1 else args[0]
    return tf.cond(_uniform(seed) < prob, lambda: fn(*args), lambda: args if len(args) > 1 else args[0])


def _flip_rot90(image, target, seeds, settings):
    for axis, seed in ((0, seeds[0]), (1, seeds[1])):
        image, target = maybe(seed, settings.flip_prob, lambda x, y, a=axis: (tf.reverse(x, [a]), tf.reverse(y, [a])),
                               image, target)
    if settings.rot90:
        k = tf.random.stateless_uniform((), seeds[2], 0, 4, dtype=tf.int32)
        shape = tf.shape(image)
        k = tf.where(tf.equal(shape[0], shape[1]), k, (k // 2) * 2)  # keep H, W on non-square images
        static = (image.shape, target.shape)
        image, target = tf.image.rot90(image, k), tf.image.rot90(target, k)
        image.set_shape(static[0])
        target.set_shape(static[1])
    return image, target


def affine_matrix(angle, scale, height, width):
    """Output -> input pixel map (ImageProjectiveTransform order) rotating/scaling about the centre."""
    cy, cx = (tf.cast(height, tf.float32) - 1) / 2, (tf.cast(width, tf.float32) - 1) / 2
    a0, a1 = tf.cos(angle) / scale, -tf.sin(angle) / scale
    b0, b1 = tf.sin(angle) / scale, tf.cos(angle) / scale
    return tf.stack([a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy, 0.0, 0.0])[None]


def _transform(x, matrix, interpolation: str, fill):
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=matrix, output_shape=tf.shape(x)[:2], fill_value=fill,
        interpolation=interpolation, fill_mode="CONSTANT")[0]
    out.set_shape(x.shape)
    return out


def _rotate_scale(image, target, seeds, settings):
    max_angle = settings.rotation_deg * math.pi / 180
    angle = _uniform(seeds[0], -max_angle, max_angle)
    scale = _uniform(seeds[1], *settings.scale_range)
    shape = tf.shape(image)
    matrix = affine_matrix(angle, scale, shape[0], shape[1])
    image = _transform(image, matrix, "BILINEAR", tf.reduce_min(image))
    return image, _transform(target, matrix, "NEAREST", 0.0)


def _sample(x, rows, cols, nearest: bool):
    """Samples ``x`` (H, W, C) at float coordinates (H, W), clamped to the border."""
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    if nearest:
        r = tf.clip_by_value(tf.cast(tf.round(rows), tf.int32), 0, h - 1)
        c = tf.clip_by_value(tf.cast(tf.round(cols), tf.int32), 0, w - 1)
        return tf.gather_nd(x, tf.stack([r, c], -1))
    r0, c0 = tf.floor(rows), tf.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]

    def at(dr, dc):
        r = tf.clip_by_value(tf.cast(r0, tf.int32) + dr, 0, h - 1)
        c = tf.clip_by_value(tf.cast(c0, tf.int32) + dc, 0, w - 1)
        return tf.gather_nd(x, tf.stack([r, c], -1))

    top = at(0, 0) * (1 - fc) + at(0, 1) * fc
    bottom = at(1, 0) * (1 - fc) + at(1, 1) * fc
    return top * (1 - fr) + bottom * fr


def _elastic(image, target, seeds, settings):
    """Smooth random displacement: a coarse Gaussian grid upsampled bicubically to (H, W)."""
    shape = tf.shape(image)
    g = settings.elastic_grid
    coarse = tf.random.stateless_normal((1, g, g, 2), seeds[0]) * settings.elastic_alpha
    field = tf.image.resize(coarse, shape[:2], method="bicubic")[0]
    rows, cols = tf.meshgrid(tf.range(shape[0], dtype=tf.float32), tf.range(shape[1], dtype=tf.float32),
                             indexing="ij")
    rows, cols = rows + field[..., 0], cols + field[..., 1]
    out_image, out_target = _sample(image, rows, cols, False), _sample(target, rows, cols, True)
    out_image.set_shape(image.shape)
    out_target.set_shape(target.shape)
    return out_image, out_target


def _gamma(image, gamma):
    lo, hi = tf.reduce_min(image), tf.reduce_max(image)
    span = tf.maximum(hi - lo, 1e-6)
    return tf.pow((image - lo) / span, gamma) * span + lo


def intensity(image, seeds, settings):
    """The intensity transforms (brightness, contrast, gamma, noise), each with ``intensity_prob``;
    ``seeds`` holds 9 stateless seeds. Shared by the 2D and 3D (:mod:`kerasunet.patches`) readers."""
    p = settings.intensity_prob
    shift = _uniform(seeds[0], -settings.brightness, settings.brightness)
    image = maybe(seeds[1], p, lambda x: x + shift * tf.cast(x > tf.reduce_min(x), x.dtype), image)
    factor = _uniform(seeds[2], *settings.contrast_range)
    image = maybe(seeds[3], p, lambda x: (x - tf.reduce_mean(x)) * factor + tf.reduce_mean(x), image)
    gamma = _uniform(seeds[4], *settings.gamma_range)
    image = maybe(seeds[5], p, lambda x: _gamma(x, gamma), image)
    std = _uniform(seeds[6], 0.0, settings.noise_std)
    return maybe(seeds[7], p, lambda x: x + tf.random.stateless_normal(tf.shape(x), seeds[8]) * std, image)


def augment(image, target, settings: AugmentSettings, seed):
    """Augments one example.

    Args:
        image: float32 ``(H, W, C)``, normalised.
        target: float32 ``(H, W, N)`` with values in {0, 1}.
        settings: what to apply and how strongly.
        seed: int32 tensor of shape ``(2,)`` (stateless randomness).

    Returns:
        ``(image, target)`` with the same shapes; target values stay in {0, 1}.
    """
    seeds = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), 20))
    image, target = _flip_rot90(image, target, seeds[0:3], settings)
    image, target = maybe(seeds[3], settings.affine_prob,
                           lambda x, y: _rotate_scale(x, y, seeds[4:6], settings), image, target)
    image, target = maybe(seeds[6], settings.elastic_prob,
                           lambda x, y: _elastic(x, y, seeds[7:8], settings), image, target)
    return intensity(image, seeds[8:17], settings), target
