"""Export a trained model as a versioned SavedModel that TF Serving loads as it is.

Layout written under ``saved_models/NAME/`` (the folder TF Serving's ``base_path`` points at)::

    1/, 2/, ...                  one SavedModel per version (saved_model.pb + variables/)
      assets.extra/tf_serving_warmup_requests   requests TF Serving replays at load
      lesion_filter.json         the run's own lesion-filter thresholds, when it has them
    models.config                TF Serving model config: the two newest versions live,
                                 version labels ``stable`` / ``canary``
    batching_parameters.txt      ``--batching_parameters_file`` for ``--enable_batching`` (CT only)
    export.json                  the model's settings, versions, labels and example command lines

The ``serving_default`` signature takes RAW intensities (HU for CT, scanner units for MRI)
as float32 ``image [batch, height, width, channels]`` with free height and width, and does
everything else in the graph: intensity normalisation with the run's own settings, padding
to a multiple of ``2**depth`` and cropping back, the U-Net, and the labels. It returns
``probabilities`` (float32 ``[b, h, w, N]``) and ``mask`` (uint8 ``[b, h, w]``), so a client
needs no knowledge of the training settings. The signature's static shapes carry what a
client must match, and TF Serving's metadata API returns them: the channel size of
``image`` is ``2K+1`` (the 2.5D context) and that of ``probabilities`` is
the number of structures the model segments. A second signature, ``model_info`` (any
float32 ``image`` in, ignored), names the modality and the structures by its OUTPUT KEYS,
which the metadata API lists with every signature, so a client learns them without a call:
one key is the modality (``ct`` or ``mri``), the others the structures of the
``probabilities`` channels (``liver``, ``tumour``; their channel order is
``labels.STRUCTURES``'s). Called, it returns int32 constants: the modality's index in
``preprocessing.MODALITIES`` and each structure's channel. So a client tells an MRI model
with liver and tumour (ATLAS) from a CT one (``kerasunet.serving_client``). ``export.json``
states these facts directly.

For MRI the normalisation statistics (percentile clip + z-score) are computed over the
whole request, which is therefore treated as one case: a request should hold the slices
of one case, and only that case (see ``docs/serving.md``). Server-side batching would
merge requests of different cases into one tensor, so MRI exports get no batching file.

A 3D run (``dims`` 3, :func:`write_volume_saved_model`) serves PATCHES: ``serving_default``
takes raw ``image [n, D, H, W, C]`` of the run's fixed ``patch_size`` (the static shape the
metadata API returns, so a client learns the window there) and ``stats [n, 4]``, the case
statistics ``[lo, hi, mean, std]`` of ``case_stats`` over the client's whole volume, one row
per patch; the graph normalises each patch with its own row. Per-request statistics would
normalise an MRI patch with the patch's own percentiles, so served masks would differ from
local ones; with the client's rows they are the same, and patches of different cases may
share a batch. ``model_info`` names the structures as for 2D. Another signature,
``volume_settings`` (any float32 ``image`` in, ignored),
returns what the client needs for that: ``modality`` (index in
``preprocessing.MODALITIES``), ``hu_window``, ``percentiles`` and ``spacing`` (``(D, H, W)``
mm the model expects; zeros: none) as float64 constants. The sliding window, resampling,
thresholding and post-processing run on the client (``kerasunet.predict``). ``export.json``
records ``dims``, ``patch_size`` and ``spacing``; 3D exports get no batching file (the
client already batches its windows, and the slice sizes of :class:`BatchingSettings` do not
fit patches).

The served ``mask`` is not lesion-filtered (the filter runs on per-lesion features of whole
cases, :mod:`kerasunet.lesion_filter`). A run's own thresholds are served by one more
signature, ``lesion_filter`` (:func:`add_lesion_filter_endpoint`; 2D, 3D and cascade exports),
which ``predict --server`` calls once and applies on the client by default, so its masks are
a local ``predict``'s. They also go with each version (``lesion_filter.json``, which
``predict --engine onnx`` of that version applies) and into ``export.json``'s ``lesion_filter``.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kerasunet import __version__
from kerasunet.core.atomic import atomic_path, write_json
from kerasunet.core.labels import label_values
from kerasunet.core.records_format import context_channels
from kerasunet.core.runs import LESION_FILTER_FILE, RunInfo, load_model, resolve_run
from kerasunet.lesion_filter import run_lesion_filter, write_lesion_filter

SIGNATURE = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "mask")
CONFIG_FILE = "models.config"
INFO_FILE = "export.json"
BATCHING_FILE = "batching_parameters.txt"
# TF Serving's warm-up file, relative to a version folder; replayed at load (--enable_model_warmup, on by default)
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
LABELS = ("stable", "canary")
LIVE_VERSIONS = 2  # the policy: the newest two versions stay loaded (a canary beside stable, instant rollback)
# Where the docker examples mount saved_models/NAME inside the tensorflow/serving container;
# models.config's base_path must be this in-container path, not the host path.
CONTAINER_ROOT = "/models"
REST_PORT, GRPC_PORT = 8501, 8500
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
INPUT_UNITS = {"ct": "HU", "mri": "scanner units"}
STATS_NAME = "stats"  # 3D exports: the per-patch case statistics input
SETTINGS_SIGNATURE = "volume_settings"  # 3D exports: the settings a sliding-window client needs
SETTINGS_OUTPUTS = ("modality", "hu_window", "percentiles", "spacing")
MODEL_INFO_SIGNATURE = "model_info"  # 2D exports: its output keys name the modality and the channels' structures
LESION_FILTER_SIGNATURE = "lesion_filter"  # runs with their own lesion filter: its four thresholds
VOLUME_WARMUP_BATCHES = (1, 2)  # 3D warm-up: one and two patches (predict's default patch_batch_size)


class ExportError(ValueError):
    """An export that cannot be done. The message starts with the path concerned."""


@dataclass(frozen=True)
class BatchingSettings:
    """TF Serving's ``BatchingParameters`` for 512x512 slices (``batching_parameters.txt``).

    A 512x512 slice with 3 channels (K=1) is 3 MiB in and 2 MiB of probabilities out; a
    filters-32, depth-4 U-Net needs a few hundred MiB of activations per slice on a GPU.

    Attributes:
        max_batch_size: slices per server batch; 16, the client's default ``--batch-size``,
            so one REST request of 16 slices runs as one batch, and a batch of 16 slices
            fits a GPU of 16 GiB or more.
        batch_timeout_micros: how long a partial batch waits for more slices; 2 ms, well
            under one 512x512 slice's model time, so a lone request pays little.
        max_enqueued_batches: the queue; beyond it requests fail fast (UNAVAILABLE). 8 full
            batches are 384 MiB of queued input.
        num_batch_threads: batches run at once; 2 per GPU lets one copy in while one computes.
        allowed_batch_sizes: sizes batches are padded up to, so the model sees only these
            shapes (the warm-up file traces each); increasing, the last = ``max_batch_size``.
    """

    max_batch_size: int = 16
    batch_timeout_micros: int = 2000
    max_enqueued_batches: int = 8
    num_batch_threads: int = 2
    allowed_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)

    def __post_init__(self):
        sizes = list(self.allowed_batch_sizes)
        if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != self.max_batch_size:
            raise ValueError("Expected increasing allowed_batch_sizes ending at max_batch_size. "
                             f"Received: allowed_batch_sizes={self.allowed_batch_sizes}, "
                             f"max_batch_size={self.max_batch_size}")

    def to_text(self) -> str:
        """The text proto TF Serving reads with ``--batching_parameters_file``."""
        lines = [f"{name} {{ value: {getattr(self, name)} }}" for name in
                 ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")]
        lines += [f"allowed_batch_sizes: {size}" for size in self.allowed_batch_sizes]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class WarmupSettings:
    """The requests of the warm-up file: one ``[b, *size, 2K+1]`` image per batch size.

    Attributes:
        size: height and width; 512x512, the LiTS slice size.
        batch_sizes: one request each; the batching file's ``allowed_batch_sizes``, the
            shapes a batching server runs.
        value: every voxel's intensity. Only shapes and dtypes matter for warm-up, and one
            value is stored once (``serving_grpc.filled_tensor_proto``), not 512x512xC times.
    """

    size: tuple[int, int] = (512, 512)
    batch_sizes: tuple[int, ...] = field(default_factory=lambda: BatchingSettings().allowed_batch_sizes)
    value: float = 0.0


def numeric_versions(model_dir: Path) -> list[int]:
    """The version folders TF Serving would see: sub-folders whose name is all digits."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def choose_version(model_dir: Path, version: int | None, overwrite: bool) -> int:
    """The version to write: ``version``, or the highest existing one + 1 (1 for a new model).

    Raises:
        ExportError: ``version`` is below 1, or exists and ``overwrite`` is False.
    """
    if version is None:
        return max(numeric_versions(model_dir), default=0) + 1
    if version < 1:
        raise ExportError(f"{model_dir}: version must be an integer >= 1, got {version}")
    if (model_dir / str(version)).exists() and not overwrite:
        raise ExportError(f"{model_dir / str(version)}: version {version} exists; "
                          "pass --overwrite to replace it or omit --version for the next one")
    return version


