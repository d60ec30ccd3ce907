"""``kerasunet train``: one custom training loop for one device, several GPUs and several nodes.

The loop runs the step functions of :mod:`kerasunet.steps` (a ``strategy.run`` step inside a
``tf.function``: GradientTape + ``optimizer.apply_gradients``) under every ``tf.distribute``
strategy that :func:`kerasunet.distribute.select_strategy` picks. Keras 3's ``model.fit``
would do for one node, but it fails under ``MultiWorkerMirroredStrategy``
(keras-team/keras#20585), and one loop for all cases keeps them from drifting apart.

Each training step's loss is the loss of the global batch, Dice included, whatever the
replica count (how it is reduced across replicas: :mod:`kerasunet.steps`). Training batches
are full (``drop_remainder``) and every worker runs the same number of steps per epoch.
BatchNorm moving statistics are set to their mean over replicas once an epoch.

Validation runs on each process's default device over the whole validation split, outside
``strategy.run``: every worker holds identical weights, so every worker gets the same
numbers without collective ops, and uneven validation shards cannot deadlock workers. The
validation loss is the mean of per-batch losses, as the training loss is.

Mixed precision (``--mixed-precision``): ``auto`` uses ``mixed_float16`` when a GPU is
visible, ``on`` always, ``off`` never. The policy is set before the model is built (the
head's sigmoid stays float32) and restored afterwards; the optimiser is wrapped in
``keras.optimizers.LossScaleOptimizer``. On CPU ``on`` works but is slow, as float16
convolutions are emulated there. ``best.keras`` is always saved as a float32 model.

The run folder is described in :mod:`kerasunet.core.runs` and written by
:mod:`kerasunet.rundir`. ``--out`` must be empty or absent unless ``--resume`` is given;
``--resume`` on an empty folder starts a new run (so job scripts may always pass it). A
resumed run must have the settings of its config.json (``--epochs`` may be raised; with the
cosine schedule the decay then spans the new total). It restores model, optimiser
(iterations, moments, loss scale, learning rate), epoch, best monitored value and plateau
counter from the newest checkpoint and keeps the history rows up to that epoch. Random
seeds are reset to ``seed + completed_epochs`` on resume: a resumed run is reproducible, but
it does not draw the same batches and dropout masks as an uninterrupted run would have.

Model selection (``--monitor``): ``best.keras`` is the epoch with the highest moving average
(:data:`DICE_EMA`) of the mean validation Dice over the output channels (``dice``, the default:
CT liver and tumour, MRI tumour) or the lowest validation loss (``loss``, the research's rule).
history.csv records ``val_dice`` and its average ``val_dice_ema`` and marks the epochs that
wrote ``best.keras`` (``best`` = 1); config.json's ``train.monitor``
names the rule. The plateau schedule watches the same number.

A shard that goes missing or is cut short while training reads it stops the run with one
line naming the shard; the checkpoint of the last finished epoch is kept.

3D (``--dims 3``, docs/3d.md): the same loop, losses, modes, precision, distribution and
resume on patches of volume records (:func:`kerasunet.patches.get_patch_dataset`), with the
3D network planned from the records' median spacing (``build_unet(dims=3, spacing=...)``).
Before anything is built, the planner's peak-memory estimate per replica is printed in
float32 and mixed precision, and a patch over ``--memory-budget`` is refused in one line
naming the largest patch of the same shape that fits (:func:`check_memory_plan`). An epoch
is ``PATCHES_PER_VOLUME`` patches per training volume unless ``--steps-per-epoch`` says.

Cascade (``--stage tumour --liver-model RUN``, :mod:`kerasunet.cascade`): the same loop on
the liver ROIs of the slice records, resized to ``--roi-size``, with one output (tumour; the
records' liver-and-tumour labels give its targets). The ROI is each case's liver box plus
``--roi-margin-mm``, jittered in training; slices outside its z range are dropped. The
liver model is checked (a 2D run that outputs liver, of the records' modality) before
anything is built, and config.json records it under ``cascade``.

Lesion filter: after the last epoch, a run with a tumour output (whole-slice, 3D, or a
cascade's second stage with stage 1's liver boxes) segments the validation cases as
``predict`` does with best.keras, and the lesion filter fitted on their predicted lesions is
written to ``lesion_filter.json`` (:func:`kerasunet.lesion_filter.fit_run_lesion_filter`);
predict, evaluate and export apply it by default. When it cannot be fitted (no validation
cases, their source volumes gone) one line says so and the run keeps every lesion.

In multi-worker runs only the chief (task ``chief``, else ``worker`` 0) writes ``--out``;
the other workers write their checkpoints and logs to a temporary folder deleted at the
end, and resume from the chief's checkpoints (a shared file system is assumed).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from kerasunet.cascade import CascadeSettings
from kerasunet.core.records_format import MANIFEST_FILE
from kerasunet.train_settings import TrainError, TrainSettings

__all__ = ["FitResult", "TrainError", "TrainSettings", "fit", "train"]

KEEP_CHECKPOINTS = 2
PROGRESS_LINES_PER_EPOCH = 10
# Weight of the past in the moving average of the validation Dice that picks best.keras
# (``--monitor dice``); nnU-Net smooths its pseudo-Dice the same way before picking its best.
DICE_EMA = 0.9


@dataclass
class FitResult:
    """What :func:`fit` returns: the chief's run folder, the trained model, the history rows."""

    run_dir: Path
    model: object
    history: list[dict] = field(default_factory=list)


