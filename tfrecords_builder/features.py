"""The TFRecord feature spec, declared once: the writer and the tf.data reader both build on it.

One example is one axial slice in canonical RAS+ voxel order (``data[:, :, k]``), so the
image height H runs along the canonical x axis and the width W along y. The image holds
raw intensities (HU for CT, scanner units for MRI); the reader normalises them with the
case's ``image/norm_stats`` (see ``kerasunet.core.preprocessing``).

Volume records (``build-records --volumes``, :data:`VOLUME_FEATURES`) hold one case per
example, in ``(D, H, W)`` order: D the axial (canonical z) axis, H and W the canonical x and
y axes of the slices, so a volume is ``np.moveaxis(canonical, 2, 0)`` of the crop and its
slice ``d`` is the 2D records' slice of the same index (:mod:`kerasunet.planner`'s order).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kerasunet.core.labels import STRUCTURES


@dataclass(frozen=True)
class Feature:
    """One entry of the spec.

    Attributes:
        kind: "bytes", "int" or "float".
        length: 0 for a scalar, n for a fixed-length vector.
        doc: what the value holds.
    """

    kind: str
    length: int
    doc: str


FEATURES = {
    "image/encoded": Feature("bytes", 0, "raw little-endian float32 bytes of the H x W x C slice stack"),
    "image/height": Feature("int", 0, "H (canonical x)"),
    "image/width": Feature("int", 0, "W (canonical y)"),
    "image/channels": Feature("int", 0, "C = 2 * context + 1; the centre channel is the labelled slice"),
    "image/segmentation/class/encoded": Feature("bytes", 0, "raw uint8 label map H x W of the centre slice"),
    "image/source_id": Feature("bytes", 0, "stable key <case_id>/<slice_index>"),
    "image/case_id": Feature("bytes", 0, "case id"),
    "image/slice_index": Feature("int", 0, "axial slice index in canonical order"),
    "image/spacing": Feature("float", 3, "voxel size in mm, canonical axis order"),
    "image/norm_stats": Feature("float", 4, "the case's [lo, hi, mean, std] (preprocessing.case_stats)"),
    "image/has_tumour": Feature("int", 0, "1 if the centre slice contains tumour (for oversampling)"),
}

# Foreground voxels sampled per structure and volume, so a reader can centre patches on them
# without scanning the volume.
VOLUME_POINTS = 64

VOLUME_FEATURES = {
    "volume/encoded": Feature("bytes", 0, "raw little-endian float32 bytes of the D x H x W x C volume"),
    "volume/depth": Feature("int", 0, "D (canonical z, the slice axis)"),
    "volume/height": Feature("int", 0, "H (canonical x)"),
    "volume/width": Feature("int", 0, "W (canonical y)"),
    "volume/channels": Feature("int", 0, "C = 1"),
    "volume/segmentation/class/encoded": Feature("bytes", 0, "raw uint8 label map D x H x W, the project's values"),
    "volume/source_id": Feature("bytes", 0, "stable key: the case id"),
    "volume/case_id": Feature("bytes", 0, "case id"),
    "volume/spacing": Feature("float", 3, "voxel size in mm of the stored volume, (D, H, W)"),
    "volume/crop_offset": Feature("int", 3, "(D, H, W) index in the canonical source of the crop's first voxel"),
    "volume/norm_stats": Feature("float", 4, "the case's [lo, hi, mean, std] (preprocessing.case_stats)"),
    **{f"volume/points/{name}": Feature("int", 3 * VOLUME_POINTS,
                                        f"{VOLUME_POINTS} (d, h, w) {name} voxels of the stored volume, "
                                        "flattened; drawn without replacement, repeated when fewer; -1 if none")
       for name in STRUCTURES},
    **{f"volume/points/{name}/count": Feature("int", 0, f"distinct {name} points (0: no {name} voxel)")
       for name in STRUCTURES},
}
"""One example per case: the volume cropped around the liver (``tfrecords_builder.volumes``)."""

_TF_DTYPES = {"bytes": "string", "int": "int64", "float": "float32"}


def _tf():
    """TensorFlow, imported on first use: the spec above is TensorFlow-free, so the build's
    worker processes (which import :data:`VOLUME_POINTS`) start without it."""
    import tensorflow as tf

    return tf


def example_key(case_id: str, slice_index: int) -> str:
    """The stable key of a slice: ``<case_id>/<slice_index>``."""
    return f"{case_id}/{int(slice_index)}"


def _to_feature(key: str, spec: Feature, value):
    tf = _tf()
    if spec.kind == "bytes":
        data = value if isinstance(value, bytes) else str(value).encode()
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
    values = np.atleast_1d(np.asarray(value)).ravel()
    if len(values) != max(spec.length, 1):
        raise ValueError(f"Expected {max(spec.length, 1)} value(s) for {key!r}. Received: {key}={value!r}")
    if spec.kind == "int":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def serialize_example(values: dict, features: dict = FEATURES) -> bytes:
    """Serialises one example; ``values`` must hold exactly the keys of ``features``.

    Args:
        values: the example's values by key.
        features: the spec, :data:`FEATURES` (slices) or :data:`VOLUME_FEATURES`.
    """
    if set(values) != set(features):
        raise ValueError(f"Expected the keys {sorted(features)}. Received: keys={sorted(values)}")
    tf = _tf()
    feature = {key: _to_feature(key, spec, values[key]) for key, spec in features.items()}
    # deterministic: map fields in key order, so a rebuild gives byte-identical shards
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def slice_example(case_id: str, slice_index: int, image: np.ndarray, label: np.ndarray,
                  spacing, norm_stats, has_tumour: bool) -> bytes:
    """Serialises one slice.

    Args:
        case_id: the case the slice comes from.
        slice_index: its axial index in canonical order.
        image: raw intensities, ``(H, W, C)``.
        label: label map of the centre slice, ``(H, W)``, values fit in uint8.
        spacing: voxel size in mm (3 values).
        norm_stats: the case's ``[lo, hi, mean, std]``.
        has_tumour: whether the centre slice contains tumour.
    """
    if image.ndim != 3 or label.shape != image.shape[:2]:
        raise ValueError(f"Expected image (H, W, C) and label (H, W). "
                         f"Received: image.shape={image.shape}, label.shape={label.shape}")
    height, width, channels = image.shape
    return serialize_example({
        "image/encoded": np.ascontiguousarray(image, dtype="<f4").tobytes(),
        "image/height": height,
        "image/width": width,
        "image/channels": channels,
        "image/segmentation/class/encoded": np.ascontiguousarray(label, dtype=np.uint8).tobytes(),
        "image/source_id": example_key(case_id, slice_index),
        "image/case_id": case_id,
        "image/slice_index": slice_index,
        "image/spacing": spacing,
        "image/norm_stats": norm_stats,
        "image/has_tumour": int(bool(has_tumour)),
    })


def volume_example(case_id: str, image: np.ndarray, label: np.ndarray, spacing, crop_offset, norm_stats,
                   points: dict) -> bytes:
    """Serialises one volume.

    Args:
        case_id: the case; also the example's key.
        image: raw intensities, ``(D, H, W)`` or ``(D, H, W, C)``.
        label: label map ``(D, H, W)`` in the project's values (fits in uint8).
        spacing: voxel size in mm of ``image``, ``(D, H, W)``.
        crop_offset: ``(D, H, W)`` index of the crop's first voxel in the canonical source.
        norm_stats: the case's ``[lo, hi, mean, std]``.
        points: per structure of ``STRUCTURES``, ``(VOLUME_POINTS, 3)`` int voxel indices
            and the number of distinct ones: ``{name: (points, count)}``.
    """
    image = image[..., None] if image.ndim == 3 else image
    if image.ndim != 4 or label.shape != image.shape[:3]:
        raise ValueError(f"Expected image (D, H, W[, C]) and label (D, H, W). "
                         f"Received: image.shape={image.shape}, label.shape={label.shape}")
    depth, height, width, channels = image.shape
    return serialize_example({
        "volume/encoded": np.ascontiguousarray(image, dtype="<f4").tobytes(),
        "volume/depth": depth,
        "volume/height": height,
        "volume/width": width,
        "volume/channels": channels,
        "volume/segmentation/class/encoded": np.ascontiguousarray(label, dtype=np.uint8).tobytes(),
        "volume/source_id": case_id,
        "volume/case_id": case_id,
        "volume/spacing": spacing,
        "volume/crop_offset": crop_offset,
        "volume/norm_stats": norm_stats,
        **{f"volume/points/{name}": points[name][0] for name in STRUCTURES},
        **{f"volume/points/{name}/count": points[name][1] for name in STRUCTURES},
    }, VOLUME_FEATURES)


def parse_spec(features: dict) -> dict:
    """The ``tf.io.parse_*`` spec of a feature spec (fixed-length features only)."""
    tf = _tf()
    return {key: tf.io.FixedLenFeature([spec.length] if spec.length else [], getattr(tf, _TF_DTYPES[spec.kind]))
            for key, spec in features.items()}


@functools.cache
def _parse_specs() -> dict:
    return {"PARSE_SPEC": parse_spec(FEATURES), "VOLUME_PARSE_SPEC": parse_spec(VOLUME_FEATURES)}


def __getattr__(name: str):
    """``PARSE_SPEC`` and ``VOLUME_PARSE_SPEC``, the parsers' specs of :data:`FEATURES` and
    :data:`VOLUME_FEATURES`, built (and TensorFlow imported) when first asked for."""
    if name in ("PARSE_SPEC", "VOLUME_PARSE_SPEC"):
        return _parse_specs()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_example(serialized):
    """Parses one serialised example into a dict of tensors keyed like :data:`FEATURES`."""
    return _tf().io.parse_single_example(serialized, _parse_specs()["PARSE_SPEC"])


def parse_examples(serialized):
    """Parses a batch (vector) of serialised examples at once; the reader's fast path."""
    return _tf().io.parse_example(serialized, _parse_specs()["PARSE_SPEC"])


