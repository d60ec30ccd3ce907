"""The liver-ROI cascade: stage 1 segments the liver on whole slices, stage 2 the tumour in its box.

After Christ et al. 2016 ("Automatic liver and lesion segmentation in CT using cascaded fully
convolutional neural networks"), Chlebus et al. 2018 and nnU-Net's cascade. Stage 1 is an
ordinary run. Stage 2 (``kerasunet train --stage tumour --liver-model RUN``) is a tumour-only
run (``outputs = ("tumour",)``) trained on crops of the liver's region of interest, each
resized to one fixed size (``roi_size``), so small tumours get more pixels and the network
never sees the spleen, kidneys or bowel that stage 1 already told apart.

The ROI rule, one home for training, local inference and the export graph:

* **Inference.** The liver mask is every voxel where a stage-1 channel reaches
  :data:`ROI_THRESHOLD` (the stage-1 label map ``>= 1``), reduced to its largest
  26-connected component. The ROI is that component's 3D bounding box grown by
  ``margin_mm`` on every side (``ceil(margin_mm / spacing)`` voxels per axis, clipped to
  the volume). Stage 2 runs on the slices of the box's z range, each cropped to the box's
  in-plane extent and resized (bilinear, half-pixel centres, no antialiasing: TensorFlow's
  ``tf.image.resize``) to ``roi_size``; its probabilities are resized back to the box and
  pasted into the input's geometry, 0 outside the box. The cascade's probabilities are
  ``(liver, tumour)``: stage 1's liver channel, and stage 2's tumour inside the liver
  component (0 elsewhere), so the final mask (``predict.final_labels``) is liver from stage
  1 and tumour from stage 2 inside the liver: CT values 0/1/2. An empty liver gives no box
  and no tumour.
* **Training.** The box is the case's liver box (from every liver voxel of the case's slices
  in the records, not the slice's own), grown by the margin, each edge moved by a random
  shift of up to ``jitter_mm`` (:data:`JITTER_MM`) so stage 2 tolerates stage-1 boxes that
  are a little off. Slices outside the box's z range are dropped; cases without liver are
  dropped. The records' default slice selection keeps liver slices evenly spaced over the
  whole liver, first and last included, so the z range is the case's and the in-plane box
  is that of the selected slices (a voxel or two inside the volume's; the jitter covers it).

Boxes are ``(lo, hi)`` per axis, half-open, in canonical ``(x, y, z)`` voxel order; in the
slice-major arrays of predict (``(z, x, y)``) and of the graph the same numbers apply to the
moved axes. Each numpy function used by local inference has a TensorFlow twin used by the
export graph (same arithmetic; probabilities agree to float32 rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kerasunet.core.records_format import channels_context, context_channels

ROI_SIZE = (128, 128)
MARGIN_MM = 10.0
JITTER_MM = 5.0
ROI_THRESHOLD = 0.5  # stage-1 probability that counts as liver for the ROI (not predict's --threshold)
CASCADE_OUTPUTS = ("liver", "tumour")  # the cascade's probabilities; the stage-2 run's own are ("tumour",)
_EPS = np.float32(1e-4)  # keeps ceil(margin / spacing) equal in float32 numpy and TensorFlow at integers


class CascadeError(ValueError):
    """A cascade that cannot run: the message names the run and the problem."""


@dataclass(frozen=True)
class CascadeSettings:
    """A stage-2 run's cascade, as config.json's ``cascade`` records it.

    Attributes:
        liver_model: the stage-1 run (folder or ``.keras``); its outputs include liver.
        roi_size: ``(H, W)`` every ROI is resized to (multiples of ``2**depth``).
        margin_mm: margin around the liver's box, in mm, on every side.
    """

    liver_model: str
    roi_size: tuple[int, int] = ROI_SIZE
    margin_mm: float = MARGIN_MM

    def __post_init__(self):
        if not (len(self.roi_size) == 2 and all(int(s) >= 1 for s in self.roi_size)):
            raise ValueError(f"Expected roi_size (H, W) >= 1. Received: roi_size={self.roi_size!r}")
        if not (math.isfinite(self.margin_mm) and self.margin_mm >= 0):
            raise ValueError(f"Expected margin_mm >= 0. Received: margin_mm={self.margin_mm!r}")

    def to_dict(self) -> dict:
        return {"liver_model": self.liver_model, "roi_size": [int(s) for s in self.roi_size],
                "margin_mm": float(self.margin_mm)}

    @classmethod
    def from_dict(cls, d: dict) -> "CascadeSettings":
        return cls(str(d["liver_model"]), tuple(int(s) for s in d["roi_size"]), float(d["margin_mm"]))


# --- geometry (numpy) ---------------------------------------------------------------------

def margin_voxels(spacing, margin_mm: float) -> np.ndarray:
    """``ceil(margin_mm / spacing)`` per axis, in float32 as the graph computes it."""
    ratio = np.float32(margin_mm) / np.asarray(spacing, np.float32)
    return np.maximum(np.ceil(ratio - _EPS), 0).astype(np.int64)


def mask_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(lo, hi)`` of every True voxel (half-open, per axis), or None for an empty mask."""
    if not mask.any():
        return None
    axes = range(mask.ndim)
    lo, hi = [], []
    for axis in axes:
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in axes if a != axis)))
        lo.append(hits[0])
        hi.append(hits[-1] + 1)
    return np.array(lo, np.int64), np.array(hi, np.int64)