def mask_labels(outputs) -> dict[str, int]:
    """Mask value of background and of each output structure (``labels.label_values``)."""
    return {"background": 0, **label_values(outputs)}


def make_serving_fn(model, info: RunInfo):
    """The ``serving_default`` function: raw image -> ``{"probabilities", "mask"}``.

    For MRI the statistics are those of the centre channels of the whole request, so a
    request holding all slices of a case gets exactly ``case_stats`` of that volume.
    Height and width are padded at the bottom/right up to a multiple of ``2**depth`` with
    the normalised value of the window's lower bound (background: air for CT, the dark
    percentile for MRI), then the outputs are cropped back to the input size. A model
    trained with a fixed ``image_size`` instead gets its input resized to that size and its
    probabilities resized back (bilinear, no antialiasing), as ``kerasunet.predict`` does.
    """
    import tensorflow as tf

    from kerasunet.core.labels import labels_from_probabilities
    from kerasunet.core.preprocessing import normalize, stats_in_graph

    multiple, settings, outputs, center = 2**info.depth, info.norm, info.outputs, info.context
    image_size = info.config["data"].get("image_size")

    def serve(image):
        # Statistics over the centre channel only: it holds each requested slice exactly
        # once, whereas the 2.5D neighbours repeat slices (edge slices more often).
        stats = stats_in_graph(image[..., center], settings)
        x = normalize(image, stats)
        height, width = tf.shape(x)[1], tf.shape(x)[2]
        if image_size:  # trained on resized slices: resize in, and probabilities back
            x = tf.image.resize(x, image_size, method="bilinear", antialias=False)
            probs = tf.cast(model(x, training=False), tf.float32)
            probs = tf.image.resize(probs, (height, width), method="bilinear", antialias=False)
        else:
            pad_h, pad_w = (-height) % multiple, (-width) % multiple
            background = (stats[0] - stats[2]) / stats[3]
            x = tf.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]], constant_values=background)
            # Mixed-precision models compute in float16; the signature stays float32.
            probs = tf.cast(model(x, training=False), tf.float32)[:, :height, :width, :]
        return {"probabilities": probs, "mask": labels_from_probabilities(probs, outputs)}

    return serve


