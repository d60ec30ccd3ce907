"""Tests of kerasunet.predict: orientation round trip, odd sizes, 2.5D stacks, TTA, folders."""

import re

import keras
import nibabel as nib
import numpy as np
import pytest

from kerasunet.core.nifti import load_volume
from kerasunet.postprocess import PostprocessSettings
from kerasunet.predict import (PredictSettings, load_predictor, plan_jobs, predict_path, predict_volume,
                               slice_batch)
from kerasunet.core.preprocessing import NormSettings, case_stats, normalize_np
from kerasunet.core.runs import RunError
from tests.helpers import LPS, ct_phantom, expected_ct_labels, threshold_model, write_run

FLIPPED_SWAPPED = np.array([[0, 0.7, 0, 10], [-0.7, 0, 0, 5], [0, 0, -3.0, 2], [0, 0, 0, 1]], float)
NO_POST = PredictSettings(postprocess=PostprocessSettings(enabled=False))


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs") / "ct_threshold", threshold_model())


@pytest.mark.parametrize("affine", [np.diag([0.8, 0.8, 2.5, 1.0]), LPS, FLIPPED_SWAPPED])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_mask_has_input_affine_shape_and_sits_on_the_organ(tmp_path, ct_run, affine, suffix):
    hu = ct_phantom()
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / f"volume-3{suffix}"))
    result = predict_path(ct_run, tmp_path / f"volume-3{suffix}", tmp_path / "out", progress=lambda line: None)
    assert result.written == [tmp_path / "out" / f"segmentation-3{suffix}"] and not result.failures
    mask = nib.load(str(result.written[0]))
    np.testing.assert_allclose(mask.affine, affine)
    assert mask.shape == hu.shape and mask.get_data_dtype() == np.uint8
    # the stored voxel order of the mask matches the input's: the mask lies on the bright block
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_ct_labels(hu))


@pytest.mark.parametrize("shape", [(37, 29, 3), (17, 64, 2), (4, 4, 1)])
def test_odd_in_plane_sizes_are_padded_and_cropped_back(tmp_path, ct_run, shape):
    rng = np.random.default_rng(1)
    hu = rng.uniform(-300, 300, size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "v.nii"))
    model, info = load_predictor(ct_run)
    labels, probs = predict_volume(model, info, load_volume(tmp_path / "v.nii"), NO_POST)
    assert labels.shape == shape and probs.shape == (*shape, 2) and probs.dtype == np.float32
    np.testing.assert_array_equal(labels, expected_ct_labels(hu))  # crop is aligned voxel for voxel


def test_odd_sizes_run_through_a_real_unet(tmp_path):
    import keras

    from kerasunet.model import build_unet

    keras.utils.set_random_seed(0)  # an unseeded net can saturate a voxel to exactly 0 or 1
    run = write_run(tmp_path / "unet", build_unet((None, None, 3), 1, filters=4, depth=2), "mri", context=1)
    nib.save(nib.Nifti1Image(np.random.default_rng(2).normal(size=(37, 29, 4)).astype(np.float32), np.eye(4)),
             str(tmp_path / "v.nii.gz"))
    model, info = load_predictor(run)
    labels, probs = predict_volume(model, info, load_volume(tmp_path / "v.nii.gz"))
    assert labels.shape == (37, 29, 4) and probs.shape == (37, 29, 4, 1)
    assert np.all((probs > 0) & (probs < 1))


def test_fixed_image_size_models_get_resized_slices(tmp_path):
    # The model only accepts 16x16: a 40x24 volume must be resized in and its output resized back.
    run = write_run(tmp_path / "fixed", threshold_model(size=(16, 16)), image_size=[16, 16])
    hu = np.full((40, 24, 2), -500.0, np.float32)
    hu[5:30, 4:20] = 100.0
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "v.nii"))
    model, info = load_predictor(run)
    labels, probs = predict_volume(model, info, load_volume(tmp_path / "v.nii"), NO_POST)
    assert labels.shape == (40, 24, 2) and probs.shape == (40, 24, 2, 2)
    truth = expected_ct_labels(hu)
    assert 2 * np.sum((labels == 1) & (truth == 1)) / (np.sum(labels == 1) + np.sum(truth == 1)) > 0.9


def test_pad_value_is_the_normalised_window_minimum():
    stats = case_stats(None, NormSettings("ct"))
    slices = normalize_np(np.full((2, 5, 3), 1000.0, np.float32), stats)
    batch = slice_batch(slices, np.array([0, 1]), 0, (8, 4), float((stats[0] - stats[2]) / stats[3]))
    assert batch.shape == (2, 8, 4, 1)
    np.testing.assert_allclose(batch[:, :5, :3], 1.0)  # 250 HU (window top) -> +1
    np.testing.assert_allclose(batch[:, 5:], -1.0)  # -200 HU (window bottom) -> -1
    np.testing.assert_allclose(batch[:, :, 3:], -1.0)


