"""Tests of kerasunet.model: shapes, names, argument checks, mixed precision, save/load."""

import re

import keras
import numpy as np
import pytest

from kerasunet.losses import get_loss
from kerasunet.metrics import metrics_for
from kerasunet.model import block_of, build_unet, check_input_size, layers_in_blocks


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("num_outputs", [1, 2])
def test_output_shape_static(depth, num_outputs):
    model = build_unet((32, 48, 1), num_outputs, filters=4, depth=depth)
    assert model.output_shape == (None, 32, 48, num_outputs)
    out = model(np.zeros((2, 32, 48, 1), np.float32))
    assert tuple(out.shape) == (2, 32, 48, num_outputs)


@pytest.mark.parametrize("size", [(16, 16), (48, 32), (80, 16)])
def test_dynamic_size_accepts_any_multiple(size):
    model = build_unet((None, None, 3), 2, filters=4, depth=3)
    out = model(np.zeros((1, *size, 3), np.float32))
    assert tuple(out.shape) == (1, *size, 2)
    out = keras.ops.convert_to_numpy(out)
    assert np.all((out > 0) & (out < 1))


@pytest.mark.parametrize("shape, depth, received", [
    ((33, 32, 1), 1, "height=33, width=32"),
    ((32, 36, 1), 3, "height=32, width=36"),
    ((8, 8, 1), 4, "height=8, width=8"),
])
def test_static_size_not_divisible(shape, depth, received):
    step = 2**depth
    message = (f"Expected height and width to be positive multiples of 2**depth={step} "
               f"(depth={depth}). Received: {received}")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_unet(shape, 1, filters=4, depth=depth)


def test_check_input_size():
    check_input_size(None, 64, 4)
    check_input_size(512, 512, 4)
    with pytest.raises(ValueError, match=re.escape("2**depth=16 (depth=4). Received: height=100, width=None")):
        check_input_size(100, None, 4)


