"""The tf.data reader of volume records (``build-records --volumes``): 3D patches.

Pipeline: interleave shard files -> (shuffle volumes) -> parse -> decode -> pad to the patch
-> sample patches -> normalise -> augment (training only) -> shuffle patches -> batch ->
prefetch. Everything runs inside tf.data with stateless random ops (no ``py_function``); the
same ``seed`` gives the same patches.

Output contract, as the 2D reader's (:mod:`kerasunet.data`) with a depth axis: batches of
``(image, labels)``, ``image`` float32 ``[B, D, H, W, C]`` normalised with the case's
statistics (:func:`kerasunet.core.preprocessing.normalize`), ``labels`` the uint8 label map
``[B, D, H, W]`` in the records' values (:func:`kerasunet.data.targets_from_labels` expands
it on the device). Axis order ``(D, H, W)``: D the slice axis (see
:mod:`tfrecords_builder.volumes`).

* **Training**: ``patches_per_volume`` patches per decoded volume. Each is centred on a
  foreground voxel with probability ``foreground_share`` (default one third, as nnU-Net
  oversamples foreground): a tumour voxel from the volume's stored points when it has
  tumour, else a liver voxel; otherwise (and for volumes without either) its start is
  uniform. A patch always lies inside the (padded) volume: a centred patch is shifted
  inwards at the borders, so its voxel stays inside but off-centre.
* **Validation** (``training=False``): deterministic patches, one centred on the volume's
  centre (volumes are cropped around the liver, so about the liver's centre) and, for a
  volume with tumour, one centred on its first stored tumour point.
* Volumes smaller than the patch are padded at the end of each axis with the case's clip
  floor (background after normalisation) and label 0.
* Augmentation (``augment``, a :class:`kerasunet.augment.AugmentSettings`): flips of each of
  the three axes with ``flip_prob``, a small in-plane rotation and scaling (the same for
  every slice, so slices stay aligned) with ``affine_prob``, and the intensity transforms of
  the 2D reader. Elastic deformation and 90-degree rotations are 2D only.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from kerasunet.augment import AugmentSettings, affine_matrix, intensity, maybe
from kerasunet.core.preprocessing import normalize
from kerasunet.data import AUTOTUNE, RecordsError, read_manifest, record_dataset
from tfrecords_builder.features import decode_volume, parse_volume

PATCHES_PER_VOLUME = 2
"""Training patches drawn from each decoded volume (decoding a CT crop costs more than a patch)."""

PATCH_AUGMENT = AugmentSettings(flip_prob=0.5)
"""3D training augmentation: nnU-Net's mirroring on every axis, plus the 2D reader's small
in-plane rotation/scaling and intensity transforms. Patches of a liver crop carry less of the
left/right position cue that makes flips harmful on whole 2D slices (``AugmentSettings``)."""


def parse_patch_size(text: str) -> tuple[int, int, int]:
    """``"48x128x128"`` -> ``(48, 128, 128)``.

    Raises:
        ValueError: not three positive integers joined by ``x``.
    """
    try:
        size = tuple(int(v) for v in str(text).lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"Expected a patch size DxHxW of three positive integers. Received: patch_size={text!r}")
    return size


def volume_manifest(records_dir) -> dict:
    """The manifest of a volume records folder.

    Raises:
        RecordsError: no manifest, or it holds slice records.
    """
    manifest = read_manifest(records_dir)
    if manifest.get("kind", "slices") != "volumes":
        raise RecordsError(f"{records_dir}: holds slice records; 3D training reads volume records "
                           "(build them with `kerasunet build-records --volumes`)")
    return manifest


def records_spacing(manifest: dict, split: str = "train") -> tuple[float, float, float]:
    """The median voxel spacing ``(D, H, W)`` in mm of a split's stored volumes (the pooling plan's)."""
    spacings = np.array([manifest["cases"][c]["spacing"] for c in manifest["splits"][split]["cases"]], float)
    return tuple(round(float(s), 4) for s in np.median(spacings, axis=0))


def check_patch_args(batch_size: int, patch_size, foreground_share: float, patches_per_volume: int,
                     augment) -> tuple[int, int, int]:
    """Checks :func:`get_patch_dataset`'s arguments; returns the patch size as a tuple."""
    patch = tuple(int(p) for p in patch_size)
    checks = ((batch_size >= 1, "batch_size >= 1", "batch_size", batch_size),
              (len(patch) == 3 and min(patch) >= 1, "patch_size of 3 positive sizes (D, H, W)",
               "patch_size", patch),
              (0 <= foreground_share <= 1, "0 <= foreground_share <= 1", "foreground_share", foreground_share),
              (patches_per_volume >= 1, "patches_per_volume >= 1", "patches_per_volume", patches_per_volume),
              (augment is None or (augment.elastic_prob == 0 and not augment.rot90),
               "augment without elastic deformation or rot90 (2D only)", "augment", augment))
    for ok, expected, name, value in checks:
        if not ok:
            raise ValueError(f"Expected {expected}. Received: {name}={value!r}")
    return patch