def write_saved_model(model, info: RunInfo, path: Path) -> None:
    """Writes the SavedModel with its ``serving_default`` signature to ``path`` (a folder).

    Uses Keras 3's ``keras.export.ExportArchive`` (TensorFlow backend): the model's
    variables are tracked and the serving function is the only endpoint.
    """
    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise ExportError(f"{info.model_path}: export needs KERAS_BACKEND=tensorflow, "
                          f"got {keras.backend.backend()!r}")
    if info.dims == 3:
        return write_volume_saved_model(model, info, path)
    if info.cascade:  # ``model`` is a kerasunet.cascade.CascadeModel
        from kerasunet.cascade import write_cascade_saved_model

        return write_cascade_saved_model(model, path)
    spec = tf.TensorSpec([None, None, None, info.input_channels], tf.float32, name=INPUT_NAME)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, make_serving_fn(model, info), input_signature=[spec])
    add_constant_endpoint(archive, MODEL_INFO_SIGNATURE, model_info_constants(info))
    add_lesion_filter_endpoint(archive, info)
    archive.write_out(str(path), verbose=False)


def add_constant_endpoint(archive, name: str, constants: dict) -> None:
    """Adds signature ``name``, which returns ``constants`` (numpy values; their dtypes are the
    outputs') whatever it is given: its float32 ``image`` ``[n]`` input is ignored, and is there
    because REST and gRPC predict calls need one (``model_info``, ``volume_settings``,
    ``lesion_filter``)."""
    import tensorflow as tf

    def endpoint(image):
        return {key: tf.constant(value) for key, value in constants.items()}

    archive.add_endpoint(name, endpoint, input_signature=[tf.TensorSpec([None], tf.float32, name=INPUT_NAME)])


