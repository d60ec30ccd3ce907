"""Tests of kerasunet.lits_metrics: hand-computed values pinning each difference between the
``lits2017`` (LiTS organisers') and ``medpy`` conventions, and agreement with medpy and with a
transcription of the organisers' program (tests/helpers.py)."""

import math

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from kerasunet.lits_metrics import (LARGE, binary_metrics, case_metrics, default_convention, lesion_detection,
                                    surface, tumour_burden_error)
from tests.helpers import organisers_case, organisers_detect_lesions, organisers_segmentation_scores

SPACING = (0.7, 0.9, 2.5)
BOTH = ("lits2017", "medpy")


def cube(shape, corner, side):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c, c + side) for c in corner)] = True
    return mask


def cross(shape=(5, 5, 5), centre=(2, 2, 2)):
    """A voxel and its six face neighbours."""
    mask = np.zeros(shape, bool)
    for axis in range(3):
        for step in (-1, 0, 1):
            index = list(centre)
            index[axis] += step
            mask[tuple(index)] = True
    return mask


def random_blobs(rng, shape, fraction, sigma=1.5):
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return smooth > np.quantile(smooth, 1 - fraction)


# ----------------------------------------------------------------------------- surfaces and distances


@pytest.mark.parametrize("convention", BOTH)
@pytest.mark.parametrize("axis, k", [(0, 1), (0, 3), (1, 2), (2, 1), (2, 4)])
def test_offset_cubes_give_analytic_values_in_mm(convention, axis, k):
    side, shape = 8, (20, 20, 20)
    truth = cube(shape, (2, 2, 2), side)
    corner = [2, 2, 2]
    corner[axis] += k
    m = binary_metrics(cube(shape, corner, side), truth, SPACING, convention)
    assert m["dice"] == pytest.approx((side - k) / side)
    assert m["voe"] == pytest.approx(1 - (side - k) / (side + k))
    assert m["rvd"] == 0.0
    # the far face of each cube is k voxels from the other's face; nothing is farther
    assert m["mssd"] == pytest.approx(k * SPACING[axis])


@pytest.mark.parametrize("convention", BOTH)
@pytest.mark.parametrize("axis, k", [(0, 2), (2, 3)])
def test_offset_plates_give_analytic_surface_distances(convention, axis, k):
    # one-voxel-thick plates are all surface: every voxel is exactly k*spacing from the other plate
    shape = (12, 12, 12)
    truth, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    index = [slice(2, 9)] * 3
    index[axis] = 3
    truth[tuple(index)] = True
    index[axis] = 3 + k
    pred[tuple(index)] = True
    m = binary_metrics(pred, truth, SPACING, convention)
    assert [m["assd"], m["rmsd"], m["mssd"]] == pytest.approx([k * SPACING[axis]] * 3)
    assert (m["dice"], m["voe"], m["rvd"]) == (0.0, 1.0, 0.0)


def test_18_and_6_neighbourhood_surfaces_differ_on_a_cross():
    # The centre of a cross keeps its 6 face neighbours but lacks its 12 edge neighbours: it is
    # inside for the 6-neighbourhood erosion (medpy) and on the surface for the 18 (organisers).
    truth = cross()
    assert surface(truth, 1).sum() == 6 and not surface(truth, 1)[2, 2, 2]
    assert surface(truth, 2).sum() == 7 and surface(truth, 2)[2, 2, 2]
    pred = np.zeros_like(truth)
    pred[2, 2, 2] = True
    # arms are 0.7, 0.7, 0.9, 0.9, 2.5, 2.5 mm from the centre: sum 8.2, sum of squares 15.1
    medpy = binary_metrics(pred, truth, SPACING, "medpy")  # centre -> nearest arm 0.7; 7 distances
    assert medpy["assd"] == pytest.approx((0.7 + 8.2) / 7, abs=1e-12)
    assert medpy["rmsd"] == pytest.approx(math.sqrt((0.49 + 15.1) / 7), abs=1e-12)
    assert medpy["assd"] == pytest.approx(medpy_binary.assd(pred, truth, voxelspacing=SPACING), abs=1e-12)
    lits = binary_metrics(pred, truth, SPACING, "lits2017")  # the centre is on both surfaces: 8 distances
    assert lits["assd"] == pytest.approx(8.2 / 8, abs=1e-12)
    assert lits["rmsd"] == pytest.approx(math.sqrt(15.1 / 8), abs=1e-12)
    assert lits["mssd"] == medpy["mssd"] == pytest.approx(2.5)


