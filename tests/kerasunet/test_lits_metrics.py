"""Tests of kerasunet.lits_metrics: analytic values, medpy cross-check, empty masks, lesions."""

import math

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from kerasunet.lits_metrics import (binary_metrics, case_metrics, global_dice, lesion_detection, mean_std,
                                    summarize_structure)

SPACING = (0.7, 0.9, 2.5)


def cube(shape, corner, side):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c, c + side) for c in corner)] = True
    return mask


@pytest.mark.parametrize("axis, k", [(0, 1), (0, 3), (1, 2), (2, 1), (2, 4)])
def test_offset_cubes_give_analytic_values_in_mm(axis, k):
    side, shape = 8, (20, 20, 20)
    truth = cube(shape, (2, 2, 2), side)
    corner = [2, 2, 2]
    corner[axis] += k
    pred = cube(shape, corner, side)
    m = binary_metrics(pred, truth, SPACING)
    assert m["dice"] == pytest.approx((side - k) / side)
    assert m["voe"] == pytest.approx(1 - (side - k) / (side + k))
    assert m["rvd"] == 0.0
    # the far face of each cube is k voxels from the other's face; nothing is farther
    assert m["mssd"] == pytest.approx(k * SPACING[axis])


@pytest.mark.parametrize("axis, k", [(0, 2), (2, 3)])
def test_offset_plates_give_analytic_surface_distances(axis, k):
    # one-voxel-thick plates are all surface: every voxel is exactly k*spacing from the other plate
    shape = (12, 12, 12)
    truth, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    index = [slice(2, 9)] * 3
    index[axis] = 3
    truth[tuple(index)] = True
    index[axis] = 3 + k
    pred[tuple(index)] = True
    m = binary_metrics(pred, truth, SPACING)
    assert m["assd"] == pytest.approx(k * SPACING[axis]) and m["mssd"] == pytest.approx(k * SPACING[axis])
    assert (m["dice"], m["voe"], m["rvd"]) == (0.0, 1.0, 0.0)


def test_nested_cubes_rvd():
    truth = cube((12, 12, 12), (2, 2, 2), 4)
    pred = cube((12, 12, 12), (1, 1, 1), 6)
    m = binary_metrics(pred, truth, SPACING)
    assert m["rvd"] == pytest.approx((6**3 - 4**3) / 4**3)
    assert m["dice"] == pytest.approx(2 * 64 / (216 + 64))


def random_blobs(rng, shape, fraction):
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    return smooth > np.quantile(smooth, 1 - fraction)


@pytest.mark.parametrize("seed", range(6))
def test_matches_medpy_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (24, 20, 12)
    spacing = tuple(rng.uniform(0.5, 3.0, size=3))
    pred, truth = random_blobs(rng, shape, 0.2), random_blobs(rng, shape, 0.15)
    if seed % 2:  # small objects away from the array border exercise the bounding-box crop
        pred[:3], truth[:4], pred[:, :, -2:], truth[:, :, -3:] = False, False, False, False
    m = binary_metrics(pred, truth, spacing)
    assert m["dice"] == pytest.approx(medpy_binary.dc(pred, truth), abs=1e-12)
    assert m["voe"] == pytest.approx(1 - medpy_binary.jc(pred, truth), abs=1e-12)
    assert m["rvd"] == pytest.approx(medpy_binary.ravd(pred, truth), abs=1e-12)
    assert m["assd"] == pytest.approx(medpy_binary.assd(pred, truth, voxelspacing=spacing), rel=1e-9)
    assert m["mssd"] == pytest.approx(medpy_binary.hd(pred, truth, voxelspacing=spacing), rel=1e-9)


