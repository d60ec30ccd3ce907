"""kerasunet.cascade: the ROI geometry (numpy and TensorFlow twins), both stages, and a run's own lesion filter."""

import json
import re

import numpy as np
import pytest

from kerasunet.cascade import (CascadeSettings, crop_resize_np, grow_box, liver_roi, margin_voxels, mask_box,
                               paste_np)


def test_margin_in_mm_with_anisotropic_spacing():
    # 10 mm: 0.7 mm -> 15 voxels (14.3 rounded up), 2.5 mm -> exactly 4, 5 mm -> exactly 2
    assert margin_voxels((0.7, 2.5, 5.0), 10.0).tolist() == [15, 4, 2]
    assert margin_voxels((1.0, 1.0, 1.0), 0.0).tolist() == [0, 0, 0]


def test_liver_roi_is_the_largest_components_box_plus_the_margin():
    liver = np.zeros((40, 30, 12), bool)
    liver[10:20, 8:18, 4:8] = True  # the liver
    liver[35:37, 1:3, 0:2] = True  # a smaller false positive, far away
    component, (lo, hi) = liver_roi(liver, (1.0, 2.0, 2.5), margin_mm=5.0)
    assert lo.tolist() == [5, 5, 2] and hi.tolist() == [25, 21, 10]
    assert component.sum() == 10 * 10 * 4 and not component[35:37].any()


def test_box_at_the_volumes_edge_is_clipped():
    liver = np.zeros((20, 20, 6), bool)
    liver[0:5, 15:20, 4:6] = True
    _, (lo, hi) = liver_roi(liver, (1.0, 1.0, 1.0), margin_mm=3.0)
    assert lo.tolist() == [0, 12, 1] and hi.tolist() == [8, 20, 6]


def test_empty_liver_has_no_roi():
    component, box = liver_roi(np.zeros((8, 8, 4), bool), (1.0, 1.0, 1.0), 10.0)
    assert box is None and not component.any()
    assert mask_box(np.zeros((3, 3), bool)) is None


def test_crop_and_paste_round_trip_at_the_boxs_own_size_is_exact():
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(3, 16, 12, 2)).astype(np.float32)
    box = ((2, 3), (11, 10))
    roi = crop_resize_np(batch, box, (9, 7))
    np.testing.assert_array_equal(roi, batch[:, 2:11, 3:10])
    back = paste_np(roi, box, (16, 12))
    inside = np.zeros((16, 12), bool)
    inside[2:11, 3:10] = True
    np.testing.assert_array_equal(back[:, inside], batch[:, inside])
    assert not back[:, ~inside].any()


def test_crop_resize_and_paste_match_tensorflow():
    import tensorflow as tf

    from kerasunet.cascade import crop_resize_tf, paste_tf

    rng = np.random.default_rng(1)
    batch = rng.uniform(size=(2, 20, 17, 1)).astype(np.float32)
    box = ((3, 1), (15, 14))
    lo, hi = tf.constant([3, 1]), tf.constant([15, 14])
    roi = crop_resize_np(batch, box, (16, 16))
    np.testing.assert_allclose(roi, crop_resize_tf(tf.constant(batch), lo, hi, (16, 16)).numpy(), atol=1e-6)
    np.testing.assert_allclose(paste_np(roi, box, (20, 17)), paste_tf(tf.constant(roi), lo, hi, (20, 17)).numpy(),
                               atol=1e-6)
    # a constant image survives crop, resize up and back down unchanged
    flat = np.full((1, 20, 17, 1), 0.25, np.float32)
    np.testing.assert_allclose(paste_np(crop_resize_np(flat, box, (32, 32)), box, (20, 17))[0, 3:15, 1:14], 0.25)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_largest_component_and_box_in_tensorflow_match_numpy(seed):
    import tensorflow as tf

    from kerasunet.cascade import largest_component_tf, mask_box_tf, scan_order_zxy
    from kerasunet.postprocess import largest_component

    rng = np.random.default_rng(seed)
    mask = rng.uniform(size=(12, 10, 6)) > 0.8  # (x, y, z): many small components, ties included
    mask[2:7, 2:6, 1:4] |= seed == 2  # one clear winner in one case
    expected = largest_component(mask)
    zxy = tf.constant(np.moveaxis(mask, 2, 0))
    got = np.moveaxis(largest_component_tf(zxy, scan_order_zxy(tf.shape(zxy))).numpy(), 0, 2)
    np.testing.assert_array_equal(got, expected)
    lo, hi = mask_box_tf(tf.constant(expected))
    assert (lo.numpy().tolist(), hi.numpy().tolist()) == tuple(b.tolist() for b in mask_box(expected))
    empty = tf.zeros((3, 4, 5), tf.bool)
    assert not largest_component_tf(empty, scan_order_zxy(tf.shape(empty))).numpy().any()