def add_lesion_filter_endpoint(archive, info: RunInfo) -> None:
    """Adds the ``lesion_filter`` signature when the run has its own thresholds (module docstring):
    each threshold of ``kerasunet.lesion_filter.FEATURES`` as a float32 scalar, so
    ``predict --server`` applies the run's filter as a local ``predict`` does, without a file."""
    thresholds = run_lesion_filter(info)
    if thresholds is not None:
        add_constant_endpoint(archive, LESION_FILTER_SIGNATURE,
                              {name: np.float32(value) for name, value in thresholds.to_dict().items()})


def model_info_constants(info: RunInfo) -> dict:
    """The ``model_info`` signature's outputs (module docstring): int32 scalars keyed by the
    modality (its index in ``MODALITIES``) and by each structure (its channel)."""
    from kerasunet.core.labels import check_outputs
    from kerasunet.core.preprocessing import MODALITIES

    return {info.modality: np.int32(MODALITIES.index(info.modality)),
            **{name: np.int32(channel) for channel, name in enumerate(check_outputs(info.outputs))}}


def make_volume_serving_fn(model, info: RunInfo):
    """A 3D run's ``serving_default``: raw patches and per-patch stats -> ``{"probabilities", "mask"}``.

    Each patch is normalised with its own ``stats`` row (``preprocessing.normalize``, the
    formula of ``normalize_np``), so a patch is normalised as the local sliding window does it.
    """
    import tensorflow as tf

    from kerasunet.core.labels import labels_from_probabilities
    from kerasunet.core.preprocessing import normalize

    outputs = info.outputs

    def serve(image, stats):
        x = tf.map_fn(lambda pair: normalize(pair[0], pair[1]), (image, stats), fn_output_signature=tf.float32)
        probs = tf.cast(model(x, training=False), tf.float32)  # float16 under mixed precision
        return {"probabilities": probs, "mask": labels_from_probabilities(probs, outputs)}

    return serve


def volume_settings(info: RunInfo) -> dict:
    """The values of the ``volume_settings`` signature (module docstring), as Python numbers."""
    from kerasunet.core.preprocessing import MODALITIES

    norm = info.norm
    return {"modality": MODALITIES.index(norm.modality), "hu_window": list(norm.hu_window),
            "percentiles": list(norm.percentiles), "spacing": list(info.spacing or (0.0, 0.0, 0.0))}