def test_rvd_sign_and_denominator():
    truth = cube((8, 8, 8), (2, 2, 2), 2)  # 8 voxels
    pred = cube((8, 8, 8), (1, 1, 1), 3)  # 27 voxels, holding the truth
    assert binary_metrics(pred, truth, SPACING, "lits2017")["rvd"] == pytest.approx((8 - 27) / 27)
    assert binary_metrics(pred, truth, SPACING, "medpy")["rvd"] == pytest.approx((27 - 8) / 8)
    # medpy's ravd(prediction, truth) and the organisers' call ravd(reference, prediction)
    assert medpy_binary.ravd(pred, truth) == pytest.approx((27 - 8) / 8)
    assert medpy_binary.ravd(truth, pred) == pytest.approx((8 - 27) / 27)


@pytest.mark.parametrize("seed", range(4))
def test_medpy_convention_matches_medpy_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (24, 20, 12)
    spacing = tuple(rng.uniform(0.5, 3.0, size=3))
    pred, truth = random_blobs(rng, shape, 0.2), random_blobs(rng, shape, 0.15)
    if seed % 2:  # small objects away from the array border exercise the bounding-box crop
        pred[:3], truth[:4], pred[:, :, -2:], truth[:, :, -3:] = False, False, False, False
    m = binary_metrics(pred, truth, spacing, "medpy")
    assert m["dice"] == pytest.approx(medpy_binary.dc(pred, truth), abs=1e-12)
    assert m["voe"] == pytest.approx(1 - medpy_binary.jc(pred, truth), abs=1e-12)
    assert m["rvd"] == pytest.approx(medpy_binary.ravd(pred, truth), abs=1e-12)
    assert m["assd"] == pytest.approx(medpy_binary.assd(pred, truth, voxelspacing=spacing), rel=1e-9)
    assert m["mssd"] == pytest.approx(medpy_binary.hd(pred, truth, voxelspacing=spacing), rel=1e-9)
    distances = getattr(medpy_binary, "__surface_distances")  # medpy's own, module-private
    both = np.concatenate([distances(pred, truth, spacing), distances(truth, pred, spacing)])
    assert m["rmsd"] == pytest.approx(math.sqrt(np.mean(both**2)), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_lits2017_objects_match_the_organisers_program(seed):
    rng = np.random.default_rng(seed)
    shape = (24, 20, 12)
    spacing = tuple(np.float32(rng.uniform(0.5, 3.0, size=3)).tolist())
    pred, truth = random_blobs(rng, shape, 0.25, 2.5), random_blobs(rng, shape, 0.2, 2.5)
    theirs = organisers_segmentation_scores(pred, truth, spacing)
    m = binary_metrics(pred, truth, spacing, "lits2017")
    for ours, their in (("dice", "dice"), ("voe", "voe"), ("rvd", "rvd"), ("assd", "assd"), ("rmsd", "rmsd"),
                        ("mssd", "msd")):
        assert m[ours] == pytest.approx(theirs[their][0], rel=1e-9, abs=1e-12), ours


# ----------------------------------------------------------------------------- empty masks


def test_empty_mask_conventions():
    empty, full = np.zeros((6, 6, 6), bool), cube((6, 6, 6), (1, 1, 1), 3)
    both = binary_metrics(empty, empty, SPACING, "medpy")
    assert [both[k] for k in ("dice", "voe", "rvd", "assd", "mssd", "rmsd")] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    missed = binary_metrics(empty, full, SPACING, "medpy")
    assert (missed["dice"], missed["voe"], missed["rvd"]) == (0.0, 1.0, -1.0)
    assert all(math.isnan(missed[k]) for k in ("assd", "mssd", "rmsd"))
    false_alarm = binary_metrics(full, empty, SPACING, "medpy")
    assert (false_alarm["dice"], false_alarm["voe"]) == (0.0, 1.0)
    assert all(math.isnan(false_alarm[k]) for k in ("rvd", "assd", "mssd", "rmsd"))
    for pred, truth in ((empty, full), (full, empty), (empty, empty)):
        lits = binary_metrics(pred, truth, SPACING, "lits2017")  # the organisers' maximum penalty
        assert [lits[k] for k in ("dice", "voe", "rvd", "assd", "mssd", "rmsd")] == [0, 1, LARGE, LARGE, LARGE, LARGE]


def ct_case(shape=(12, 12, 8)):
    """A liver block holding one 2x2x2 tumour."""
    labels = np.zeros(shape, np.uint8)
    labels[1:11, 1:11, 1:7] = 1
    labels[3:5, 3:5, 2:4] = 2
    return labels


def test_empty_prediction_case():
    truth = ct_case()
    empty = np.zeros_like(truth)
    lits = case_metrics(empty, truth, "ct", SPACING, "lits2017")
    # no voxel labelled 1: the liver is missing, scored Dice 0, VOE 1 and 9001
    assert lits["liver"]["predicted"] is False
    assert [lits["liver"][k] for k in ("dice", "voe", "rvd", "assd", "mssd", "rmsd")] == [0, 1] + [LARGE] * 4
    assert lits["tumour"]["dice"] == 0.0 and lits["tumour"]["lesions"] == []
    assert (lits["tumour"]["truth_lesions"], lits["tumour"]["pred_lesions"], lits["tumour"]["detected_lesions"]) == (
        1, 0, 0)
    assert lits["tumour"]["burden_error"] == pytest.approx(8 / 600 - LARGE)  # predicted burden 9001
    medpy = case_metrics(empty, truth, "ct", SPACING, "medpy")
    assert (medpy["liver"]["dice"], medpy["liver"]["rvd"]) == (0.0, -1.0) and math.isnan(medpy["liver"]["assd"])
    assert math.isnan(medpy["tumour"]["burden_error"])  # no predicted liver: no burden


def test_a_prediction_without_label_1_has_no_liver_in_lits2017():
    truth = ct_case()
    pred = np.where(truth >= 1, 2, 0).astype(np.uint8)  # liver and tumour, all labelled tumour
    lits = case_metrics(pred, truth, "ct", SPACING, "lits2017")
    assert lits["liver"]["predicted"] is False and lits["liver"]["dice"] == 0
    assert lits["tumour"]["burden_pred"] == LARGE
    medpy = case_metrics(pred, truth, "ct", SPACING, "medpy")
    assert medpy["liver"]["dice"] == 1.0 and medpy["tumour"]["burden_pred"] == 1.0


def test_tumour_burden_is_truth_minus_prediction():
    truth, pred = ct_case(), ct_case()
    pred[3:5, 3:5, 4] = 2  # 4 more tumour voxels in the same liver (600 voxels)
    for convention in BOTH:
        b = tumour_burden_error(pred, truth, convention)
        assert (b["burden_truth"], b["burden_pred"]) == (8 / 600, 12 / 600)
        assert b["burden_error"] == pytest.approx(-4 / 600)
    assert organisers_case(pred, truth, SPACING)["tumor_burden"] == pytest.approx(-4 / 600, abs=1e-15)
    no_liver = np.zeros_like(truth)  # the organisers' program divides by zero here
    assert math.isnan(tumour_burden_error(pred, no_liver, "lits2017")["burden_error"])


def test_tumour_free_cases():
    truth = np.where(ct_case() >= 1, 1, 0).astype(np.uint8)
    for convention in BOTH:
        both_free = case_metrics(truth, truth, "ct", SPACING, convention)["tumour"]
        assert both_free["dice"] == 1.0 and both_free["truth_lesions"] == both_free["pred_lesions"] == 0
    pred = truth.copy()
    pred[4:6, 4:6, 3] = 2  # one false-positive lesion; the organisers' program stops here
    lits = case_metrics(pred, truth, "ct", SPACING, "lits2017")["tumour"]
    assert lits["dice"] == 0.0 and lits["lesions"] == []
    assert (lits["truth_lesions"], lits["pred_lesions"], lits["detected_lesions"], lits["detected_lesions_gt0"]) == (
        0, 1, 0, 0)
    medpy = case_metrics(pred, truth, "ct", SPACING, "medpy")["tumour"]
    assert (medpy["truth_lesions"], medpy["pred_lesions"], medpy["correct_lesions"]) == (0, 1, 0)


# ----------------------------------------------------------------------------- lesions


def test_lesions_touching_along_an_edge_are_one_with_26_and_two_with_6_connectivity():
    truth = np.zeros((10, 10, 6), np.uint8)
    truth[1:9, 1:9, 1:5] = 1
    truth[2:4, 2:4, 2:4] = 2
    truth[4:6, 4:6, 2:4] = 2  # shares only the edge x=3|4, y=3|4 with the first
    pred = truth.copy()
    pred[4:6, 4:6, 2:4] = 1  # only the first is found
    lits = case_metrics(pred, truth, "ct", SPACING, "lits2017")["tumour"]
    assert (lits["truth_lesions"], lits["pred_lesions"], lits["detected_lesions"]) == (2, 1, 1)
    assert len(lits["lesions"]) == 1 and lits["lesions"][0]["dice"] == 1.0
    medpy = case_metrics(pred, truth, "ct", SPACING, "medpy")["tumour"]
    assert (medpy["truth_lesions"], medpy["pred_lesions"], medpy["detected_lesions"]) == (1, 1, 1)


def two_lesions(gap: int):
    """Liver with two 2x2x2 tumours ``gap`` voxels apart along y, and a prediction bar covering both."""
    truth = np.zeros((6, 14, 6), np.uint8)
    truth[0:5, 0:13, 0:5] = 1
    truth[1:3, 1:3, 1:3] = 2
    truth[1:3, 3 + gap:5 + gap, 1:3] = 2
    pred = truth.copy()
    pred[1:3, 1:5 + gap, 1:3] = 2
    return pred, truth


def test_a_prediction_covering_two_lesions_merges_them():
    # bar 2x6x2 = 24 voxels over two lesions of 8: merged into one lesion, IoU 16/24 > 0.5
    pred, truth = two_lesions(gap=2)
    lits = case_metrics(pred, truth, "ct", SPACING, "lits2017")["tumour"]
    assert (lits["truth_lesions"], lits["pred_lesions"], lits["detected_lesions"], lits["detected_lesions_gt0"]) == (
        2, 1, 1, 1)
    (lesion,) = lits["lesions"]
    assert lesion["dice"] == pytest.approx(32 / 40) and lesion["rvd"] == pytest.approx((16 - 24) / 24)
    # all voxels are surface; the 8 gap voxels lie one y-step (0.9 mm) from a lesion, the rest on one
    assert lesion["assd"] == pytest.approx(8 * 0.9 / 40) and lesion["mssd"] == pytest.approx(0.9)
    assert lesion["rmsd"] == pytest.approx(math.sqrt(8 * 0.81 / 40))
    medpy = case_metrics(pred, truth, "ct", SPACING, "medpy")["tumour"]
    assert (medpy["truth_lesions"], medpy["detected_lesions"], medpy["correct_lesions"]) == (2, 2, 1)


def test_an_undetected_merged_lesion_counts_as_the_organisers_program_counts_it():
    # bar 2x8x2 = 32 voxels over 16 lesion voxels: IoU 0.5 is not > 0.5. The program then lowers
    # its detection count by the two merged lesions from one matched group: TP = 1 - 2 = -1.
    pred, truth = two_lesions(gap=4)
    lits = case_metrics(pred, truth, "ct", SPACING, "lits2017")["tumour"]
    assert (lits["detected_lesions"], lits["detected_lesions_gt0"], lits["lesions"]) == (-1, 1, [])
    theirs = organisers_case(pred, truth, SPACING)["detection"]
    assert theirs == {0.5: (-1, 2, 3), 0: (1, 0, 1)}  # (TP, FP, FN) as the program adds them up


def test_the_iou_union_uses_the_first_predicted_id_as_the_program_does():
    # True lesions T1 (id 1) and T2 (id 2); predictions P1 (id 1, first in raster order by a
    # one-voxel tail) covers T2, P2 (id 2) covers T1 plus 4 voxels. The program takes the union of
    # group (P1, T2) with the detected voxels labelled 1, i.e. P2's: IoU 8 / (12 + 8) = 0.4, so it
    # drops P1 although its own IoU is 8/9. Then group (P2, T1): label 2 is gone, IoU 8 / 8.
    truth = np.zeros((4, 4, 8), np.uint8)
    truth[:, :, :] = 1
    truth[1:3, 1:3, 1:3] = 2  # T1
    truth[1:3, 1:3, 5:7] = 2  # T2
    pred = np.where(truth == 1, 1, 0).astype(np.uint8)
    pred[1:3, 1:3, 5:7] = 2
    pred[0, 1, 5] = 2  # P1's tail
    pred[1:3, 1:3, 0:3] = 2  # P2: T1 and one more layer (12 voxels)
    lits = case_metrics(pred, truth, "ct", SPACING, "lits2017")["tumour"]
    assert (lits["detected_lesions"], lits["detected_lesions_gt0"]) == (1, 2)
    (lesion,) = lits["lesions"]
    assert lesion["dice"] == pytest.approx(16 / 20) and lesion["rvd"] == pytest.approx((8 - 12) / 12)
    labels = [ndimage.label(mask)[0] for mask in (pred == 2, truth == 2)]
    assert organisers_detect_lesions(*labels, min_overlap=0.5)[2] == 1


@pytest.mark.parametrize("seed", range(3))
def test_lesion_counts_match_the_organisers_program(seed):
    rng = np.random.default_rng(seed)
    shape = (28, 24, 12)
    truth = np.where(random_blobs(rng, shape, 0.5, 3), 1, 0).astype(np.uint8)
    truth[random_blobs(rng, shape, 0.1, 1.0) & (truth == 1)] = 2
    pred = truth.copy()
    pred[random_blobs(rng, shape, 0.1, 1.0)] = 2
    pred[random_blobs(rng, shape, 0.05, 1.0)] = 0
    ours = case_metrics(pred, truth, "ct", SPACING, "lits2017")["tumour"]
    theirs = organisers_case(pred, truth, SPACING)
    assert ours["truth_lesions"] > 3 and ours["pred_lesions"] > 3  # enough lesions to merge and match
    for overlap, key in ((0.5, "detected_lesions"), (0, "detected_lesions_gt0")):
        assert theirs["detection"][overlap] == (ours[key], ours["pred_lesions"] - ours[key],
                                                ours["truth_lesions"] - ours[key])
    assert len(ours["lesions"]) == len(theirs["lesion"].get("dice", []))
    for name, their in (("dice", "dice"), ("rvd", "rvd"), ("assd", "assd"), ("mssd", "msd")):
        assert [lesion[name] for lesion in ours["lesions"]] == pytest.approx(theirs["lesion"][their], rel=1e-9)


def test_medpy_lesion_detection_counts_components():
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


# ----------------------------------------------------------------------------- cases and arguments


def test_case_metrics_structures_per_modality():
    truth = ct_case((8, 8, 8))
    pred = truth.copy()
    pred[truth == 2] = 1  # tumour missed, liver perfect
    for convention in BOTH:
        ct = case_metrics(pred, truth, "ct", SPACING, convention)
        assert set(ct) == {"liver", "tumour"} and ct["liver"]["dice"] == 1.0 and ct["tumour"]["dice"] == 0.0
        assert ct["tumour"]["truth_lesions"] == 1 and ct["tumour"]["detected_lesions"] == 0
        mri = case_metrics((pred == 1).astype(np.uint8), (truth >= 1).astype(np.uint8), "mri", SPACING, convention)
        assert set(mri) == {"tumour"} and mri["tumour"]["dice"] == 1.0 and "burden_error" not in mri["tumour"]
    assert (default_convention("ct"), default_convention("mri")) == ("lits2017", "medpy")


def test_argument_errors():
    with pytest.raises(ValueError, match=r"Expected masks of the same shape. Received: \(2, 2, 2\) and \(2, 2, 3\)"):
        binary_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), SPACING)
    with pytest.raises(ValueError, match=r"Expected label maps of the same shape. Received: \(2, 2, 2\) and "):
        case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), "ct", SPACING)
    with pytest.raises(ValueError, match=r"Expected convention in \('lits2017', 'medpy'\). Received: convention='x'"):
        binary_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), SPACING, "x")
