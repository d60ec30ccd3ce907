"""Tests of kerasunet.metrics: Dice/IoU on hand-made masks, accumulation, serialization."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from kerasunet.metrics import ChannelDice, ChannelIoU, metrics_for
from tests.helpers import tensorflow_only

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def result(metric):
    return float(keras.ops.convert_to_numpy(metric.result()))


def case():
    """Channel 0: true 4 px, predicted 6 px, 3 overlap. Channel 1: both empty."""
    y_true = np.zeros((1, 4, 4, 2), np.float32)
    y_pred = np.zeros((1, 4, 4, 2), np.float32)
    y_true[0, 0, :4, 0] = 1
    y_pred[0, 0, :3, 0] = 0.9
    y_pred[0, 1, :3, 0] = 0.5  # exactly at the threshold counts as foreground
    y_pred[0, 2, :, 0] = 0.49
    return y_true, y_pred


def test_dice_and_iou_known_values():
    y_true, y_pred = case()
    dice, iou = ChannelDice(0), ChannelIoU(0)
    dice.update_state(y_true, y_pred)
    iou.update_state(y_true, y_pred)
    assert result(dice) == pytest.approx(2 * 3 / (4 + 6))
    assert result(iou) == pytest.approx(3 / 7)


def test_empty_masks_score_one():
    y_true, y_pred = case()
    dice, iou = ChannelDice(1), ChannelIoU(1)
    dice.update_state(y_true, y_pred)
    iou.update_state(y_true, y_pred)
    assert result(dice) == 1.0 and result(iou) == 1.0
    y_pred[0, 3, 3, 1] = 1.0  # one false positive on an empty target
    dice.reset_state()
    dice.update_state(y_true, y_pred)
    assert result(dice) == 0.0


def test_accumulation_is_pooled_over_batches():
    rng = np.random.default_rng(0)
    y_true = (rng.random((4, 8, 8, 1)) > 0.7).astype(np.float32)
    y_pred = rng.random((4, 8, 8, 1)).astype(np.float32)
    pooled, batched = ChannelDice(0), ChannelDice(0)
    pooled.update_state(y_true, y_pred)
    batched.update_state(y_true[:1], y_pred[:1])  # unequal batches: a mean of batch Dice would differ
    batched.update_state(y_true[1:], y_pred[1:])
    assert result(batched) == pytest.approx(result(pooled), rel=1e-6)
    p, t = y_pred >= 0.5, y_true >= 0.5
    assert result(pooled) == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()), rel=1e-6)
    iou = ChannelIoU(0)
    iou.update_state(y_true[:3], y_pred[:3])
    iou.update_state(y_true[3:], y_pred[3:])
    assert result(iou) == pytest.approx((p & t).sum() / (p | t).sum(), rel=1e-6)


def test_metrics_for_names_and_channels():
    metrics = metrics_for(("liver", "tumour"))
    assert [m.name for m in metrics] == ["dice_liver", "iou_liver", "dice_tumour", "iou_tumour"]
    assert [m.channel for m in metrics] == [0, 0, 1, 1]
    restored = keras.metrics.deserialize(keras.metrics.serialize(metrics[3]))
    assert type(restored) is ChannelIoU and restored.get_config() == metrics[3].get_config()


def test_sample_weight_is_refused():
    y_true, y_pred = case()
    with pytest.raises(ValueError, match="^Expected sample_weight=None for metric 'dice'"):
        ChannelDice(0, name="dice").update_state(y_true, y_pred, sample_weight=np.ones((1,)))


MIRRORED = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from kerasunet.metrics import metrics_for
    rng = np.random.default_rng(0)
    y_true = (rng.random((8, 8, 8, 1)) > 0.6).astype(np.float32)
    y_pred = rng.random((8, 8, 8, 1)).astype(np.float32)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        metrics = metrics_for(("tumour",))
    @tf.function
    def step(t, p):
        for m in metrics:
            m.update_state(t, p)
    data = tf.data.Dataset.from_tensor_slices((y_true, y_pred)).batch(4)
    for t, p in strategy.experimental_distribute_dataset(data):
        strategy.run(step, args=(t, p))
    p, t = y_pred >= 0.5, y_true >= 0.5
    i = (p & t).sum()
    assert strategy.num_replicas_in_sync == 2
    print("RESULT", float(metrics[0].result()), 2 * i / (p.sum() + t.sum()),
          float(metrics[1].result()), i / (p | t).sum())
    # The same metrics compiled into a model: evaluate() under the strategy vs numpy on its predictions.
    from kerasunet.losses import get_loss
    from kerasunet.model import build_unet
    x = rng.random((8, 16, 16, 1)).astype(np.float32)
    with strategy.scope():
        model = build_unet((16, 16, 1), 1, filters=4, depth=1)
        model.compile(optimizer="adam", loss=get_loss("bce_dice", ("tumour",)), metrics=metrics_for(("tumour",)))
    y = np.pad(y_true, ((0, 0), (4, 4), (4, 4), (0, 0)))
    logs = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    p, t = model.predict(x, batch_size=4, verbose=0) >= 0.5, y >= 0.5
    print("RESULT", logs["dice_tumour"], 2 * (p & t).sum() / (p.sum() + t.sum()),
          logs["iou_tumour"], (p & t).sum() / (p | t).sum())
""")


@tensorflow_only
def test_metrics_under_mirrored_strategy():
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [row for row in proc.stdout.splitlines() if row.startswith("RESULT")]
    assert len(lines) == 2  # strategy.run with the bare metrics, then fit/evaluate
    for line in lines:
        dice, dice_expected, iou, iou_expected = map(float, line.split()[1:])
        assert dice == pytest.approx(dice_expected, rel=1e-5)
        assert iou == pytest.approx(iou_expected, rel=1e-5)