def write_volume_saved_model(model, info: RunInfo, path: Path) -> None:
    """Writes a 3D run's SavedModel: ``serving_default`` on patches and ``volume_settings``."""
    import keras
    import tensorflow as tf

    if info.patch_size is None:
        raise ExportError(f"{info.model_path}: a 3D run needs model.patch_size in its config.json")
    image = tf.TensorSpec([None, *info.patch_size, info.input_channels], tf.float32, name=INPUT_NAME)
    stats = tf.TensorSpec([None, 4], tf.float32, name=STATS_NAME)
    values = volume_settings(info)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, make_volume_serving_fn(model, info), input_signature=[image, stats])
    add_constant_endpoint(archive, SETTINGS_SIGNATURE, {
        "modality": np.int32(values["modality"]),
        **{k: np.asarray(values[k], np.float64) for k in ("hu_window", "percentiles", "spacing")}})
    add_constant_endpoint(archive, MODEL_INFO_SIGNATURE, model_info_constants(info))  # the structures, as for 2D
    add_lesion_filter_endpoint(archive, info)
    archive.write_out(str(path), verbose=False)


def write_volume_warmup(path: Path, name: str, info: RunInfo, batch_sizes=VOLUME_WARMUP_BATCHES) -> list:
    """The 3D warm-up file: one request of ``b`` zero patches (stats ``[1, 1, 1, 1]``) per size.

    Raises:
        ServingError: tensorflow-serving-api (the ``grpc`` extra) is not installed.
    """
    import tensorflow as tf

    from kerasunet import serving_grpc

    p = serving_grpc.protos()
    shapes = [[batch, *info.patch_size, info.input_channels] for batch in batch_sizes]
    target = path / WARMUP_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(target)) as writer:
        for shape in shapes:
            request = p.PredictRequest(model_spec=serving_grpc.model_spec(name, signature=SIGNATURE))
            request.inputs[INPUT_NAME].CopyFrom(serving_grpc.filled_tensor_proto(shape, 0.0))
            request.inputs[STATS_NAME].CopyFrom(serving_grpc.filled_tensor_proto((shape[0], 4), 1.0))
            writer.write(p.PredictionLog(predict_log=p.PredictLog(request=request)).SerializeToString())
    return shapes


def serves_batching(info: RunInfo) -> bool:
    """Whether the export gets a batching file: 2D CT (fixed window, slices of any case)."""
    return info.modality == "ct" and info.dims == 2 and not info.cascade  # a cascade request is one case


def volume_export_fields(name: str, info: RunInfo) -> dict:
    """``export.json`` entries of a 3D export that differ from a 2D one (module docstring)."""
    channels, url = info.input_channels, f"http://localhost:{REST_PORT}/v1/models/{name}"
    return {
        "inputs": {INPUT_NAME: {"dtype": "float32", "shape": [None, *info.patch_size, channels],
                                "units": INPUT_UNITS[info.modality]},
                   STATS_NAME: {"dtype": "float32", "shape": [None, 4],
                                "meaning": "case_stats [lo, hi, mean, std] of the whole volume, one row per patch"}},
        "outputs": {"probabilities": {"dtype": "float32", "shape": [None, *info.patch_size, len(info.outputs)],
                                      "channels": list(info.outputs)},
                    "mask": {"dtype": "uint8", "shape": [None, *info.patch_size], "labels": mask_labels(info.outputs)}},
        "settings_signature": {"name": SETTINGS_SIGNATURE, "outputs": volume_settings(info)},
        "pad_multiple": None,
        "one_case_per_request": False,
        "curl_predict": (f"curl -X POST {url}:predict -d '{{\"signature_name\": \"{SETTINGS_SIGNATURE}\", "
                         f"\"inputs\": {{\"{INPUT_NAME}\": [0.0]}}}}'"),
    }