def grow_box(box, spacing, margin_mm: float, shape) -> tuple[np.ndarray, np.ndarray]:
    """``box`` grown by ``margin_mm`` on every side (voxels per axis from ``spacing``), clipped to ``shape``."""
    lo, hi = box
    grow = margin_voxels(spacing, margin_mm)
    return np.maximum(np.asarray(lo) - grow, 0), np.minimum(np.asarray(hi) + grow, np.asarray(shape))


def liver_roi(liver: np.ndarray, spacing, margin_mm: float):
    """The ROI of a liver mask ``(x, y, z)``: ``(component, box)``, its largest component and that
    component's box plus the margin (``(lo, hi)``; None for an empty mask)."""
    from kerasunet.postprocess import largest_component

    component = largest_component(liver)
    box = mask_box(component)
    return component, None if box is None else grow_box(box, spacing, margin_mm, liver.shape)


def crop_resize_np(batch: np.ndarray, box2d, size) -> np.ndarray:
    """Crops ``(B, H, W, C)`` to the in-plane box ``((x0, y0), (x1, y1))`` and resizes it to ``size``."""
    from kerasunet.predict import resize

    (x0, y0), (x1, y1) = box2d
    return resize(batch[:, x0:x1, y0:y1, :], size)


def paste_np(roi: np.ndarray, box2d, hw) -> np.ndarray:
    """Inverse of :func:`crop_resize_np`: ``roi`` resized to the box and placed in zeros ``(B, *hw, C)``."""
    from kerasunet.predict import resize

    (x0, y0), (x1, y1) = box2d
    out = np.zeros((roi.shape[0], *hw, roi.shape[-1]), np.float32)
    out[:, x0:x1, y0:y1, :] = resize(roi, (x1 - x0, y1 - y0))
    return out


# --- geometry (TensorFlow twins, for the export graph and the training reader) ------------

def margin_voxels_tf(spacing, margin_mm: float):
    """TensorFlow twin of :func:`margin_voxels` (int32)."""
    import tensorflow as tf

    ratio = tf.constant(margin_mm, tf.float32) / tf.cast(spacing, tf.float32)
    return tf.cast(tf.maximum(tf.math.ceil(ratio - _EPS), 0.0), tf.int32)


def mask_box_tf(mask):
    """``(lo, hi)`` int32 per axis of a non-empty boolean mask (twin of :func:`mask_box`)."""
    import tensorflow as tf

    rank = mask.shape.rank
    lo, hi = [], []
    for axis in range(rank):
        hits = tf.where(tf.reduce_any(mask, axis=[a for a in range(rank) if a != axis]))[:, 0]
        lo.append(tf.reduce_min(hits))
        hi.append(tf.reduce_max(hits) + 1)
    return tf.cast(tf.stack(lo), tf.int32), tf.cast(tf.stack(hi), tf.int32)


def _max3(ids, axis: int):
    """Max of each element and its two neighbours along ``axis`` (0 beyond the ends)."""
    import tensorflow as tf

    rank = ids.shape.rank
    pad = [[0, 0]] * rank
    pad[axis] = [1, 1]
    padded = tf.pad(ids, pad)
    n = tf.shape(ids)[axis]

    def take(start):
        return tf.gather(padded, tf.range(start, start + n), axis=axis)

    return tf.maximum(tf.maximum(take(0), take(1)), take(2))