def test_grow_box_and_settings_checks():
    lo, hi = grow_box((np.array([2, 2]), np.array([4, 4])), (1.0, 0.5), 1.0, (5, 5))
    assert lo.tolist() == [1, 0] and hi.tolist() == [5, 5]
    assert CascadeSettings.from_dict(CascadeSettings("run", (64, 32), 7.5).to_dict()) == CascadeSettings(
        "run", (64, 32), 7.5)
    with pytest.raises(ValueError, match=r"Expected margin_mm >= 0. Received: margin_mm=-1"):
        CascadeSettings("run", margin_mm=-1.0)


# --- both stages end to end -------------------------------------------------------------------
#
# A deterministic cascade: stage 1 is the threshold model (liver = HU above the liver cut,
# tumour above the tumour cut), stage 2 a 1x1 conv that thresholds the tumour cut, and the
# ROI size is the box's own size, so crop and paste are exact and the cascade's mask must be
# exactly the threshold labels inside the liver's largest component.

SPACING = (0.8, 0.7, 2.5)
MARGIN_MM = 3.0  # 4, 5 and 2 voxels


def liver_volume(shape=(32, 32, 8)):
    """Air, a liver block (100 HU) with a tumour (200 HU), and a small far 'organ' with a hot spot."""
    hu = np.full(shape, -500.0, np.float32)
    hu[6:22, 5:20, 1:7] = 100.0
    hu[10:14, 9:13, 3:5] = 200.0
    hu[28:31, 27:30, 2:4] = 200.0  # a second component: outside the ROI, never stage 2's
    return hu


def tumour_model():
    import keras

    from tests.helpers import TUMOUR_CUT

    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, name="head_conv")
    outputs = keras.layers.Activation("sigmoid", name="head_sigmoid")(conv(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), 50.0, np.float32), np.array([-50.0 * TUMOUR_CUT], np.float32)])
    return keras.Model(inputs, outputs)


def write_cascade(root, roi_size):
    """A stage-2 run folder of :func:`tumour_model` whose cascade starts at the threshold model."""
    import json

    from tests.helpers import threshold_model, write_run

    liver = write_run(root / "liver", threshold_model())
    run = write_run(root / "tumour", tumour_model())
    config = json.loads((run / "config.json").read_text())
    config["model"]["outputs"] = ["tumour"]
    config["cascade"] = {"liver_model": str(liver), "roi_size": list(roi_size), "margin_mm": MARGIN_MM}
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="module")
def exact_cascade(tmp_path_factory):
    # the ROI of liver_volume(): x 6-22 -> 2-26 (24), y 5-20 -> 0-25 (25), z 1-7 -> 0-8 (all)
    return write_cascade(tmp_path_factory.mktemp("exact_cascade"), (24, 25))


def save(path, hu):
    import nibabel as nib

    nib.save(nib.Nifti1Image(hu, np.diag([*SPACING, 1.0])), str(path))
    return path


def test_cascade_mask_is_stage_1_liver_and_stage_2_tumour_in_the_roi(exact_cascade, tmp_path):
    from kerasunet.core.cases import load_image
    from kerasunet.predict import PredictSettings, load_predictor, predict_volume
    from tests.helpers import expected_ct_labels

    hu = liver_volume()
    volume = load_image(save(tmp_path / "v.nii", hu))
    net, info = load_predictor(exact_cascade)
    assert info.cascade and info.mask_outputs == ("liver", "tumour")
    labels, probs = predict_volume(net, info, volume, PredictSettings(batch_size=3))
    expected = expected_ct_labels(hu)
    expected[25:, 25:] = 0  # the far component is not the liver
    np.testing.assert_array_equal(labels, expected)
    assert probs.shape == (*hu.shape, 2)
    assert not probs[28:31, 27:30, :, 1].any()  # stage 2 never ran there
    assert probs[10:14, 9:13, 3:5, 1].min() > 0.99


