"""Tests of kerasunet.losses on tiny hand-made tensors with known values."""

import re

import keras
import numpy as np
import pytest

from kerasunet.core.choices import LOSSES
from kerasunet.losses import BCEDice, Dice, MaskedTumourLoss, get_loss
from tests.helpers import backend_gradient

RNG = np.random.default_rng(0)


def value(loss, y_true, y_pred):
    return float(keras.ops.convert_to_numpy(loss(y_true, y_pred)))


def masks(shape=(2, 8, 8, 2)):
    y_true = (RNG.random(shape) > 0.6).astype(np.float32)
    y_pred = RNG.uniform(0.05, 0.95, shape).astype(np.float32)
    return y_true, y_pred


def test_bce_matches_keras():
    y_true, y_pred = masks()
    expected = float(np.mean(keras.ops.convert_to_numpy(keras.losses.binary_crossentropy(y_true, y_pred))))
    assert value(get_loss("bce", ("liver", "tumour")), y_true, y_pred) == pytest.approx(expected, rel=1e-5)


def test_dice_known_values():
    y_true, _ = masks()
    assert value(Dice(), y_true, y_true) == pytest.approx(0.0, abs=1e-7)
    assert value(Dice(smooth=0.0), y_true, 1.0 - y_true) == pytest.approx(1.0)
    # One channel: 4 true pixels, prediction covers 2 of them plus 2 false ones at 1.0 -> dice 0.5.
    t = np.zeros((1, 4, 4, 1), np.float32)
    p = np.zeros((1, 4, 4, 1), np.float32)
    t[0, 0, :, 0] = 1
    p[0, 0, :2, 0] = 1
    p[0, 1, :2, 0] = 1
    assert value(Dice(smooth=0.0), t, p) == pytest.approx(0.5)
    assert value(Dice(smooth=1.0), t, p) == pytest.approx(1 - 5 / 9)


def test_dice_is_mean_over_channels():
    t = np.zeros((1, 4, 4, 2), np.float32)
    t[0, :2, :, :] = 1
    p = t.copy()
    p[..., 1] = 0  # channel 0 perfect (loss 0), channel 1 all missed (loss 1)
    assert value(Dice(smooth=0.0), t, p) == pytest.approx(0.5)


def test_bce_dice_is_the_sum():
    y_true, y_pred = masks()
    bce = value(get_loss("bce", ("tumour",)), y_true, y_pred)
    dice = value(get_loss("dice", ("tumour",)), y_true, y_pred)
    assert value(get_loss("bce_dice", ("tumour",)), y_true, y_pred) == pytest.approx(bce + dice, rel=1e-5)
    assert value(BCEDice(bce_weight=0.0), y_true, y_pred) == pytest.approx(dice, rel=1e-5)


def test_focal_matches_keras_binary_focal():
    loss = get_loss("focal", ("tumour",))
    y_true, y_pred = masks()
    expected = float(np.mean(keras.ops.convert_to_numpy(
        keras.losses.binary_focal_crossentropy(y_true, y_pred, gamma=2.0))))
    assert value(loss, y_true, y_pred) == pytest.approx(expected, rel=1e-5)
    confident = np.where(y_true > 0, 0.99, 0.01).astype(np.float32)
    assert value(loss, y_true, confident) < value(loss, y_true, y_pred)


@pytest.mark.parametrize("name", LOSSES)
def test_sums_of_two_halves_give_the_loss_of_the_whole_batch(name):
    """The property the multi-replica step relies on: batch sums add up across replicas."""
    loss = get_loss(name, ("liver", "tumour"))
    y_true, y_pred = masks((4, 8, 8, 2))
    halves = [loss.batch_sums(y_true[i:i + 2], y_pred[i:i + 2]) for i in (0, 2)]
    summed = [a + b for a, b in zip(*halves)]
    whole = value(loss, y_true, y_pred)
    assert float(keras.ops.convert_to_numpy(loss.from_sums(summed))) == pytest.approx(whole, rel=1e-6)
    first_half = value(loss, y_true[:2], y_pred[:2])
    assert first_half != pytest.approx(whole, rel=1e-3)  # the halves differ, so the check means something


