"""The run folder contract: what ``kerasunet train`` writes and what predict/evaluate/export read.

A run folder ``RUN_DIR`` holds::

    best.keras          the best model (train.monitor: highest val Dice or lowest val loss), Keras 3
    config.json         every setting (schema below), the git commit and the manifest hash
    history.csv         one row per epoch (loss, val_loss, per-channel dice/iou, lr)
    timing.csv          seconds per epoch
    learning_curves.png train/validation loss and Dice per epoch
    checkpoints/        resumable state (model + optimiser), written atomically each epoch
    logs/               TensorBoard
    lesion_filter.json  runs with a tumour output: lesion-filter thresholds fitted on the
                        validation cases' predicted lesions at the end of training
                        (kerasunet.lesion_filter; absent without validation cases or predicted
                        lesions); predict/evaluate/export apply them by default

``config.json`` keys used outside training::

    {"model": {"input_channels": C, "num_outputs": N, "outputs": ["liver", "tumour"] | ["tumour"] | ...,
               "filters": F, "depth": D, "dropout": p},
     "data":  {"modality": "ct"|"mri", "context": K, "norm": NormSettings.to_dict(),
               "image_size": [H, W] | null, "records": "...", "manifest_sha256": "..."},
     "train": {...}, "git_commit": "...", "kerasunet_version": "..."}

3D runs (``train --dims 3``, :mod:`kerasunet.patches`) add three ``model`` keys::

    {"model": {..., "dims": 3, "patch_size": [PD, PH, PW], "spacing": [sD, sH, sW]}}

* ``dims``: 2 or 3 spatial axes; a config without it is a 2D run (``RunInfo.dims`` 2).
* ``patch_size``: the training patch ``(D, H, W)`` in voxels, D the slice (canonical z)
  axis and H, W the canonical x, y axes of the 2D slices (:mod:`kerasunet.planner`'s
  order). Sliding-window inference uses it as its window. 2D runs: absent or null.
* ``spacing``: the voxel spacing ``(D, H, W)`` in mm the pooling was planned from
  (:func:`kerasunet.planner.pooling_plan`; the median spacing of the training volumes).
  The model expects inputs at this spacing. 2D runs: absent or null.

A 3D model takes ``[N, D, H, W, C]`` with every spatial size None (the patch size is not
baked in): any size that is a multiple of each axis's pooling factor
(``pooling_factors(pooling_plan(spacing, depth))``) is accepted, so a window may be the
training patch or, where memory allows, a whole padded volume. ``data.context`` is 0 and
``data.image_size`` null for 3D runs.

A cascade's second stage (``train --stage tumour --liver-model RUN``, :mod:`kerasunet.cascade`)
has ``model.outputs`` ``["tumour"]`` and one more key::

    {"cascade": {"liver_model": "/abs/path/to/stage-1 run", "roi_size": [H, W], "margin_mm": m}}

* ``liver_model``: the stage-1 run (a 2D run whose outputs include liver), absolute path.
* ``roi_size``: the size every liver ROI is resized to before the model (its input size).
* ``margin_mm``: the margin around the liver's bounding box, in mm.

predict, evaluate and export given such a run run both stages and return the cascade's
outputs (liver from stage 1, tumour from stage 2 inside the liver; CT labels 0/1/2).
Runs without the key are not cascades (``RunInfo.cascade`` None).

A ``.keras`` file may be given instead of a run folder when a ``config.json`` sits next to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kerasunet.core.preprocessing import NormSettings
from kerasunet.core.records_format import context_channels

MODEL_FILE = "best.keras"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
TIMING_FILE = "timing.csv"
CURVES_FILE = "learning_curves.png"
LESION_FILTER_FILE = "lesion_filter.json"


class RunError(ValueError):
    """A path that is not a usable kerasunet run or model. The message names the path."""


@dataclass(frozen=True)
class RunInfo:
    """What inference needs to know about a trained model."""

    model_path: Path
    config: dict

    @property
    def modality(self) -> str:
        return self.config["data"]["modality"]

    @property
    def outputs(self) -> tuple[str, ...]:
        """The structures of the model's output channels, in order (``labels.label_values``
        gives their mask values); runs written before this key: the modality's default."""
        from kerasunet.core.labels import OUTPUTS

        return tuple(self.config["model"].get("outputs") or OUTPUTS[self.modality])

    @property
    def mask_outputs(self) -> tuple[str, ...]:
        """The structures of the masks predict writes with this run: ``outputs``, or a
        cascade's ``("liver", "tumour")`` (liver from its first stage)."""
        return ("liver", "tumour") if self.cascade else self.outputs

    @property
    def cascade(self) -> dict | None:
        """A cascade's second stage: config.json's ``cascade`` (liver_model, roi_size,
        margin_mm); None for other runs."""
        return self.config.get("cascade") or None

    @property
    def context(self) -> int:
        return int(self.config["data"].get("context", 0))

    @property
    def norm(self) -> NormSettings:
        return NormSettings.from_dict(self.config["data"]["norm"])

    @property
    def depth(self) -> int:
        return int(self.config["model"]["depth"])

    @property
    def input_channels(self) -> int:
        return int(self.config["model"]["input_channels"])

    @property
    def dims(self) -> int:
        """Spatial axes of the model: 2 (slices) or 3 (volumes); runs without the key are 2D."""
        return int(self.config["model"].get("dims") or 2)

    @property
    def patch_size(self) -> tuple[int, int, int] | None:
        """The training patch ``(D, H, W)`` in voxels of a 3D run; None for 2D runs."""
        size = self.config["model"].get("patch_size")
        return tuple(int(s) for s in size) if size else None

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """The voxel spacing ``(D, H, W)`` in mm a 3D run's pooling was planned from; None for 2D."""
        spacing = self.config["model"].get("spacing")
        return tuple(float(s) for s in spacing) if spacing else None


