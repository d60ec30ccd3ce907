"""Per-channel Dice and IoU at a 0.5 threshold, accumulated over all pixels seen.

The state is three sums (intersection, predicted, true pixel counts) held in
metric variables updated with ``assign_add``, so the value for an epoch is the
global Dice/IoU over every pixel of the epoch, not a mean of per-batch values,
and replicas under ``tf.distribute`` strategies add up (aggregation "sum").
"""

from __future__ import annotations

import keras
from keras import ops


class ChannelOverlap(keras.metrics.Metric):
    """Base of :class:`ChannelDice` and :class:`ChannelIoU`: the three sums of one channel.

    Args:
        channel: Index of the output channel in ``[B, H, W, N]``.
        threshold: Predictions ``>= threshold`` count as foreground; targets use 0.5.
        name: Metric name, e.g. ``"dice_tumour"``.
    """

    def __init__(self, channel: int, threshold: float = 0.5, name=None, dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        self.channel, self.threshold = channel, threshold
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection")
        self.pred_sum = self.add_variable(shape=(), initializer="zeros", name="pred_sum")
        self.true_sum = self.add_variable(shape=(), initializer="zeros", name="true_sum")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(f"Expected sample_weight=None for metric {self.name!r}: "
                             "Dice and IoU count pixels. Received: a sample_weight tensor")
        pred = ops.cast(y_pred[..., self.channel] >= self.threshold, self.dtype)
        true = ops.cast(y_true[..., self.channel] >= 0.5, self.dtype)
        self.intersection.assign_add(ops.sum(pred * true))
        self.pred_sum.assign_add(ops.sum(pred))
        self.true_sum.assign_add(ops.sum(true))

    def reset_state(self):
        for variable in (self.intersection, self.pred_sum, self.true_sum):
            variable.assign(ops.zeros((), self.dtype))

    def get_config(self):
        return {"channel": self.channel, "threshold": self.threshold, "name": self.name, "dtype": self.dtype}


def ratio_or_one(numerator, denominator):
    """``numerator / denominator``, or 1 when both masks were empty (denominator 0)."""
    one = ops.ones_like(denominator)  # not ones_like(numerator): a metric Variable under JAX has no dtype for it
    safe = ops.where(denominator > 0, denominator, one)
    return ops.where(denominator > 0, numerator / safe, one)


@keras.saving.register_keras_serializable(package="kerasunet")
class ChannelDice(ChannelOverlap):
    """Dice ``2|P∩T| / (|P| + |T|)`` of one channel; 1 when both are empty."""

    def result(self):
        return ratio_or_one(2.0 * self.intersection, self.pred_sum + self.true_sum)


@keras.saving.register_keras_serializable(package="kerasunet")
class ChannelIoU(ChannelOverlap):
    """IoU ``|P∩T| / |P∪T|`` of one channel; 1 when both are empty."""

    def result(self):
        return ratio_or_one(self.intersection, self.pred_sum + self.true_sum - self.intersection)


def metrics_for(output_names) -> list:
    """``dice_<name>`` and ``iou_<name>`` for each output channel, in channel order."""
    metrics = []
    for channel, name in enumerate(output_names):
        metrics += [ChannelDice(channel, name=f"dice_{name}"), ChannelIoU(channel, name=f"iou_{name}")]
    return metrics