@dataclass
class Inputs:
    """The datasets of a run: a distributed training iterator and the validation batches."""

    train_iter: object
    val: object | None
    steps: int
    channels: int
    output_names: tuple
    spacing: tuple | None = None  # 3D: the (D, H, W) spacing the pooling is planned from


@dataclass
class State:
    """What a run trains and checkpoints: model, optimiser, loss, metrics and loop counters."""

    model: object
    optimizer: object
    export_model: object  # best.keras's float32 twin
    loss_fn: object
    train_metrics: list
    val_metrics: list
    epoch: object  # tf.Variables, so the checkpoint holds them
    best: object
    wait: object
    checkpoint: object


class Steps(NamedTuple):
    """The step functions of a run (:mod:`kerasunet.steps`)."""

    train: Callable
    val: Callable
    sync: Callable | None


def train(settings: TrainSettings, progress=print) -> Path:
    """Trains a U-Net and writes the run folder (see :func:`fit`).

    Returns:
        The run folder ``settings.out``.
    """
    return fit(settings, progress).run_dir


def fit(settings: TrainSettings, progress=print) -> FitResult:
    """Trains a U-Net as ``settings`` say, under the strategy this process calls for.

    Args:
        settings: The run's settings.
        progress: Called with one line of text per progress message.

    Returns:
        A :class:`FitResult` (model and history of this process; on the chief the same as
        the run folder holds).

    Raises:
        TrainError: bad records, run folder, pretrained model, a shard that cannot be read,
            or a NaN/Inf loss.
    """
    from kerasunet.distribute import describe, is_chief, select_strategy, tf_config

    strategy = select_strategy()  # before any other TensorFlow op (multi-worker needs it)
    import keras

    from kerasunet.rundir import check_run_dir

    manifest, manifest_sha = read_manifest(Path(settings.records))
    check_records_kind(settings, manifest)
    if settings.stage == "tumour":
        check_cascade(settings, manifest)
    if settings.dims == 3:
        check_3d_precision(settings)
        check_memory_plan(settings, manifest, strategy, progress)
    run_dir = Path(settings.out)
    chief = is_chief(tf_config())
    if chief:
        check_run_dir(run_dir, settings, manifest_sha)
    write_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix="kerasunet-worker-"))
    policy = precision_policy(settings.mixed_precision, progress)
    progress(f"training on {describe(strategy)}, policy {policy}, writing {write_dir}")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        return run(settings, strategy, manifest, manifest_sha, run_dir, write_dir, progress)
    finally:
        keras.mixed_precision.set_global_policy(previous)
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)


