"""The run-folder writer of ``kerasunet train``: the files a run leaves (see :mod:`kerasunet.core.runs`).

:class:`RunWriter` owns ``config.json``, ``history.csv``, ``timing.csv``, the TensorBoard
logs, ``learning_curves.png`` and ``best.keras``; :func:`check_run_dir` decides whether a
folder may be written or resumed. Checkpoints are the training loop's (:mod:`kerasunet.train`).
Every file is written atomically, and each epoch's files are written before its checkpoint,
so a checkpoint never runs ahead of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kerasunet.core.atomic import atomic_path, write_csv, write_json
from kerasunet.core.runs import CONFIG_FILE, CURVES_FILE, HISTORY_FILE, MODEL_FILE, TIMING_FILE
from kerasunet.curves import plot_learning_curves, read_history
from kerasunet.train_settings import TrainError, TrainSettings, resume_conflict

LOGS_DIR = "logs"


def read_config(run_dir: Path) -> dict | None:
    """The run's config.json, or None when the folder has none.

    Raises:
        TrainError: config.json is not JSON with a ``train`` section.
    """
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
            raise ValueError("no 'train' section")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TrainError(f"{path}: unreadable run config ({reason}); restore it, or choose a new --out "
                         "for a new run") from None
    return config


def check_run_dir(run_dir: Path, settings: TrainSettings, manifest_sha: str) -> None:
    """Refuses to mix runs: ``out`` must be empty or absent unless resuming a matching run.

    Args:
        run_dir: The run folder (``settings.out``).
        settings: The new run's settings.
        manifest_sha: sha256 of the records' manifest.json.

    Raises:
        TrainError: a non-empty folder without ``--resume``; a resume with settings that
            differ from the run's config.json (``--epochs`` may be raised), on records with
            another manifest, or with an unreadable config.json.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"{run_dir}: exists and is not a folder")
    if not settings.resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise TrainError(f"{run_dir}: exists and is not empty; pass --resume to continue its run "
                             "or choose a new --out")
        return
    config = read_config(run_dir)
    if config is None:
        return
    conflict = resume_conflict(config["train"], settings)
    if conflict:
        raise TrainError(f"{run_dir}: {conflict}")
    old_sha = (config.get("data") or {}).get("manifest_sha256")
    if old_sha is not None and old_sha != manifest_sha:
        raise TrainError(f"{run_dir}: cannot resume on other records: {settings.records} has manifest sha256 "
                         f"{manifest_sha[:12]}…, the run used {old_sha[:12]}… "
                         f"({config['data'].get('records')}); pass those records, or choose a new --out")


def previous_rows(run_dir: Path, epochs: int) -> tuple[list[dict], list[dict]]:
    """The history and timing rows of the first ``epochs`` epochs of a run (for a resume).

    ``best`` (1 where the epoch wrote ``best.keras``) is read back as the int it was written as.
    """
    history = [{**r, **({"best": int(r["best"])} if r.get("best", math.nan) == r.get("best") else {})}
               for r in read_history(run_dir / HISTORY_FILE) if r["epoch"] <= epochs]
    return history, [r for r in read_history(run_dir / TIMING_FILE) if r["epoch"] <= epochs]


class RunWriter:
    """Writes one run's files into ``folder``.

    Args:
        folder: Where to write (the run folder, or a worker's temporary folder).
        history: Rows of earlier epochs (a resumed run), extended in place.
        timing: Their timing rows.
    """

    def __init__(self, folder: Path, history: list[dict] | None = None, timing: list[dict] | None = None):
        self.folder = Path(folder)
        self.history = [] if history is None else history
        self.timing = [] if timing is None else timing
        self._writers = None

    def write_config(self, config: dict) -> None:
        write_json(self.folder / CONFIG_FILE, config)

    def end_epoch(self, row: dict, seconds: float) -> None:
        """Adds one epoch: history and timing rows, CSVs, TensorBoard scalars, learning curves."""
        self.history.append(row)
        self.timing.append({"epoch": row["epoch"], "seconds": round(seconds, 3)})
        write_csv(self.folder / HISTORY_FILE, self.history)
        write_csv(self.folder / TIMING_FILE, self.timing)
        self.log_scalars(row)
        self.plot_curves()

    def plot_curves(self) -> None:
        if self.history:
            plot_learning_curves({"run": [self.history]}, self.folder / CURVES_FILE)

    def save_model(self, model, export_model) -> None:
        """Saves ``model``'s weights as ``best.keras`` through ``export_model`` (its float32 twin)."""
        export_model.set_weights(model.get_weights())
        with atomic_path(self.folder / MODEL_FILE) as tmp:
            export_model.save(tmp)

    def log_scalars(self, row: dict) -> None:
        """TensorBoard scalars: ``logs/train`` and ``logs/validation`` share tag names."""
        import tensorflow as tf

        if self._writers is None:
            self._writers = {name: tf.summary.create_file_writer(str(self.folder / LOGS_DIR / name))
                             for name in ("train", "validation")}
        for key, value in row.items():
            if key in ("epoch", "best"):
                continue
            name, tag = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            with self._writers[name].as_default():
                write_scalar(tag, value, row["epoch"])
        for writer in self._writers.values():
            writer.flush()


def write_scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar via ``tf.summary.write``.

    ``tf.summary.scalar`` needs the ``tensorboard`` package even to write; this writes the
    same event (a float32 tensor tagged for the "scalars" plugin) with TensorFlow alone.
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)
