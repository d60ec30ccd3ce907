"""The settings of ``kerasunet train`` and the rule for resuming a run with them.

TensorFlow-free, so the CLI can build and check settings before TensorFlow starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kerasunet.core.choices import LOSSES, MODES, PRECISIONS, SCHEDULES

# Settings that do not describe the run itself: where it is written, whether to resume, and
# the records path (a moved records folder is the same data; resume compares the manifest's hash).
NOT_COMPARED_ON_RESUME = ("out", "resume", "records")


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
        loss: One of :data:`kerasunet.core.choices.LOSSES`.
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
        """The settings as JSON values (``image_size`` as a list), as config.json stores them."""
        d = asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size else None
        return d


def _check(ok: bool, expected: str, name: str, value) -> None:
    if not ok:
        raise TrainError(f"Expected {expected}. Received: {name}={value!r}")


def option_text(name: str, value) -> str:
    """How ``name=value`` is written on the ``kerasunet train`` command line."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if value is None:
        return f"no {flag}"
    if isinstance(value, (list, tuple)):
        return f"{flag} {'x'.join(map(str, value))}"
    return f"{flag} {value}"


def resume_conflict(old: dict, new: TrainSettings) -> str | None:
    """Why a run trained with settings ``old`` cannot continue with ``new``, or None.

    ``epochs`` may be raised; every other setting (except those in
    :data:`NOT_COMPARED_ON_RESUME`) must be unchanged. Keys missing from ``old`` (a run
    folder written by an older kerasunet) are not compared.

    Args:
        old: The ``train`` section of the run's config.json.
        new: The settings of the resumed run.

    Returns:
        One line naming the first changed setting, both values and what to do; None when
        the run may continue.
    """
    for name, value in new.to_dict().items():
        if name in NOT_COMPARED_ON_RESUME or name not in old:
            continue
        if name == "epochs":
            if value < old[name]:
                return (f"cannot resume with epochs={value}; the run used epochs={old[name]} and --epochs "
                        f"may only be raised (pass {option_text(name, old[name])} or more)")
            continue
        if old[name] != value:
            return (f"cannot resume with {name}={value!r}; the run used {name}={old[name]!r} (pass "
                    f"{option_text(name, old[name])} to continue it, or choose a new --out for a new run)")
    return None