@pytest.mark.parametrize("name", LOSSES)
def test_volume_loss_is_the_loss_of_its_slices(name):
    """A 3D batch ``[B, D, H, W, N]`` is scored over every voxel, as its slices would be in 2D."""
    loss = get_loss(name, ("liver", "tumour"))
    y_true, y_pred = masks((2, 3, 4, 5, 2))
    as_slices = value(loss, y_true.reshape(6, 4, 5, 2), y_pred.reshape(6, 4, 5, 2))
    assert value(loss, y_true, y_pred) == pytest.approx(as_slices, rel=1e-5)


def test_masked_loss_dilation_grows_the_mask_in_3d():
    y_true = np.zeros((1, 3, 8, 8, 2), np.float32)
    y_true[0, 1, :, :4, 0] = 1  # liver on the middle slice only
    y_pred = np.full(y_true.shape, 0.2, np.float32)
    above = y_pred.copy()
    above[0, 0, :, :4, 1] = 0.99  # tumour false positives on the slice above the liver
    assert value(MaskedTumourLoss(), y_true, above) == value(MaskedTumourLoss(), y_true, y_pred)
    assert value(MaskedTumourLoss(dilation=1), y_true, above) > value(MaskedTumourLoss(dilation=1), y_true, y_pred)


def ct_case():
    """Liver in the left half; a tumour inside it."""
    y_true = np.zeros((1, 8, 8, 2), np.float32)
    y_true[0, :, :4, 0] = 1
    y_true[0, 2:4, 1:3, 1] = 1
    y_pred = np.full((1, 8, 8, 2), 0.2, np.float32)
    return y_true, y_pred


def test_masked_loss_ignores_tumour_outside_liver():
    loss = get_loss("masked", ("liver", "tumour"))
    y_true, y_pred = ct_case()
    base = value(loss, y_true, y_pred)
    outside = y_pred.copy()
    outside[0, :, 4:, 1] = 0.99  # tumour false positives outside the liver
    assert value(loss, y_true, outside) == base
    inside = y_pred.copy()
    inside[0, 6:, :4, 1] = 0.99  # the same error inside the liver counts
    assert value(loss, y_true, inside) > base + 0.1
    liver = y_pred.copy()
    liver[0, :, 4:, 0] = 0.99  # liver channel errors count everywhere
    assert value(loss, y_true, liver) > base + 0.1


def test_masked_loss_dilation_grows_the_mask():
    y_true, y_pred = ct_case()
    border = y_pred.copy()
    border[0, :, 4, 1] = 0.99  # one column right of the liver
    assert value(MaskedTumourLoss(), y_true, border) == value(MaskedTumourLoss(), y_true, y_pred)
    assert value(MaskedTumourLoss(dilation=1), y_true, border) > value(MaskedTumourLoss(dilation=1), y_true, y_pred)


def test_masked_loss_perfect_prediction():
    y_true, _ = ct_case()
    assert value(get_loss("masked", ("liver", "tumour")), y_true, y_true) == pytest.approx(0.0, abs=1e-5)


def test_masked_loss_needs_ct_channels():
    message = ("Expected output_names ('liver', 'tumour') for loss='masked' (the liver mask gates the tumour "
               "loss; CT only). Received: output_names=('tumour',)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_loss("masked", ("tumour",))


def test_unknown_loss():
    message = "Expected loss in ('bce', 'dice', 'bce_dice', 'focal', 'masked'). Received: loss='l2'"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_loss("l2", ("tumour",))


@pytest.mark.parametrize("name", LOSSES)
def test_losses_serialize(name):
    loss = get_loss(name, ("liver", "tumour"))
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    y_true, y_pred = masks()
    assert value(restored, y_true, y_pred) == pytest.approx(value(loss, y_true, y_pred))


@pytest.mark.parametrize("name", ["bce", "bce_dice", "focal"])
def test_saturated_predictions_still_get_gradients(name):
    # A frozen-BatchNorm transfer model can start with logits near -20; a clip at 1e-7 would
    # zero every gradient there and the model would never learn.
    logits = np.full((1, 4, 4, 1), -20.0, np.float32)
    y_true = np.zeros((1, 4, 4, 1), np.float32)
    y_true[0, 1:3, 1:3, 0] = 1.0
    loss = get_loss(name, ("tumour",))
    grad = backend_gradient(lambda x: loss(y_true, keras.activations.sigmoid(x)), logits)
    assert np.all(grad[y_true > 0] < -1e-3)  # pushes the tumour logits up
