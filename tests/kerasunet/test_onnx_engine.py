"""Tests of kerasunet.onnx_engine: the ONNX graph equals the Keras model, and `predict --engine onnx`
gives the Keras engine's masks without importing TensorFlow."""

import json
import os
import re

import keras
import nibabel as nib
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cli.export import export as export_cli
from cli.predict import predict as predict_cli
from kerasunet.core.runs import RunError, RunInfo, resolve_run
from kerasunet.model import build_unet
from kerasunet.onnx_engine import (CONFIG_KEY, ONNX_FILE, OnnxPredictor, find_onnx, load_onnx_predictor,
                                   onnx_model_of, to_onnx, write_onnx)
from kerasunet.postprocess import PostprocessSettings
from kerasunet.predict import PredictSettings, predict_path
from tests.helpers import REPO, assert_one_line_error, ct_phantom, run_cli, write_unet_run

INFO = RunInfo(model_path=None, config={"data": {"modality": "ct", "norm": {}, "context": 1},
                                        "model": {"depth": 2}})


def random_bn(model, seed=0):
    """Every BatchNorm weight random (moving statistics included), so a wrong BN conversion shows."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if "_bn_" in layer.name:
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    return model


@pytest.mark.parametrize("channels, outputs, depth, size", [(3, 2, 2, (32, 48)), (1, 1, 3, (8, 24))])
def test_graph_equals_the_keras_model(tmp_path, channels, outputs, depth, size):
    keras.utils.set_random_seed(depth)
    model = random_bn(build_unet((None, None, channels), outputs, filters=4, depth=depth))
    path = write_onnx(to_onnx(model, INFO), tmp_path)
    assert path == tmp_path / ONNX_FILE
    x = np.random.default_rng(1).normal(size=(3, *size, channels)).astype(np.float32)
    got = OnnxPredictor(path).predict_on_batch(x)
    np.testing.assert_allclose(got, model.predict_on_batch(x), rtol=0, atol=1e-5)
    stored = onnx.load(str(path))
    assert [i.name for i in stored.graph.input] == ["image"] and [o.name for o in stored.graph.output] == [
        "probabilities"]
    assert json.loads({p.key: p.value for p in stored.metadata_props}[CONFIG_KEY]) == INFO.config


def test_layers_without_a_conversion_are_named():
    volume = build_unet((None, None, None, 1), 1, filters=2, depth=1, dims=3)
    with pytest.raises(ValueError, match=re.escape("layer 'encoder_1_conv_a' (Conv3D) has no ONNX conversion")):
        to_onnx(volume, INFO)
    inputs = keras.Input((None, None, 1))
    strided = keras.Model(inputs, keras.layers.Conv2D(2, 3, strides=2, padding="same", name="head_conv")(inputs))
    with pytest.raises(ValueError, match="^layer 'head_conv': only stride-1 'same' convs"):
        to_onnx(strided, INFO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CT run (2.5D, padded) and an MRI run trained on resized slices, each with its model.onnx."""
    root = tmp_path_factory.mktemp("onnx")
    made = {"ct": write_unet_run(root / "ct", "ct", context=1),
            "mri": write_unet_run(root / "mri", "mri", context=0, image_size=[16, 16])}
    for run in made.values():
        model = keras.saving.load_model(run / "best.keras")
        head = model.get_layer("head_conv")
        head.set_weights([head.get_weights()[0], np.full(head.filters, -0.5, np.float32)])  # air is background
        model.save(run / "best.keras")
        write_onnx(onnx_model_of(run), run)
    hu = ct_phantom((20, 18, 5))
    hu += np.random.default_rng(0).normal(0, 30, hu.shape).astype(np.float32)  # masks with every label
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), str(root / "volume-1.nii"))
    mri = np.random.default_rng(1).gamma(2.0, 100.0, (24, 20, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(mri, np.eye(4)), str(root / "mri.nii.gz"))
    return {**made, "root": root}


def outputs(folder, mask_name, probs_name):
    return (np.asarray(nib.load(str(folder / mask_name)).dataobj),
            np.asarray(nib.load(str(folder / probs_name)).dataobj))


def test_predict_engine_onnx_without_tensorflow_equals_keras(runs, tmp_path):
    # A `tensorflow` that cannot be imported first on the path: keras (TensorFlow backend) and
    # TensorFlow itself fail to import, so the command passes only if it needs neither.
    blocker = tmp_path / "blocker" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('predict --engine onnx imported tensorflow')\n")
    volume = runs["root"] / "volume-1.nii"
    proc = run_cli("predict", "--engine", "onnx", "--model", runs["ct"] / ONNX_FILE, "--input", volume,
                   "--output", tmp_path / "onnx", "--probabilities", "--batch-size", "2",
                   "--no-fill-liver-holes",  # the random model's liver encloses all: keep the mask varied
                   env={"PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO)])})
    assert proc.returncode == 0, proc.stderr
    predict_path(runs["ct"], volume, tmp_path / "keras",
                 PredictSettings(save_probabilities=True, batch_size=2,
                                 postprocess=PostprocessSettings(fill_liver_holes=False)),
                 progress=lambda line: None)
    mask, probs = outputs(tmp_path / "onnx", "segmentation-1.nii", "probabilities-1.nii.gz")
    keras_mask, keras_probs = outputs(tmp_path / "keras", "segmentation-1.nii", "probabilities-1.nii.gz")
    assert set(np.unique(keras_mask)) == {0, 1, 2}
    np.testing.assert_array_equal(mask, keras_mask)
    np.testing.assert_allclose(probs, keras_probs, rtol=0, atol=1e-4)


def test_resized_run_with_tta_equals_keras(runs, tmp_path):
    # Trained on 16x16 slices: both engines resize the 24x20 slices in and the probabilities back.
    volume = runs["root"] / "mri.nii.gz"
    for engine in ("keras", "onnx"):
        model = runs["mri"] if engine == "keras" else runs["mri"] / ONNX_FILE
        settings = PredictSettings(save_probabilities=True, tta=True, engine=engine, batch_size=3)
        predict_path(model, volume, tmp_path / engine, settings, progress=lambda line: None)
    mask, probs = outputs(tmp_path / "onnx", "mri_prediction.nii.gz", "mri_probabilities.nii.gz")
    keras_mask, keras_probs = outputs(tmp_path / "keras", "mri_prediction.nii.gz", "mri_probabilities.nii.gz")
    assert 0 < keras_mask.mean() < 1
    np.testing.assert_array_equal(mask, keras_mask)
    np.testing.assert_allclose(probs, keras_probs, rtol=0, atol=1e-4)


def test_export_format_onnx_writes_model_onnx_in_the_version(runs, tmp_path):
    out = tmp_path / "saved_models" / "liver"
    result = CliRunner().invoke(export_cli, ["--model", str(runs["ct"]), "--out", str(out), "--format", "onnx"])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert (out / "1" / "saved_model.pb").is_file() and (out / "1" / ONNX_FILE).is_file()
    assert f"wrote {out / '1' / ONNX_FILE}" in result.output
    # The export folder resolves to its newest version's model.onnx; the config is the run's.
    predictor, info = load_onnx_predictor(out)
    assert info.model_path == out / "1" / ONNX_FILE and info.config == resolve_run(runs["ct"]).config
    x = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
    expected = keras.saving.load_model(runs["ct"] / "best.keras").predict_on_batch(x)
    np.testing.assert_allclose(predictor.predict_on_batch(x), expected, rtol=0, atol=1e-5)


def test_onnx_export_of_a_cascade_is_refused_in_one_line(tmp_path):
    run = write_unet_run(tmp_path / "tumour", "ct", context=0)
    config = json.loads((run / "config.json").read_text())
    config["cascade"] = {"liver_model": str(tmp_path / "liver"), "roi_size": [16, 16], "margin_mm": 10.0}
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "saved" / "cascade"
    result = CliRunner().invoke(export_cli, ["--model", str(run), "--out", str(out), "--format", "onnx"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.strip() == (f"Error: {run / 'best.keras'}: no ONNX export of a cascade (stage 2 alone "
                                     "would segment tumour without its liver ROI); export it as a SavedModel")
    assert not out.exists()


def test_export_of_a_3d_model_writes_nothing(tmp_path):
    run = tmp_path / "run3d"
    run.mkdir()
    build_unet((None, None, None, 1), 1, filters=2, depth=1, dims=3).save(run / "best.keras")
    config = {"model": {"input_channels": 1, "num_outputs": 1, "depth": 1, "dims": 3, "patch_size": [8, 8, 8]},
              "data": {"modality": "mri", "context": 0, "norm": {}}}
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "saved" / "liver3d"
    result = CliRunner().invoke(export_cli, ["--model", str(run), "--out", str(out), "--format", "onnx"])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {run / 'best.keras'}: no ONNX export: layer 'encoder_1_conv_a' "
                                     "(Conv3D) has no ONNX conversion here")
    assert not out.exists()


def test_missing_or_foreign_onnx_is_a_one_line_error(runs, tmp_path):
    with pytest.raises(RunError, match=f"^{re.escape(str(tmp_path))}: no model.onnx"):
        find_onnx(tmp_path)
    assert find_onnx(runs["ct"]) == runs["ct"] / ONNX_FILE
    foreign = tmp_path / "foreign.onnx"
    proto = onnx.load(str(runs["ct"] / ONNX_FILE))
    del proto.metadata_props[:]
    foreign.write_bytes(proto.SerializeToString())
    with pytest.raises(RunError, match=f"^{re.escape(str(foreign))}: not a kerasunet ONNX model"):
        load_onnx_predictor(foreign)
    junk = tmp_path / "junk.onnx"
    junk.write_text("not onnx")
    proc = run_cli("predict", "--engine", "onnx", "--model", junk, "--input", runs["root"] / "volume-1.nii",
                   "--output", tmp_path / "out")
    assert_one_line_error(proc, f"{re.escape(str(junk))}: not a loadable ONNX model")


def test_engine_is_for_a_local_model():
    result = CliRunner().invoke(predict_cli, ["--server", "http://localhost:8501", "--model-name", "liver",
                                              "--engine", "onnx", "--input", "x.nii", "--output", "out"])
    assert result.exit_code == 2 and "--engine only applies to a local --model" in result.output
    with pytest.raises(ValueError, match=re.escape("Expected engine in ('keras', 'onnx'). Received: "
                                                   "engine='torch'")):
        PredictSettings(engine="torch")