@pytest.mark.parametrize("context", [1, 2])
def test_2_5d_stacks_match_the_records_builder(context):
    from kerasunet.core.stacking import stack_slices

    volume = np.random.default_rng(3).normal(size=(6, 5, 4)).astype(np.float32)
    indices = np.arange(4)
    ours = slice_batch(np.ascontiguousarray(np.moveaxis(volume, 2, 0)), indices, context, (6, 5), 0.0)
    np.testing.assert_array_equal(ours, stack_slices(volume, indices, context))


def test_2_5d_model_sees_the_neighbouring_slice_with_edge_replication(tmp_path):
    # The model looks only at channel 2 (slice k+1): labels at k come from slice k+1,
    # and the last slice replicates itself.
    run = write_run(tmp_path / "ctx", threshold_model(channels=3, source_channel=2), context=1)
    hu = ct_phantom()
    nib.save(nib.Nifti1Image(hu, LPS), str(tmp_path / "v.nii"))
    volume = load_volume(tmp_path / "v.nii")
    model, info = load_predictor(run)
    labels, _ = predict_volume(model, info, volume, NO_POST)
    z = volume.data.shape[2]
    shifted = volume.data[:, :, [min(k + 1, z - 1) for k in range(z)]]
    np.testing.assert_array_equal(labels, expected_ct_labels(shifted))


def shift_model():
    """A model that is NOT flip-equivariant: each output pixel reads its upper-left neighbour."""
    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 3, padding="same", name="head_conv")
    outputs = keras.layers.Activation("sigmoid", name="head_sigmoid")(conv(inputs))
    kernel = np.zeros((3, 3, 1, 1), np.float32)
    kernel[0, 0, 0, 0] = 4.0
    conv.set_weights([kernel, np.zeros(1, np.float32)])
    return keras.Model(inputs, outputs)


def test_tta_averages_flips_so_predictions_become_flip_equivariant(tmp_path):
    run = write_run(tmp_path / "shift", shift_model(), "mri")
    data = np.random.default_rng(4).normal(size=(8, 12, 3)).astype(np.float32)
    model, info = load_predictor(run)

    def probs(array, tta):
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / "v.nii"))
        return predict_volume(model, info, load_volume(tmp_path / "v.nii"), PredictSettings(tta=tta))[1]

    for tta, equivariant in [(False, False), (True, True)]:
        plain, flipped = probs(data, tta), probs(np.ascontiguousarray(data[::-1]), tta)
        assert np.allclose(flipped[::-1], plain, atol=1e-5) == equivariant


def test_folder_with_a_bad_file_still_processes_the_others(tmp_path, ct_run):
    src = tmp_path / "lits"
    src.mkdir()
    nib.save(nib.Nifti1Image(ct_phantom(), LPS), str(src / "volume-1.nii"))
    nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(src / "volume-2.nii"))
    (src / "volume-2.nii").write_bytes((src / "volume-2.nii").read_bytes()[:400])
    nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(src / "volume-3.nii.gz"))
    lines = []
    result = predict_path(ct_run, src, tmp_path / "out", PredictSettings(save_probabilities=True), lines.append)
    assert result.written == [tmp_path / "out" / "segmentation-1.nii", tmp_path / "out" / "segmentation-3.nii.gz"]
    [(failed, message)] = result.failures
    assert failed == src / "volume-2.nii" and message.startswith(f"{failed}: unreadable or truncated NIfTI")
    assert re.fullmatch(r"\[1/3\] volume-1: 6 slices, \d+\.\d s -> .*segmentation-1\.nii", lines[0])
    assert lines[1].startswith("[2/3] volume-2: error: ") and "volume-2.nii: unreadable" in lines[1]
    probs = nib.load(str(tmp_path / "out" / "probabilities-3.nii.gz"))
    assert probs.shape == (20, 16, 6, 2) and probs.get_data_dtype() == np.float32


def test_mri_layout_writes_case_folders(tmp_path):
    run = write_run(tmp_path / "mri_run", threshold_model(modality="mri"), "mri")
    for case in ["FZMC002", "FZMC010"]:
        (tmp_path / "mri" / case).mkdir(parents=True)
        data = np.zeros((12, 10, 4), np.float32)
        data[2:8, 2:8, 1:3] = 100.0
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "mri" / case / "artery.nii.gz"))
    result = predict_path(run, tmp_path / "mri", tmp_path / "out", progress=lambda line: None)
    assert result.written == [tmp_path / "out" / c / "prediction.nii.gz" for c in ["FZMC002", "FZMC010"]]
    mask = np.asarray(nib.load(str(result.written[0])).dataobj)
    assert mask.sum() == 6 * 6 * 2 and mask[2:8, 2:8, 1:3].all()