def test_empty_liver_gives_no_tumour_and_no_crash(exact_cascade, tmp_path):
    from kerasunet.core.cases import load_image
    from kerasunet.predict import PredictSettings, load_predictor, predict_volume

    volume = load_image(save(tmp_path / "air.nii", np.full((32, 32, 8), -500.0, np.float32)))
    net, info = load_predictor(exact_cascade)
    labels, probs = predict_volume(net, info, volume, PredictSettings())
    assert not labels.any() and not probs[..., 1].any()


def test_exported_cascade_serves_one_signature_with_the_local_masks(exact_cascade, tmp_path):
    import json

    import nibabel as nib
    import tensorflow as tf

    from kerasunet.export import export_model
    from kerasunet.predict import PredictSettings, predict_path, predict_path_served
    from tests.helpers import ServingDouble

    hu = liver_volume()
    hu[2:4, 2:4, 6] = 200.0  # a box at the volume's edge for the probabilities: not in the liver
    save(tmp_path / "volume-3.nii", hu)
    version = export_model(exact_cascade, tmp_path / "saved_models" / "cascade")
    assert list(tf.saved_model.load(str(version)).signatures) == ["serving_default"]
    info = json.loads((tmp_path / "saved_models" / "cascade" / "export.json").read_text())
    assert info["cascade"]["roi_size"] == [24, 25] and info["outputs"]["probabilities"]["channels"] == [
        "liver", "tumour"] and set(info["inputs"]) == {"image", "spacing"}
    assert not (tmp_path / "saved_models" / "cascade" / "batching_parameters.txt").exists()
    settings = PredictSettings(batch_size=3, save_probabilities=True)
    local = predict_path(exact_cascade, tmp_path / "volume-3.nii", tmp_path / "local", settings,
                         progress=lambda line: None)
    with ServingDouble(tmp_path / "saved_models" / "cascade") as double:
        served = predict_path_served(double.url, "cascade", tmp_path / "volume-3.nii", tmp_path / "served", settings,
                                     progress=lambda line: None)
    assert not local.failures and not served.failures
    local_mask, served_mask = (np.asarray(nib.load(str(r.written[0])).dataobj) for r in (local, served))
    assert set(np.unique(local_mask)) == {0, 1, 2}
    np.testing.assert_array_equal(served_mask, local_mask)
    local_probs, served_probs = (nib.load(str(d / "probabilities-3.nii.gz")).get_fdata()
                                 for d in (tmp_path / "local", tmp_path / "served"))
    np.testing.assert_allclose(served_probs, local_probs, atol=1e-5)


# --- train --stage tumour: one end-to-end CLI run, and its bad inputs ----------------------

def invoke(*args):
    from click.testing import CliRunner

    from cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def roi_records(tmp_path_factory):
    """Records of four tiny CT cases (32x32x8, the threshold model's labels; liver moved per case)."""
    from tests.helpers import build_settings, expected_ct_labels
    from tfrecords_builder.build import build_records

    root = tmp_path_factory.mktemp("roi_records")
    (root / "lits").mkdir()
    for i in range(4):
        hu = np.roll(liver_volume(), (2 * i - 3, i - 2), axis=(0, 1))
        save(root / "lits" / f"volume-{i}.nii", hu)
        save(root / "lits" / f"segmentation-{i}.nii", expected_ct_labels(hu).astype(np.float32))
    build_records(build_settings(root / "lits", root / "records", val_fraction=0.25, test_fraction=0.0))
    return root