def decode_example(parsed: dict, channels: int | None = None) -> dict:
    """Decodes the raw bytes of a parsed example (the decoder; no resizing or augmentation).

    Works on one example (:func:`parse_example`) or on a batch (:func:`parse_examples`) whose
    examples share one height and width; tensors then get a leading batch axis.

    Args:
        parsed: the output of :func:`parse_example` or :func:`parse_examples`.
        channels: the channel count, when known, to give the image a static last dimension.

    Returns:
        ``image`` float32 ``(H, W, C)`` raw intensities, ``label`` uint8 ``(H, W)``,
        ``norm_stats`` float32 ``(4,)``, ``has_tumour`` bool, ``spacing``, ``source_id``,
        ``case_id`` and ``slice_index``.
    """
    tf = _tf()
    lead = tf.shape(parsed["image/height"])  # [] for one example, [B] for a batch
    first = lambda key: tf.cast(tf.reshape(parsed[key], [-1])[0], tf.int32)  # noqa: E731
    height, width = first("image/height"), first("image/width")
    image = tf.reshape(tf.io.decode_raw(parsed["image/encoded"], tf.float32),
                       tf.concat([lead, [height, width, first("image/channels")]], 0))
    if channels is not None:
        image = tf.ensure_shape(image, [None] * (image.shape.rank - 1) + [channels])
    label = tf.reshape(tf.io.decode_raw(parsed["image/segmentation/class/encoded"], tf.uint8),
                       tf.concat([lead, [height, width]], 0))
    return {
        "image": image,
        "label": label,
        "norm_stats": parsed["image/norm_stats"],
        "has_tumour": parsed["image/has_tumour"] > 0,
        "spacing": parsed["image/spacing"],
        "source_id": parsed["image/source_id"],
        "case_id": parsed["image/case_id"],
        "slice_index": parsed["image/slice_index"],
    }