def read_manifest(records: Path) -> tuple[dict, str]:
    """The records' manifest and the sha256 of its bytes.

    Raises:
        TrainError: no manifest, or no training examples in it.
    """
    from kerasunet import data

    path = records / MANIFEST_FILE
    if not path.is_file():
        raise TrainError(f"{records}: no {MANIFEST_FILE}; build records with `kerasunet build-records` first")
    try:
        manifest = data.read_manifest(records)
    except ValueError as exc:
        raise TrainError(f"{records}: unreadable manifest ({exc})") from None
    train_split = manifest.get("splits", {}).get("train") or {}
    if not train_split.get("num_examples"):
        raise TrainError(f"{records}: no train split (0 training examples in {MANIFEST_FILE})")
    return manifest, hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_outputs(manifest: dict) -> tuple[str, ...]:
    """The structures the records' label maps hold (the manifest's ``outputs``; older
    manifests: the modality's default)."""
    from kerasunet.core.labels import OUTPUTS

    return tuple(manifest.get("outputs") or OUTPUTS[manifest["modality"]])


def precision_policy(mode: str, progress=print) -> str:
    """The Keras dtype policy for ``--mixed-precision`` ``auto``/``on``/``off``."""
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if mode == "off" or (mode == "auto" and not has_gpu):
        return "float32"
    if not has_gpu:
        progress("warning: mixed precision on CPU is slow (float16 convolutions are emulated)")
    return "mixed_float16"


def git_commit() -> str | None:
    """The commit of the kerasunet checkout, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def latest_checkpoint(run_dir: Path) -> tuple[str | None, int]:
    """The newest checkpoint in ``run_dir/checkpoints`` and the epochs it completed."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    if path is None:
        return None, 0
    return path, int(tf.train.load_variable(path, "epoch/.ATTRIBUTES/VARIABLE_VALUE"))


def shard_options(num_files: int):
    """tf.data options for multi-worker input: split files between workers when there are
    enough, else let every worker read all files and keep its share of the batches (DATA)."""
    import tensorflow as tf

    from kerasunet.distribute import num_workers

    options = tf.data.Options()
    if num_files < num_workers():
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


# --- setup -------------------------------------------------------------------------------

def check_records_kind(settings: TrainSettings, manifest: dict) -> None:
    """Raises a :class:`TrainError` when the records' kind (slices, volumes) does not fit ``--dims``."""
    kind = manifest.get("kind", "slices")
    if (kind == "volumes") != (settings.dims == 3):
        raise TrainError(f"{settings.records}: holds {kind.rstrip('s')} records; --dims {settings.dims} trains on "
                         + ("volume records (build-records --volumes)" if settings.dims == 3
                            else "slice records (build-records without --volumes), or pass --dims 3"))


def default_memory_budget() -> float:
    """GiB of the first GPU's memory as TensorFlow's allocator sees it, else ``CPU_MEMORY_BUDGET``."""
    import tensorflow as tf

    from kerasunet.train_settings import CPU_MEMORY_BUDGET

    if not tf.config.list_physical_devices("GPU"):
        return CPU_MEMORY_BUDGET
    from tensorflow.python.client import device_lib  # the only API that reports a GPU's memory

    limits = [d.memory_limit for d in device_lib.list_local_devices() if d.device_type == "GPU"]
    return limits[0] / 2**30 if limits else CPU_MEMORY_BUDGET


def check_3d_precision(settings: TrainSettings) -> None:
    """Refuses mixed precision for a 3D run on CPU: TensorFlow has no float16 MaxPool3D kernel there."""
    import tensorflow as tf

    if settings.mixed_precision == "on" and not tf.config.list_physical_devices("GPU"):
        raise TrainError("--mixed-precision on with --dims 3 needs a GPU (TensorFlow has no float16 3D "
                         "max-pooling on CPU); use --mixed-precision auto or off")