@pytest.mark.parametrize("kwargs, message", [
    ({"filters": 0}, "Expected filters >= 1. Received: filters=0"),
    ({"depth": 0}, "Expected depth >= 1. Received: depth=0"),
    ({"dropout": 1.0}, "Expected 0 <= dropout < 1. Received: dropout=1.0"),
    ({"dropout": -0.1}, "Expected 0 <= dropout < 1. Received: dropout=-0.1"),
    ({"num_outputs": 0}, "Expected num_outputs >= 1. Received: num_outputs=0"),
    ({"input_shape": (32, 32)},
     "Expected input_shape with 3 dims (height, width, channels). Received: input_shape=(32, 32)"),
    ({"input_shape": (32, 32, None)},
     "Expected a channel count >= 1 in input_shape. Received: input_shape=(32, 32, None)"),
])
def test_argument_checks(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_unet(**kwargs)


def test_every_layer_named_by_block():
    depth = 3
    model = build_unet((None, None, 1), 2, filters=4, depth=depth)
    blocks = {block_of(layer.name) for layer in model.layers}
    expected = {"input", "bottleneck", "head"} | {f"{side}_{i}" for side in ("encoder", "decoder")
                                                   for i in range(1, depth + 1)}
    assert blocks == expected
    names = {layer.name for layer in model.layers}
    for i in range(1, depth + 1):
        assert {f"encoder_{i}_{p}" for p in ("conv_a", "bn_a", "relu_a", "conv_b", "bn_b", "add",
                                             "relu_b", "pool")} <= names
        assert {f"decoder_{i}_{p}" for p in ("up", "concat", "dropout_a", "dropout_b", "conv_a", "conv_b",
                                             "add")} <= names
    assert {"head_conv", "head_sigmoid"} <= names


def test_block_of_rejects_unknown_names():
    assert block_of("decoder_12_conv_a") == "decoder_12"
    with pytest.raises(ValueError, match=re.escape("Received: layer_name='conv2d'")):
        block_of("conv2d")


def test_residual_projection_where_channels_differ():
    # 4 input channels == filters: encoder_1 adds its input directly; every other block changes width.
    model = build_unet((32, 32, 4), 1, filters=4, depth=2)
    names = {layer.name for layer in model.layers}
    assert "encoder_1_proj" not in names
    assert {"encoder_2_proj", "bottleneck_proj", "decoder_2_proj", "decoder_1_proj"} <= names
    add = model.get_layer("encoder_1_add")
    assert {t._keras_history.operation.name for t in add.input} == {"encoder_1_bn_b", "input_image"}
    add = model.get_layer("decoder_1_add")
    assert {t._keras_history.operation.name for t in add.input} == {"decoder_1_bn_b", "decoder_1_proj"}
    assert model.get_layer("decoder_1_proj").input._keras_history.operation.name == "decoder_1_concat"
    # Dropout sits before each decoder conv, never in the encoder.
    assert model.get_layer("decoder_1_conv_a").input._keras_history.operation.name == "decoder_1_dropout_a"
    assert model.get_layer("decoder_1_conv_b").input._keras_history.operation.name == "decoder_1_dropout_b"
    assert model.get_layer("decoder_1_dropout_a").rate == 0.5
    assert not [layer for layer in model.layers if "dropout" in layer.name and "encoder" in layer.name]


def test_filters_double_per_level():
    model = build_unet((32, 32, 1), 1, filters=4, depth=3)
    assert [model.get_layer(f"encoder_{i}_conv_a").filters for i in (1, 2, 3)] == [4, 8, 16]
    assert model.get_layer("bottleneck_conv_b").filters == 32
    assert [model.get_layer(f"decoder_{i}_up").filters for i in (3, 2, 1)] == [16, 8, 4]
    assert model.get_layer("encoder_1_conv_a").kernel_initializer.__class__.__name__ == "GlorotNormal"


def test_layers_in_blocks():
    model = build_unet((32, 32, 1), 1, filters=4, depth=2)
    selected = layers_in_blocks(model, ["encoder_1", "head"])
    assert {block_of(layer.name) for layer in selected} == {"encoder_1", "head"}
    assert "encoder_10_conv_a" not in {layer.name for layer in selected}
    with pytest.raises(ValueError, match=re.escape("Expected blocks present in model 'unet'. "
                                                   "Received: blocks=['encoder_3']")):
        layers_in_blocks(model, ["encoder_1", "encoder_3"])


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_output_is_float32(mixed_precision):
    model = build_unet((32, 32, 1), 2, filters=4, depth=2)
    assert model.get_layer("encoder_1_conv_a").compute_dtype == "float16"
    assert model.get_layer("head_conv").compute_dtype == "float16"
    assert model.get_layer("head_conv").kernel.dtype == "float32"  # variables stay float32
    assert model.get_layer("head_sigmoid").compute_dtype == "float32"
    assert model.get_layer("head_conv").output.dtype == "float16"
    out = model(np.random.rand(2, 32, 32, 1).astype(np.float32))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


def test_save_load_round_trip_safe_mode(tmp_path):
    names = ("liver", "tumour")
    model = build_unet((None, None, 1), 2, filters=4, depth=2)
    model.compile(optimizer="adam", loss=get_loss("masked", names), metrics=metrics_for(names))
    x = np.random.default_rng(0).random((2, 32, 32, 1), np.float32)
    y = (np.random.default_rng(1).random((2, 32, 32, 2)) > 0.5).astype(np.float32)
    model.optimizer.build(model.trainable_variables)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert type(loaded.loss).__name__ == "MaskedTumourLoss"
    # The registered loss and metrics come back compiled and give the same values.
    expected = model.evaluate(x, y, verbose=0, return_dict=True)
    got = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert set(got) == {"loss", "dice_liver", "iou_liver", "dice_tumour", "iou_tumour"}
    assert got == pytest.approx(expected, rel=1e-6)


# --- 3D ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing, depth, size, plan", [
    ((3.0, 1.2, 1.2), 3, (12, 24, 40), ((1, 2, 2), (2, 2, 2), (2, 2, 2))),  # thick slices: z waits a level
    ((5.0, 1.0, 1.0), 2, (7, 12, 20), ((1, 2, 2), (1, 2, 2))),  # z never pooled: any D, odd included
    ((1.0, 0.8, 2.0), 2, (12, 12, 6), ((2, 2, 1), (2, 2, 2))),  # the coarse axis can be any one
    ((2.0, 1.0, 1.0), 1, (6, 10, 14), ((2, 2, 2),)),  # exactly twice the finest is still pooled
    ((1.0, 1.0, 1.0), 2, (4, 20, 12), ((2, 2, 2), (2, 2, 2))),
])
def test_3d_pooling_per_axis_from_spacing(spacing, depth, size, plan):
    keras.utils.set_random_seed(0)  # fixed weights: an unlucky random init can round a sigmoid to 1.0 in float32
    model = build_unet((*size, 2), 3, filters=2, depth=depth, dims=3, spacing=spacing)
    assert [model.get_layer(f"encoder_{i}_pool").pool_size for i in range(1, depth + 1)] == list(plan)
    # Each decoder level's upsampling mirrors the pool of its level.
    assert [tuple(model.get_layer(f"decoder_{i}_up").strides) for i in range(1, depth + 1)] == list(plan)
    level = np.array(size)
    for i, pool in enumerate(plan, start=1):
        level = level // np.array(pool)
        assert model.get_layer(f"encoder_{i}_pool").output.shape[1:4] == tuple(level)
    out = model(np.random.default_rng(0).random((2, *size, 2), np.float32))
    assert tuple(out.shape) == (2, *size, 3)
    out = keras.ops.convert_to_numpy(out)
    assert np.all((out > 0) & (out < 1))


