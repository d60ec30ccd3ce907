"""Whole-volume inference: NIfTI in, NIfTI label mask (and optional probabilities) out.

The model's preprocessing is read from its run config (``kerasunet.core.runs``), never repeated by
hand: per-case statistics ``case_stats(volume, info.norm)`` and ``normalize_np``, the same
formula the training reader applies. Slices are the canonical axial slices ``data[:, :, k]``
(height = canonical x, width = canonical y), as the records builder writes them. A 2.5D model
with context K gets channels ``k-K .. k+K``; edge slices replicate the border slice (the
builder's ``stack_slices`` convention).

Height and width are padded at the bottom/right to multiples of ``2**depth`` with the
normalised value of the window's lower bound ``lo`` (air for CT, the dark percentile for MRI),
as the reader's ``pad_to_multiple`` and the exported serving graph do, then cropped back. A
model trained with a fixed ``image_size`` (the reader then *resizes*, bilinear) gets its slices
resized to that size and its probabilities resized back (bilinear) before thresholding. With
``tta`` the probabilities are averaged over four flips (none, height, width, both), each
un-flipped before averaging. Labels come from ``labels.labels_from_probabilities_np`` and are
then post-processed (``kerasunet.postprocess``), both in :func:`final_labels`.

A model served by TF Serving (``predict_path_served``) returns the probabilities of the same
preprocessing, done in its exported graph (``kerasunet.export``); :func:`final_labels` then
runs here as for a local model, so served and local masks are the same. TTA needs the local
model.

A 3D run (``info.dims == 3``; :func:`predict_volume_3d`) segments the volume with the sliding
window (:mod:`kerasunet.sliding_window`: windows of the run's ``patch_size``, 50 % overlap,
Gaussian weighting, ``patch_batch_size`` windows per model call, so the network's memory is
bounded by that batch, not by the volume). The model's axes ``(D, H, W)`` are the canonical
``(z, x, y)``: ``np.moveaxis(data, 2, 0)``, the records builder's order for volumes. The
steps: the case statistics of the whole raw volume (``case_stats``, as for slices); the raw
volume resampled (linear) to the run's ``spacing`` when the volume's differs, with
``core.preprocessing.resample`` (the one the volume records use); each window normalised
(``normalize_np``) just before the model,
the volume padded where shorter than a window with the window's lower bound ``lo``
(normalised: the 2D pad value); probabilities resampled back (linear) to the input grid and
only then thresholded (:func:`final_labels`, the 2D post-processing). ``tta`` averages the 8
flips of the three axes. A served 3D model (``kerasunet.export``) gets the same raw windows
and the same statistics, and normalises in its graph, so its masks equal the local ones.

Output naming for a folder input (``predict_path``):

* LiTS layout ``volume-N.nii[.gz]`` -> ``OUT/segmentation-N.nii[.gz]`` (same suffix), the
  LiTS submission name; probabilities ``OUT/probabilities-N.nii.gz``.
* MRI (FZMC) layout ``CASE/<phase>.nii[.gz]`` -> ``OUT/CASE/prediction.nii.gz``; probabilities
  ``OUT/CASE/probabilities.nii.gz``.
* The other layouts (``kerasunet.core.cases.LAYOUTS``: msd, nnunet, atlas, ircadb, dicom) ->
  the name of the case's label file (``OUT/liver_3.nii.gz``, ``OUT/lb3.nii.gz``) or
  ``OUT/CASE.nii.gz``; probabilities ``OUT/CASE_probabilities.nii.gz``. A DICOM series is
  written as NIfTI in the series' own world geometry; a folder holding one series may be
  given a ``.nii[.gz]`` output file.

A single file is written to ``OUTPUT`` when that ends in ``.nii``/``.nii.gz``, else into the
folder ``OUTPUT`` under the name above (``volume-N`` -> ``segmentation-N``, any other stem
``S`` -> ``S_prediction.nii.gz``). Masks are uint8, probabilities float32 ``(…, N)``, both
with the input's own affine, shape and voxel order (``nifti.save_like``, atomic).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from kerasunet.core.labels import labels_from_probabilities_np
from kerasunet.core.cases import load_image, mask_path, open_dataset
from kerasunet.core.dicom import holds_dicom
from kerasunet.core.nifti import Volume, VolumeError, is_nifti, save_like, strip_nifti_suffix
from kerasunet.postprocess import PostprocessSettings, postprocess
from kerasunet.core.preprocessing import case_stats, normalize_np, resample, resampled_shape
from kerasunet.core.runs import RunError, RunInfo, load_model, resolve_run
from kerasunet.core.stacking import stack_slices
from kerasunet.sliding_window import OVERLAP, sliding_window_predict

# (flip height, flip width) for test-time augmentation; each is its own inverse.
TTA_FLIPS = ((False, False), (True, False), (False, True), (True, True))
ENGINES = ("keras", "onnx")
OUTPUT_FORMATS = ("nifti", "dicom-seg")  # dicom-seg: DICOM series input only (kerasunet.dicom_seg)


@dataclass(frozen=True)
class PredictSettings:
    """How volumes are segmented.

    Attributes:
        batch_size: slices per model call (2D models).
        tta: average the probabilities over flips (4x the model calls; 3D models 8x).
        threshold: probability at or above which a voxel is foreground.
        postprocess: the post-processing rules (``PostprocessSettings(enabled=False)`` skips them).
        save_probabilities: also write the float32 probability maps.
        phase: MRI image file stem inside each case folder (folder inputs).
        layout: the folder input's layout (``kerasunet.core.cases.LAYOUTS``); None detects it.
        series: SeriesInstanceUID to read from DICOM folders that hold several series.
        engine: what runs a local model (``ENGINES``): ``keras`` (the run's ``.keras`` model) or
            ``onnx`` (its ``model.onnx`` under onnxruntime, with no TensorFlow import;
            ``kerasunet.onnx_engine``). Preprocessing and labels are the same numpy code for both.
        patch_batch_size: sliding windows per model call (3D models; with a server, per
            request); bounds the memory the network needs.
        lesion_filter: thresholds on per-lesion features (``kerasunet.lesion_filter``,
            ``--lesion-filter FILE``) applied after the post-processing; None: the run's own
            (below), else every lesion is kept.
        run_lesion_filter: apply the run's own thresholds (its ``lesion_filter.json``, fitted
            at the end of training) when ``lesion_filter`` is None; False
            (``--no-lesion-filter``) keeps every lesion.
        output_format: ``nifti`` masks, or ``dicom-seg``: a DICOM Segmentation per DICOM
            series input (``kerasunet.dicom_seg``; the mask's path with ``.dcm``).
    """

    batch_size: int = 16
    tta: bool = False
    threshold: float = 0.5
    postprocess: PostprocessSettings = field(default_factory=PostprocessSettings)
    save_probabilities: bool = False
    phase: str = "artery"
    layout: str | None = None
    series: str | None = None
    engine: str = "keras"
    patch_batch_size: int = 2
    lesion_filter: object = None  # a kerasunet.lesion_filter.LesionFilter, or None
    run_lesion_filter: bool = True
    output_format: str = "nifti"

    def __post_init__(self):
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"Expected output_format in {OUTPUT_FORMATS}. "
                             f"Received: output_format={self.output_format!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"Expected engine in {ENGINES}. Received: engine={self.engine!r}")
        if self.batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1. Received: batch_size={self.batch_size}")
        if self.patch_batch_size < 1:
            raise ValueError(f"Expected patch_batch_size >= 1. Received: patch_batch_size={self.patch_batch_size}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"Expected 0 < threshold < 1. Received: threshold={self.threshold}")


@dataclass(frozen=True)
class Job:
    """One volume to segment and where its outputs go."""

    case_id: str
    image: Path
    output: Path
    probabilities: Path | None = None
    series: str | None = None


@dataclass
class PredictResult:
    """What ``predict_path`` did: files written and ``(input, message)`` for each failure."""

    written: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)


def load_predictor(model, engine: str = "keras") -> tuple[object, RunInfo]:
    """Loads a model from a run folder, a ``.keras`` file or a ``RunInfo`` and checks it.

    With ``engine="onnx"``, ``model`` is a ``model.onnx``, a folder holding one, or an export
    folder ``saved_models/NAME`` (``onnx_engine.find_onnx``); nothing imports TensorFlow.

    Raises:
        RunError: not a kerasunet model, or the model does not match its config.
    """
    if engine == "onnx":
        from kerasunet.onnx_engine import load_onnx_predictor

        net, info = load_onnx_predictor(model)
        if info.cascade:  # the ONNX file holds one stage; kerasunet.cascade runs both with Keras
            raise RunError(f"{info.model_path}: a cascade's second stage; predict it with --engine keras")
        return net, info
    from kerasunet.lesion_filter import run_lesion_filter

    info = model if isinstance(model, RunInfo) else resolve_run(model)
    run_lesion_filter(info)  # an unreadable lesion_filter.json fails here, not case by case
    if info.cascade:  # both stages (kerasunet.cascade)
        from kerasunet.cascade import load_cascade

        return load_cascade(info), info
    return load_model(info), info


def slice_batch(slices: np.ndarray, indices: np.ndarray, context: int, padded_hw: tuple[int, int],
                background: float) -> np.ndarray:
    """The model input for some axial slices: ``(B, Hp, Wp, 2K+1)`` float32, padded bottom/right.

    Args:
        slices: normalised volume in slice-major order ``(z, x, y)``.
        indices: the centre slices ``k``.
        context: K; channels are slices ``k-K .. k+K``, edge slices replicate the border slice.
        padded_hw: height and width after padding.
        background: the pad value.
    """
    stacks = stack_slices(np.moveaxis(slices, 0, -1), indices, context)
    batch = np.full((len(indices), *padded_hw, stacks.shape[-1]), background, dtype=np.float32)
    batch[:, : slices.shape[1], : slices.shape[2], :] = stacks
    return batch


def resize(batch: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of ``(B, H, W, C)`` to ``size``, the reader's ``tf.image.resize`` (no antialias).

    In numpy, so the ONNX engine needs no TensorFlow, with TensorFlow's float32 arithmetic:
    half-pixel centres (source coordinate ``(i + 0.5) * old / new - 0.5``), clamped at the
    edges, one axis after the other.
    """
    out = np.asarray(batch, np.float32)
    for axis, new in ((1, int(size[0])), (2, int(size[1]))):
        old = out.shape[axis]
        if new == old:
            continue
        source = (np.arange(new, dtype=np.float32) + np.float32(0.5)) * np.float32(old / new) - np.float32(0.5)
        low = np.clip(np.floor(source), 0, old - 1).astype(int)
        high = np.clip(np.ceil(source), 0, old - 1).astype(int)
        weight = (source - np.floor(source)).reshape([-1 if a == axis else 1 for a in range(4)])
        top = np.take(out, low, axis)
        out = top + (np.take(out, high, axis) - top) * weight
    return out


def model_probabilities(model, batch: np.ndarray, tta: bool, batch_size: int) -> np.ndarray:
    """Sigmoid outputs of ``model`` for one batch, float32; averaged over flips with ``tta``."""
    if not tta:
        return _predict_full_batch(model, batch, batch_size)
    total = None
    for flip_h, flip_w in TTA_FLIPS:
        axes = tuple(a for a, flip in ((1, flip_h), (2, flip_w)) if flip)
        x = np.flip(batch, axes) if axes else batch
        out = _predict_full_batch(model, np.ascontiguousarray(x), batch_size)
        out = np.flip(out, axes) if axes else out
        total = out if total is None else total + out
    return total / len(TTA_FLIPS)


def _predict_full_batch(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    # A short last batch is padded to ``batch_size`` (repeating its last slice), so the model
    # is traced once per image size rather than again for every volume's remainder.
    n = len(x)
    if n < batch_size:
        x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    return np.asarray(model.predict_on_batch(x), dtype=np.float32)[:n]


def predict_volume(model, info: RunInfo, volume: Volume, settings: PredictSettings = PredictSettings()
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Segments one volume (see the module docstring for the exact preprocessing).

    Args:
        model: the loaded Keras model of ``info``.
        info: the run's settings (modality, context, norm, depth).
        volume: the input, canonical order.
        settings: batch size, TTA, threshold and post-processing.

    Returns:
        ``(labels, probabilities)``: uint8 ``(x, y, z)`` in the dataset's label convention and
        float32 ``(x, y, z, N)``, both in canonical order.
    """
    settings = replace(settings, lesion_filter=applied_lesion_filter(info, settings))
    if info.dims == 3:
        return predict_volume_3d(model, info, volume, settings)
    if info.cascade:  # ``model`` is load_predictor's CascadeModel
        from kerasunet.cascade import predict_cascade

        return predict_cascade(model, volume, settings)
    probs = volume_probabilities(model, info, volume, settings)
    return final_labels(probs, info.outputs, volume.spacing, settings, volume.data), probs


def applied_lesion_filter(info: RunInfo, settings: PredictSettings):
    """The lesion filter :func:`predict_volume` applies with the run ``info``
    (:func:`given_or_own`; the run's own is its ``lesion_filter.json``,
    :func:`kerasunet.lesion_filter.run_lesion_filter`)."""
    from kerasunet.lesion_filter import run_lesion_filter

    return given_or_own(settings, lambda: run_lesion_filter(info))


def given_or_own(settings: PredictSettings, own):
    """The lesion filter that applies, locally or to a served model: ``settings.lesion_filter``
    (``--lesion-filter``), else ``own()``, the model's own thresholds, unless
    ``settings.run_lesion_filter`` is False (``--no-lesion-filter``); None keeps every lesion."""
    if settings.lesion_filter is not None or not settings.run_lesion_filter:
        return settings.lesion_filter
    return own()


def volume_probabilities(model, info: RunInfo, volume: Volume, settings: PredictSettings) -> np.ndarray:
    """A 2D model's probabilities ``(x, y, z, N)`` of one volume, before any threshold."""
    stats = case_stats(volume.data, info.norm)
    slices = normalize_np(np.ascontiguousarray(np.moveaxis(volume.data, 2, 0)), stats)
    depth_z, height, width = slices.shape
    resize_to = info.config["data"].get("image_size")
    step = 2**info.depth
    padded = (height, width) if resize_to else (-(-height // step) * step, -(-width // step) * step)
    background = float((stats[0] - stats[2]) / stats[3])
    probs = np.empty((depth_z, height, width, len(info.outputs)), dtype=np.float32)
    for start in range(0, depth_z, settings.batch_size):
        indices = np.arange(start, min(start + settings.batch_size, depth_z))
        batch = slice_batch(slices, indices, info.context, padded, background)
        if resize_to:
            batch = resize(batch, resize_to)
        out = model_probabilities(model, batch, settings.tta, settings.batch_size)
        probs[indices] = resize(out, (height, width)) if resize_to else out[:, :height, :width, :]
    return np.moveaxis(probs, 0, 2)


def predict_volume_3d(model, info: RunInfo, volume: Volume, settings: PredictSettings = PredictSettings()
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Segments one volume with a 3D run's model by sliding window (module docstring).

    Args:
        model: the loaded model of ``info`` (anything with ``predict_on_batch``).
        info: the 3D run's settings (norm, ``patch_size``, ``spacing``, outputs).
        volume: the input, canonical order.
        settings: windows per call (``patch_batch_size``), TTA, threshold, post-processing.

    Returns:
        ``(labels, probabilities)`` as :func:`predict_volume` returns them, in the input's grid.
    """

    def predict_raw(raw: np.ndarray, stats: np.ndarray) -> np.ndarray:
        return _predict_full_batch(model, normalize_np(raw, stats), settings.patch_batch_size)

    return segment_volume_3d(predict_raw, volume, info.norm, info.patch_size, info.spacing, info.outputs, settings)


def segment_volume_3d(predict_raw: Callable[[np.ndarray, np.ndarray], np.ndarray], volume: Volume, norm,
                      patch_size, model_spacing, outputs, settings: PredictSettings,
                      batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 3D steps shared by local and served models: resample, slide, resample back, label.

    Args:
        predict_raw: ``predict_raw(raw[N, D, H, W, 1], stats[4]) -> probs[N, D, H, W, K]``:
            normalises the raw windows with ``stats`` and runs the network.
        volume: the input, canonical order.
        norm: the run's ``NormSettings``.
        patch_size: the window ``(D, H, W)``.
        model_spacing: the ``(D, H, W)`` spacing in mm the model expects, or None (as stored).
        outputs: the structures of the K output channels.
        settings: TTA, threshold, post-processing and ``patch_batch_size``.
        batch_size: windows per ``predict_raw`` call; default ``settings.patch_batch_size``.

    Returns:
        ``(labels, probabilities)``: uint8 ``(x, y, z)`` and float32 ``(x, y, z, K)``.
    """
    stats = case_stats(volume.data, norm)
    raw = np.ascontiguousarray(np.moveaxis(volume.data, 2, 0), dtype=np.float32)  # (z, x, y) = (D, H, W)
    spacing = tuple(float(volume.spacing[i]) for i in (2, 0, 1))
    grid = raw.shape
    resampled = model_spacing is not None and not np.allclose(spacing, model_spacing, rtol=1e-3)
    if resampled:
        raw = resample(raw, resampled_shape(grid, spacing, model_spacing), order=1)
    probs = sliding_window_predict(lambda batch: predict_raw(batch, stats), raw[..., None], patch_size,
                                   OVERLAP, batch_size or settings.patch_batch_size,
                                   flip_axes=(0, 1, 2) if settings.tta else (), pad_value=float(stats[0]))
    if resampled:  # back to the input grid, linear, before any threshold
        probs = resample(probs, (*grid, probs.shape[-1]), order=1)
    probs = np.ascontiguousarray(np.moveaxis(probs, 0, 2), dtype=np.float32)  # (x, y, z, K)
    return final_labels(probs, outputs, volume.spacing, settings, volume.data), probs


def final_labels(probs: np.ndarray, outputs, spacing, settings: PredictSettings, image=None) -> np.ndarray:
    """Thresholded, post-processed uint8 labels of probabilities ``(x, y, z, N)``.

    The one rule after the network, for local (:func:`predict_volume`) and served
    (:func:`predict_volume_served`) models alike, so both give the same masks. With
    ``settings.lesion_filter`` the tumour lesions then pass :mod:`kerasunet.lesion_filter`
    (it needs ``image``, the input volume, for their contrast).
    """
    labels = postprocess(labels_from_probabilities_np(probs, outputs, settings.threshold), outputs, spacing,
                         settings.postprocess)
    if settings.lesion_filter is None or "tumour" not in outputs:
        return labels
    from kerasunet.lesion_filter import filter_lesions

    return filter_lesions(labels, probs[..., list(outputs).index("tumour")], image, spacing,
                          settings.lesion_filter, outputs)


def predict_volume_served(served, volume: Volume, settings: PredictSettings = PredictSettings(),
                          timeout: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Segments one volume with a TF Serving model: :func:`predict_volume` for a served model.

    The server returns probabilities (its graph normalises and pads as the run did); the
    threshold and the post-processing are applied here by :func:`final_labels`.

    Args:
        served: the ``serving_client.RemoteModel`` of ``serving_client.fetch_model``.
        volume: the input, canonical order.
        settings: batch size (slices per request), threshold and post-processing; ``tta``
            must be False (the served graph has no flips).
        timeout: seconds to wait for each answer.

    Returns:
        ``(labels, probabilities)`` as :func:`predict_volume` returns them.

    Raises:
        ValueError: ``settings.tta`` is True.
        ServingError: the server fails (see ``serving_client.predict_probabilities``).
    """
    from kerasunet.serving_client import predict_probabilities

    settings = served_settings(served, settings)
    probs = predict_probabilities(served, volume.data, settings.batch_size, timeout, spacing=volume.spacing)
    return final_labels(probs, served.outputs, volume.spacing, settings, volume.data), probs


def served_settings(served, settings: PredictSettings) -> PredictSettings:
    """``settings`` for a served model: checked (:func:`_check_servable`), with the lesion filter
    the client applies (:func:`given_or_own`; the model's own is the one its export serves,
    ``serving_client.served_lesion_filter``)."""
    _check_servable(settings)
    return replace(settings, lesion_filter=given_or_own(settings, lambda: served.lesion_filter))


def predict_volume_served_3d(served, volume: Volume, settings: PredictSettings = PredictSettings(),
                             timeout: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Segments one volume with a served 3D model: the sliding window runs here, the network there.

    The client sends raw windows and the case's statistics (``serving_client.predict_windows``);
    resampling, windows, weighting, thresholding and post-processing are
    :func:`segment_volume_3d`'s, as for a local model, so the masks are the same.

    Args:
        served: the ``serving_client.RemoteVolumeModel`` of ``serving_client.fetch_model``.
        volume: the input, canonical order.
        settings: ``patch_batch_size`` (windows per request, fewer where a gRPC message
            would not hold them), threshold and post-processing; ``tta`` must be False.
        timeout: seconds to wait for each answer.

    Returns:
        ``(labels, probabilities)`` as :func:`predict_volume` returns them.

    Raises:
        ValueError: ``settings.tta`` is True.
        ServingError: the server fails, or one window does not fit a gRPC message.
    """
    from kerasunet.serving_client import predict_windows, windows_per_request

    settings = served_settings(served, settings)
    return segment_volume_3d(lambda raw, stats: predict_windows(served, raw, stats, timeout), volume, served.norm,
                             served.patch_size, served.spacing, served.outputs, settings,
                             windows_per_request(served, settings.patch_batch_size))


def output_name(image: Path) -> str:
    """Mask file name for a single input file: ``volume-N`` -> ``segmentation-N``, else ``S_prediction``."""
    match = re.fullmatch(r"volume-(\d+)(\.nii(?:\.gz)?)", image.name)
    if match:
        return f"segmentation-{match.group(1)}{match.group(2)}"
    return f"{strip_nifti_suffix(image.name)}_prediction.nii.gz"


def probability_path(mask_path: Path) -> Path:
    """Where the probabilities of a mask go (see the module docstring)."""
    stem = strip_nifti_suffix(mask_path.name)
    if stem.startswith("segmentation-"):
        stem = "probabilities-" + stem[len("segmentation-"):]
    elif stem == "prediction":
        stem = "probabilities"
    elif stem.endswith("_prediction"):
        stem = stem[: -len("_prediction")] + "_probabilities"
    else:
        stem += "_probabilities"
    return mask_path.with_name(stem + ".nii.gz")


def plan_jobs(input_path, output_path, phase: str = "artery", probabilities: bool = False,
              layout: str | None = None, series: str | None = None) -> list[Job]:
    """Lists the volumes under ``input_path`` and their output paths (module docstring rules).

    A folder is read in ``layout`` (detected when None); its label-only cases are left out.
    A folder holding one DICOM series is one volume, and may have a NIfTI file as output.

    Raises:
        VolumeError: the input is missing, not NIfTI, or a folder without cases, or a folder
            input of several volumes is given a NIfTI file name as output.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.is_file():
        if not is_nifti(input_path):
            raise VolumeError(f"{input_path}: not a NIfTI file (.nii or .nii.gz)")
        target = output_path if is_nifti(output_path) else output_path / output_name(input_path)
        jobs = [Job(strip_nifti_suffix(input_path.name), input_path, target)]
    elif input_path.is_dir():
        one_file = f"{output_path}: the input is a folder, so the output must be a folder"
        if is_nifti(output_path) and not holds_dicom(input_path):
            raise VolumeError(one_file)
        dataset = open_dataset(input_path, layout, phase, series)
        cases = [c for c in dataset.cases if Path(c.image).exists()]
        if is_nifti(output_path) and [Path(c.image) for c in cases] != [input_path]:
            raise VolumeError(one_file)
        jobs = [Job(c.case_id, c.image, output_path if is_nifti(output_path) else
                    output_path / mask_path(dataset.layout, c), series=c.series) for c in cases]
    else:
        raise VolumeError(f"{input_path}: file or folder not found")
    if probabilities:
        jobs = [Job(j.case_id, j.image, j.output, probability_path(j.output), j.series) for j in jobs]
    return jobs


def run_jobs(jobs: list[Job], predict_one: Callable[[Job], str], progress: Callable[[str], None] = print,
             errors: tuple[type[BaseException], ...] = (VolumeError, OSError)) -> PredictResult:
    """Runs ``predict_one`` on each job; a failing volume is reported and the others still run.

    Args:
        jobs: from :func:`plan_jobs`.
        predict_one: segments one job and returns a short detail for the progress line.
        progress: receives one line per volume (case i/n, detail, seconds).
        errors: exception types that fail one volume instead of the whole run.
    """
    result = PredictResult()
    for i, job in enumerate(jobs, 1):
        start = time.perf_counter()
        try:
            detail = predict_one(job)
        except errors as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            result.failures.append((job.image, message))
            progress(f"[{i}/{len(jobs)}] {job.case_id}: error: {message}")
            continue
        result.written.append(job.output)
        progress(f"[{i}/{len(jobs)}] {job.case_id}: {detail}, {time.perf_counter() - start:.1f} s -> {job.output}")
    return result


def predict_path(model, input_path, output_path, settings: PredictSettings = PredictSettings(),
                 progress: Callable[[str], None] = print) -> PredictResult:
    """Segments a NIfTI file or every volume of a folder (either layout) with a local model.

    Args:
        model: a run folder, a ``.keras`` file (config.json beside it) or a ``RunInfo``; with
            ``settings.engine="onnx"`` a ``model.onnx`` or a folder holding one.
        input_path: a ``.nii``/``.nii.gz`` file or a folder in the LiTS or MRI layout.
        output_path: a mask file (single input) or a folder; see the module docstring.
        settings: how to segment.
        progress: receives one line per volume.

    Returns:
        The files written and the failures; a bad input file does not stop the others.

    Raises:
        RunError: the model is missing, not a kerasunet model, or mismatches its config.
        VolumeError: the input path itself is unusable (missing, no cases).
    """
    jobs = _output_jobs(plan_jobs(input_path, output_path, settings.phase, settings.save_probabilities,
                                  settings.layout, settings.series), settings)
    net, info = load_predictor(model, settings.engine)
    return run_jobs(jobs, _segment_job(lambda volume: predict_volume(net, info, volume, settings),
                                       settings.output_format, info.outputs), progress)


def predict_path_served(server: str, model_name: str, input_path, output_path,
                        settings: PredictSettings = PredictSettings(), version: int | None = None,
                        timeout: float = 60.0, progress: Callable[[str], None] = print, *,
                        label: str | None = None, modality: str | None = None,
                        max_message_bytes: int | None = None) -> PredictResult:
    """Like :func:`predict_path`, but each volume is segmented by a TF Serving model.

    The masks equal :func:`predict_path`'s for the same model and settings: the threshold and
    post-processing run here on the served probabilities (:func:`predict_volume_served`).
    Before any volume is sent the served signature is checked (``serving_client.fetch_model``):
    a model of another modality than the input is refused in one line.

    Args:
        server: ``http://HOST:8501`` (REST) or ``grpc://HOST:8500`` (gRPC).
        model_name: the served model's name (``saved_models/NAME``).
        input_path: a ``.nii``/``.nii.gz`` file or a folder in the LiTS or MRI layout.
        output_path: a mask file (single input) or a folder; see the module docstring.
        settings: as for :func:`predict_path`, with ``tta`` False.
        version: a specific version; default the server's latest (or ``label``'s).
        timeout: seconds to wait for each answer.
        progress: receives one line per volume.
        label: a version label (``stable``, ``canary``) instead of ``version``.
        modality: the input's modality; default the folder layout's (LiTS CT, MRI layout
            MRI), none for a single file (then any served modality is accepted).
        max_message_bytes: gRPC only: the largest request or answer (default 4 MiB).

    Raises:
        ValueError: ``settings.tta`` is True, or both ``version`` and ``label``.
        ServingError: the server cannot be reached or does not serve the model, or serves
            one of another modality (a failure while segmenting one volume fails only that
            volume).
        VolumeError: the input path itself is unusable (missing, no cases).
    """
    from kerasunet.serving_client import ServingError, fetch_model

    _check_servable(settings)
    jobs = _output_jobs(plan_jobs(input_path, output_path, settings.phase, settings.save_probabilities,
                                  settings.layout, settings.series), settings)
    if modality is None and Path(input_path).is_dir():
        modality = open_dataset(input_path, settings.layout, settings.phase, settings.series).modality
    with fetch_model(server, model_name, version, timeout=timeout, label=label, modality=modality,
                     max_message_bytes=max_message_bytes) as served:
        segment = predict_volume_served_3d if getattr(served, "dims", 2) == 3 else predict_volume_served
        return run_jobs(jobs, _segment_job(lambda volume: segment(served, volume, settings, timeout),
                                           settings.output_format, served.outputs),
                        progress, errors=(VolumeError, OSError, ServingError))


def _check_servable(settings: PredictSettings) -> None:
    if settings.tta:
        raise ValueError("Expected tta=False for a served model (its graph has no flips). Received: tta=True")


def _output_jobs(jobs: list[Job], settings: PredictSettings) -> list[Job]:
    """The jobs with DICOM SEG outputs for ``output_format="dicom-seg"`` (``kerasunet.dicom_seg.seg_jobs``)."""
    if settings.output_format != "dicom-seg":
        return jobs
    from kerasunet.dicom_seg import seg_jobs

    return seg_jobs(jobs)


def _segment_job(segment: Callable[[Volume], tuple[np.ndarray, np.ndarray]], output_format: str = "nifti",
                 outputs=()) -> Callable[[Job], str]:
    """A ``run_jobs`` step: read the job's volume, ``segment`` it, write its mask (and probabilities);
    ``dicom-seg`` writes the mask as a DICOM SEG of the structures ``outputs``."""

    def predict_one(job: Job) -> str:
        volume = load_image(job.image, job.series)
        labels, probs = segment(volume)
        if output_format == "dicom-seg":
            from kerasunet.dicom_seg import write_segmentation

            write_segmentation(labels, volume, outputs, job.output, job.series)
        else:
            save_like(labels, volume, job.output, dtype=np.uint8)
        if job.probabilities is not None:
            save_like(probs, volume, job.probabilities, dtype=np.float32)
        return f"{volume.data.shape[2]} slices"

    return predict_one