def test_train_stage_tumour_writes_a_cascade_run_that_predicts_0_1_2(roi_records, tmp_path):
    import json

    import nibabel as nib

    from tests.helpers import threshold_model, write_run

    liver = write_run(tmp_path / "liver", threshold_model())
    result = invoke("train", "--records", roi_records / "records", "--out", tmp_path / "tumour", "--stage", "tumour",
                    "--liver-model", liver, "--roi-size", "16x16", "--roi-margin-mm", MARGIN_MM, "--epochs", 1,
                    "--steps-per-epoch", 2, "--batch-size", 4, "--filters", 4, "--depth", 2,
                    "--mixed-precision", "off")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "tumour" / "config.json").read_text())
    assert config["model"]["outputs"] == ["tumour"] and config["model"]["num_outputs"] == 1
    assert config["cascade"] == {"liver_model": str(liver.resolve()), "roi_size": [16, 16], "margin_mm": MARGIN_MM}
    # the lesion filter was fitted on the validation case: written, or one line says why not
    fitted = [line for line in result.output.splitlines() if line.startswith("lesion filter: ")]
    assert len(fitted) == 2 and fitted[0].startswith("lesion filter: [1/1] "), result.output  # the case, then the outcome
    assert "1 validation case(s)" in fitted[1] or "of 1;" in fitted[1], result.output
    assert (tmp_path / "tumour" / "lesion_filter.json").exists() == fitted[1].endswith("lesion_filter.json")
    result = invoke("predict", "--model", tmp_path / "tumour", "--input", roi_records / "lits" / "volume-1.nii",
                    "--output", tmp_path / "mask.nii.gz")
    assert result.exit_code == 0, result.output
    image, mask = nib.load(str(roi_records / "lits" / "volume-1.nii")), nib.load(str(tmp_path / "mask.nii.gz"))
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine)
    labels = np.asarray(mask.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels >= 1).sum() > 0
    assert not labels[image.get_fdata() < 0].any()  # liver (and tumour) only where stage 1 found liver