def test_3d_dynamic_size():
    model = build_unet((None, None, None, 1), 1, filters=2, depth=2, dims=3, spacing=(3.0, 1.2, 1.2))
    assert tuple(model(np.zeros((1, 6, 12, 20, 1), np.float32)).shape) == (1, 6, 12, 20, 1)


def test_3d_has_the_2d_layers_and_blocks():
    flat = build_unet((32, 32, 1), 2, filters=4, depth=2)
    volume = build_unet((8, 32, 32, 1), 2, filters=4, depth=2, dims=3, spacing=(3.0, 1.2, 1.2))
    assert [layer.name for layer in volume.layers] == [layer.name for layer in flat.layers]
    for layer in volume.layers:
        twin = flat.get_layer(layer.name)
        assert [w.shape[-2:] for w in layer.weights] == [w.shape[-2:] for w in twin.weights], layer.name
    assert tuple(volume.get_layer("encoder_1_conv_a").kernel.shape) == (3, 3, 3, 1, 4)
    assert tuple(volume.get_layer("decoder_1_up").kernel.shape) == (2, 2, 2, 4, 8)
    assert {block_of(layer.name) for layer in layers_in_blocks(volume, ["encoder_2"])} == {"encoder_2"}


@pytest.mark.parametrize("shape, spacing, depth, received", [
    ((5, 16, 16, 1), (3.0, 1.2, 1.2), 2, "factors (2, 4, 4) (spacing=(3.0, 1.2, 1.2), depth=2). "
                                         "Received: size=(5, 16, 16)"),
    ((8, 16, 18, 1), (3.0, 1.2, 1.2), 2, "factors (2, 4, 4) (spacing=(3.0, 1.2, 1.2), depth=2). "
                                         "Received: size=(8, 16, 18)"),
    ((4, None, 12, 1), None, 3, "factors (8, 8, 8) (spacing=(1.0, 1.0, 1.0), depth=3). "
                                "Received: size=(4, None, 12)"),
])
def test_3d_size_not_divisible(shape, spacing, depth, received):
    message = f"Expected sizes (D, H, W) that are positive multiples of the pooling {received}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_unet(shape, 1, filters=2, depth=depth, dims=3, spacing=spacing)


@pytest.mark.parametrize("kwargs, message", [
    ({"dims": 1}, "Expected dims in (2, 3). Received: dims=1"),
    ({"dims": 3, "input_shape": (32, 32, 1)},
     "Expected input_shape with 4 dims (D, H, W, channels). Received: input_shape=(32, 32, 1)"),
    ({"dims": 3, "input_shape": (8, 32, 32, 1), "spacing": (1.0, 1.0)},
     "Expected spacing with 3 values (D, H, W) in mm. Received: spacing=(1.0, 1.0)"),
    ({"dims": 3, "input_shape": (8, 32, 32, 1), "spacing": (3.0, 0.0, 1.0)},
     "Expected spacing of positive numbers in mm. Received: spacing=(3.0, 0.0, 1.0)"),
])
def test_3d_argument_checks(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_unet(**{"filters": 2, "depth": 2, **kwargs})


def test_3d_save_load_keeps_the_pooling_plan(tmp_path):
    model = build_unet((None, None, None, 1), 1, filters=2, depth=2, dims=3, spacing=(3.0, 1.2, 1.2))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert loaded.get_layer("encoder_1_pool").pool_size == (1, 2, 2)
    x = np.random.default_rng(0).random((1, 6, 12, 20, 1), np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))
