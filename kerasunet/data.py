"""The tf.data reader of a records folder written by ``kerasunet build-records``.

Pipeline: interleave shard files -> parse -> decode -> normalise -> (resize / pad) ->
augment (training only) -> shuffle -> batch -> prefetch. Everything runs inside tf.data.

Output contract: batches of ``(image, labels)``: ``image`` float32 ``[B, H, W, C]``
normalised, ``labels`` the uint8 label map ``[B, H, W]`` of the centre slices (0 background,
then the modality's structures, ``kerasunet.core.labels``). The label map stays uint8 all the
way to the model's device (a quarter of the bytes of one float32 channel); the training and
validation steps (``kerasunet.steps``) expand it into the float32 multi-label targets
``[B, H, W, N]`` the loss and metrics take, with :func:`targets_from_labels`. Expanded in
tf.data, the 8-byte-per-pixel targets were most of the reader's cost at 512x512
(``benchmarks/README.md``).

* Normalisation uses each example's own case statistics (``image/norm_stats``) and
  :func:`kerasunet.core.preprocessing.normalize`, the same formula predict and export use.
* ``image_size=(H, W)`` *resizes* (bilinear image, nearest-neighbour mask) rather than
  crops, so the whole field of view is kept; predict must resize its output back.
* ``pad_to_multiple=m`` pads bottom/right to the next multiple of m with the example's
  normalised minimum, ``(lo - mean) / std`` (the value of voxels at or below the window
  floor, i.e. background), and with 0 in the targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from kerasunet.core.labels import label_values, targets_from_labels_np
from kerasunet.core.preprocessing import normalize
from kerasunet.core.records_format import MANIFEST_FILE, file_sha256
from tfrecords_builder.features import decode_example, parse_example, parse_examples

AUTOTUNE = tf.data.AUTOTUNE


class RecordsError(ValueError):
    """A records folder or split that cannot be read. The message names the path."""


def read_manifest(records_dir: str | Path) -> dict:
    """Reads ``records_dir/manifest.json``.

    Raises:
        RecordsError: the manifest is missing or unreadable.
    """
    path = Path(records_dir) / MANIFEST_FILE
    if not path.exists():
        raise RecordsError(f"{path}: not found (build it with `kerasunet build-records`)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordsError(f"{path}: unreadable ({exc})") from None


def split_files(records_dir: str | Path, manifest: dict, split: str) -> list[str]:
    """The shard paths of a split. Raises RecordsError when the split is missing or empty."""
    entry = manifest["splits"].get(split)
    if not entry or entry["num_examples"] == 0:
        raise RecordsError(f"{Path(records_dir) / MANIFEST_FILE}: split {split!r} is empty "
                           f"(splits with examples: {sorted(manifest['splits'])})")
    return [str(Path(records_dir) / s["file"]) for s in entry["shards"]]


def targets_from_labels(label, outputs, label_outputs=None):
    """uint8 label map ``(...)`` -> float32 targets ``(..., N)`` (tf twin of labels.targets_from_labels_np).

    One table lookup per voxel (row = label value), cheaper than comparing per channel;
    the builder guarantees label values are 0 or a value of ``label_outputs`` (default
    ``outputs``; the records manifest's ``outputs``).
    """
    held = label_outputs if label_outputs is not None else outputs
    table = targets_from_labels_np(np.arange(len(label_values(held)) + 1), outputs, held)
    return tf.gather(tf.constant(table), tf.cast(label, tf.int32))


def record_dataset(records_dir, manifest: dict, split: str, training: bool, seed):
    """The serialised examples of a split's shards, each shard held to the manifest's count.

    A shard cut exactly at a record boundary reads as a normal end of file, so each shard's
    count is asserted (``FailedPreconditionError`` at its end, without the file's name: the
    training loop's ``unreadable_shard`` finds the shard, as for any other read error).
    """
    files = split_files(records_dir, manifest, split)
    counts = [shard["num_examples"] for shard in manifest["splits"][split]["shards"]]
    ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(counts, tf.int64)))
    if training:
        ds = ds.shuffle(len(files), seed=seed)
    compression = manifest.get("compression") or ""

    def shard(path, count):
        records = tf.data.TFRecordDataset(path, compression_type=compression)
        return records.apply(tf.data.experimental.assert_cardinality(count))

    return ds.interleave(shard, cycle_length=min(len(files), 8), num_parallel_calls=AUTOTUNE,
                         deterministic=not training)


def oversample(parsed, fraction: float, seed, repeat: bool):
    """Draws ``fraction`` of the stream from tumour slices (nnU-Net style foreground oversampling).

    Without ``repeat`` an epoch ends when the plain stream runs out, so it holds every
    slice once plus the extra tumour draws.
    """
    tumour = parsed.filter(lambda p: p["image/has_tumour"] > 0).repeat()
    plain = parsed.repeat() if repeat else parsed
    return tf.data.Dataset.sample_from_datasets([plain, tumour], weights=[1.0 - fraction, fraction],
                                                seed=seed, stop_on_empty_dataset=not repeat)


def _pad_to_multiple(image, label, stats, multiple: int):
    """Pads bottom/right to a multiple; one example ``(H, W, C)`` or a batch ``(B, H, W, C)``.

    The image gets its normalised clip floor, the label map (``(H, W, 1)`` or ``(B, H, W, 1)``)
    background (0).
    """
    shape, rank = tf.shape(image), image.shape.rank
    pad_h = (-shape[-3]) % multiple
    pad_w = (-shape[-2]) % multiple
    floor = (stats[..., 0] - stats[..., 2]) / stats[..., 3]  # the normalised clip floor, per example
    floor = tf.reshape(floor, tf.concat([tf.shape(floor), [1, 1, 1]], 0))
    paddings = [[0, 0]] * (rank - 3) + [[0, pad_h], [0, pad_w], [0, 0]]
    return tf.pad(image - floor, paddings) + floor, tf.pad(label, paddings)


def _static_hw(manifest: dict, split: str, image_size, pad_to_multiple):
    """The (H, W) every batch will have, or None where the split's cases differ."""
    if image_size is not None:
        shapes = {tuple(image_size)}
    else:
        shapes = {tuple(manifest["cases"][c]["shape"][:2]) for c in manifest["splits"][split]["cases"]}
    if len(shapes) != 1:
        return (None, None)
    (h, w), m = shapes.pop(), pad_to_multiple or 1
    return (-(-h // m) * m, -(-w // m) * m)


def _example_fn(manifest: dict, image_size, pad_to_multiple):
    """parse -> decode -> normalise -> resize/pad, as one map function.

    The label map carries a channel axis of 1 (``(H, W, 1)``) until :func:`with_static_shape`,
    so resizing, padding and augmentation treat it as a one-channel image.
    """
    channels = manifest["channels"]
    # One XLA kernel instead of three passes (clip, subtract, divide) over each 1 MiB slice:
    # twice the reader's rate at 512x512 on CPU (benchmarks/README.md). Compiled per shape.
    normalize_xla = tf.function(normalize, jit_compile=True)

    def fn(parsed):
        ex = decode_example(parsed, channels)
        image = normalize_xla(ex["image"], ex["norm_stats"])
        label = ex["label"][..., None]
        if image_size is not None:
            image = tf.image.resize(image, image_size, method="bilinear")
            label = tf.image.resize(label, image_size, method="nearest")  # stays uint8
        if pad_to_multiple:
            image, label = _pad_to_multiple(image, label, ex["norm_stats"], pad_to_multiple)
        return image, label

    return fn


def get_dataset(records_dir, split: str, batch_size: int, training: bool, *, image_size=None,
                pad_to_multiple=None, augment=None, oversample_tumour: float = 0.0, seed=None,
                repeat: bool = False, drop_remainder=None, shuffle_buffer: int = 256) -> tf.data.Dataset:
    """Batches of ``(image [B, H, W, C] float32 normalised, labels [B, H, W] uint8)`` from one split.

    The labels are the records' label maps (module docstring); :func:`targets_from_labels`
    turns them into the float32 targets ``[B, H, W, N]`` on the device that trains.

    Args:
        records_dir: folder with ``manifest.json`` and the shards.
        split: "train", "val" or "test".
        batch_size: examples per batch.
        training: shuffle files and examples, augment, non-deterministic order for speed.
            When False the order is the stored order (cases, then slices).
        image_size: ``(H, W)`` to resize to (bilinear image, nearest mask).
        pad_to_multiple: pad bottom/right to the next multiple (e.g. 16 for a depth-4 U-Net).
        augment: ``kerasunet.augment.AugmentSettings``; applied only when training.
        oversample_tumour: fraction of the stream drawn from slices with tumour (training only).
        seed: seed for file order, shuffling, augmentation and oversampling.
        repeat: repeat forever (then use ``steps_per_epoch``).
        drop_remainder: drop the last short batch; defaults to ``training``.
        shuffle_buffer: examples in the shuffle buffer (each holds a decoded slice).

    Raises:
        RecordsError: missing manifest or empty split, or oversampling a split without tumour.
        ValueError: invalid arguments.
    """
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    if not 0 <= oversample_tumour < 1:
        raise ValueError(f"Expected 0 <= oversample_tumour < 1. Received: oversample_tumour={oversample_tumour}")
    if pad_to_multiple is not None and pad_to_multiple < 1:
        raise ValueError(f"Expected pad_to_multiple >= 1. Received: pad_to_multiple={pad_to_multiple}")
    manifest = read_manifest(records_dir)
    split_files(records_dir, manifest, split)  # RecordsError for an empty split, before any tf.data
    drop = training if drop_remainder is None else drop_remainder
    height, width = _static_hw(manifest, split, image_size, pad_to_multiple)
    per_example = training and (augment is not None or oversample_tumour > 0)
    if not per_example and _static_hw(manifest, split, None, None) != (None, None):
        # Fast path: shuffle and batch the serialised records, then parse, decode and
        # normalise whole batches (one op per batch instead of per slice).
        ds = record_dataset(records_dir, manifest, split, training, seed)
        if repeat:  # before the shuffle: its buffer then never drains and refills at an epoch's end
            ds = ds.repeat()
        if training:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=drop)
        fn = _example_fn(manifest, image_size, pad_to_multiple)
        ds = ds.map(lambda s: fn(parse_examples(s)), num_parallel_calls=AUTOTUNE, deterministic=not training)
        return with_static_shape(ds, manifest, batch_size if drop else None, height, width)
    parsed = record_dataset(records_dir, manifest, split, training, seed).map(parse_example, num_parallel_calls=AUTOTUNE,
                                                           deterministic=not training)
    if training and oversample_tumour > 0:
        if manifest["class_stats"][split]["tumour_slices"] == 0:
            raise RecordsError(f"{records_dir}: split {split!r} has no tumour slices to oversample")
        parsed = oversample(parsed, oversample_tumour, seed, repeat)
    ds = parsed.map(_example_fn(manifest, image_size, pad_to_multiple),
                    num_parallel_calls=AUTOTUNE, deterministic=not training)
    if training and augment is not None:
        ds = augmented(ds, augment, seed)
    if repeat and not (training and oversample_tumour > 0):  # (oversampling repeats its own streams)
        ds = ds.repeat()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop, num_parallel_calls=AUTOTUNE,
                  deterministic=not training)
    return with_static_shape(ds, manifest, batch_size if drop else None, height, width)


def with_static_shape(ds, manifest: dict, batch, height, width):
    """Batches with static shapes (``batch`` None for a ragged last batch), then prefetch."""
    ds = ds.map(lambda x, y: (tf.ensure_shape(x, [batch, height, width, manifest["channels"]]),
                              tf.ensure_shape(y[..., 0], [batch, height, width])))
    return ds.prefetch(AUTOTUNE)


def augmented(ds, settings, seed):
    """Un-batched ``(image, label)`` examples augmented (:func:`kerasunet.augment.augment`) with a
    fresh stateless seed pair each, drawn from ``seed``."""
    from kerasunet.augment import augment

    seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
    seeds = seeds.map(lambda s: tf.cast(s % (2**31 - 1), tf.int32))
    return tf.data.Dataset.zip((ds, seeds)).map(
        lambda xy, s: augment(xy[0], xy[1], settings, s), num_parallel_calls=AUTOTUNE, deterministic=False)


def load_split_examples(records_dir, split: str, limit: int | None = None):
    """Yields the stored examples of a split as numpy dicts, in stored order (for tests and tools).

    Each dict holds ``key``, ``case_id``, ``slice_index``, ``image`` (raw float32 H x W x C),
    ``label`` (uint8 H x W), ``norm_stats``, ``spacing`` and ``has_tumour``.
    """
    manifest = read_manifest(records_dir)
    ds = record_dataset(records_dir, manifest, split, False, None).map(lambda s: decode_example(parse_example(s)))
    if limit is not None:
        ds = ds.take(limit)
    for ex in ds.as_numpy_iterator():
        yield {"key": ex["source_id"].decode(), "case_id": ex["case_id"].decode(),
               "slice_index": int(ex["slice_index"]), "image": ex["image"], "label": ex["label"],
               "norm_stats": ex["norm_stats"], "spacing": ex["spacing"], "has_tumour": bool(ex["has_tumour"])}


def verify_records(records_dir) -> list[str]:
    """Checks every shard's SHA-256 and example count against the manifest.

    Returns:
        One line per problem, each starting with the shard's path; empty when all is well.
    """
    manifest = read_manifest(records_dir)
    problems = []
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            path = Path(records_dir) / shard["file"]
            problems += _verify_shard(path, shard, manifest.get("compression") or "")
    return problems


def _verify_shard(path: Path, shard: dict, compression: str) -> list[str]:
    if not path.exists():
        return [f"{path}: missing"]
    digest = file_sha256(path)
    if digest != shard["sha256"]:
        return [f"{path}: SHA-256 mismatch (expected {shard['sha256'][:12]}…, got {digest[:12]}…)"]
    try:
        count = sum(1 for _ in tf.data.TFRecordDataset(str(path), compression_type=compression))
    except tf.errors.OpError as exc:
        return [f"{path}: unreadable records ({exc.message.splitlines()[0]})"]
    if count != shard["num_examples"]:
        return [f"{path}: holds {count} examples, manifest says {shard['num_examples']}"]
    return []

