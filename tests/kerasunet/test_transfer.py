"""Tests of kerasunet.transfer: what scratch, init and freeze do to the weights."""

import json
import re

import keras
import numpy as np
import pytest

from kerasunet.losses import get_loss
from kerasunet.model import block_of, build_unet
from kerasunet.core.runs import RunError
from kerasunet.transfer import build_for_mode, frozen_blocks, transfer_weights
from tests.helpers import write_run

ARCH = {"filters": 4, "depth": 3}
SHAPE = (32, 32, 1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A CT model (liver, tumour) whose every weight, BN statistics included, is random."""
    keras.utils.set_random_seed(1)
    model = build_unet((None, None, 1), 2, **ARCH)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if "bn" in layer.name else w
                           for w in layer.get_weights()])
    run_dir = tmp_path_factory.mktemp("ct_run")
    model.save(run_dir / "best.keras")
    return run_dir, model


def weights_by_name(model):
    return {f"{layer.name}/{i}": w for layer in model.layers for i, w in enumerate(layer.get_weights())}


def fit_steps(model, steps=3):
    rng = np.random.default_rng(2)
    x = rng.random((2 * steps, *SHAPE), np.float32)
    y = (rng.random((2 * steps, 32, 32, 1)) > 0.8).astype(np.float32)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=get_loss("bce_dice", ("tumour",)))
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)


def test_init_copies_every_weight_and_the_tumour_column(pretrained):
    run_dir, source = pretrained
    model = build_for_mode("init", SHAPE, 1, pretrained=run_dir, **ARCH)
    new, old = weights_by_name(model), weights_by_name(source)
    head = {"head_conv/0", "head_conv/1"}
    assert set(new) == set(old)
    for key in set(new) - head:
        np.testing.assert_array_equal(new[key], old[key], err_msg=key)
    # CT head columns are (liver, tumour); the MRI head keeps column 1 only.
    assert new["head_conv/0"].shape == (1, 1, 4, 1)
    np.testing.assert_array_equal(new["head_conv/0"][..., 0], old["head_conv/0"][..., 1])
    np.testing.assert_array_equal(new["head_conv/1"], old["head_conv/1"][1:2])
    assert not np.array_equal(new["head_conv/0"][..., 0], old["head_conv/0"][..., 0])
    assert all(layer.trainable for layer in model.layers)
    # Same predictions as the CT model's tumour channel, before any training.
    x = np.random.default_rng(3).random((1, *SHAPE), np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0)[..., 0], source.predict(x, verbose=0)[..., 1],
                               rtol=1e-5, atol=1e-6)


def test_init_with_equal_heads_copies_all(pretrained):
    _, source = pretrained
    model = build_for_mode("init", SHAPE, 2, pretrained=source, **ARCH)
    np.testing.assert_array_equal(model.get_layer("head_conv").get_weights()[0],
                                  source.get_layer("head_conv").get_weights()[0])


def test_a_ct_head_goes_whole_into_a_liver_and_tumour_mri_head(pretrained, tmp_path):
    _, source = pretrained
    run_dir = write_run(tmp_path / "ct", source, "ct", depth=ARCH["depth"])
    model = build_for_mode("freeze", SHAPE, 2, pretrained=run_dir, outputs=("liver", "tumour"), **ARCH)
    for new, old in zip(model.get_layer("head_conv").get_weights(), source.get_layer("head_conv").get_weights()):
        np.testing.assert_array_equal(new, old)
    assert frozen_blocks(model) == ["encoder_1", "encoder_2"]


def test_head_columns_follow_the_structures_the_run_config_names(tmp_path):
    keras.utils.set_random_seed(4)
    liver_only = build_unet((None, None, 1), 1, **ARCH)
    run_dir = write_run(tmp_path / "liver", liver_only, "mri", depth=ARCH["depth"])
    config = json.loads((run_dir / "config.json").read_text())
    config["model"]["outputs"] = ["liver"]
    (run_dir / "config.json").write_text(json.dumps(config))
    # by channel count a one-channel head would be tumour; its config.json says liver
    with pytest.raises(ValueError, match=re.escape("first mismatching layer 'head_conv' (the pretrained head "
                                                   "segments liver; the new one tumour)")):
        build_for_mode("init", SHAPE, 1, pretrained=run_dir, outputs=("tumour",), **ARCH)
    model = build_for_mode("init", SHAPE, 1, pretrained=run_dir / "best.keras", outputs=("liver",), **ARCH)
    np.testing.assert_array_equal(model.get_layer("head_conv").get_weights()[0],
                                  liver_only.get_layer("head_conv").get_weights()[0])


def test_freeze_keeps_first_blocks_bit_identical(pretrained):
    run_dir, source = pretrained
    model = build_for_mode("freeze", SHAPE, 1, pretrained=run_dir / "best.keras", freeze_blocks=2, **ARCH)
    assert frozen_blocks(model) == ["encoder_1", "encoder_2"]
    before = weights_by_name(model)
    fit_steps(model)
    after, old = weights_by_name(model), weights_by_name(source)
    frozen = [k for k in after if block_of(k.split("/")[0]) in ("encoder_1", "encoder_2")]
    assert any("bn_a/2" in k for k in frozen)  # moving means are among the compared weights
    for key in frozen:
        np.testing.assert_array_equal(after[key], old[key], err_msg=key)
    for key in ("encoder_3_conv_a/0", "encoder_3_bn_a/2", "bottleneck_conv_b/0", "decoder_1_conv_a/0",
                "head_conv/0"):
        assert not np.array_equal(after[key], before[key]), key


def test_freeze_zero_blocks_trains_everything(pretrained):
    _, source = pretrained
    model = build_for_mode("freeze", SHAPE, 1, pretrained=source, freeze_blocks=0, **ARCH)
    assert frozen_blocks(model) == []


def test_scratch_shares_no_kernel_with_pretrained(pretrained):
    _, source = pretrained
    model = build_for_mode("scratch", SHAPE, 1, **ARCH)
    old = weights_by_name(source)
    kernels = {k: w for k, w in weights_by_name(model).items()
               if isinstance(model.get_layer(k.split("/")[0]), (keras.layers.Conv2D, keras.layers.Conv2DTranspose))
               and k.endswith("/0")}
    assert len(kernels) == 7 * 3 + 3 + 1  # conv_a, conv_b, proj of 7 blocks; 3 ups; head
    for key, w in kernels.items():
        assert not np.allclose(w, old[key][..., :w.shape[-1]], rtol=0, atol=1e-4), key
    assert all(layer.trainable for layer in model.layers)


def test_mismatched_architecture_error(pretrained):
    run_dir, _ = pretrained
    message = (f"{run_dir / 'best.keras'}: architecture does not match the new model; first mismatching layer "
               "'encoder_1_conv_a' (weight shapes [(3, 3, 1, 4)] in the pretrained model, [(3, 3, 1, 8)] in "
               "the new one). Use the pretrained run's --filters, --depth and input channels")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_for_mode("init", SHAPE, 1, pretrained=run_dir, filters=8, depth=3)


def test_mismatched_depth_error(pretrained):
    _, source = pretrained
    with pytest.raises(ValueError, match=re.escape("pretrained model 'unet': architecture does not match the "
                                                   "new model; first mismatching layer 'encoder_4_conv_a' "
                                                   "(missing in the pretrained model)")):
        build_for_mode("init", SHAPE, 1, pretrained=source, filters=4, depth=4)
    with pytest.raises(ValueError, match=re.escape("first mismatching layer 'bottleneck_conv_a' (weight shapes "
                                                   "[(3, 3, 16, 32)] in the pretrained model, [(3, 3, 8, 16)]")):
        build_for_mode("init", SHAPE, 1, pretrained=source, filters=4, depth=2)


def test_layer_only_in_pretrained_is_a_mismatch():
    inputs = keras.Input((8, 8, 1))
    conv_a = keras.layers.Conv2D(2, 3, name="encoder_1_conv_a")
    target = keras.Model(inputs, conv_a(inputs))
    source = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="encoder_1_proj")(conv_a(inputs)))
    with pytest.raises(ValueError, match=re.escape("source: architecture does not match the new model; first "
                                                   "mismatching layer 'encoder_1_proj' (missing in the new model)")):
        transfer_weights(target, source, "source")


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "finetune"}, "Expected mode in ('scratch', 'init', 'freeze'). Received: mode='finetune'"),
    ({"mode": "freeze"}, "Expected a pretrained model (run folder or .keras file) for mode='freeze'. "
                         "Received: pretrained=None"),
    ({"mode": "scratch", "pretrained": "ct_run"},
     "Expected no pretrained model for mode='scratch'. Received: pretrained='ct_run'"),
])
def test_mode_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_for_mode(input_shape=SHAPE, num_outputs=1, **kwargs, **ARCH)


def test_freeze_blocks_out_of_range(pretrained):
    _, source = pretrained
    message = "Expected 0 <= freeze_blocks <= depth=3. Received: freeze_blocks=4"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_for_mode("freeze", SHAPE, 1, pretrained=source, freeze_blocks=4, **ARCH)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(RunError, match=f"^{re.escape(str(tmp_path / 'best.keras'))}: no pretrained model"):
        build_for_mode("init", SHAPE, 1, pretrained=tmp_path, **ARCH)
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    with pytest.raises(RunError, match=f"^{re.escape(str(junk))}: not a loadable kerasunet model"):
        build_for_mode("init", SHAPE, 1, pretrained=junk, **ARCH)


# --- 3D: CT pretrained on near-isotropic voxels, MRI with thick slices -------------------------

ARCH_3D = {"filters": 4, "depth": 2, "dims": 3}
CT_SPACING, MRI_SPACING = (1.0, 0.8, 0.8), (3.0, 1.2, 1.2)  # pooling (2,2,2) vs (1,2,2) at level 1
PATCH_3D = (8, 16, 16, 1)


@pytest.fixture(scope="module")
def pretrained_3d():
    """A 3D CT model (liver, tumour) with random weights, BN statistics included."""
    keras.utils.set_random_seed(3)
    model = build_unet((None, None, None, 1), 2, spacing=CT_SPACING, **ARCH_3D)
    rng = np.random.default_rng(3)
    for layer in model.layers:
        layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if "bn" in layer.name else w
                           for w in layer.get_weights()])
    return model


def test_3d_init_copies_every_weight_across_spacings(pretrained_3d):
    model = build_for_mode("init", PATCH_3D, 1, pretrained=pretrained_3d, spacing=MRI_SPACING, **ARCH_3D)
    assert model.get_layer("encoder_1_pool").pool_size == (1, 2, 2)
    assert pretrained_3d.get_layer("encoder_1_pool").pool_size == (2, 2, 2)
    new, old = weights_by_name(model), weights_by_name(pretrained_3d)
    assert set(new) == set(old)
    for key in set(new) - {"head_conv/0", "head_conv/1"}:
        np.testing.assert_array_equal(new[key], old[key], err_msg=key)
    assert new["head_conv/0"].shape == (1, 1, 1, 4, 1)
    np.testing.assert_array_equal(new["head_conv/0"][..., 0], old["head_conv/0"][..., 1])
    np.testing.assert_array_equal(new["head_conv/1"], old["head_conv/1"][1:2])


def test_3d_freeze_keeps_first_block_bit_identical(pretrained_3d):
    model = build_for_mode("freeze", PATCH_3D, 1, pretrained=pretrained_3d, freeze_blocks=1,
                           spacing=MRI_SPACING, **ARCH_3D)
    assert frozen_blocks(model) == ["encoder_1"]
    before = weights_by_name(model)
    rng = np.random.default_rng(4)
    x = rng.random((2, *PATCH_3D), np.float32)
    y = (rng.random((2, *PATCH_3D[:-1], 1)) > 0.8).astype(np.float32)
    # One step: eager under TensorFlow (tracing a 3D step costs more than running it once); jitted
    # under JAX, where eager dispatch compiles every op separately.
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.BinaryCrossentropy(),
                  run_eagerly=keras.backend.backend() == "tensorflow")
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    after, old = weights_by_name(model), weights_by_name(pretrained_3d)
    frozen = [k for k in after if block_of(k.split("/")[0]) == "encoder_1"]
    assert any("bn_a/2" in k for k in frozen)  # moving means are among the compared weights
    for key in frozen:
        np.testing.assert_array_equal(after[key], old[key], err_msg=key)
    for key in ("encoder_2_conv_a/0", "encoder_2_bn_a/2", "bottleneck_conv_b/0", "decoder_1_up/0", "head_conv/0"):
        assert not np.array_equal(after[key], before[key]), key


def test_3d_pretrained_into_2d_is_a_mismatch(pretrained_3d):
    with pytest.raises(ValueError, match=re.escape("first mismatching layer 'encoder_1_conv_a' (weight shapes "
                                                   "[(3, 3, 3, 1, 4)] in the pretrained model, [(3, 3, 1, 4)]")):
        build_for_mode("init", SHAPE, 1, pretrained=pretrained_3d, filters=4, depth=2)