def write_warmup(path: Path, name: str, info: RunInfo, settings: WarmupSettings = WarmupSettings()) -> list:
    """Writes ``path/assets.extra/tf_serving_warmup_requests``: one request per batch size.

    A TFRecord of ``PredictionLog`` records holding ``PredictRequest`` s for
    ``serving_default`` (TF Serving reads at most 1000). The messages are
    tensorflow-serving-api's (``kerasunet.serving_grpc.warmup_records``).

    Returns:
        The request shapes written.

    Raises:
        ServingError: tensorflow-serving-api (the ``grpc`` extra) is not installed.
    """
    import tensorflow as tf

    from kerasunet.serving_grpc import warmup_records

    if info.dims == 3:
        return write_volume_warmup(path, name, info)
    channels = context_channels(info.context)
    records = warmup_records(name, channels, settings.size, settings.batch_sizes, settings.value, SIGNATURE)
    target = path / WARMUP_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(target)) as writer:
        for record in records:
            writer.write(record)
    return [[batch, *settings.size, channels] for batch in settings.batch_sizes]


def update_labels(out_dir: Path, previous: dict, versions: list[int], version: int, label: str) -> dict[str, int]:
    """The version labels after exporting ``version`` with ``label``.

    ``stable`` moves to the new version and drops a canary that is not newer; ``canary``
    moves to the new version and keeps ``stable``. Labels of versions no longer on disk are
    dropped. TF Serving only labels a loaded version, so each label must point to one of
    the :data:`LIVE_VERSIONS` newest versions.

    Args:
        out_dir: ``saved_models/NAME`` (for messages).
        previous: the labels before (``export.json``'s ``version_labels``).
        versions: the version numbers on disk once ``version`` is written.
        version: the version being exported.
        label: ``stable`` or ``canary``.

    Raises:
        ExportError: ``label`` unknown, or a label would point to a version no longer served.
    """
    if label not in LABELS:
        raise ExportError(f"{out_dir}: label must be one of {', '.join(LABELS)}, got {label!r}")
    labels = {k: int(v) for k, v in previous.items() if k in LABELS and int(v) in versions and int(v) != version}
    labels[label] = version
    if label == "stable" and labels.get("canary", version + 1) <= version:
        del labels["canary"]
    live = sorted(versions)[-LIVE_VERSIONS:]
    for name, labelled in sorted(labels.items()):
        if labelled not in live:
            raise ExportError(f"{out_dir}: label {name!r} would point to version {labelled}, which the policy "
                              f"(the {LIVE_VERSIONS} newest versions live) no longer serves once version {version} "
                              f"is written (live: {', '.join(map(str, live))}); export with --label {name} "
                              "to move it, or move the newer versions away")
    return dict(sorted(labels.items(), key=lambda item: LABELS.index(item[0])))


def models_config(name: str, labels: dict[str, int] | None = None) -> str:
    """TF Serving's ``--model_config_file`` text proto for this model.

    ``base_path`` is the in-container path of the docker examples (``/models/NAME``).
    The policy ``latest {num_versions: 2}`` keeps the two newest versions loaded: a canary
    next to stable, and the previous version ready for a rollback without a reload.
    ``version_labels`` maps ``stable``/``canary`` to versions; TF Serving refuses, at start,
    labels on versions still loading unless started with
    ``--allow_version_labels_for_unavailable_models=true`` (the docker lines pass it).
    """
    label_lines = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n' for k, v in (labels or {}).items())
    return (
        "model_config_list {\n"
        "  config {\n"
        f'    name: "{name}"\n'
        f'    base_path: "{CONTAINER_ROOT}/{name}"\n'
        '    model_platform: "tensorflow"\n'
        "    model_version_policy {\n"
        "      latest {\n"
        f"        num_versions: {LIVE_VERSIONS}\n"
        "      }\n"
        "    }\n"
        f"{label_lines}"
        "  }\n"
        "}\n"
    )