def largest_component_tf(mask, scan_order):
    """The largest 26-connected component of a boolean mask, in TensorFlow (twin of
    ``postprocess.largest_component``).

    Labels propagate as the maximum over the 3x3x3 neighbourhood (a separable max filter)
    until nothing changes, so every component ends up holding one id: ``n - first``, ``first``
    its voxel earliest in ``scan_order``. Ties in size go to the component found first in
    that order, as scipy's raster labelling and ``np.argmax`` do.

    Args:
        mask: bool tensor of rank 3.
        scan_order: int32 tensor of the mask's shape: each voxel's position in the numpy
            array's C order (for slice-major ``(z, x, y)`` tensors of an ``(x, y, z)`` array,
            see :func:`scan_order_zxy`).
    """
    import tensorflow as tf

    n = tf.size(mask, out_type=tf.int32)
    ids = tf.where(mask, n - scan_order, 0)

    def grow(current):
        out = current
        for axis in range(3):
            out = _max3(out, axis)
        return tf.where(mask, out, 0)

    def cond(previous, current):
        return tf.reduce_any(tf.not_equal(previous, current))

    def body(_, current):
        return current, grow(current)

    _, ids = tf.while_loop(cond, body, (ids, grow(ids)), parallel_iterations=1)

    def pick():
        values = tf.boolean_mask(ids, mask)
        unique, index = tf.unique(values)
        sizes = tf.math.unsorted_segment_sum(tf.ones_like(index), index, tf.size(unique))
        best = tf.reduce_max(tf.where(tf.equal(sizes, tf.reduce_max(sizes)), unique, 0))
        return tf.equal(ids, best) & mask

    return tf.cond(tf.reduce_any(mask), pick, lambda: mask)


def scan_order_zxy(shape_zxy):
    """Each voxel's C-order index in the ``(x, y, z)`` array of a slice-major ``(z, x, y)`` tensor."""
    import tensorflow as tf

    z, x, y = shape_zxy[0], shape_zxy[1], shape_zxy[2]
    return (tf.range(x)[None, :, None] * (y * z) + tf.range(y)[None, None, :] * z + tf.range(z)[:, None, None])


def crop_resize_tf(batch, lo, hi, size):
    """TensorFlow twin of :func:`crop_resize_np`; ``lo``/``hi`` hold ``(x, y)`` (``(B, H=x, W=y, C)``)."""
    import tensorflow as tf

    crop = batch[:, lo[0]:hi[0], lo[1]:hi[1], :]
    return tf.image.resize(crop, size, method="bilinear", antialias=False)


def paste_tf(roi, lo, hi, hw):
    """TensorFlow twin of :func:`paste_np`."""
    import tensorflow as tf

    back = tf.image.resize(roi, tf.stack([hi[0] - lo[0], hi[1] - lo[1]]), method="bilinear", antialias=False)
    return tf.pad(back, [[0, 0], [lo[0], hw[0] - hi[0]], [lo[1], hw[1] - hi[1]], [0, 0]])


# --- stage-2 training data -----------------------------------------------------------------

_BOX_SPEC_KEYS = ("image/segmentation/class/encoded", "image/height", "image/width", "image/case_id",
                  "image/slice_index", "image/spacing")