def get_patch_dataset(records_dir, split: str, batch_size: int, training: bool, patch_size, *,
                      foreground_share: float = 1 / 3, augment: AugmentSettings | None = None,
                      patches_per_volume: int = PATCHES_PER_VOLUME, seed=None, repeat: bool = False,
                      drop_remainder=None, shuffle_buffer: int = 64) -> tf.data.Dataset:
    """Batches of ``(image [B, D, H, W, C] float32 normalised, labels [B, D, H, W] uint8)`` patches.

    Args:
        records_dir: a volume records folder (``build-records --volumes``).
        split: "train", "val" or "test".
        batch_size: patches per batch.
        training: random patches (module docstring), shuffled, augmented; else the
            deterministic validation patches in stored order.
        patch_size: ``(D, H, W)`` in voxels.
        foreground_share: training: chance a patch is centred on a foreground voxel.
        augment: :class:`kerasunet.augment.AugmentSettings` (e.g. :data:`PATCH_AUGMENT`);
            applied only when training; None for none.
        patches_per_volume: training: patches drawn from each decoded volume.
        seed: seed for file order, shuffling, patch positions and augmentation.
        repeat: repeat forever (then use ``steps_per_epoch``).
        drop_remainder: drop the last short batch; defaults to ``training``.
        shuffle_buffer: patches in the shuffle buffer.

    Raises:
        RecordsError: missing manifest, slice records, or an empty split.
        ValueError: invalid arguments.
    """
    patch = check_patch_args(batch_size, patch_size, foreground_share, patches_per_volume, augment)
    manifest = volume_manifest(records_dir)
    channels = int(manifest.get("channels", 1))
    ds = record_dataset(records_dir, manifest, split, training, seed)
    if repeat:
        ds = ds.repeat()
    if training:
        ds = ds.shuffle(8, seed=seed, reshuffle_each_iteration=True)  # volumes are large: a small buffer
    ds = ds.map(lambda s: padded_volume(decode_volume(parse_volume(s)), patch), num_parallel_calls=AUTOTUNE,
                deterministic=not training)
    if training:
        seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True).map(
            lambda s: tf.cast(s % (2**31 - 1), tf.int32))

        def sample(ex, volume_seed):
            return training_patches(ex, patch, volume_seed, foreground_share, patches_per_volume, augment)

        ds = tf.data.Dataset.zip((ds, seeds)).map(sample, num_parallel_calls=AUTOTUNE, deterministic=False)
        ds = ds.unbatch().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        ds = ds.flat_map(lambda ex: validation_patches(ex, patch))
    drop = training if drop_remainder is None else drop_remainder
    batch = batch_size if drop else None
    ds = ds.batch(batch_size, drop_remainder=drop)
    ds = ds.map(lambda x, y: (tf.ensure_shape(x, [batch, *patch, channels]), tf.ensure_shape(y, [batch, *patch])))
    return ds.prefetch(AUTOTUNE)


def padded_volume(ex: dict, patch) -> dict:
    """``ex`` with image and label padded at the end of each axis to at least ``patch``.

    The image gets the case's clip floor ``lo`` (background once normalised), the label 0.
    """
    pad = tf.maximum(tf.constant(patch, tf.int32) - tf.shape(ex["label"]), 0)
    paddings = tf.stack([tf.zeros(3, tf.int32), pad], axis=1)
    image = tf.pad(ex["image"], tf.concat([paddings, [[0, 0]]], 0), constant_values=ex["norm_stats"][0])
    return {**ex, "image": image, "label": tf.pad(ex["label"], paddings)}


def foreground_point(ex: dict, seed):
    """A stored foreground voxel ``(d, h, w)``: tumour if the volume has any, else liver.

    Returns:
        ``(point int32 (3,), found bool)``; ``found`` is False for a volume with neither.
    """
    has_tumour = ex["point_counts"]["tumour"] > 0
    points = tf.where(has_tumour, ex["points"]["tumour"], ex["points"]["liver"])
    count = tf.where(has_tumour, ex["point_counts"]["tumour"], ex["point_counts"]["liver"])
    index = tf.random.stateless_uniform((), seed, 0, tf.maximum(count, 1), dtype=tf.int32)
    return points[index], count > 0