def check_memory_plan(settings: TrainSettings, manifest: dict, strategy, progress) -> None:
    """Prints the planner's peak-memory estimate of one 3D training step per replica, in float32
    and mixed precision, and refuses a patch whose estimate for the run's precision is over the
    budget.

    Raises:
        TrainError: one line: a patch that breaks the pooling's size rule, or over the budget
            (naming the largest patch of the same shape that fits).
    """
    from kerasunet.patches import records_spacing
    from kerasunet.planner import PRECISIONS, check_memory, estimate_memory

    s = settings
    budget = s.memory_budget or default_memory_budget()
    batch = -(-s.batch_size // strategy.num_replicas_in_sync)
    arch = dict(channels=int(manifest.get("channels", 1)), num_outputs=len(manifest_outputs(manifest)),
                filters=s.filters, depth=s.depth, spacing=records_spacing(manifest))
    precision = precision_policy(s.mixed_precision, lambda line: None)
    try:
        for name in PRECISIONS:
            progress(f"memory estimate per replica: {estimate_memory(s.patch_size, batch, name, **arch).describe()}")
        check_memory(s.patch_size, budget, batch, precision, **arch)
    except ValueError as exc:  # MemoryBudgetError, or a patch the pooling cannot take
        raise TrainError(str(exc)) from None


def run_augment(settings: TrainSettings, base=None):
    """The run's training augmentation, None with ``--no-augment``: ``base`` (default: the 2D
    reader's ``AugmentSettings()``) with the intensity transforms of ``--augment-intensity``."""
    from kerasunet.augment import AugmentSettings, with_intensity

    return with_intensity(base or AugmentSettings(), settings.augment_intensity) if settings.augment else None


def make_patch_inputs(settings: TrainSettings, manifest: dict, strategy, start_epoch: int) -> Inputs:
    """:func:`make_inputs` for ``--dims 3``: patches of volume records (:mod:`kerasunet.patches`)."""
    from kerasunet.patches import PATCH_AUGMENT, PATCHES_PER_VOLUME, get_patch_dataset, records_spacing

    s, splits = settings, manifest["splits"]
    steps = s.steps_per_epoch or max(1, splits["train"]["num_examples"] * PATCHES_PER_VOLUME // s.batch_size)
    try:
        train_ds = get_patch_dataset(s.records, "train", s.batch_size, True, s.patch_size,
                                     foreground_share=s.oversample_tumour,
                                     augment=run_augment(s, PATCH_AUGMENT), seed=s.seed + start_epoch,
                                     repeat=True, drop_remainder=True)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    train_ds = train_ds.with_options(shard_options(len(splits["train"]["shards"])))
    val = None
    if (splits.get("val") or {}).get("num_examples", 0) > 0:
        val = get_patch_dataset(s.records, "val", s.batch_size, False, s.patch_size)
    return Inputs(iter(strategy.experimental_distribute_dataset(train_ds)), val, steps,
                  int(train_ds.element_spec[0].shape[-1]), manifest_outputs(manifest), records_spacing(manifest))


def check_cascade(settings: TrainSettings, manifest: dict) -> None:
    """Raises a one-line :class:`TrainError` when ``--liver-model`` cannot be a cascade's first stage."""
    from kerasunet.cascade import CascadeError, check_liver_model

    try:
        check_liver_model(settings.liver_model, manifest["modality"])
    except CascadeError as exc:
        raise TrainError(str(exc)) from None
    if "tumour" not in manifest_outputs(manifest):
        raise TrainError(f"{settings.records}: the records hold no tumour labels "
                         f"({list(manifest_outputs(manifest))}); --stage tumour trains on them")


def make_roi_inputs(settings: TrainSettings, manifest: dict, strategy, start_epoch: int) -> Inputs:
    """:func:`make_inputs` for ``--stage tumour``: liver ROIs of the slice records (:mod:`kerasunet.cascade`)."""
    from kerasunet.cascade import case_liver_boxes, roi_dataset, roi_slice_count

    s, splits = settings, manifest["splits"]
    boxes = case_liver_boxes(s.records, manifest, ("train", "val"))
    steps = s.steps_per_epoch or max(1, roi_slice_count(boxes, s.roi_margin_mm) // s.batch_size)
    roi = dict(roi_size=s.roi_size, margin_mm=s.roi_margin_mm, boxes=boxes)
    try:
        train_ds = roi_dataset(s.records, "train", s.batch_size, True, **roi,
                               augment=run_augment(s),
                               oversample_tumour=s.oversample_tumour, seed=s.seed + start_epoch,
                               repeat=True, drop_remainder=True)
        val = None
        if any(case in boxes for case in (splits.get("val") or {}).get("cases", [])):
            val = roi_dataset(s.records, "val", s.batch_size, False, **roi)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    train_ds = train_ds.with_options(shard_options(len(splits["train"]["shards"])))
    return Inputs(iter(strategy.experimental_distribute_dataset(train_ds)), val, steps,
                  int(train_ds.element_spec[0].shape[-1]), ("tumour",))


def make_inputs(settings: TrainSettings, manifest: dict, strategy, start_epoch: int) -> Inputs:
    """The training iterator (distributed, repeated, seeded by epoch) and validation batches.

    Raises:
        TrainError: the records cannot serve this run (e.g. oversampling a split without tumour).
    """
    if settings.dims == 3:
        return make_patch_inputs(settings, manifest, strategy, start_epoch)
    if settings.stage == "tumour":
        return make_roi_inputs(settings, manifest, strategy, start_epoch)
    from kerasunet import data

    s, splits = settings, manifest["splits"]
    output_names = manifest_outputs(manifest)
    steps = s.steps_per_epoch or max(1, splits["train"]["num_examples"] // s.batch_size)
    shape = dict(image_size=s.image_size, pad_to_multiple=None if s.image_size else 2**s.depth)
    try:
        train_ds = data.get_dataset(s.records, "train", s.batch_size, training=True, **shape,
                                    augment=run_augment(s),
                                    oversample_tumour=s.oversample_tumour, seed=s.seed + start_epoch,
                                    repeat=True, drop_remainder=True)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    train_ds = train_ds.with_options(shard_options(len(splits["train"]["shards"])))
    channels = int(train_ds.element_spec[0].shape[-1])
    val = None
    if (splits.get("val") or {}).get("num_examples", 0) > 0:
        val = data.get_dataset(s.records, "val", s.batch_size, training=False, **shape)
    return Inputs(iter(strategy.experimental_distribute_dataset(train_ds)), val, steps, channels, output_names)


def build_state(settings: TrainSettings, strategy, inputs: Inputs) -> State:
    """Model (transfer mode applied), optimiser, loss, metrics and checkpoint of a run.

    Raises:
        TrainError: the pretrained model is missing or does not match (names its path).
    """
    import keras
    import tensorflow as tf

    from kerasunet.core.runs import RunError
    from kerasunet.losses import get_loss
    from kerasunet.metrics import metrics_for
    from kerasunet.model import build_unet
    from kerasunet.schedule import learning_rate
    from kerasunet.transfer import build_for_mode

    s, names = settings, inputs.output_names
    arch = dict(filters=s.filters, depth=s.depth, dropout=s.dropout)
    if s.dims == 3:
        arch |= dict(dims=3, spacing=inputs.spacing)
    input_shape = (None,) * s.dims + (inputs.channels,)  # any size the pooling takes (kerasunet.core.runs)
    with strategy.scope():
        try:
            model = build_for_mode(s.mode, input_shape, len(names), pretrained=s.pretrained,
                                   freeze_blocks=s.freeze_blocks, outputs=names, **arch)
        except (RunError, ValueError) as exc:
            raise TrainError(str(exc)) from None
        optimizer = keras.optimizers.Adam(learning_rate(s.lr, s.schedule, s.epochs * inputs.steps))
        if keras.mixed_precision.global_policy().name == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        train_metrics = metrics_for(names)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        export_model = build_unet(input_shape, len(names), **arch)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    best = tf.Variable(math.inf, dtype=tf.float64, trainable=False)
    wait = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch, best=best, wait=wait)
    return State(model, optimizer, export_model, get_loss(s.loss, names), train_metrics, metrics_for(names),
                 epoch, best, wait, checkpoint)


def make_config(settings: TrainSettings, manifest: dict, manifest_sha: str, inputs: Inputs) -> dict:
    """The run's config.json (schema in :mod:`kerasunet.core.runs`)."""
    import kerasunet

    s = settings
    volume = {"dims": 3, "patch_size": list(s.patch_size), "spacing": list(inputs.spacing)} if s.dims == 3 else {}
    return {
        "model": {"input_channels": inputs.channels, "num_outputs": len(inputs.output_names),
                  "outputs": list(inputs.output_names),
                  "filters": s.filters, "depth": s.depth, "dropout": s.dropout, **volume},
        "data": {"modality": manifest["modality"], "context": manifest.get("context", 0),
                 "norm": manifest["norm"], "image_size": list(s.image_size) if s.image_size else None,
                 "records": str(Path(s.records).resolve()), "manifest_sha256": manifest_sha},
        "train": s.to_dict(),
        **({"cascade": CascadeSettings(str(Path(s.liver_model).resolve()), s.roi_size, s.roi_margin_mm).to_dict()}
           if s.stage == "tumour" else {}),
        "git_commit": git_commit(),
        "kerasunet_version": kerasunet.__version__,
    }


# --- the loop ------------------------------------------------------------------------------

def run(settings: TrainSettings, strategy, manifest: dict, manifest_sha: str, run_dir: Path,
        write_dir: Path, progress) -> FitResult:
    """Builds the run (resuming from ``run_dir``'s newest checkpoint) and trains to ``settings.epochs``."""
    import keras
    import tensorflow as tf

    from kerasunet.rundir import RunWriter, previous_rows
    from kerasunet.data import targets_from_labels
    from kerasunet.steps import make_sync_step, make_train_step, make_val_step

    resume_from, start_epoch = latest_checkpoint(run_dir) if settings.resume else (None, 0)
    keras.utils.set_random_seed(settings.seed + start_epoch)
    inputs = make_inputs(settings, manifest, strategy, start_epoch)
    state = build_state(settings, strategy, inputs)
    # the steps expand the reader's uint8 label maps (the records' outputs) into the model's targets
    def to_targets(labels):
        return targets_from_labels(labels, inputs.output_names, manifest_outputs(manifest))

    steps = Steps(make_train_step(state.model, state.optimizer, state.loss_fn, state.train_metrics, strategy,
                                  to_targets),
                  make_val_step(state.model, state.loss_fn, state.val_metrics, to_targets),
                  make_sync_step(state.model, strategy))
    writer = RunWriter(write_dir)
    if resume_from is not None:
        state.checkpoint.restore(resume_from).assert_existing_objects_matched()
        progress(f"resuming {run_dir} after epoch {start_epoch} from {resume_from}")
        writer.history, writer.timing = previous_rows(run_dir, start_epoch)
    writer.write_config(make_config(settings, manifest, manifest_sha, inputs))
    manager = tf.train.CheckpointManager(state.checkpoint, str(write_dir / "checkpoints"),
                                         max_to_keep=KEEP_CHECKPOINTS)
    if start_epoch >= settings.epochs:
        progress(f"{run_dir}: already trained for {start_epoch} epoch(s); nothing to do")
    for epoch in range(start_epoch + 1, settings.epochs + 1):
        start = time.perf_counter()
        with records_errors(settings.records, manifest, "train", manager, epoch):
            row = {"epoch": epoch, **train_epoch(settings, inputs, state, steps, epoch, manager, progress)}
        with records_errors(settings.records, manifest, "val", manager, epoch):
            row |= validate(inputs, state, steps.val)
        end_epoch(settings, state, writer, row, time.perf_counter() - start, inputs.val is not None, progress)
        manager.save()  # last, so a checkpoint never runs ahead of the files above
    writer.plot_curves()
    if "tumour" in inputs.output_names and write_dir == run_dir:  # the chief: the run's own lesion filter
        from kerasunet.core.nifti import VolumeError
        from kerasunet.core.runs import RunError
        from kerasunet.lesion_filter import fit_run_lesion_filter

        try:
            fit_run_lesion_filter(run_dir, settings.records, progress)
        except (RunError, VolumeError) as exc:  # e.g. the stage-1 run moved meanwhile; the model is kept
            progress(f"lesion filter: not fitted ({exc}); {run_dir} keeps every lesion")
    return FitResult(run_dir=run_dir, model=state.model, history=writer.history)


def train_epoch(settings, inputs: Inputs, state: State, steps: Steps, epoch: int, manager, progress) -> dict:
    """Runs one epoch of training steps; returns mean loss and train Dice/IoU.

    Raises:
        TrainError: the loss became NaN or Inf (names the checkpoint kept).
    """
    for metric in state.train_metrics:
        metric.reset_state()
    total, start, n = 0.0, time.perf_counter(), inputs.steps
    every = max(1, n // PROGRESS_LINES_PER_EPOCH)
    for step in range(1, n + 1):
        loss = float(steps.train(inputs.train_iter))
        if not math.isfinite(loss):
            raise TrainError(f"loss became {'NaN' if math.isnan(loss) else 'Inf'} at epoch {epoch} "
                             f"step {step}; {kept_checkpoint(manager)}")
        total += loss
        if step % every == 0 or step == n:
            eta = (time.perf_counter() - start) / step * (n - step)
            progress(f"epoch {epoch}/{settings.epochs} step {step}/{n} loss {total / step:.4f} eta {eta:.0f}s")
    if steps.sync is not None:
        steps.sync()
    return {"loss": total / n, **_results(state.train_metrics)}


def validate(inputs: Inputs, state: State, val_step) -> dict:
    """Loss and Dice/IoU over the validation split ({} without one)."""
    if inputs.val is None:
        return {}
    for metric in state.val_metrics:
        metric.reset_state()
    loss_sum = count = 0.0
    for x, y in inputs.val:
        batch_loss, n = val_step(x, y)
        loss_sum, count = loss_sum + float(batch_loss), count + float(n)
    row = {"val_loss": loss_sum / max(count, 1.0)}
    return row | {f"val_{k}": v for k, v in _results(state.val_metrics).items()}


def end_epoch(settings, state: State, writer, row: dict, seconds: float, has_val: bool, progress) -> None:
    """Best model, plateau schedule, the run folder's files and a summary line."""
    from kerasunet.schedule import apply_plateau, current_lr

    row["lr"] = current_lr(state.optimizer)
    if has_val:
        row["val_dice"] = mean_val_dice(row)
        row["val_dice_ema"] = smoothed_val_dice(writer.history, row["val_dice"])
    score = monitored(row, settings.monitor)
    improved = score < float(state.best.numpy())  # False for NaN
    if improved:
        state.best.assign(score)
    row["best"] = int(improved or not has_val)
    if row["best"]:  # without validation, best.keras is the last epoch
        writer.save_model(state.model, state.export_model)
    state.epoch.assign(row["epoch"])
    if settings.schedule == "plateau":
        lowered = apply_plateau(state.optimizer, state.wait, improved)
        if lowered is not None:
            progress(f"plateau: learning rate now {lowered:.3g}")
    writer.end_epoch(row, seconds)
    shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "best"))
    progress(f"epoch {row['epoch']}/{settings.epochs} done in {seconds:.1f}s: {shown}"
             + (" (best so far)" if improved else ""))


def mean_val_dice(row: dict) -> float:
    """The mean validation Dice over the output channels (``val_dice_<name>`` entries of ``row``)."""
    values = [v for k, v in row.items() if k.startswith("val_dice_")]
    return sum(values) / len(values)


def smoothed_val_dice(history: list[dict], val_dice: float) -> float:
    """The exponential moving average of ``val_dice`` over the epochs so far (:data:`DICE_EMA`).

    Starts at the first epoch's value (or a resumed run's first epoch without one in
    ``history``); ``history`` holds the earlier epochs' rows.
    """
    previous = history[-1].get("val_dice_ema", math.nan) if history else math.nan
    return val_dice if math.isnan(previous) else DICE_EMA * previous + (1 - DICE_EMA) * val_dice


def monitored(row: dict, monitor: str) -> float:
    """The number ``best.keras`` minimises for ``monitor`` in an epoch's history ``row``.

    ``dice``: minus the moving average of the mean validation Dice over the output channels
    (``val_dice_ema``, :func:`smoothed_val_dice`), so the best model has the highest smoothed
    Dice: a few validation cases make one epoch's Dice jumpy, and the raw maximum kept early
    spikes (docs/quality.md, the fifth run); CT weighs liver and tumour equally, so the liver (high and
    steady once learnt) guards against an epoch that finds tumours by losing the liver, and the
    tumour decides among the rest. ``loss``: the validation loss. Without a validation split
    both fall back to the training loss (and ``best.keras`` is then the last epoch).
    """
    if "val_loss" not in row:
        return row["loss"]
    return -row["val_dice_ema"] if monitor == "dice" else row["val_loss"]


def kept_checkpoint(manager) -> str:
    """What a stopped run leaves to resume from, for its one-line error."""
    last = manager.latest_checkpoint
    return f"last good checkpoint kept at {last}" if last else "no checkpoint was written (no epoch had finished)"


@contextlib.contextmanager
def records_errors(records, manifest: dict, split: str, manager, epoch: int):
    """Turns a shard that cannot be read into a one-line :class:`TrainError`.

    TensorFlow reports a deleted shard (NotFoundError), a truncated or corrupt one
    (DataLossError; FailedPreconditionError from the reader's per-shard count when a shard
    was cut at a record boundary) or an emptied split (OutOfRangeError) from inside a step, often without
    the file's name; :func:`unreadable_shard` finds it. The checkpoint of the last finished
    epoch stays as it was.
    """
    import tensorflow as tf

    try:
        yield
    except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.OutOfRangeError,
            tf.errors.FailedPreconditionError) as exc:
        raise TrainError(f"{unreadable_shard(Path(records), manifest, split, exc)}; training stopped in "
                         f"epoch {epoch}; {kept_checkpoint(manager)}") from None


def unreadable_shard(records: Path, manifest: dict, split: str, exc) -> str:
    """``"<shard>: <problem>"`` for the shard of ``split`` behind a TensorFlow read error.

    The shard named in TensorFlow's message if there is one; else the first shard of the
    split that fails :func:`kerasunet.data.verify_records` (missing, checksum, example
    count; this reads the records, on error only); else the records folder and the split.
    """
    from kerasunet import data

    reason = tf_reason(exc)
    shards = [str(records / shard["file"]) for shard in manifest["splits"][split]["shards"]]
    named = [path for path in shards if path in exc.message]
    if named:
        return f"{named[0]}: unreadable ({reason.replace(named[0] + '; ', '')})"
    problems = [p for p in data.verify_records(records) if p.startswith(tuple(f"{s}:" for s in shards))]
    if problems:
        return problems[0]
    return f"{records}: the {split} split could not be read ({reason})"


def tf_reason(exc) -> str:
    """The line of a TensorFlow op error that says what went wrong, with the error's type."""
    noise = r"\{\{function_node [^}]*\}\}|\[\[\{\{node [^]]*\]\]|\[Op:[^]]*\]( name: \S*)?"
    lines = [re.sub(noise, "", line).strip() for line in exc.message.splitlines()]
    reason = [line for line in lines
              if line and not line.startswith(("Graph execution error", "Detected at node", "File "))]
    return f"{type(exc).__name__}: {reason[0] if reason else 'no details'}"


def _results(metrics) -> dict:
    import keras

    return {m.name: float(keras.ops.convert_to_numpy(m.result())) for m in metrics}