def case_liver_boxes(records_dir, manifest: dict, splits) -> dict[str, dict]:
    """Each case's liver box over the records' slices of ``splits``: one pass over the label maps.

    Returns:
        ``{case_id: {"lo": (x, y, z), "hi": (x, y, z), "spacing": (x, y, z), "slices": [k, ...]}}``
        with ``lo``/``hi`` the half-open box of every label ``>= 1`` voxel (liver, tumour
        included) and ``slices`` the stored slice indices; cases without liver are left out.
    """
    import tensorflow as tf

    from kerasunet import data
    from tfrecords_builder.features import PARSE_SPEC

    spec = {k: PARSE_SPEC[k] for k in _BOX_SPEC_KEYS}

    def parse(serialized):  # only the label maps and the keys of the box
        return tf.io.parse_example(serialized, spec)

    seen: dict[str, dict] = {}
    for split in splits:
        if not (manifest["splits"].get(split) or {}).get("num_examples"):
            continue
        ds = data.record_dataset(records_dir, manifest, split, False, None).batch(256).map(parse)
        for batch in ds.as_numpy_iterator():
            for i, case in enumerate(batch["image/case_id"]):
                shape = (int(batch["image/height"][i]), int(batch["image/width"][i]))
                label = np.frombuffer(batch["image/segmentation/class/encoded"][i], np.uint8).reshape(shape)
                entry = seen.setdefault(case.decode(), {"boxes": [], "slices": [],
                                                        "spacing": tuple(float(s) for s in batch["image/spacing"][i])})
                k = int(batch["image/slice_index"][i])
                entry["slices"].append(k)
                box = mask_box(label >= 1)
                if box is not None:
                    entry["boxes"].append((*box[0], k, *box[1], k + 1))
    out = {}
    for case, entry in seen.items():
        if entry["boxes"]:
            boxes = np.array(entry["boxes"])
            out[case] = {"lo": tuple(int(v) for v in boxes[:, :3].min(0)),
                         "hi": tuple(int(v) for v in boxes[:, 3:].max(0)),
                         "spacing": entry["spacing"], "slices": sorted(entry["slices"])}
    return out


def roi_slice_count(boxes: dict, margin_mm: float) -> int:
    """How many stored slices lie in their case's ROI z range (the stage-2 examples of one pass)."""
    total = 0
    for entry in boxes.values():
        grow = int(margin_voxels(entry["spacing"], margin_mm)[2])
        total += sum(entry["lo"][2] - grow <= k < entry["hi"][2] + grow for k in entry["slices"])
    return total


def roi_dataset(records_dir, split: str, batch_size: int, training: bool, roi_size, margin_mm: float,
                boxes: dict, *, jitter_mm: float = JITTER_MM, augment=None, oversample_tumour: float = 0.0,
                seed=None, repeat: bool = False, drop_remainder=None, shuffle_buffer: int = 256):
    """Batches of liver ROIs ``(image [B, *roi_size, C] float32 normalised, labels [B, *roi_size] uint8)``.

    Each slice of a case in ``boxes`` whose index lies in the case's ROI z range is
    normalised (its case's statistics, as :mod:`kerasunet.data`), cropped to the case's
    in-plane liver box plus ``margin_mm`` (training: each edge moved by a random shift of up
    to ``jitter_mm``) and resized to ``roi_size`` (bilinear image, nearest labels). The rest of
    the pipeline (oversampling, augmentation, shuffling, batching) is :mod:`kerasunet.data`'s.

    Args:
        records_dir, split, batch_size, training, augment, oversample_tumour, seed, repeat,
        drop_remainder, shuffle_buffer: as :func:`kerasunet.data.get_dataset`.
        roi_size: ``(H, W)`` of every ROI.
        margin_mm: margin around the liver's box.
        boxes: :func:`case_liver_boxes` of the split.
        jitter_mm: largest random shift of each box edge in training (0: none).

    Raises:
        RecordsError: missing manifest, empty split, no case with liver, or oversampling a
            split without tumour.
    """
    import tensorflow as tf

    from kerasunet import data
    from kerasunet.core.preprocessing import normalize
    from tfrecords_builder.features import decode_example, parse_example

    manifest = data.read_manifest(records_dir)
    cases = [c for c in manifest["splits"][split]["cases"] if c in boxes] if split in manifest["splits"] else []
    data.split_files(records_dir, manifest, split)
    if not cases:
        raise data.RecordsError(f"{records_dir}: split {split!r} has no case with liver to crop a ROI from")
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(cases), tf.range(len(cases), dtype=tf.int64)), default_value=-1)
    box_table = tf.constant([[*boxes[c]["lo"], *boxes[c]["hi"]] for c in cases], tf.int32)
    size = tuple(int(s) for s in roi_size)

    def in_roi(parsed):
        index = table.lookup(parsed["image/case_id"])
        box = tf.gather(box_table, tf.maximum(index, 0))
        grow = margin_voxels_tf(parsed["image/spacing"], margin_mm)[2]
        k = tf.cast(parsed["image/slice_index"], tf.int32)
        return (index >= 0) & (k >= box[2] - grow) & (k < box[5] + grow)

    def crop(parsed, random):
        ex = decode_example(parsed, manifest["channels"])
        image = normalize(ex["image"], ex["norm_stats"])
        label = ex["label"][..., None]
        box = tf.gather(box_table, table.lookup(parsed["image/case_id"]))
        hw = tf.shape(label)[:2]
        grow = margin_voxels_tf(ex["spacing"][:2], margin_mm)
        lo, hi = box[:2] - grow, box[3:5] + grow
        if training and jitter_mm > 0:
            reach = tf.floor(jitter_mm / ex["spacing"][:2])  # voxels per in-plane axis
            shift = tf.random.stateless_uniform([2, 2], random, -1.0, 1.0) * (reach + 1.0)
            shift = tf.cast(tf.clip_by_value(tf.floor(shift), -reach, reach), tf.int32)  # rows: lo, hi
            lo, hi = lo + shift[0], hi + shift[1]
        lo = tf.clip_by_value(lo, 0, hw - 1)
        hi = tf.clip_by_value(hi, lo + 1, hw)
        image = crop_resize_tf(image[None], lo, hi, size)[0]
        label = tf.image.resize(label[lo[0]:hi[0], lo[1]:hi[1]], size, method="nearest")
        return image, label

    parsed = data.record_dataset(records_dir, manifest, split, training, seed).map(
        parse_example, num_parallel_calls=data.AUTOTUNE, deterministic=not training).filter(in_roi)
    if training and oversample_tumour > 0:
        if manifest["class_stats"][split]["tumour_slices"] == 0:
            raise data.RecordsError(f"{records_dir}: split {split!r} has no tumour slices to oversample")
        parsed = data.oversample(parsed, oversample_tumour, seed, repeat)
    seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True).map(
        lambda s: tf.cast(s % (2**31 - 1), tf.int32))
    ds = tf.data.Dataset.zip((parsed, seeds)).map(crop, num_parallel_calls=data.AUTOTUNE,
                                                  deterministic=not training)
    if training and augment is not None:
        ds = data.augmented(ds, augment, seed)
    if repeat and not (training and oversample_tumour > 0):
        ds = ds.repeat()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    drop = training if drop_remainder is None else drop_remainder
    ds = ds.batch(batch_size, drop_remainder=drop)
    return data.with_static_shape(ds, manifest, batch_size if drop else None, *size)