def centred_start(centre, size, patch):
    """The start of a patch centred on ``centre``, shifted inwards to lie inside ``size``."""
    return tf.clip_by_value(centre - tf.constant(patch, tf.int32) // 2, 0, size - tf.constant(patch, tf.int32))


def patch_start(ex: dict, patch, seed, foreground_share: float):
    """A training patch's start: centred on a foreground voxel with ``foreground_share``, else uniform."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    size = tf.shape(ex["label"])
    room = size - tf.constant(patch, tf.int32) + 1  # valid starts per axis (>= 1 after padding)
    uniform = tf.minimum(tf.cast(tf.random.stateless_uniform((3,), seeds[0]) * tf.cast(room, tf.float32),
                                 tf.int32), room - 1)
    point, found = foreground_point(ex, seeds[1])
    centred = tf.logical_and(found, tf.random.stateless_uniform((), seeds[2]) < foreground_share)
    return tf.where(centred, centred_start(point, size, patch), uniform)


def cut_patch(ex: dict, start, patch):
    """The normalised image ``(D, H, W, C)`` and label ``(D, H, W)`` of the patch at ``start``."""
    image = tf.slice(ex["image"], tf.concat([start, [0]], 0), [*patch, -1])
    label = tf.slice(ex["label"], start, list(patch))
    return normalize(image, ex["norm_stats"]), label


def training_patches(ex: dict, patch, seed, foreground_share: float, count: int, augment):
    """``count`` random patches of one volume, stacked: ``([count, D, H, W, C], [count, D, H, W])``."""
    images, labels = [], []
    for patch_seed in tf.unstack(tf.random.experimental.stateless_split(seed, count)):
        seeds = tf.random.experimental.stateless_split(patch_seed, 2)
        image, label = cut_patch(ex, patch_start(ex, patch, seeds[0], foreground_share), patch)
        if augment is not None:
            image, label = augment_patch(image, label, augment, seeds[1])
        images.append(image)
        labels.append(label)
    return tf.stack(images), tf.stack(labels)


def validation_patches(ex: dict, patch) -> tf.data.Dataset:
    """The deterministic patches of one volume: its centre, and its first tumour point if any."""
    size = tf.shape(ex["label"])
    starts = tf.stack([centred_start(size // 2, size, patch), centred_start(ex["points"]["tumour"][0], size, patch)])
    pairs = [cut_patch(ex, starts[i], patch) for i in range(2)]
    count = tf.where(ex["point_counts"]["tumour"] > 0, 2, 1)
    images, labels = tf.stack([p[0] for p in pairs]), tf.stack([p[1] for p in pairs])
    return tf.data.Dataset.from_tensor_slices((images, labels)).take(tf.cast(count, tf.int64))


def rotate_in_plane(image, label, seeds, settings: AugmentSettings):
    """One small rotation and scaling of every slice (``H, W``) about the patch's centre."""
    max_angle = settings.rotation_deg * math.pi / 180
    angle = tf.random.stateless_uniform((), seeds[0], -max_angle, max_angle)
    scale = tf.random.stateless_uniform((), seeds[1], *settings.scale_range)
    shape = tf.shape(image)
    matrix = affine_matrix(angle, scale, shape[1], shape[2])

    def transform(x, interpolation, fill):  # the slices are the op's batch
        out = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=matrix, output_shape=shape[1:3],
                                                     fill_value=fill, interpolation=interpolation,
                                                     fill_mode="CONSTANT")
        return tf.ensure_shape(out, x.shape)

    image = transform(image, "BILINEAR", tf.reduce_min(image))
    return image, transform(label[..., None], "NEAREST", 0.0)[..., 0]


def augment_patch(image, label, settings: AugmentSettings, seed):
    """Augments one patch: flips of D, H and W, an in-plane rotation/scaling, intensity.

    Args:
        image: float32 ``(D, H, W, C)``, normalised.
        label: uint8 ``(D, H, W)``.
        settings: what to apply and how strongly (elastic and rot90 are not used).
        seed: int32 ``(2,)``.

    Returns:
        ``(image, label)`` with the same shapes and dtypes.
    """
    seeds = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), 16))
    for axis in range(3):
        image, label = maybe(seeds[axis], settings.flip_prob,
                              lambda x, y, a=axis: (tf.reverse(x, [a]), tf.reverse(y, [a])), image, label)
    image, label = maybe(seeds[3], settings.affine_prob,
                          lambda x, y: rotate_in_plane(x, y, seeds[4:6], settings), image, label)
    return intensity(image, seeds[6:15], settings), label


def load_split_volumes(records_dir, split: str):
    """Yields the stored volumes of a split as numpy dicts, in stored order (for tests and tools).

    Each dict holds ``case_id``, ``image`` (raw float32 ``(D, H, W, C)``), ``label`` (uint8
    ``(D, H, W)``), ``spacing``, ``crop_offset``, ``norm_stats``, ``points`` and
    ``point_counts`` (per structure).
    """
    manifest = volume_manifest(records_dir)
    ds = record_dataset(records_dir, manifest, split, False, None).map(lambda s: decode_volume(parse_volume(s)))
    for ex in ds.as_numpy_iterator():
        yield {**{k: v for k, v in ex.items() if k not in ("source_id", "case_id")},
               "case_id": ex["case_id"].decode()}
