"""Export a trained model as a versioned SavedModel that TF Serving loads as it is.

Layout written under ``saved_models/NAME/`` (the folder TF Serving's ``base_path`` points at)::

    1/, 2/, ...        one SavedModel per version (saved_model.pb + variables/)
    models.config      TF Serving model config (name, base_path, version policy)
    export.json        the model's settings, the versions and example docker/curl lines

The ``serving_default`` signature takes RAW intensities (HU for CT, scanner units for MRI)
as float32 ``image [batch, height, width, channels]`` with free height and width, and does
everything else in the graph: intensity normalisation with the run's own settings, padding
to a multiple of ``2**depth`` and cropping back, the U-Net, and the labels. It returns
``probabilities`` (float32 ``[b, h, w, N]``) and ``mask`` (uint8 ``[b, h, w]``), so a client
needs no knowledge of the training settings.

For MRI the normalisation statistics (percentile clip + z-score) are computed over the
whole request, which is therefore treated as one case: a request should hold the slices
of one case, and only that case (see ``docs/serving.md``).
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from kerasunet import __version__
from kerasunet.core.atomic import atomic_path, write_json
from kerasunet.core.labels import LABEL_VALUES, OUTPUTS
from kerasunet.core.runs import RunInfo, load_model, resolve_run

SIGNATURE = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "mask")
CONFIG_FILE = "models.config"
INFO_FILE = "export.json"
# Where the docker examples mount saved_models/NAME inside the tensorflow/serving container;
# models.config's base_path must be this in-container path, not the host path.
CONTAINER_ROOT = "/models"
REST_PORT, GRPC_PORT = 8501, 8500
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
INPUT_UNITS = {"ct": "HU", "mri": "scanner units"}


class ExportError(ValueError):
    """An export that cannot be done. The message starts with the path concerned."""


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


def label_values(modality: str) -> dict[str, int]:
    """Mask label of each output channel: CT liver 1 / tumour 2, MRI tumour 1 (see labels.py)."""
    if modality == "ct":
        return {"background": 0, **{name: LABEL_VALUES[name] for name in OUTPUTS["ct"]}}
    return {"background": 0, "tumour": 1}


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

    multiple, settings, modality, center = 2**info.depth, info.norm, info.modality, info.context
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
        return {"probabilities": probs, "mask": labels_from_probabilities(probs, modality)}

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
    spec = tf.TensorSpec([None, None, None, info.input_channels], tf.float32, name=INPUT_NAME)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, make_serving_fn(model, info), input_signature=[spec])
    archive.write_out(str(path), verbose=False)


def models_config(name: str, policy: str = "latest") -> str:
    """TF Serving's ``--model_config_file`` text proto for this model.

    ``base_path`` is the in-container path of the docker examples (``/models/NAME``).
    The policy ``latest {num_versions: 1}`` serves the newest version; older ones stay on
    disk so a rollback is deleting (or moving away) the newest folder.
    """
    return (
        "model_config_list {\n"
        "  config {\n"
        f'    name: "{name}"\n'
        f'    base_path: "{CONTAINER_ROOT}/{name}"\n'
        '    model_platform: "tensorflow"\n'
        "    model_version_policy {\n"
        "      latest {\n"
        "        num_versions: 1\n"
        "      }\n"
        "    }\n"
        "  }\n"
        "}\n"
    )


def example_commands(name: str, channels: int) -> dict[str, str]:
    """The docker run and curl lines a user runs on a machine with Docker (not run here)."""
    mount = f'-v "$PWD/saved_models/{name}:{CONTAINER_ROOT}/{name}"'
    ports = f"-p {REST_PORT}:{REST_PORT} -p {GRPC_PORT}:{GRPC_PORT}"
    pixel = "[" + ", ".join(["0.0"] * channels) + "]"
    image = f"[[[{pixel}, {pixel}], [{pixel}, {pixel}]]]"  # 1 x 2 x 2 x C
    url = f"http://localhost:{REST_PORT}/v1/models/{name}"
    return {
        "docker_run": f"docker run --rm {ports} {mount} -e MODEL_NAME={name} tensorflow/serving",
        "docker_run_config_file": (f"docker run --rm {ports} {mount} tensorflow/serving "
                                   f"--model_config_file={CONTAINER_ROOT}/{name}/{CONFIG_FILE}"),
        "curl_metadata": f"curl {url}/metadata",
        "curl_predict": (f"curl -X POST {url}:predict -d "
                         f"'{{\"signature_name\": \"{SIGNATURE}\", \"inputs\": {{\"{INPUT_NAME}\": {image}}}}}'"),
    }


def export_info(name: str, info: RunInfo, version: int, previous: dict, versions: list[int]) -> dict:
    """The content of ``export.json``: settings of the newest export plus one entry per version."""
    channels = 2 * info.context + 1
    entry = {"source_model": str(info.model_path.resolve()), "modality": info.modality,
             "channels": channels, "exported_at": datetime.datetime.now().isoformat(timespec="seconds"),
             "kerasunet_version": __version__}
    kept = {k: v for k, v in previous.get("versions", {}).items() if int(k) in versions}
    return {
        "model_name": name,
        "signature_name": SIGNATURE,
        "inputs": {INPUT_NAME: {"dtype": "float32", "shape": [None, None, None, channels],
                                "units": INPUT_UNITS[info.modality]}},
        "outputs": {"probabilities": {"dtype": "float32", "shape": [None, None, None, len(OUTPUTS[info.modality])],
                                      "channels": list(OUTPUTS[info.modality])},
                    "mask": {"dtype": "uint8", "shape": [None, None, None],
                             "labels": label_values(info.modality)}},
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
        "model_version_policy": "latest {num_versions: 1}",
        "versions": {**kept, str(version): entry},
        **example_commands(name, channels),
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
                 overwrite: bool = False) -> Path:
    """Exports a run's model to ``out_dir/VERSION`` and (re)writes models.config and export.json.

    The SavedModel is written into a temporary sibling folder (``.tmp-…``, never all
    digits, so TF Serving ignores it) and renamed onto ``out_dir/VERSION`` once complete.

    Args:
        model_path: a run folder (best.keras + config.json) or a ``.keras`` file with a
            config.json beside it.
        out_dir: ``saved_models/NAME``; NAME is the model name TF Serving serves.
        version: version number; default the highest existing version + 1 (1 if none).
        overwrite: replace ``out_dir/version`` if it exists.

    Returns:
        The version folder written.

    Raises:
        RunError: ``model_path`` is not a usable run or model.
        ExportError: bad name or version, an existing version without ``overwrite``, or a
            model that does not match its config.
    """
    out_dir = Path(out_dir)
    name = check_out_dir(out_dir)
    info = resolve_run(model_path)
    version = choose_version(out_dir, version, overwrite)
    model = load_model(info)
    target = out_dir / str(version)
    with atomic_path(target, is_dir=True) as tmp:
        write_saved_model(model, info, tmp)
    previous = _read_json(out_dir / INFO_FILE)
    with atomic_path(out_dir / CONFIG_FILE) as tmp:  # TF Serving may poll this file
        tmp.write_text(models_config(name))
    write_json(out_dir / INFO_FILE, export_info(name, info, version, previous, numeric_versions(out_dir)))
    return target


def _read_json(path: Path) -> dict:
    # A damaged export.json only loses the history of earlier versions, not the export.
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