def test_channel_mismatch_is_a_clear_error(tmp_path):
    run = write_run(tmp_path / "bad", threshold_model(channels=3), context=0)
    with pytest.raises(RunError, match=r"bad/best\.keras: model takes 3 input channels but its config has "
                                       r"context K=0 \(expected 2K\+1=1\)"):
        load_predictor(run)


def test_plan_jobs_names_and_errors(tmp_path):
    from kerasunet.core.nifti import VolumeError

    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(tmp_path / "scan.nii.gz"))
    [job] = plan_jobs(tmp_path / "scan.nii.gz", tmp_path / "o", probabilities=True)
    assert (job.output.name, job.probabilities.name) == ("scan_prediction.nii.gz", "scan_probabilities.nii.gz")
    [job] = plan_jobs(tmp_path / "scan.nii.gz", tmp_path / "mask.nii")
    assert job.output == tmp_path / "mask.nii" and job.probabilities is None
    with pytest.raises(VolumeError, match=r"missing\.nii: file or folder not found"):
        plan_jobs(tmp_path / "missing.nii", tmp_path / "o")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(VolumeError, match=r"notes\.txt: not a NIfTI file"):
        plan_jobs(tmp_path / "notes.txt", tmp_path / "o")
    with pytest.raises(VolumeError, match=r"o\.nii\.gz: the input is a folder, so the output must be a folder"):
        plan_jobs(tmp_path, tmp_path / "o.nii.gz")


def test_synth_phantoms_round_trip_in_every_stored_orientation(tmp_path, ct_run, tiny_phantoms):
    # volume-2 is stored LPS, volume-5 PLI (x/y swapped, z flipped), volume-3 gzipped, all int16 HU
    result = predict_path(ct_run, tiny_phantoms / "lits", tmp_path / "out", NO_POST, progress=lambda line: None)
    assert not result.failures and len(result.written) == 6
    for n in range(6):
        suffix = ".nii.gz" if n == 3 else ".nii"
        image = nib.load(str(tiny_phantoms / "lits" / f"volume-{n}{suffix}"))
        mask = nib.load(str(tmp_path / "out" / f"segmentation-{n}{suffix}"))
        np.testing.assert_allclose(mask.affine, image.affine)
        assert mask.shape == image.shape
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_ct_labels(image.get_fdata()))


def test_served_masks_equal_local_masks_with_postprocessing(tmp_path, ct_run):
    from kerasunet.export import export_model
    from kerasunet.predict import predict_path_served
    from tests.helpers import ServingDouble

    # Post-processing has work to do: a distant second "liver" (largest component drops it)
    # and a 4-voxel tumour in the liver (under min_tumour_voxels=10: it becomes liver).
    hu = ct_phantom((40, 16, 6))
    hu[34:38, 10:14, 2:4] = 100.0
    hu[9:11, 6:8, 2] = 200.0
    nib.save(nib.Nifti1Image(hu, LPS), str(tmp_path / "volume-7.nii"))
    export_model(ct_run, tmp_path / "saved_models" / "liver")
    settings = PredictSettings(batch_size=4, save_probabilities=True)
    local = predict_path(ct_run, tmp_path / "volume-7.nii", tmp_path / "local", settings, progress=lambda line: None)
    with ServingDouble(tmp_path / "saved_models" / "liver") as double:
        served = predict_path_served(double.url, "liver", tmp_path / "volume-7.nii", tmp_path / "served", settings,
                                     progress=lambda line: None)
    assert not local.failures and not served.failures
    local_mask, served_mask = (np.asarray(nib.load(str(r.written[0])).dataobj) for r in (local, served))
    assert not np.array_equal(local_mask, expected_ct_labels(hu))  # post-processing changed the mask
    np.testing.assert_array_equal(served_mask, local_mask)
    local_probs, served_probs = (nib.load(str(d / "probabilities-7.nii.gz")).get_fdata()
                                 for d in (tmp_path / "local", tmp_path / "served"))
    np.testing.assert_allclose(served_probs, local_probs, atol=1e-5)


def test_served_model_refuses_tta():
    from kerasunet.predict import predict_path_served

    with pytest.raises(ValueError, match=r"^Expected tta=False for a served model \(its graph has no flips\)\. "
                                         r"Received: tta=True$"):
        predict_path_served("http://127.0.0.1:1", "liver", "in.nii", "out.nii", PredictSettings(tta=True))


@pytest.mark.parametrize("shape, size", [((2, 20, 30, 3), (32, 16)), ((1, 64, 64, 1), (48, 80)),
                                         ((1, 7, 5, 2), (7, 13))])
def test_resize_is_the_readers_tf_image_resize(shape, size):
    # predict's numpy resize (no TensorFlow for the ONNX engine) must be the training reader's.
    import tensorflow as tf

    from kerasunet.predict import resize

    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    expected = tf.image.resize(x, size, method="bilinear", antialias=False).numpy()
    got = resize(x, size)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