def check_liver_model(path, modality: str | None = None):
    """The stage-1 run of a cascade, checked: a 2D run whose outputs include liver.

    Args:
        path: the run folder or ``.keras`` file.
        modality: the stage-2 records' modality, when known: the liver model must match it.

    Returns:
        Its :class:`kerasunet.core.runs.RunInfo`.

    Raises:
        CascadeError: one line naming ``path``: not a run, not a liver model, 3D, another
            modality, or itself a cascade's second stage.
    """
    from kerasunet.core.runs import RunError, resolve_run

    try:
        info = resolve_run(path)
    except RunError as exc:
        raise CascadeError(f"--liver-model {exc}") from None
    if "liver" not in info.outputs or info.config.get("cascade"):
        raise CascadeError(f"--liver-model {path}: not a liver model (its outputs are {list(info.outputs)}); "
                           "the first stage of a cascade segments the liver")
    if info.dims != 2:
        raise CascadeError(f"--liver-model {path}: a {info.dims}D run; the cascade's first stage is a 2D run")
    if modality is not None and info.modality != modality:
        raise CascadeError(f"--liver-model {path}: a {info.modality} model; the records are {modality}")
    return info


# --- inference (local) ----------------------------------------------------------------------

@dataclass(frozen=True)
class CascadeModel:
    """Both stages of a cascade, loaded: what ``predict.load_predictor`` returns for a stage-2 run."""

    liver_net: object
    liver_info: object
    tumour_net: object
    tumour_info: object

    @property
    def settings(self) -> CascadeSettings:
        return CascadeSettings.from_dict(self.tumour_info.cascade)


def load_cascade(info) -> CascadeModel:
    """Loads both models of a stage-2 run: its own and the stage-1 model its config names.

    Raises:
        RunError: either model is missing or does not match its config, or the stage-1 run
            is not a liver model (the message names the stage-2 run's config).
    """
    from kerasunet.core.runs import RunError, load_model

    settings = CascadeSettings.from_dict(info.cascade)
    try:
        liver_info = check_liver_model(settings.liver_model, info.modality)
    except CascadeError as exc:
        raise RunError(f"{info.model_path.parent / 'config.json'}: cascade.{str(exc).lstrip('-')}") from None
    return CascadeModel(load_model(liver_info), liver_info, load_model(info), info)


