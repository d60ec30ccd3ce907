"""Segmentation losses for multi-label sigmoid outputs ``[B, H, W, N]`` or ``[B, D, H, W, N]``.

The research trained with BCE alone and reported blurry tumours; the default
here is BCE + soft Dice, which rewards overlap on small structures directly.
All losses use ``keras.ops`` only (any Keras backend) and are registered as
Keras serializable, so compiled models load with ``safe_mode=True``.

Every loss here is a :class:`BatchSumsLoss`: a function of sums over the batch's examples
(pixel BCE and pixel count, Dice intersection and totals, ...). Sums add up across
replicas, so a training step can add the replicas' sums and compute the loss of the
*global* batch exactly, Dice included (see :mod:`kerasunet.steps`). On one device
``loss(y_true, y_pred)`` is ``from_sums(batch_sums(y_true, y_pred))`` and returns a scalar.
"""

from __future__ import annotations

import keras
from keras import ops

from kerasunet.core.choices import LOSSES
from kerasunet.core.labels import OUTPUTS

# Floor inside the logs. Keras's usual clip at 1e-7 zeroes the gradient of every pixel whose
# sigmoid is below it, so a model that starts saturated (e.g. frozen BatchNorm layers running
# CT statistics on MRI inputs, transfer mode "freeze") never moves. float32 holds sigmoid(z)
# down to z ≈ -87, and the chain rule through log and sigmoid stays finite there.
TINY = 1e-30


def pixel_bce(y_true, y_pred):
    """Binary cross-entropy per pixel and channel, ``[B, H, W, N]``."""
    return -(y_true * ops.log(ops.maximum(y_pred, TINY))
             + (1.0 - y_true) * ops.log(ops.maximum(1.0 - y_pred, TINY)))


def mean_sums(values):
    """``(sum, count)`` of ``values``: their mean over a batch is ``sum / count``."""
    return ops.sum(values), ops.cast(ops.size(values), "float32")


def dice_sums(y_true, y_pred):
    """Per-channel ``(Σ y·p, Σ y + Σ p)`` over the batch and every spatial axis.

    Works for 2D ``[B, H, W, N]`` and 3D ``[B, D, H, W, N]`` tensors alike.
    """
    axes = tuple(range(len(y_true.shape) - 1))
    return ops.sum(y_true * y_pred, axis=axes), ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)


def dice_from_sums(intersection, total, smooth: float):
    """``1 - mean over channels of (2·Σ y·p + s) / (Σ y + Σ p + s)``."""
    return 1.0 - ops.mean((2.0 * intersection + smooth) / (total + smooth))


def soft_dice_loss(y_true, y_pred, smooth: float):
    """Soft Dice loss with sums over the whole batch (batch, height, width).

    Slices without foreground therefore do not each count as a perfect or a failed case.
    """
    return dice_from_sums(*dice_sums(y_true, y_pred), smooth)


def as_float(y_true, y_pred):
    return ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")


class BatchSumsLoss(keras.losses.Loss):
    """A loss computed from sums over a batch's examples.

    Subclasses define :meth:`batch_sums` (a tuple of tensors, each a sum over examples,
    so the sums of two halves of a batch add up to those of the whole batch) and
    :meth:`from_sums`. ``call`` returns the scalar loss of the batch it is given.
    """

    def batch_sums(self, y_true, y_pred) -> tuple:
        raise NotImplementedError

    def from_sums(self, sums):
        raise NotImplementedError

    def call(self, y_true, y_pred):
        return self.from_sums(self.batch_sums(*as_float(y_true, y_pred)))


@keras.saving.register_keras_serializable(package="kerasunet")
class BCE(BatchSumsLoss):
    """Binary cross-entropy averaged over pixels and channels (the research's loss)."""

    def __init__(self, name="bce", **kwargs):
        super().__init__(name=name, **kwargs)

    def batch_sums(self, y_true, y_pred):
        return mean_sums(pixel_bce(y_true, y_pred))

    def from_sums(self, sums):
        bce_sum, count = sums
        return bce_sum / count


