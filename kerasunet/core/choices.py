"""The named choices of training: transfer modes, losses, schedules, precision settings.

Each list is defined here once. The CLI lists them as ``click.Choice`` without importing
TensorFlow; :mod:`kerasunet.train_settings`, :func:`kerasunet.losses.get_loss` and
:func:`kerasunet.transfer.build_for_mode` check against them.
"""

from __future__ import annotations

MODES = ("scratch", "init", "freeze")
"""Transfer modes (:mod:`kerasunet.transfer`): new weights, CT-initialised, CT-initialised with frozen blocks."""

LOSSES = ("bce", "dice", "bce_dice", "focal", "masked")
"""Training losses (:mod:`kerasunet.losses`)."""

SCHEDULES = ("none", "cosine", "plateau")
"""Learning-rate schedules (:mod:`kerasunet.schedule`)."""

AUGMENT_INTENSITIES = ("standard", "mild")
"""``--augment-intensity``: the intensity transforms' strength (:func:`kerasunet.augment.with_intensity`).
``standard`` (the default) keeps a model's Dice when scans are 30 HU brighter or darker than the
training scans; ``mild`` (the ranges before the seventh session) fits short runs on one scanner's
data faster."""

PRECISIONS = ("auto", "on", "off")
"""``--mixed-precision`` settings: mixed_float16 when a GPU is visible, always, never."""