def liver_probability(probs: np.ndarray) -> np.ndarray:
    """Stage 1's liver: the maximum over its channels, so ``>= t`` is its label map ``>= 1`` at ``t``."""
    return probs.max(axis=-1)


def predict_cascade(cascade: CascadeModel, volume, settings) -> tuple[np.ndarray, np.ndarray]:
    """Segments one volume with both stages (module docstring): ``predict.predict_volume`` for a cascade.

    Returns:
        ``(labels, probabilities)``: uint8 ``(x, y, z)`` in :data:`CASCADE_OUTPUTS`'s values
        (0/1/2) and float32 ``(x, y, z, 2)`` (liver, tumour), canonical order.
    """
    from kerasunet.predict import final_labels, model_probabilities, volume_probabilities

    liver = liver_probability(volume_probabilities(cascade.liver_net, cascade.liver_info, volume, settings))
    tumour = roi_tumour(cascade, volume, liver >= ROI_THRESHOLD, settings,
                        lambda batch: model_probabilities(cascade.tumour_net, batch, settings.tta, settings.batch_size))
    probs = np.stack([liver, tumour], axis=-1)
    return final_labels(probs, CASCADE_OUTPUTS, volume.spacing, settings, volume.data), probs


def roi_tumour(cascade: CascadeModel, volume, liver: np.ndarray, settings, run_model) -> np.ndarray:
    """Stage 2's tumour probabilities ``(x, y, z)`` in the ROI of ``liver``, 0 outside its largest component."""
    from kerasunet.core.preprocessing import case_stats, normalize_np
    from kerasunet.predict import slice_batch

    info, roi = cascade.tumour_info, cascade.settings
    tumour = np.zeros(volume.data.shape, np.float32)
    component, box = liver_roi(liver, volume.spacing, roi.margin_mm)
    if box is None:
        return tumour
    lo, hi = box
    stats = case_stats(volume.data, info.norm)
    slices = normalize_np(np.ascontiguousarray(np.moveaxis(volume.data, 2, 0)), stats)
    background = float((stats[0] - stats[2]) / stats[3])
    hw = slices.shape[1:]
    for start in range(lo[2], hi[2], settings.batch_size):
        indices = np.arange(start, min(start + settings.batch_size, hi[2]))
        batch = crop_resize_np(slice_batch(slices, indices, info.context, hw, background), (lo[:2], hi[:2]),
                               roi.roi_size)
        tumour[:, :, indices] = np.moveaxis(paste_np(run_model(batch), (lo[:2], hi[:2]), hw)[..., 0], 0, 2)
    return tumour * component


# --- inference (the export graph) -----------------------------------------------------------

SPACING_INPUT = "spacing"  # the cascade signature's second input: voxel size (x, y, z) in mm


def serving_channels(cascade: CascadeModel) -> int:
    """Channels of the cascade signature's ``image``: ``2K+1`` for the larger context of the two stages."""
    return context_channels(max(cascade.liver_info.context, cascade.tumour_info.context))