def parse_volume(serialized):
    """Parses one serialised volume example into a dict of tensors keyed like :data:`VOLUME_FEATURES`."""
    return _tf().io.parse_single_example(serialized, _parse_specs()["VOLUME_PARSE_SPEC"])


def decode_volume(parsed: dict) -> dict:
    """Decodes one parsed volume example (the decoder; no cropping, patching or augmentation).

    Returns:
        ``image`` float32 ``(D, H, W, C)`` raw intensities, ``label`` uint8 ``(D, H, W)``,
        ``spacing`` float32 ``(3,)``, ``crop_offset`` int64 ``(3,)``, ``norm_stats`` float32
        ``(4,)``, ``points`` ``{structure: int32 (VOLUME_POINTS, 3)}``, ``point_counts``
        ``{structure: int32 scalar}``, ``source_id`` and ``case_id``.
    """
    tf = _tf()
    size = tf.cast(tf.stack([parsed["volume/depth"], parsed["volume/height"], parsed["volume/width"]]), tf.int32)
    channels = tf.cast(parsed["volume/channels"], tf.int32)
    return {
        "image": tf.reshape(tf.io.decode_raw(parsed["volume/encoded"], tf.float32), tf.concat([size, [channels]], 0)),
        "label": tf.reshape(tf.io.decode_raw(parsed["volume/segmentation/class/encoded"], tf.uint8), size),
        "spacing": parsed["volume/spacing"],
        "crop_offset": parsed["volume/crop_offset"],
        "norm_stats": parsed["volume/norm_stats"],
        "points": {name: tf.reshape(tf.cast(parsed[f"volume/points/{name}"], tf.int32), [VOLUME_POINTS, 3])
                   for name in STRUCTURES},
        "point_counts": {name: tf.cast(parsed[f"volume/points/{name}/count"], tf.int32) for name in STRUCTURES},
        "source_id": parsed["volume/source_id"],
        "case_id": parsed["volume/case_id"],
    }