def resolve_run(path: str | Path) -> RunInfo:
    """Finds the model file and config of a run folder or ``.keras`` file.

    Raises:
        RunError: no model or no config.json is found, or the config is not kerasunet's.
    """
    path = Path(path)
    if path.is_dir():
        model_path, config_path = path / MODEL_FILE, path / CONFIG_FILE
    else:
        model_path, config_path = path, path.parent / CONFIG_FILE
    if not model_path.exists():
        raise RunError(f"{model_path}: no model file (expected a run folder holding {MODEL_FILE} "
                       "or a .keras file)")
    if not config_path.exists():
        raise RunError(f"{config_path}: missing; a kerasunet model needs the config.json of its run")
    try:
        config = json.loads(config_path.read_text())
        config["data"]["modality"], config["data"]["norm"], config["model"]["depth"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{config_path}: not a kerasunet run config ({exc})") from None
    return RunInfo(model_path=model_path, config=config)


def load_model(info: RunInfo):
    """Loads the Keras model of a run with ``safe_mode=True`` (no code from the file runs).

    Raises:
        RunError: the file is not a Keras model kerasunet can load, or its input/output
            channels do not match its config.
    """
    import keras

    import kerasunet.model  # noqa: F401  registers custom layers, losses and metrics

    try:
        model = keras.saving.load_model(info.model_path, compile=False, safe_mode=True)
    except Exception as exc:
        raise RunError(f"{info.model_path}: not a loadable kerasunet model "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    check_model(model, info)
    return model


def check_model(model, info: RunInfo) -> None:
    """Checks spatial axes (``dims``), input channels (2K+1 of the config's context) and outputs.

    Raises:
        RunError: a mismatch; the message names the model file.
    """
    if len(model.input_shape) - 2 != info.dims:
        raise RunError(f"{info.model_path}: model takes {len(model.input_shape) - 2}D inputs "
                       f"{tuple(model.input_shape)} but its config has dims={info.dims}")
    channels, expected = model.input_shape[-1], context_channels(info.context)
    if channels != expected or channels != info.input_channels:
        raise RunError(f"{info.model_path}: model takes {channels} input channels but its config has "
                       f"context K={info.context} (expected 2K+1={expected}), "
                       f"input_channels={info.input_channels}")
    outputs, names = model.output_shape[-1], info.outputs
    if outputs != len(names):
        raise RunError(f"{info.model_path}: model has {outputs} output channels; its config.json "
                       f"names {len(names)} {names}")