def example_commands(name: str, channels: int, batching: bool = True) -> dict[str, str]:
    """The docker run, curl and kerasunet lines a user runs on a machine with Docker (not run here)."""
    mount = f'-v "$PWD/saved_models/{name}:{CONTAINER_ROOT}/{name}"'
    ports = f"-p {REST_PORT}:{REST_PORT} -p {GRPC_PORT}:{GRPC_PORT}"
    pixel = "[" + ", ".join(["0.0"] * channels) + "]"
    image = f"[[[{pixel}, {pixel}], [{pixel}, {pixel}]]]"  # 1 x 2 x 2 x C
    url = f"http://localhost:{REST_PORT}/v1/models/{name}"
    flags = (f"--model_config_file={CONTAINER_ROOT}/{name}/{CONFIG_FILE} "
             "--allow_version_labels_for_unavailable_models=true")
    if batching:
        flags += f" --enable_batching --batching_parameters_file={CONTAINER_ROOT}/{name}/{BATCHING_FILE}"
    return {
        "docker_run": f"docker run --rm {ports} {mount} -e MODEL_NAME={name} tensorflow/serving",
        "docker_run_config_file": f"docker run --rm {ports} {mount} tensorflow/serving {flags}",
        "docker_run_gpu": f"docker run --rm --gpus all {ports} {mount} tensorflow/serving:latest-gpu {flags}",
        "curl_metadata": f"curl {url}/labels/stable/metadata",
        "curl_predict": (f"curl -X POST {url}:predict -d "
                         f"'{{\"signature_name\": \"{SIGNATURE}\", \"inputs\": {{\"{INPUT_NAME}\": {image}}}}}'"),
        "predict_grpc": (f"kerasunet predict --server grpc://localhost:{GRPC_PORT} --model-name {name} "
                         "--model-label stable --input VOL.nii.gz --output MASK.nii.gz"),
        "predict_rest": (f"kerasunet predict --server http://localhost:{REST_PORT} --model-name {name} "
                         "--model-label stable --input VOL.nii.gz --output MASK.nii.gz"),
    }


def export_info(name: str, info: RunInfo, version: int, previous: dict, versions: list[int],
                labels: dict[str, int] | None = None, warmup: list | None = None) -> dict:
    """The content of ``export.json``: settings of the newest export plus one entry per version."""
    channels = context_channels(info.context)
    batching = serves_batching(info)
    entry = {"source_model": str(info.model_path.resolve()), "modality": info.modality,
             "channels": channels, "exported_at": datetime.datetime.now().isoformat(timespec="seconds"),
             "kerasunet_version": __version__, "warmup_requests": warmup}
    kept = {k: v for k, v in previous.get("versions", {}).items() if int(k) in versions}
    return {
        "model_name": name,
        "signature_name": SIGNATURE,
        "inputs": {INPUT_NAME: {"dtype": "float32", "shape": [None, None, None, channels],
                                "units": INPUT_UNITS[info.modality]}},
        "outputs": {"probabilities": {"dtype": "float32", "shape": [None, None, None, len(info.outputs)],
                                      "channels": list(info.outputs)},
                    "mask": {"dtype": "uint8", "shape": [None, None, None],
                             "labels": mask_labels(info.outputs)}},
        "modality": info.modality,
        "context": info.context,
        "channels": channels,
        "norm": info.norm.to_dict(),
        "depth": info.depth,
        "pad_multiple": 2**info.depth,
        "image_size": info.config["data"].get("image_size"),
        "one_case_per_request": info.modality == "mri",
        "source_run": str(info.model_path.parent.resolve()),
        "kerasunet_version": __version__,
        "latest_version": max(versions),
        "model_version_policy": f"latest {{num_versions: {LIVE_VERSIONS}}}",
        "version_labels": labels or {},
        "warmup_file": WARMUP_FILE if warmup else None,
        "batching_parameters": ({"file": BATCHING_FILE, **asdict(BatchingSettings())} if batching else None),
        "versions": {**kept, str(version): entry},
        **example_commands(name, channels, batching),
        "dims": info.dims,
        "patch_size": list(info.patch_size) if info.patch_size else None,
        "spacing": list(info.spacing) if info.spacing else None,
        **(volume_export_fields(name, info) if info.dims == 3 else {}),
    }