def test_empty_mask_conventions():
    empty, full = np.zeros((6, 6, 6), bool), cube((6, 6, 6), (1, 1, 1), 3)
    both = binary_metrics(empty, empty, SPACING)
    assert [both[k] for k in ("dice", "voe", "rvd", "assd", "mssd")] == [1.0, 0.0, 0.0, 0.0, 0.0]
    missed = binary_metrics(empty, full, SPACING)
    assert (missed["dice"], missed["voe"], missed["rvd"]) == (0.0, 1.0, -1.0)
    assert math.isnan(missed["assd"]) and math.isnan(missed["mssd"])
    false_alarm = binary_metrics(full, empty, SPACING)
    assert (false_alarm["dice"], false_alarm["voe"]) == (0.0, 1.0)
    assert all(math.isnan(false_alarm[k]) for k in ("rvd", "assd", "mssd"))
    # medpy agrees where it is defined (with numpy 2 its both-empty Dice is NaN, not its intended 1.0)
    assert medpy_binary.dc(empty, full) == 0.0 and medpy_binary.dc(full, empty) == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"Expected masks of the same shape. Received: \(2, 2, 2\) and \(2, 2, 3\)"):
        binary_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), SPACING)


def test_lesion_detection_counts_components():
    truth = np.zeros((20, 20, 20), bool)
    truth[1:4, 1:4, 1:4] = True  # hit
    truth[10:12, 10:12, 10:12] = True  # hit
    truth[12, 12, 12] = True  # touches the previous one diagonally: same lesion (26-connectivity)
    truth[16:18, 1:3, 1:3] = True  # missed
    pred = np.zeros_like(truth)
    pred[3:6, 3:6, 3:6] = True  # overlaps lesion 1 in one corner voxel
    pred[12, 12, 12] = True  # overlaps lesion 2 through its diagonal voxel
    pred[1:3, 16:18, 16:18] = True  # false positive
    assert lesion_detection(pred, truth) == {"truth_lesions": 3, "detected_lesions": 2,
                                             "pred_lesions": 3, "correct_lesions": 2}


def test_case_metrics_structures_per_modality():
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[1:7, 1:7, 1:7] = 1
    truth[2:4, 2:4, 2:4] = 2
    pred = truth.copy()
    pred[2:4, 2:4, 2:4] = 1  # tumour missed, liver perfect
    ct = case_metrics(pred, truth, "ct", SPACING)
    assert set(ct) == {"liver", "tumour"} and ct["liver"]["dice"] == 1.0 and ct["tumour"]["dice"] == 0.0
    assert ct["tumour"]["truth_lesions"] == 1 and ct["tumour"]["detected_lesions"] == 0
    mri = case_metrics((pred == 1).astype(np.uint8), (truth >= 1).astype(np.uint8), "mri", SPACING)
    assert set(mri) == {"tumour"} and mri["tumour"]["dice"] == 1.0


def test_global_dice_pools_voxels_and_summary_drops_nan():
    a = {"overlap": 10, "pred_voxels": 10, "truth_voxels": 30, "dice": 0.5, "voe": 0.75, "rvd": -2 / 3,
         "assd": 1.0, "mssd": 2.0, "truth_lesions": 2, "detected_lesions": 1, "pred_lesions": 1,
         "correct_lesions": 1}
    b = {"overlap": 0, "pred_voxels": 0, "truth_voxels": 10, "dice": 0.0, "voe": 1.0, "rvd": -1.0,
         "assd": math.nan, "mssd": math.nan, "truth_lesions": 1, "detected_lesions": 0, "pred_lesions": 0,
         "correct_lesions": 0}
    assert global_dice([a, b]) == pytest.approx(20 / 50)
    assert global_dice([]) == 1.0
    summary = summarize_structure([a, b])
    assert summary["dice_per_case"] == pytest.approx(0.25) and summary["global_dice"] == pytest.approx(0.4)
    assert summary["assd"] == {"mean": 1.0, "std": 0.0, "n": 1, "n_undefined": 1}
    assert summary["lesion_recall"] == pytest.approx(1 / 3) and summary["lesion_precision"] == 1.0
    assert mean_std([math.nan])["n_undefined"] == 1 and math.isnan(mean_std([])["mean"])
