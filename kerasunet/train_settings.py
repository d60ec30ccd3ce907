"""The settings of ``kerasunet train`` and the rule for resuming a run with them.

TensorFlow-free, so the CLI can build and check settings before TensorFlow starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kerasunet.core.choices import AUGMENT_INTENSITIES, LOSSES, MODES, PRECISIONS, SCHEDULES
from kerasunet.cascade import MARGIN_MM, ROI_SIZE
from kerasunet.core.records_format import MANIFEST_FILE

# Settings that do not describe the run itself: where it is written, whether to resume, the
# records path (a moved records folder is the same data; resume compares the manifest's hash)
# and the memory budget (a resumed run may move to another GPU).
NOT_COMPARED_ON_RESUME = ("out", "resume", "records", "memory_budget")

CPU_MEMORY_BUDGET = 8.0
"""GiB a 3D training step may use on a machine without a GPU (``--memory-budget``'s default there)."""

STAGES = ("all", "tumour")
"""``--stage``: ``all`` trains on whole slices; ``tumour`` is a cascade's second stage
(:mod:`kerasunet.cascade`): tumour only, on the liver ROI of ``--liver-model``."""

MONITORS = ("dice", "loss")
"""What picks ``best.keras``: the highest mean validation Dice over the output channels
(CT: liver and tumour, MRI: tumour), or the lowest validation loss."""

PRESETS = {
    # The research's settings (Wang & Tang; Chlebus et al.'s network): Adam 1e-4, batch 10,
    # 5 epochs, BCE on CT; Adam 5e-4, batch 18, 8 epochs on MRI; no augmentation, no
    # oversampling, dropout 0.5, the model of the lowest validation loss.
    "paper": {
        "ct": dict(epochs=5, batch_size=10, lr=1e-4),
        "mri": dict(epochs=8, batch_size=18, lr=5e-4),
        "both": dict(loss="bce", filters=32, depth=4, dropout=0.5, schedule="none", augment=False,
                     oversample_tumour=0.0, monitor="loss"),
    },
}
"""Named sets of settings (``--preset``); per modality, plus the values both share."""


class TrainError(ValueError):
    """A training setting, input or state that stops a run; the message is one line."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``kerasunet train`` needs; each field is one command-line option.

    The defaults are the best settings measured on a small data set (10 CT cases; the runs
    are in docs/quality.md): Adam 1e-3 with a cosine decay over 30 epochs, no dropout, and
    ``best.keras`` chosen by validation Dice. ``--preset paper`` gives the research's.

    Attributes:
        records: Records folder written by ``kerasunet build-records``.
        out: Run folder to write (see :mod:`kerasunet.core.runs`).
        mode: ``scratch``, ``init`` or ``freeze`` (see :mod:`kerasunet.transfer`).
        pretrained: Run folder or ``.keras`` file for ``init``/``freeze``.
        epochs: Total epochs (a resumed run continues up to this number).
        batch_size: Global batch size (split over replicas).
        lr: Adam learning rate, the schedule's start (the research: 1e-4 on CT, 5e-4 on MRI,
            for 131 CT cases; 1e-4 learns too slowly on small sets, docs/quality.md).
        loss: One of :data:`kerasunet.core.choices.LOSSES`.
        filters, depth, dropout: U-Net architecture (:func:`kerasunet.model.build_unet`).
        image_size: ``(height, width)`` to resize/crop to; None pads the records' own size
            to a multiple of ``2**depth``.
        freeze_blocks: Encoder blocks frozen in ``freeze`` mode.
        schedule: ``none``, ``cosine`` (decay to 0 over the run) or ``plateau`` (halve the
            learning rate after 2 epochs without improvement of the ``monitor``; of the
            training loss when the records have no validation split).
        mixed_precision: ``auto``, ``on`` or ``off``.
        augment: Random augmentation of training slices.
        augment_intensity: Strength of its intensity transforms (``AUGMENT_INTENSITIES``):
            ``standard``, or ``mild`` for short runs on one scanner's data
            (:func:`kerasunet.augment.with_intensity`).
        oversample_tumour: Share of training slices drawn from slices with tumour; in 3D the
            share of patches centred on a foreground voxel (tumour, else liver).
        steps_per_epoch: Training steps per epoch; None is one pass over the train split.
        seed: Seed for weights, data order, augmentation and dropout.
        monitor: One of :data:`MONITORS`; what picks ``best.keras`` (and what the plateau
            schedule watches).
        preset: The :data:`PRESETS` entry these settings started from, or None (recorded in
            config.json; :func:`settings_from_options` applies it).
        resume: Continue the run in ``out`` from its newest checkpoint.
        dims: 2 (slices, the default) or 3 (patches of volume records; docs/3d.md).
        patch_size: ``(D, H, W)`` training patch in voxels; 3D only, then required.
        memory_budget: 3D: GiB one training step may use; None is the GPU's memory, or
            :data:`CPU_MEMORY_BUDGET` without a GPU. A patch whose estimate
            (:mod:`kerasunet.planner`) is over it is refused before training.
        stage: One of :data:`STAGES`.
        liver_model: ``--stage tumour``: the stage-1 run (its outputs include liver).
        roi_size: ``--stage tumour``: ``(H, W)`` each liver ROI is resized to.
        roi_margin_mm: ``--stage tumour``: margin around the liver's box, mm.
    """

    records: str
    out: str
    mode: str = "scratch"
    pretrained: str | None = None
    epochs: int = 30
    batch_size: int = 10
    lr: float = 1e-3
    loss: str = "bce_dice"
    filters: int = 32
    depth: int = 4
    dropout: float = 0.0
    image_size: tuple[int, int] | None = None
    freeze_blocks: int = 2
    schedule: str = "cosine"
    mixed_precision: str = "auto"
    augment: bool = True
    augment_intensity: str = "standard"
    oversample_tumour: float = 0.33
    steps_per_epoch: int | None = None
    seed: int = 0
    monitor: str = "dice"
    preset: str | None = None
    resume: bool = False
    dims: int = 2
    patch_size: tuple[int, int, int] | None = None
    memory_budget: float | None = None
    stage: str = "all"
    liver_model: str | None = None
    roi_size: tuple[int, int] = ROI_SIZE
    roi_margin_mm: float = MARGIN_MM

    def __post_init__(self):
        for name, allowed in (("mode", MODES), ("loss", LOSSES), ("schedule", SCHEDULES),
                              ("mixed_precision", PRECISIONS), ("monitor", MONITORS),
                              ("augment_intensity", AUGMENT_INTENSITIES), ("preset", (None, *PRESETS))):
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
        _check(self.dims in (2, 3), "dims in (2, 3)", "dims", self.dims)
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        _check((self.dims == 3) == (self.patch_size is not None),
               "patch_size (D, H, W) with dims=3 and none with dims=2", "patch_size", self.patch_size)
        _check(self.dims == 2 or self.image_size is None, "no image_size with dims=3 (use patch_size)",
               "image_size", self.image_size)
        _check(self.patch_size is None or (len(self.patch_size) == 3 and min(self.patch_size) >= 1),
               "patch_size of 3 positive sizes (D, H, W)", "patch_size", self.patch_size)
        _check(self.memory_budget is None or self.memory_budget > 0, "memory_budget > 0 (GiB)",
               "memory_budget", self.memory_budget)
        _check_cascade(self)
        if self.image_size is not None:
            step = 2**self.depth
            _check(len(self.image_size) == 2 and all(s >= step and s % step == 0 for s in self.image_size),
                   f"image_size height and width multiples of 2**depth={step}", "image_size", self.image_size)

    def to_dict(self) -> dict:
        """The settings as JSON values (``image_size`` as a list), as config.json stores them."""
        d = asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size else None
        d["patch_size"] = list(self.patch_size) if self.patch_size else None
        d["roi_size"] = list(self.roi_size)
        return d


def _check_cascade(s: TrainSettings) -> None:
    """The cascade's settings (``--stage``, ``--liver-model``, ``--roi-size``, ``--roi-margin-mm``)."""
    _check(s.stage in STAGES, f"stage in {STAGES}", "stage", s.stage)
    if s.stage == "tumour" and not s.liver_model:
        raise TrainError("--stage tumour needs --liver-model (the stage-1 run whose liver gives the ROI)")
    if s.stage != "tumour" and s.liver_model:
        raise TrainError("--liver-model is the first stage of a cascade; pass --stage tumour with it")
    object.__setattr__(s, "roi_size", tuple(int(v) for v in s.roi_size))
    step = 2**s.depth
    _check(s.stage == "all" or (len(s.roi_size) == 2 and all(v >= step and v % step == 0 for v in s.roi_size)),
           f"roi_size height and width multiples of 2**depth={step}", "roi_size", s.roi_size)
    _check(s.roi_margin_mm >= 0, "roi_margin_mm >= 0", "roi_margin_mm", s.roi_margin_mm)
    _check(s.stage == "all" or (s.dims == 2 and s.image_size is None),
           "--stage tumour with 2D slices and no image_size (the ROI is resized to roi_size)",
           "stage", s.stage)


def _check(ok: bool, expected: str, name: str, value) -> None:
    if not ok:
        raise TrainError(f"Expected {expected}. Received: {name}={value!r}")


def preset_values(name: str, modality: str) -> dict:
    """The settings of preset ``name`` for records of ``modality`` (``"ct"`` or ``"mri"``).

    Raises:
        TrainError: an unknown preset or modality.
    """
    _check(name in PRESETS, f"preset in {tuple(PRESETS)}", "preset", name)
    _check(modality in PRESETS[name], f"modality in {tuple(k for k in PRESETS[name] if k != 'both')}",
           "modality", modality)
    return {**PRESETS[name]["both"], **PRESETS[name][modality], "preset": name}


def records_modality(records) -> str:
    """The modality in a records folder's manifest (read without TensorFlow).

    Raises:
        TrainError: no readable manifest with a modality.
    """
    path = Path(records) / MANIFEST_FILE
    try:
        modality = json.loads(path.read_text())["modality"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"{path}: cannot read the records' modality for --preset "
                         f"({type(exc).__name__}: {exc})") from None
    return modality


def settings_from_options(options: dict, given=None) -> TrainSettings:
    """The settings of a ``train`` command line: a preset's values, then the options given.

    Args:
        options: Every :class:`TrainSettings` field by name (click passes all of them, with
            defaults for the options not on the command line).
        given: Names of the options the user gave; None counts all as given. Options not
            given take the preset's value where the preset has one.

    Returns:
        The settings; ``preset`` records the preset's name.

    Raises:
        TrainError: an unknown preset, unreadable records, or a bad setting.
    """
    given = set(options) if given is None else set(given)
    preset = options.get("preset")
    values = dict(options)
    if preset is not None:
        defaults = preset_values(preset, records_modality(options["records"]))
        values |= {k: v for k, v in defaults.items() if k not in given}
    return TrainSettings(**values)


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