@pytest.mark.parametrize("args, message", [
    (("--stage", "tumour"), r"^Error: --stage tumour needs --liver-model \(the stage-1 run"),
    (("--liver-model", "L"), r"^Error: --liver-model is the first stage of a cascade; pass --stage tumour"),
    (("--stage", "tumour", "--liver-model", "MISSING"), r"^Error: --liver-model \S*MISSING\S*: no model file"),
    (("--stage", "tumour", "--liver-model", "MRI"), r"^Error: --liver-model \S*MRI: not a liver model "
                                                    r"\(its outputs are \['tumour'\]\)"),
])
def test_bad_cascade_options_are_one_line(roi_records, tmp_path, args, message):
    from tests.helpers import threshold_model, write_run

    write_run(tmp_path / "MRI", threshold_model(modality="mri"), "mri")
    args = [str(tmp_path / a) if a in ("MISSING", "MRI") else a for a in args]
    result = invoke("train", "--records", roi_records / "records", "--out", tmp_path / "out", *args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.output
    assert not (tmp_path / "out").exists()


def test_stage_2_examples_are_the_cases_liver_box_not_the_slices(tmp_path):
    """The liver narrows towards its ends, but every slice is cropped to the case's box."""
    from kerasunet.cascade import case_liver_boxes, roi_dataset
    from kerasunet.data import read_manifest
    from tests.helpers import build_settings, expected_ct_labels
    from tfrecords_builder.build import build_records

    (tmp_path / "lits").mkdir()
    hu = np.full((32, 32, 12), -500.0, np.float32)
    hu[8:20, 6:18, 4:9] = 100.0
    hu[12:14, 10:12, 3] = 100.0  # slice 3 holds only the liver's tip
    hu[10:16, 8:14, 8] = 200.0  # slice 8 a tumour
    save(tmp_path / "lits" / "volume-0.nii", hu)
    save(tmp_path / "lits" / "segmentation-0.nii", expected_ct_labels(hu).astype(np.float32))
    build_records(build_settings(tmp_path / "lits", tmp_path / "rec", val_fraction=0.0, test_fraction=0.0,
                                 all_slices=True))
    manifest = read_manifest(tmp_path / "rec")
    boxes = case_liver_boxes(tmp_path / "rec", manifest, ("train",))
    assert (boxes["volume-0"]["lo"], boxes["volume-0"]["hi"]) == ((8, 6, 3), (20, 18, 9))
    # margin 2.5 mm: 4 voxels in x (0.8 mm), 4 in y (0.7 mm), 1 slice in z (2.5 mm)
    ds = roi_dataset(tmp_path / "rec", "train", 16, False, (20, 20), 2.5, boxes)
    images, labels = next(iter(ds.as_numpy_iterator()))
    assert len(labels) == 8  # slices 2..9 of 12
    expected = expected_ct_labels(hu)[4:24, 2:22, 2:10]
    np.testing.assert_array_equal(labels, np.moveaxis(expected, 2, 0))
    assert images.shape == (8, 20, 20, manifest["channels"])


# --- the cascade's own lesion filter ----------------------------------------------------------
#
# The exact cascade on two cases whose labels call a small hot spot (12 voxels, 200 HU) liver:
# the cascade finds it as a tumour, a false positive next to the true tumour (32 voxels), so
# the filter fitted on the validation case keeps lesions above a volume between the two.

FALSE_POSITIVE = (slice(16, 19), slice(14, 16), slice(2, 4))


def false_positive_volume():
    hu = liver_volume()
    hu[28:31, 27:30, 2:4] = -500.0  # no far organ: every true lesion is in the liver
    hu[FALSE_POSITIVE] = 200.0
    return hu


@pytest.fixture(scope="module")
def filtered_cascade(tmp_path_factory):
    """``(root, run, lines)``: records of two such cases (one validates), the exact cascade, and
    the progress lines of fitting its lesion filter."""
    from kerasunet.lesion_filter import fit_run_lesion_filter
    from tests.helpers import build_settings, expected_ct_labels
    from tfrecords_builder.build import build_records

    root = tmp_path_factory.mktemp("filtered_cascade")
    (root / "lits").mkdir()
    hu = false_positive_volume()
    truth = expected_ct_labels(hu)
    truth[FALSE_POSITIVE] = 1  # not a tumour
    for i in range(2):
        save(root / "lits" / f"volume-{i}.nii", hu)
        save(root / "lits" / f"segmentation-{i}.nii", truth.astype(np.float32))
    build_records(build_settings(root / "lits", root / "records", val_fraction=0.5, test_fraction=0.0))
    run = write_cascade(root, (24, 25))
    lines = []
    fit_run_lesion_filter(run, root / "records", lines.append)
    return root, run, lines


def masks_with_and_without_filter(run, volume, out) -> dict:
    """``predict`` of ``run`` by default (``"default"``) and with ``--no-lesion-filter`` (``"off"``)."""
    import nibabel as nib

    masks = {}
    for name, extra in (("default", ()), ("off", ("--no-lesion-filter",))):
        result = invoke("predict", "--model", run, "--input", volume, "--output", out / f"{name}.nii.gz", *extra)
        assert result.exit_code == 0, result.output
        masks[name] = np.asarray(nib.load(str(out / f"{name}.nii.gz")).dataobj)
    return masks


def test_fitted_filter_is_written_to_the_run_and_drops_the_false_positive_by_default(filtered_cascade, tmp_path):
    root, run, lines = filtered_cascade
    assert re.fullmatch(r"lesion filter: \[1/1\] volume-\d: 2 predicted lesion\(s\), 1 true", lines[0]), lines
    assert len(lines) == 2 and "fitted on 2 predicted lesion(s) of 1 validation case(s)" in lines[1], lines
    thresholds = json.loads((run / "lesion_filter.json").read_text())
    voxel_mm3 = float(np.prod(SPACING))
    assert 12 * voxel_mm3 < thresholds["volume_mm3"] < 32 * voxel_mm3
    masks = masks_with_and_without_filter(run, root / "lits" / "volume-0.nii", tmp_path)
    assert (masks["off"][FALSE_POSITIVE] == 2).all() and (masks["default"][FALSE_POSITIVE] == 1).all()
    assert (masks["default"][10:14, 9:13, 3:5] == 2).all()  # the true tumour stays
    np.testing.assert_array_equal(masks["default"] >= 1, masks["off"] >= 1)


def test_no_validation_cases_write_no_filter_and_remove_an_old_one(filtered_cascade, tmp_path):
    import shutil

    from kerasunet.core.runs import resolve_run
    from kerasunet.lesion_filter import fit_run_lesion_filter, run_lesion_filter

    root, run, _ = filtered_cascade
    copy = shutil.copytree(run, tmp_path / "run")
    assert run_lesion_filter(resolve_run(copy)).to_dict() == json.loads((run / "lesion_filter.json").read_text())
    lines = []
    assert fit_run_lesion_filter(copy, tmp_path / "no-records", lines.append) is None
    assert len(lines) == 1 and "no validation cases" in lines[0] and "not written" in lines[0]
    assert not (copy / "lesion_filter.json").exists() and run_lesion_filter(resolve_run(copy)) is None


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_served_cascade_applies_its_own_lesion_filter_as_local_predict(filtered_cascade, tmp_path, protocol):
    """The export serves the run's thresholds (``lesion_filter`` signature); ``predict --server``
    fetches and applies them by default, so served masks equal local ones with and without."""
    import nibabel as nib
    import tensorflow as tf

    from kerasunet.export import export_model
    from kerasunet.predict import PredictSettings, predict_path, predict_path_served
    from tests.helpers import GrpcServingDouble, ServingDouble

    root, run, _ = filtered_cascade
    own = json.loads((run / "lesion_filter.json").read_text())
    target = export_model(run, tmp_path / "cascade")
    assert json.loads((target / "lesion_filter.json").read_text()) == own  # for --engine onnx and people
    assert json.loads((tmp_path / "cascade" / "export.json").read_text())["lesion_filter"] == own
    assert {k: float(v) for k, v in tf.saved_model.load(str(target)).signatures["lesion_filter"](
        image=tf.zeros([1])).items()} == pytest.approx(own)
    volume = root / "lits" / "volume-0.nii"
    double = GrpcServingDouble if protocol == "grpc" else ServingDouble
    masks = {}
    with double(tmp_path / "cascade") as server:
        for name, settings in (("on", PredictSettings()), ("off", PredictSettings(run_lesion_filter=False))):
            local = predict_path(run, volume, tmp_path / f"local-{name}", settings, progress=lambda line: None)
            served = predict_path_served(server.url, "cascade", volume, tmp_path / f"served-{name}", settings,
                                         progress=lambda line: None)
            assert not local.failures and not served.failures
            masks[name] = [np.asarray(nib.load(str(r.written[0])).dataobj) for r in (local, served)]
    for name in masks:
        np.testing.assert_array_equal(masks[name][1], masks[name][0])
    assert (masks["on"][1][FALSE_POSITIVE] == 1).all() and (masks["off"][1][FALSE_POSITIVE] == 2).all()


def test_a_whole_slice_run_fits_and_applies_its_own_filter_too(filtered_cascade, tmp_path):
    """Not only a cascade: a whole-slice run (the threshold model, which also finds the hot false
    positive) gets thresholds from the same validation case, and predict applies them by default."""
    from kerasunet.lesion_filter import fit_run_lesion_filter
    from tests.helpers import threshold_model, write_run

    root, _, _ = filtered_cascade
    run = write_run(tmp_path / "whole", threshold_model())
    lines = []
    assert fit_run_lesion_filter(run, root / "records", lines.append) is not None
    summary = "2 predicted lesion(s) of 1 validation case(s) (1 true; labels of 2 case(s): smallest lesion 45 mm³)"
    assert len(lines) == 2 and summary in lines[1], lines  # the smallest lesion: the 32-voxel tumour
    masks = masks_with_and_without_filter(run, root / "lits" / "volume-0.nii", tmp_path)
    assert (masks["off"][FALSE_POSITIVE] == 2).all() and (masks["default"][FALSE_POSITIVE] == 1).all()
    assert (masks["default"][10:14, 9:13, 3:5] == 2).all()


@pytest.mark.parametrize("own", [False, True])
def test_a_bad_lesion_filter_file_is_one_line(filtered_cascade, tmp_path, own):
    import shutil

    root, run, _ = filtered_cascade
    bad = tmp_path / "bad.json"
    bad.write_text('{"volume_mm3": -1}')
    if own:  # the run's own file is bad: a copy of the run holds it
        run = shutil.copytree(run, tmp_path / "run")
        shutil.copy(bad, run / "lesion_filter.json")
        bad = run / "lesion_filter.json"
    result = invoke("predict", "--model", run, "--input", root / "lits" / "volume-0.nii", "--output",
                    tmp_path / "m.nii.gz", *(() if own else ("--lesion-filter", bad)))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(rf"^Error: {re.escape(str(bad))}: Expected a finite volume_mm3 >= 0",
                                         lines[0]), result.output
    assert not (tmp_path / "m.nii.gz").exists()


def test_evaluate_of_a_cascade_reports_its_own_filter_before_and_after(filtered_cascade, tmp_path):
    import json

    root, run, _ = filtered_cascade
    result = invoke("evaluate", "--model", run, "--input", root / "lits", "--out", tmp_path / "report",
                    "--overlays", 0)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    model = summary["models"]["tumour"]
    assert model["lesion_filter"] == json.loads((run / "lesion_filter.json").read_text())
    assert model["before_lesion_filter"]["structures"]["tumour"]["pred_lesions"] == 4
    assert model["structures"]["tumour"]["pred_lesions"] == 2
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Lesion filter" in report and f"`{model['lesion_filter']}`" in report
