"""``kerasunet train``: one custom training loop for one device, several GPUs and several nodes.

The loop is a ``strategy.run`` step inside a ``tf.function`` (GradientTape +
``optimizer.apply_gradients``), used under every ``tf.distribute`` strategy that
:func:`kerasunet.distribute.select_strategy` picks. Keras 3's ``model.fit`` would do for
one node, but it fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585), and
one loop for all cases keeps them from drifting apart.

Loss scaling across replicas: each replica computes the loss of its share of the batch
(a mean over its examples, as the losses in :mod:`kerasunet.losses` return) and weights it
by ``local_batch / global_batch``; the summed gradients are then those of the global batch
mean. For Dice, which is computed over a whole batch, this is the mean of per-replica Dice
terms rather than one Dice over the global batch. Training batches are full
(``drop_remainder``) and every worker runs the same number of steps per epoch.

BatchNorm moving statistics are updated per replica with the local batch; once an epoch
they are set to their mean over replicas (:meth:`Loop.make_sync_step`), which keeps workers
identical and, as the moving averages are linear, equals averaging every step.

Validation runs on each process's default device over the whole validation split, outside
``strategy.run``: every worker holds identical weights, so every worker gets the same
numbers without collective ops, and uneven validation shards cannot deadlock workers.

Mixed precision (``--mixed-precision``): ``auto`` uses ``mixed_float16`` when a GPU is
visible, ``on`` always, ``off`` never. The policy is set before the model is built (the
head's sigmoid stays float32) and restored afterwards; the optimiser is wrapped in
``keras.optimizers.LossScaleOptimizer``. On CPU ``on`` works but is slow, as float16
convolutions are emulated there. ``best.keras`` is always saved as a float32 model.

The run folder is described in :mod:`kerasunet.core.runs`. ``--out`` must be empty or absent
unless ``--resume`` is given; ``--resume`` on an empty folder starts a new run (so job
scripts may always pass it). A resumed run restores model, optimiser (iterations, moments,
loss scale, learning rate), epoch, best validation loss and plateau counter from the
newest checkpoint and keeps the history rows up to that epoch. Random seeds are reset to
``seed + completed_epochs`` on resume: a resumed run is reproducible, but it does not draw
the same batches and dropout masks as an uninterrupted run would have.

In multi-worker runs only the chief (task ``chief``, else ``worker`` 0) writes ``--out``;
the other workers write their checkpoints and logs to a temporary folder deleted at the
end, and resume from the chief's checkpoints (a shared file system is assumed).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kerasunet.core.atomic import atomic_path, write_csv, write_json
from kerasunet.curves import plot_learning_curves, read_history
from kerasunet.core.records_format import MANIFEST_FILE
from kerasunet.core.runs import CONFIG_FILE, MODEL_FILE

# Kept here (and checked against kerasunet.transfer / kerasunet.losses by the tests) so the
# CLI can list choices without importing TensorFlow.
MODES = ("scratch", "init", "freeze")
LOSSES = ("bce", "dice", "bce_dice", "focal", "masked")
SCHEDULES = ("none", "cosine", "plateau")
PRECISIONS = ("auto", "on", "off")
PLATEAU_FACTOR = 0.5
PLATEAU_PATIENCE = 2
KEEP_CHECKPOINTS = 2
PROGRESS_LINES_PER_EPOCH = 10


class TrainError(ValueError):
    """A training setting, input or state that stops a run; the message is one line."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``kerasunet train`` needs; each field is one command-line option.

    Attributes:
        records: Records folder written by ``kerasunet build-records``.
        out: Run folder to write (see :mod:`kerasunet.core.runs`).
        mode: ``scratch``, ``init`` or ``freeze`` (see :mod:`kerasunet.transfer`).
        pretrained: Run folder or ``.keras`` file for ``init``/``freeze``.
        epochs: Total epochs (a resumed run continues up to this number).
        batch_size: Global batch size (split over replicas).
        lr: Adam learning rate (the research: 1e-4 on CT, 5e-4 on MRI).
        loss: One of :data:`LOSSES`.
        filters, depth, dropout: U-Net architecture (:func:`kerasunet.model.build_unet`).
        image_size: ``(height, width)`` to resize/crop to; None pads the records' own size
            to a multiple of ``2**depth``.
        freeze_blocks: Encoder blocks frozen in ``freeze`` mode.
        schedule: ``none``, ``cosine`` (decay to 0 over the run) or ``plateau`` (halve the
            learning rate after 2 epochs without a lower validation loss; training loss
            when the records have no validation split).
        mixed_precision: ``auto``, ``on`` or ``off``.
        augment: Random augmentation of training slices.
        oversample_tumour: Share of training slices drawn from slices with tumour.
        steps_per_epoch: Training steps per epoch; None is one pass over the train split.
        seed: Seed for weights, data order, augmentation and dropout.
        resume: Continue the run in ``out`` from its newest checkpoint.
    """

    records: str
    out: str
    mode: str = "scratch"
    pretrained: str | None = None
    epochs: int = 5
    batch_size: int = 10
    lr: float = 1e-4
    loss: str = "bce_dice"
    filters: int = 32
    depth: int = 4
    dropout: float = 0.5
    image_size: tuple[int, int] | None = None
    freeze_blocks: int = 2
    schedule: str = "none"
    mixed_precision: str = "auto"
    augment: bool = True
    oversample_tumour: float = 0.33
    steps_per_epoch: int | None = None
    seed: int = 0
    resume: bool = False

    def __post_init__(self):
        for name, allowed in (("mode", MODES), ("loss", LOSSES), ("schedule", SCHEDULES),
                              ("mixed_precision", PRECISIONS)):
            _check(getattr(self, name) in allowed, f"{name} in {allowed}", name, getattr(self, name))
        if self.mode != "scratch" and not self.pretrained:
            raise TrainError(f"--mode {self.mode} needs --pretrained (a CT run folder or .keras file)")
        if self.mode == "scratch" and self.pretrained:
            raise TrainError("--mode scratch trains new weights; drop --pretrained or use --mode init|freeze")
        for name in ("epochs", "batch_size", "filters", "depth"):
            _check(getattr(self, name) >= 1, f"{name} >= 1", name, getattr(self, name))
        _check(self.lr > 0, "lr > 0", "lr", self.lr)
        _check(0 <= self.dropout < 1, "0 <= dropout < 1", "dropout", self.dropout)
        _check(0 <= self.oversample_tumour < 1, "0 <= oversample_tumour < 1", "oversample_tumour",
               self.oversample_tumour)
        _check(self.steps_per_epoch is None or self.steps_per_epoch >= 1, "steps_per_epoch >= 1",
               "steps_per_epoch", self.steps_per_epoch)
        _check(self.mode != "freeze" or 0 <= self.freeze_blocks <= self.depth,
               f"0 <= freeze_blocks <= depth={self.depth}", "freeze_blocks", self.freeze_blocks)
        if self.image_size is not None:
            step = 2**self.depth
            _check(len(self.image_size) == 2 and all(s >= step and s % step == 0 for s in self.image_size),
                   f"image_size height and width multiples of 2**depth={step}", "image_size", self.image_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size else None
        return d


def _check(ok: bool, expected: str, name: str, value) -> None:
    if not ok:
        raise TrainError(f"Expected {expected}. Received: {name}={value!r}")


@dataclass
class FitResult:
    """What :func:`fit` returns: the chief's run folder, the trained model, the history rows."""

    run_dir: Path
    model: object
    history: list[dict] = field(default_factory=list)


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
        TrainError: bad records, run folder, pretrained model, or a NaN/Inf loss.
    """
    from kerasunet.distribute import describe, is_chief, select_strategy, tf_config

    strategy = select_strategy()  # before any other TensorFlow op (multi-worker needs it)
    import keras

    records = Path(settings.records)
    manifest, manifest_sha = read_manifest(records)
    run_dir = Path(settings.out)
    chief = is_chief(tf_config())
    if chief:
        check_run_dir(run_dir, settings)
    write_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix="kerasunet-worker-"))
    policy = precision_policy(settings.mixed_precision, progress)
    progress(f"training on {describe(strategy)}, policy {policy}, writing {write_dir}")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        loop = Loop(settings, strategy, manifest, manifest_sha, run_dir, write_dir, progress)
        history = loop.run()
        return FitResult(run_dir=run_dir, model=loop.model, history=history)
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


def check_run_dir(run_dir: Path, settings: TrainSettings) -> None:
    """Refuses to mix runs: ``out`` must be empty or absent unless resuming a matching run.

    Raises:
        TrainError: a non-empty folder without ``--resume``, or a resume whose model
            settings differ from the run's config.json.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"{run_dir}: exists and is not a folder")
    if not settings.resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise TrainError(f"{run_dir}: exists and is not empty; pass --resume to continue its run "
                             "or choose a new --out")
        return
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        return
    old = json.loads(config_path.read_text())["train"]
    for key in ("mode", "loss", "filters", "depth", "dropout", "image_size",
                "freeze_blocks", "batch_size"):
        new = settings.to_dict()[key]
        if old.get(key) != new:
            raise TrainError(f"{run_dir}: cannot resume with {key}={new!r}; the run used {old.get(key)!r}")


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