def check_out_dir(out_dir: Path) -> str:
    """The model name (the folder's name), checked to be usable in TF Serving URLs.

    Raises:
        ExportError: the name has characters other than letters, digits, ``_ . -``,
            is all digits, or ``out_dir`` is an existing file.
    """
    name = out_dir.name
    if not _NAME_PATTERN.match(name) or name.isdigit():
        raise ExportError(f"{out_dir}: model name {name!r} must be letters, digits, '_', '.' or '-' "
                          "and not all digits (it becomes part of the serving URL)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    return name


def export_model(model_path: str | Path, out_dir: str | Path, version: int | None = None,
                 overwrite: bool = False, label: str = "stable") -> Path:
    """Exports a run's model to ``out_dir/VERSION`` and (re)writes the files beside it.

    The SavedModel and its warm-up file are written into a temporary sibling folder
    (``.tmp-…``, never all digits, so TF Serving ignores it) and renamed into place, so a
    server polling ``out_dir`` never loads half a model. ``models.config``,
    ``batching_parameters.txt`` (CT; removed for MRI) and ``export.json`` are rewritten
    atomically afterwards.

    Args:
        model_path: a run folder (best.keras + config.json) or a ``.keras`` file with a
            config.json beside it.
        out_dir: ``saved_models/NAME``; NAME is the model name TF Serving serves.
        version: version number; default the highest existing version + 1 (1 if none).
        overwrite: replace ``out_dir/version`` if it exists.
        label: the version label the new version gets: ``stable`` or ``canary``
            (:func:`update_labels`).

    Returns:
        The version folder written.

    Raises:
        RunError: ``model_path`` is not a usable run or model.
        ExportError: bad name, version or label, an existing version without ``overwrite``,
            a label that would point to a version no longer served, or a model that does
            not match its config.
    """
    out_dir = Path(out_dir)
    name = check_out_dir(out_dir)
    info = resolve_run(model_path)
    version = choose_version(out_dir, version, overwrite)
    previous = _read_json(out_dir / INFO_FILE)
    versions = sorted(set(numeric_versions(out_dir)) | {version})
    labels = update_labels(out_dir, previous.get("version_labels", {}), versions, version, label)
    if info.cascade:  # both stages in one graph (kerasunet.cascade)
        from kerasunet.cascade import load_cascade

        model = load_cascade(info)
    else:
        model = load_model(info)
    target = out_dir / str(version)
    thresholds = run_lesion_filter(info)
    with atomic_path(target, is_dir=True) as tmp:
        write_saved_model(model, info, tmp)
        if thresholds is not None:
            write_lesion_filter(tmp / LESION_FILTER_FILE, thresholds)
        warmup = None if info.cascade else _warmup_or_warn(tmp, target, name, info)  # cascade: whole cases
    with atomic_path(out_dir / CONFIG_FILE) as tmp:  # TF Serving may poll this file
        tmp.write_text(models_config(name, labels))
    if serves_batching(info):
        with atomic_path(out_dir / BATCHING_FILE) as tmp:
            tmp.write_text(BatchingSettings().to_text())
    else:  # batching merges requests, and with them MRI cases (3D: see the module docstring)
        (out_dir / BATCHING_FILE).unlink(missing_ok=True)
    exported = export_info(name, info, version, previous, numeric_versions(out_dir), labels, warmup)
    exported["lesion_filter"] = None if thresholds is None else thresholds.to_dict()  # applied by clients
    if info.cascade:
        from kerasunet.cascade import cascade_export_fields

        exported |= cascade_export_fields(name, model)
    write_json(out_dir / INFO_FILE, exported)
    return target


def _warmup_or_warn(path: Path, target: Path, name: str, info: RunInfo) -> list | None:
    # Without the grpc extra the model still serves; it only pays its first call at load.
    from kerasunet.serving_client import ServingError

    try:
        return write_warmup(path, name, info)
    except ServingError as exc:
        print(f"warning: {target}: no warm-up file ({exc})", file=sys.stderr)
        return None


def _read_json(path: Path) -> dict:
    # A damaged export.json only loses the history of earlier versions, not the export.
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