@keras.saving.register_keras_serializable(package="kerasunet")
class Focal(BatchSumsLoss):
    """Binary focal cross-entropy (Lin et al. 2017) averaged over pixels and channels.

    ``(1 - p_t)**gamma · BCE`` with ``p_t`` the predicted probability of the true class:
    Keras's ``BinaryFocalCrossentropy`` without class balancing, but with the same log
    floor as :func:`pixel_bce`, so saturated pixels keep their gradients.

    Args:
        gamma: Focusing parameter; 0 gives BCE.
    """

    def __init__(self, gamma: float = 2.0, name="focal", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma = gamma

    def batch_sums(self, y_true, y_pred):
        p_t = y_true * y_pred + (1.0 - y_true) * (1.0 - y_pred)
        return mean_sums(ops.power(1.0 - p_t, self.gamma) * pixel_bce(y_true, y_pred))

    def from_sums(self, sums):
        focal_sum, count = sums
        return focal_sum / count

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="kerasunet")
class Dice(BatchSumsLoss):
    """Soft Dice loss per channel over the batch, then the mean over channels.

    Args:
        smooth: Added to numerator and denominator; keeps empty masks finite.
    """

    def __init__(self, smooth: float = 1.0, name="dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth

    def batch_sums(self, y_true, y_pred):
        return dice_sums(y_true, y_pred)

    def from_sums(self, sums):
        return dice_from_sums(*sums, self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="kerasunet")
class BCEDice(BatchSumsLoss):
    """``bce_weight · BCE + dice_weight · soft Dice`` (the default loss)."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 name="bce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth

    def batch_sums(self, y_true, y_pred):
        return (*mean_sums(pixel_bce(y_true, y_pred)), *dice_sums(y_true, y_pred))

    def from_sums(self, sums):
        bce_sum, count, intersection, total = sums
        return (self.bce_weight * bce_sum / count
                + self.dice_weight * dice_from_sums(intersection, total, self.smooth))

    def get_config(self):
        return {**super().get_config(), "bce_weight": self.bce_weight,
                "dice_weight": self.dice_weight, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="kerasunet")
class MaskedTumourLoss(BatchSumsLoss):
    """Liver-masked tumour loss for CT, after Chlebus et al. 2018 (Sci. Rep. 8:15497).

    Chlebus et al. segment tumours only inside the liver. Here the liver channel
    gets BCE + soft Dice over the whole image, and the tumour channel gets BCE
    averaged over ground-truth liver pixels only plus soft Dice on the
    liver-masked prediction: tumour errors outside the liver cost nothing.

    Args:
        liver_channel: Index of the liver channel.
        tumour_channel: Index of the tumour channel.
        dilation: Grow the liver mask by this many pixels (a square or cubic max-pool), so
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

    def batch_sums(self, y_true, y_pred):
        lc, tc = self.liver_channel, self.tumour_channel
        liver_true, liver_pred = y_true[..., lc:lc + 1], y_pred[..., lc:lc + 1]
        tumour_true, tumour_pred = y_true[..., tc:tc + 1], y_pred[..., tc:tc + 1]
        mask = liver_true
        if self.dilation:
            mask = ops.max_pool(mask, 2 * self.dilation + 1, strides=1, padding="same")
        # The mask multiplies the loss, so predictions outside it get no gradient.
        return (*mean_sums(pixel_bce(liver_true, liver_pred)), *dice_sums(liver_true, liver_pred),
                ops.sum(pixel_bce(tumour_true, tumour_pred) * mask), ops.sum(mask),
                *dice_sums(tumour_true * mask, tumour_pred * mask))

    def from_sums(self, sums):
        liver_bce, count, liver_inter, liver_total, tumour_bce, mask_sum, tumour_inter, tumour_total = sums
        return (liver_bce / count + dice_from_sums(liver_inter, liver_total, self.smooth)
                + tumour_bce / ops.maximum(mask_sum, 1.0)
                + dice_from_sums(tumour_inter, tumour_total, self.smooth))

    def get_config(self):
        return {**super().get_config(), "liver_channel": self.liver_channel,
                "tumour_channel": self.tumour_channel, "dilation": self.dilation, "smooth": self.smooth}


def get_loss(name: str, output_names) -> BatchSumsLoss:
    """The loss called ``name`` for a model with these output channels.

    Args:
        name: One of :data:`kerasunet.core.choices.LOSSES`.
        output_names: Channel names, e.g. ``("liver", "tumour")`` for CT.

    Returns:
        A :class:`BatchSumsLoss` for ``[B, H, W, N]`` targets and sigmoid outputs.

    Raises:
        ValueError: unknown name, or ``masked`` without liver and tumour channels.
    """
    output_names = tuple(output_names)
    if name not in LOSSES:
        raise ValueError(f"Expected loss in {LOSSES}. Received: loss={name!r}")
    if name == "masked":
        if not {"liver", "tumour"} <= set(output_names):
            raise ValueError(
                f"Expected output_names {OUTPUTS['ct']} for loss='masked' (the liver mask gates the "
                f"tumour loss; CT only). Received: output_names={output_names}"
            )
        return MaskedTumourLoss(liver_channel=output_names.index("liver"),
                                tumour_channel=output_names.index("tumour"))
    return {"bce": BCE, "dice": Dice, "bce_dice": BCEDice, "focal": Focal}[name]()
