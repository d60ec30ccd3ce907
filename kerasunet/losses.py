"""Segmentation losses for multi-label sigmoid outputs ``[B, H, W, N]``.

The research trained with BCE alone and reported blurry tumours; the default
here is BCE + soft Dice, which rewards overlap on small structures directly.
All losses use ``keras.ops`` only (any Keras backend) and are registered as
Keras serializable, so compiled models load with ``safe_mode=True``.
"""

from __future__ import annotations

import keras
from keras import ops

from kerasunet.core.labels import OUTPUTS

LOSSES = ("bce", "dice", "bce_dice", "focal", "masked")
# Floor inside the logs. Keras's usual clip at 1e-7 zeroes the gradient of every pixel whose
# sigmoid is below it, so a model that starts saturated (e.g. frozen BatchNorm layers running
# CT statistics on MRI inputs, transfer mode "freeze") never moves. float32 holds sigmoid(z)
# down to z ≈ -87, and the chain rule through log and sigmoid stays finite there.
TINY = 1e-30


def pixel_bce(y_true, y_pred):
    """Binary cross-entropy per pixel and channel, ``[B, H, W, N]``."""
    return -(y_true * ops.log(ops.maximum(y_pred, TINY))
             + (1.0 - y_true) * ops.log(ops.maximum(1.0 - y_pred, TINY)))


def soft_dice_loss(y_true, y_pred, smooth: float):
    """``1 - mean over channels of (2·Σ y·p + s) / (Σ y + Σ p + s)``.

    Sums run over the whole batch (batch, height, width), so slices without
    foreground do not each count as a perfect or a failed case.
    """
    axes = (0, 1, 2)
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - ops.mean((2.0 * intersection + smooth) / (total + smooth))


def as_float(y_true, y_pred):
    return ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")


@keras.saving.register_keras_serializable(package="kerasunet")
class BCE(keras.losses.Loss):
    """Binary cross-entropy averaged over pixels and channels (the research's loss)."""

    def __init__(self, name="bce", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_true, y_pred = as_float(y_true, y_pred)
        return ops.mean(pixel_bce(y_true, y_pred), axis=-1)


@keras.saving.register_keras_serializable(package="kerasunet")
class Dice(keras.losses.Loss):
    """Soft Dice loss per channel over the batch, then the mean over channels.

    Args:
        smooth: Added to numerator and denominator; keeps empty masks finite.
    """

    def __init__(self, smooth: float = 1.0, name="dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth

    def call(self, y_true, y_pred):
        y_true, y_pred = as_float(y_true, y_pred)
        return soft_dice_loss(y_true, y_pred, self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="kerasunet")
class BCEDice(keras.losses.Loss):
    """``bce_weight · BCE + dice_weight · soft Dice`` (the default loss)."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 name="bce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth

    def call(self, y_true, y_pred):
        y_true, y_pred = as_float(y_true, y_pred)
        bce = ops.mean(pixel_bce(y_true, y_pred))
        return self.bce_weight * bce + self.dice_weight * soft_dice_loss(y_true, y_pred, self.smooth)

    def get_config(self):
        return {**super().get_config(), "bce_weight": self.bce_weight,
                "dice_weight": self.dice_weight, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="kerasunet")
class MaskedTumourLoss(keras.losses.Loss):
    """Liver-masked tumour loss for CT, after Chlebus et al. 2018 (Sci. Rep. 8:15497).

    Chlebus et al. segment tumours only inside the liver. Here the liver channel
    gets BCE + soft Dice over the whole image, and the tumour channel gets BCE
    averaged over ground-truth liver pixels only plus soft Dice on the
    liver-masked prediction: tumour errors outside the liver cost nothing.

    Args:
        liver_channel: Index of the liver channel.
        tumour_channel: Index of the tumour channel.
        dilation: Grow the liver mask by this many pixels (a square max-pool), so
            tumours at the liver border are not cut off; 0 uses the mask as is.
        smooth: Soft Dice smoothing term.
    """

    def __init__(self, liver_channel: int = 0, tumour_channel: int = 1, dilation: int = 0,
                 smooth: float = 1.0, name="masked", **kwargs):
        super().__init__(name=name, **kwargs)
        if dilation < 0:
            raise ValueError(f"Expected dilation >= 0. Received: dilation={dilation}")
        self.liver_channel, self.tumour_channel = liver_channel, tumour_channel
        self.dilation, self.smooth = dilation, smooth

    def call(self, y_true, y_pred):
        y_true, y_pred = as_float(y_true, y_pred)
        lc, tc = self.liver_channel, self.tumour_channel
        liver_true, liver_pred = y_true[..., lc:lc + 1], y_pred[..., lc:lc + 1]
        tumour_true, tumour_pred = y_true[..., tc:tc + 1], y_pred[..., tc:tc + 1]
        mask = liver_true
        if self.dilation:
            mask = ops.max_pool(mask, 2 * self.dilation + 1, strides=1, padding="same")
        liver_loss = ops.mean(pixel_bce(liver_true, liver_pred)) + soft_dice_loss(
            liver_true, liver_pred, self.smooth)
        # The mask multiplies the loss, so predictions outside it get no gradient.
        tumour_bce = ops.sum(pixel_bce(tumour_true, tumour_pred) * mask) / ops.maximum(ops.sum(mask), 1.0)
        tumour_dice = soft_dice_loss(tumour_true * mask, tumour_pred * mask, self.smooth)
        return liver_loss + tumour_bce + tumour_dice

    def get_config(self):
        return {**super().get_config(), "liver_channel": self.liver_channel,
                "tumour_channel": self.tumour_channel, "dilation": self.dilation, "smooth": self.smooth}


def get_loss(name: str, output_names) -> keras.losses.Loss:
    """The loss called ``name`` for a model with these output channels.

    Args:
        name: One of :data:`LOSSES`.
        output_names: Channel names, e.g. ``("liver", "tumour")`` for CT.

    Returns:
        A ``keras.losses.Loss`` for ``[B, H, W, N]`` targets and sigmoid outputs.

    Raises:
        ValueError: unknown name, or ``masked`` without liver and tumour channels.
    """
    output_names = tuple(output_names)
    if name not in LOSSES:
        raise ValueError(f"Expected loss in {LOSSES}. Received: loss={name!r}")
    if name == "bce":
        return BCE()
    if name == "dice":
        return Dice()
    if name == "bce_dice":
        return BCEDice()
    if name == "focal":
        return keras.losses.BinaryFocalCrossentropy(name="focal")
    if not {"liver", "tumour"} <= set(output_names):
        raise ValueError(
            f"Expected output_names {OUTPUTS['ct']} for loss='masked' (the liver mask gates the "
            f"tumour loss; CT only). Received: output_names={output_names}"
        )
    return MaskedTumourLoss(liver_channel=output_names.index("liver"),
                            tumour_channel=output_names.index("tumour"))