def make_cascade_serving_fn(cascade: CascadeModel):
    """The cascade's one ``serving_default`` function: ``(image, spacing) -> {"probabilities", "mask"}``.

    ``image`` holds the raw 2.5D stacks of ALL slices of one case, in order (float32
    ``[z, x, y, 2K+1]``, K the larger context of the two stages; each stage takes its own
    centre channels), ``spacing`` its voxel size ``(x, y, z)`` in mm. Stage 1 is the liver
    run's own export graph (``export.make_serving_fn``); the ROI, stage 2 and the paste back
    follow the module docstring with the TensorFlow twins, so the probabilities are those of
    :func:`predict_cascade` (to float32 rounding) and the masks the same.
    """
    import tensorflow as tf

    from kerasunet.core.labels import labels_from_probabilities
    from kerasunet.core.preprocessing import normalize, stats_in_graph
    from kerasunet.export import make_serving_fn

    k = channels_context(serving_channels(cascade))
    k1, k2 = cascade.liver_info.context, cascade.tumour_info.context
    stage1 = make_serving_fn(cascade.liver_net, cascade.liver_info)
    info, roi = cascade.tumour_info, cascade.settings

    def tumour_in_box(image, component, spacing):
        shape = tf.shape(component)  # (z, x, y)
        lo, hi = mask_box_tf(component)
        grow = margin_voxels_tf(tf.gather(spacing, [2, 0, 1]), roi.margin_mm)
        lo, hi = tf.maximum(lo - grow, 0), tf.minimum(hi + grow, shape)
        stats = stats_in_graph(image[..., k], info.norm)  # the whole case, as case_stats
        x = normalize(image[lo[0]:hi[0], :, :, k - k2:k + k2 + 1], stats)
        out = tf.cast(cascade.tumour_net(crop_resize_tf(x, lo[1:], hi[1:], roi.roi_size), training=False), tf.float32)
        back = paste_tf(out, lo[1:], hi[1:], shape[1:])[..., 0]
        return tf.pad(back, [[lo[0], shape[0] - hi[0]], [0, 0], [0, 0]])

    def serve(image, spacing):
        liver = tf.reduce_max(stage1(image[..., k - k1:k + k1 + 1])["probabilities"], axis=-1)
        component = largest_component_tf(liver >= ROI_THRESHOLD, scan_order_zxy(tf.shape(liver)))
        tumour = tf.cond(tf.reduce_any(component), lambda: tumour_in_box(image, component, spacing),
                         lambda: tf.zeros_like(liver))
        probs = tf.stack([liver, tumour * tf.cast(component, tf.float32)], axis=-1)
        return {"probabilities": probs, "mask": labels_from_probabilities(probs, CASCADE_OUTPUTS)}

    return serve


def write_cascade_saved_model(cascade: CascadeModel, path) -> None:
    """Writes the cascade's SavedModel: both models and :func:`make_cascade_serving_fn` as ``serving_default``."""
    import keras
    import tensorflow as tf

    from kerasunet.export import INPUT_NAME, SIGNATURE, add_lesion_filter_endpoint

    image = tf.TensorSpec([None, None, None, serving_channels(cascade)], tf.float32, name=INPUT_NAME)
    spacing = tf.TensorSpec([3], tf.float32, name=SPACING_INPUT)
    archive = keras.export.ExportArchive()
    archive.track(cascade.liver_net)
    archive.track(cascade.tumour_net)
    archive.add_endpoint(SIGNATURE, make_cascade_serving_fn(cascade), input_signature=[image, spacing])
    add_lesion_filter_endpoint(archive, cascade.tumour_info)  # stage 2's own thresholds
    archive.write_out(str(path), verbose=False)


def cascade_export_fields(name: str, cascade: CascadeModel) -> dict:
    """``export.json`` entries of a cascade that differ from a plain 2D export."""
    from kerasunet.export import INPUT_NAME, INPUT_UNITS, REST_PORT, SIGNATURE, mask_labels

    channels, info = serving_channels(cascade), cascade.tumour_info
    pixel = "[" + ", ".join(["0.0"] * channels) + "]"
    return {
        "inputs": {INPUT_NAME: {"dtype": "float32", "shape": [None, None, None, channels],
                                "units": INPUT_UNITS[info.modality]},
                   SPACING_INPUT: {"dtype": "float32", "shape": [3], "units": "mm, canonical (x, y, z)"}},
        "outputs": {"probabilities": {"dtype": "float32", "shape": [None, None, None, len(CASCADE_OUTPUTS)],
                                      "channels": list(CASCADE_OUTPUTS)},
                    "mask": {"dtype": "uint8", "shape": [None, None, None], "labels": mask_labels(CASCADE_OUTPUTS)}},
        "channels": channels,
        "context": channels_context(channels),
        "one_case_per_request": True,
        "cascade": {**cascade.settings.to_dict(), "liver_context": cascade.liver_info.context,
                    "tumour_context": info.context, "roi_threshold": ROI_THRESHOLD},
        "curl_predict": (f"curl -X POST http://localhost:{REST_PORT}/v1/models/{name}:predict -d "
                         f"'{{\"signature_name\": \"{SIGNATURE}\", \"inputs\": {{\"{INPUT_NAME}\": "
                         f"[[[{pixel}, {pixel}], [{pixel}, {pixel}]]], \"{SPACING_INPUT}\": [1.0, 1.0, 1.0]}}}}'"),
    }