class Loop:
    """The state of one training run: model, optimiser, steps, checkpoint and run-folder writers.

    Built by :func:`fit` inside the dtype policy and strategy it chose; :meth:`run` trains.
    """

    def __init__(self, settings, strategy, manifest, manifest_sha, run_dir, write_dir, progress):
        import keras

        self.s, self.strategy, self.progress = settings, strategy, progress
        self.manifest, self.run_dir, self.write_dir = manifest, run_dir, write_dir
        self.resume_from, self.start_epoch = latest_checkpoint(run_dir) if settings.resume else (None, 0)
        keras.utils.set_random_seed(settings.seed + self.start_epoch)
        self.make_datasets()
        self.build_model()
        self.config = self.make_config(manifest_sha)

    # --- setup -------------------------------------------------------------------------
    def make_datasets(self) -> None:
        from kerasunet import data
        from kerasunet.core.labels import OUTPUTS

        s, splits = self.s, self.manifest["splits"]
        self.output_names = OUTPUTS[self.manifest["modality"]]
        self.steps = s.steps_per_epoch or max(1, splits["train"]["num_examples"] // s.batch_size)
        shape = dict(image_size=s.image_size, pad_to_multiple=None if s.image_size else 2**s.depth)
        try:
            train = data.get_dataset(s.records, "train", s.batch_size, training=True, **shape,
                                     augment=self.augment_settings(), oversample_tumour=s.oversample_tumour,
                                     seed=s.seed + self.start_epoch, repeat=True, drop_remainder=True)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        train = train.with_options(shard_options(len(splits["train"]["shards"])))
        self.channels = int(train.element_spec[0].shape[-1])
        targets = int(train.element_spec[1].shape[-1])
        if targets != len(self.output_names):
            raise TrainError(f"{s.records}: targets have {targets} channels; {self.manifest['modality']} "
                             f"models have {len(self.output_names)} ({', '.join(self.output_names)})")
        self.train_iter = iter(self.strategy.experimental_distribute_dataset(train))
        has_val = (splits.get("val") or {}).get("num_examples", 0) > 0
        self.val = None
        if has_val:
            self.val = data.get_dataset(s.records, "val", s.batch_size, training=False, **shape)

    def augment_settings(self):
        if not self.s.augment:
            return None
        from kerasunet.augment import AugmentSettings

        return AugmentSettings()

    def build_model(self) -> None:
        import keras
        import tensorflow as tf

        from kerasunet.losses import get_loss
        from kerasunet.metrics import metrics_for
        from kerasunet.model import build_unet
        from kerasunet.core.runs import RunError
        from kerasunet.transfer import build_for_mode

        s = self.s
        arch = dict(filters=s.filters, depth=s.depth, dropout=s.dropout)
        with self.strategy.scope():
            try:
                self.model = build_for_mode(s.mode, (None, None, self.channels), len(self.output_names),
                                            pretrained=s.pretrained, freeze_blocks=s.freeze_blocks, **arch)
            except (RunError, ValueError) as exc:
                raise TrainError(str(exc)) from None  # names the pretrained path
            self.optimizer = self.make_optimizer()
            self.optimizer.build(self.model.trainable_variables)
            self.train_metrics = metrics_for(self.output_names)
        self.val_metrics = metrics_for(self.output_names)
        self.loss_fn = get_loss(s.loss, self.output_names)
        # best.keras is a float32 twin: loads and predicts fast on CPU whatever the training policy.
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("float32")
        try:
            self.export_model = build_unet((None, None, self.channels), len(self.output_names), **arch)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.best = tf.Variable(math.inf, dtype=tf.float64, trainable=False)
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, epoch=self.epoch,
                                              best=self.best, wait=self.wait)
        self.train_step = self.make_train_step()
        self.val_step = self.make_val_step()
        self.sync_step = self.make_sync_step()

    def make_optimizer(self):
        import keras

        s = self.s
        lr = s.lr
        if s.schedule == "cosine":
            lr = keras.optimizers.schedules.CosineDecay(s.lr, decay_steps=s.epochs * self.steps)
        optimizer = keras.optimizers.Adam(lr)
        if keras.mixed_precision.global_policy().name == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return optimizer

    def make_config(self, manifest_sha: str) -> dict:
        import kerasunet

        s, m = self.s, self.manifest
        return {
            "model": {"input_channels": self.channels, "num_outputs": len(self.output_names),
                      "filters": s.filters, "depth": s.depth, "dropout": s.dropout},
            "data": {"modality": m["modality"], "context": m.get("context", 0), "norm": m["norm"],
                     "image_size": list(s.image_size) if s.image_size else None,
                     "records": str(Path(s.records).resolve()), "manifest_sha256": manifest_sha},
            "train": s.to_dict(),
            "git_commit": git_commit(),
            "kerasunet_version": kerasunet.__version__,
        }

    # --- steps -------------------------------------------------------------------------
    def make_train_step(self):
        import tensorflow as tf

        model, optimizer, loss_fn, metrics = self.model, self.optimizer, self.loss_fn, self.train_metrics
        strategy, global_batch = self.strategy, float(self.s.batch_size)

        def replica_step(x, y):
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                # Weighted so that the sum over replicas is the global-batch mean.
                loss = loss_fn(y, pred) * tf.cast(tf.shape(x)[0], "float32") / global_batch
                if model.losses:
                    loss += tf.add_n(model.losses) / strategy.num_replicas_in_sync
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            for metric in metrics:
                metric.update_state(y, pred)
            return loss

        @tf.function
        def step(iterator):
            x, y = next(iterator)
            per_replica = strategy.run(replica_step, args=(x, y))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        return step

    def make_sync_step(self):
        """A step that sets each BatchNorm moving statistic to its mean over all replicas.

        Keras BatchNorm updates its moving mean/variance with the local batch on each
        replica, so under MultiWorkerMirroredStrategy the workers' copies drift apart.
        The moving averages are linear in the batch statistics, so averaging them once an
        epoch equals averaging every step. Frozen layers are left alone (they never change,
        and their weights stay bit-identical to the pretrained ones).

        Returns:
            A ``tf.function``, or None with one replica or nothing to synchronise.
        """
        import tensorflow as tf

        strategy = self.strategy
        variables = [w for layer in self.model.layers if layer.trainable
                     for w in layer.non_trainable_weights if "float" in str(w.dtype)]
        if strategy.num_replicas_in_sync == 1 or not variables:
            return None

        def replica_mean():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])

        @tf.function
        def sync():
            means = strategy.run(replica_mean)
            for variable, mean in zip(variables, means):
                variable.assign(strategy.experimental_local_results(mean)[0])

        return sync

    def make_val_step(self):
        import tensorflow as tf

        model, loss_fn, metrics = self.model, self.loss_fn, self.val_metrics

        @tf.function
        def step(x, y):
            pred = model(x, training=False)
            for metric in metrics:
                metric.update_state(y, pred)
            n = tf.cast(tf.shape(x)[0], "float32")
            return loss_fn(y, pred) * n, n

        return step

    # --- the loop ----------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Trains from the start (or the restored) epoch to ``settings.epochs``.

        Returns:
            The history rows, earlier epochs of a resumed run included.
        """
        import tensorflow as tf

        history, timing = self.restore()
        write_json(self.write_dir / CONFIG_FILE, self.config)
        manager = tf.train.CheckpointManager(self.checkpoint, str(self.write_dir / "checkpoints"),
                                             max_to_keep=KEEP_CHECKPOINTS)
        writers = {name: tf.summary.create_file_writer(str(self.write_dir / "logs" / name))
                   for name in ("train", "validation")}
        if self.start_epoch >= self.s.epochs:
            self.progress(f"{self.run_dir}: already trained for {self.start_epoch} epoch(s); nothing to do")
        for epoch in range(self.start_epoch + 1, self.s.epochs + 1):
            start = time.perf_counter()
            row = {"epoch": epoch, **self.train_epoch(epoch, manager), **self.validate()}
            row["lr"] = self.current_lr()
            seconds = time.perf_counter() - start
            history.append(row)
            timing.append({"epoch": epoch, "seconds": round(seconds, 3)})
            self.end_epoch(row, history, timing, writers, seconds)
            manager.save()  # last, so a checkpoint never runs ahead of the files above
        if history:
            plot_learning_curves({"run": [history]}, self.write_dir / "learning_curves.png")
        return history

    def restore(self) -> tuple[list[dict], list[dict]]:
        """Loads the resumed checkpoint and the history/timing rows up to its epoch."""
        if self.resume_from is None:
            return [], []
        self.checkpoint.restore(self.resume_from).assert_existing_objects_matched()
        self.progress(f"resuming {self.run_dir} after epoch {self.start_epoch} from {self.resume_from}")
        history = [r for r in read_history(self.run_dir / "history.csv") if r["epoch"] <= self.start_epoch]
        timing = [r for r in read_history(self.run_dir / "timing.csv") if r["epoch"] <= self.start_epoch]
        return history, timing

    def train_epoch(self, epoch: int, manager) -> dict:
        """Runs one epoch of training steps; returns mean loss and train Dice/IoU."""
        for metric in self.train_metrics:
            metric.reset_state()
        total, start = 0.0, time.perf_counter()
        every = max(1, self.steps // PROGRESS_LINES_PER_EPOCH)
        for step in range(1, self.steps + 1):
            loss = float(self.train_step(self.train_iter))
            if not math.isfinite(loss):
                last = manager.latest_checkpoint
                kept = (f"last good checkpoint kept at {last}" if last
                        else "no checkpoint was written (no epoch had finished)")
                raise TrainError(f"loss became {'NaN' if math.isnan(loss) else 'Inf'} at epoch {epoch} "
                                 f"step {step}; {kept}")
            total += loss
            if step % every == 0 or step == self.steps:
                eta = (time.perf_counter() - start) / step * (self.steps - step)
                self.progress(f"epoch {epoch}/{self.s.epochs} step {step}/{self.steps} "
                              f"loss {total / step:.4f} eta {eta:.0f}s")
        if self.sync_step is not None:
            self.sync_step()
        return {"loss": total / self.steps, **_results(self.train_metrics)}

    def validate(self) -> dict:
        """Loss and Dice/IoU over the validation split ({} without one)."""
        if self.val is None:
            return {}
        for metric in self.val_metrics:
            metric.reset_state()
        loss_sum = count = 0.0
        for x, y in self.val:
            batch_loss, n = self.val_step(x, y)
            loss_sum, count = loss_sum + float(batch_loss), count + float(n)
        row = {"val_loss": loss_sum / max(count, 1.0)}
        return row | {f"val_{k}": v for k, v in _results(self.val_metrics).items()}

    def current_lr(self) -> float:
        import keras

        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    def end_epoch(self, row, history, timing, writers, seconds) -> None:
        """Best model, plateau schedule, CSVs, TensorBoard, curves and a summary line."""
        monitor = row.get("val_loss", row["loss"])
        improved = monitor < float(self.best.numpy())  # False for NaN
        if improved:
            self.best.assign(monitor)
        if improved or self.val is None:  # without validation, best.keras is the last epoch
            self.save_best()
        self.epoch.assign(row["epoch"])
        if self.s.schedule == "plateau":
            self.plateau(improved)
        write_csv(self.write_dir / "history.csv", history)
        write_csv(self.write_dir / "timing.csv", timing)
        self.log_scalars(row, writers)
        plot_learning_curves({"run": [history]}, self.write_dir / "learning_curves.png")
        shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
        self.progress(f"epoch {row['epoch']}/{self.s.epochs} done in {seconds:.1f}s: {shown}"
                      + (" (best so far)" if improved else ""))

    def save_best(self) -> None:
        self.export_model.set_weights(self.model.get_weights())
        with atomic_path(self.write_dir / MODEL_FILE) as tmp:
            self.export_model.save(tmp)

    def plateau(self, improved: bool) -> None:
        """Halves the learning rate after PLATEAU_PATIENCE epochs without improvement."""
        self.wait.assign(0 if improved else int(self.wait.numpy()) + 1)
        if int(self.wait.numpy()) >= PLATEAU_PATIENCE:
            self.optimizer.learning_rate = self.current_lr() * PLATEAU_FACTOR
            self.wait.assign(0)
            self.progress(f"plateau: learning rate now {self.current_lr():.3g}")

    def log_scalars(self, row: dict, writers: dict) -> None:
        """TensorBoard scalars: ``logs/train`` and ``logs/validation`` share tag names."""
        for key, value in row.items():
            if key == "epoch":
                continue
            name, tag = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            with writers[name].as_default():
                write_scalar(tag, value, row["epoch"])
        for writer in writers.values():
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


def _results(metrics) -> dict:
    import keras

    return {m.name: float(keras.ops.convert_to_numpy(m.result())) for m in metrics}
