"""kerasunet.lesion_filter: per-lesion features, the filter, and thresholds fitted on candidates."""

import math

import numpy as np
import pytest

from kerasunet.lesion_filter import (Candidate, LesionFilter, case_candidates, detection_scores, filter_lesions,
                                     fit_lesion_filter, lesion_features)

SPACING = (1.0, 1.0, 2.0)


def liver_case():
    """A 30x30x5 liver (label 1, 100 HU) holding three lesions, with probabilities and HU.

    Lesion 1: 4x4x3 voxels deep inside, 60 HU, probability 0.9 (a true tumour).
    Lesion 2: 1x1x1 voxel, 100 HU (no contrast), probability 0.55.
    Lesion 3: 2x2x1 voxels on the liver's edge, 98 HU, probability 0.8.
    """
    labels = np.zeros((40, 40, 7), np.uint8)
    labels[5:35, 5:35, 1:6] = 1
    image = np.full(labels.shape, -100.0)
    image[labels == 1] = 100.0
    image[labels == 1] += np.tile([-2.0, 2.0], 30 * 30 * 5 // 2)  # std 2 in the liver
    prob = np.zeros(labels.shape, np.float32)
    for (xs, ys, zs), hu, p in (((slice(14, 18), slice(14, 18), slice(2, 5)), 60.0, 0.9),
                                ((slice(25, 26), slice(10, 11), slice(3, 4)), None, 0.55),
                                ((slice(5, 7), slice(28, 30), slice(3, 4)), 98.0, 0.8)):
        labels[xs, ys, zs] = 2
        prob[xs, ys, zs] = p
        if hu is not None:
            image[xs, ys, zs] = hu
    return labels, prob, image


def test_features_of_three_lesions():
    labels, prob, image = liver_case()
    components, features = lesion_features(labels, prob, image, SPACING)
    assert components.max() == 3 and len(features) == 3
    edge, big, dot = features  # ids in raster order: x 5, 14, 25
    assert big["volume_mm3"] == 4 * 4 * 3 * 2.0 and dot["volume_mm3"] == 2.0 and edge["volume_mm3"] == 8.0
    assert big["mean_prob"] == pytest.approx(0.9) and dot["mean_prob"] == pytest.approx(0.55)
    # Depth: the farthest lesion voxel from outside the liver. The big lesion's centre voxel
    # (x 17, y 17) is 13 voxels from the x/y faces, its z 2..4 is 3 slices (6 mm) from z=0.
    assert big["depth_mm"] == pytest.approx(6.0)
    assert edge["depth_mm"] == pytest.approx(2.0)  # x = 6 is 2 voxels from x = 4, outside
    # Contrast: |100 - 60| over the ring's std 2 (the ring is liver only, alternating ±2).
    assert big["contrast"] == pytest.approx(40.0 / 2.0, rel=0.05)
    assert dot["contrast"] < 1.0 and edge["contrast"] < 2.0


def test_filter_turns_dropped_lesions_into_liver_and_keeps_the_rest():
    labels, prob, image = liver_case()
    before = labels.copy()
    out = filter_lesions(labels, prob, image, SPACING, LesionFilter(volume_mm3=4.0, contrast=5.0))
    np.testing.assert_array_equal(labels, before)  # the input is left alone
    assert (out == 2).sum() == 48  # only the big lesion stays
    assert (out[labels == 2] >= 1).all() and ((out == 2) == (labels == 2) & (prob == np.float32(0.9))).all()
    np.testing.assert_array_equal(filter_lesions(labels, prob, image, SPACING, LesionFilter()), labels)


def test_mri_lesions_have_no_liver_features_and_become_background():
    labels = np.zeros((10, 10, 3), np.uint8)
    labels[2:5, 2:5, 1] = 1
    labels[8, 8, 1] = 1
    prob = np.where(labels == 1, 0.7, 0.0).astype(np.float32)
    components, features = lesion_features(labels, prob, np.zeros(labels.shape), (1, 1, 1), ("tumour",))
    assert all(math.isnan(f["depth_mm"]) and math.isnan(f["contrast"]) for f in features)
    out = filter_lesions(labels, prob, np.zeros(labels.shape), (1, 1, 1), LesionFilter(volume_mm3=2, depth_mm=3),
                         ("tumour",))
    assert out.sum() == 9 and out[8, 8, 1] == 0  # NaN depth passes; the 1-voxel lesion goes


def test_candidates_are_matched_to_true_lesions():
    labels, prob, image = liver_case()
    truth = labels.copy()
    truth[truth == 2] = 1
    truth[15:19, 15:19, 3:5] = 2  # overlaps lesion 1 only
    truth[30:32, 30:32, 2] = 2  # missed
    candidates, n_truth = case_candidates(labels, prob, image, SPACING, truth, "case-a")
    assert n_truth == 2 and [bool(c.truth_ids) for c in candidates] == [False, True, False]
    assert candidates[1].truth_ids == frozenset({("case-a", 1)})
    scores = detection_scores(candidates, n_truth, LesionFilter())
    assert scores == {"precision": 1 / 3, "recall": 0.5, "f1": pytest.approx(0.4), "kept": 3, "false_positives": 2}


def cand(volume, prob, truth=()):
    return Candidate({"volume_mm3": volume, "mean_prob": prob, "depth_mm": math.nan, "contrast": math.nan},
                     frozenset(truth))


def test_fit_removes_false_positives_without_losing_a_validation_lesion():
    candidates = [cand(100, 0.9, [("a", 1)]), cand(30, 0.6, [("a", 2)]), cand(5, 0.95), cand(8, 0.7),
                  cand(40, 0.52)]
    fitted = fit_lesion_filter(candidates, 2)
    scores = detection_scores(candidates, 2, fitted)
    assert scores["recall"] == 1.0 and scores["false_positives"] == 0
    # Midpoints between neighbouring values: volume 8 | 30 -> sqrt(240) (geometric: sizes span
    # orders of magnitude), probability 0.52 | 0.6 -> 0.56.
    assert (fitted.volume_mm3, fitted.mean_prob) == (pytest.approx(240**0.5), pytest.approx(0.56))


def test_fit_trades_recall_only_when_allowed():
    # The only way to drop the three false positives (volume 5-7) also drops the small true
    # lesion: F1 rises from 0.57 (precision 2/5, recall 1) to 0.67 (precision 1, recall 1/2).
    candidates = [cand(100, 0.9, [("a", 1)]), cand(4, 0.9, [("a", 2)]), cand(5, 0.9), cand(6, 0.9), cand(7, 0.9)]
    assert fit_lesion_filter(candidates, 2) == LesionFilter()
    traded = fit_lesion_filter(candidates, 2, max_recall_loss=0.5)
    assert traded.volume_mm3 == pytest.approx(700**0.5)  # between 7 and 100
    assert detection_scores(candidates, 2, traded) == {
        "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "kept": 1, "false_positives": 0}


@pytest.mark.parametrize("field, value", [("volume_mm3", -1.0), ("contrast", math.nan), ("mean_prob", math.inf)])
def test_thresholds_are_checked(field, value):
    with pytest.raises(ValueError, match=rf"^Expected a finite {field} >= 0\. Received: {field}={value!r}$"):
        LesionFilter(**{field: value})


def test_shapes_must_agree():
    with pytest.raises(ValueError, match=r"^Expected labels, probabilities and image of one shape"):
        lesion_features(np.zeros((3, 3, 3), np.uint8), np.zeros((3, 3, 2)), np.zeros((3, 3, 3)), (1, 1, 1))


def test_thresholds_file_round_trip_and_bad_files(tmp_path):
    from kerasunet.lesion_filter import read_lesion_filter, write_lesion_filter

    thresholds = LesionFilter(volume_mm3=15.0, contrast=1.5)
    write_lesion_filter(tmp_path / "f.json", thresholds)
    assert read_lesion_filter(tmp_path / "f.json") == thresholds
    (tmp_path / "bad.json").write_text('{"volume": 3}')
    with pytest.raises(ValueError, match=r"bad\.json: a lesion filter is a JSON object with keys from"):
        read_lesion_filter(tmp_path / "bad.json")
    (tmp_path / "neg.json").write_text('{"volume_mm3": -3}')
    with pytest.raises(ValueError, match=r"neg\.json: Expected a finite volume_mm3 >= 0"):
        read_lesion_filter(tmp_path / "neg.json")


def test_evaluate_with_a_lesion_filter_reports_lesions_before_and_after(tmp_path):
    """The threshold model finds a true tumour (18 voxels) and a 12-voxel false one; a volume
    threshold of 15 mm³ drops the false one: precision 0.5 -> 1, recall 1 -> 1."""
    import json

    import nibabel as nib
    from click.testing import CliRunner

    from cli.main import main
    from tests.helpers import ct_phantom, expected_ct_labels, threshold_model, write_run

    run = write_run(tmp_path / "run", threshold_model())
    (tmp_path / "lits").mkdir()
    hu = ct_phantom((24, 20, 8))
    truth = expected_ct_labels(hu)
    hu[9:11, 6:9, 2:4] = 200.0  # a hot spot in the liver the labels call liver
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "lits" / "volume-0.nii"))
    nib.save(nib.Nifti1Image(truth, np.eye(4)), str(tmp_path / "lits" / "segmentation-0.nii"))
    (tmp_path / "filter.json").write_text('{"volume_mm3": 15}')
    result = CliRunner().invoke(main, ["evaluate", "--model", str(run), "--input", str(tmp_path / "lits"),
                                       "--out", str(tmp_path / "report"), "--overlays", "0",
                                       "--lesion-filter", str(tmp_path / "filter.json")])
    assert result.exit_code == 0, result.output
    model = json.loads((tmp_path / "report" / "summary.json").read_text())["models"]["run"]
    after, before = model["structures"]["tumour"], model["before_lesion_filter"]["structures"]["tumour"]
    assert (before["pred_lesions"], before["lesion_precision"], before["lesion_recall"]) == (2, 0.5, 1.0)
    assert (after["pred_lesions"], after["lesion_precision"], after["lesion_recall"]) == (1, 1.0, 1.0)
    assert after["dice_per_case"] == 1.0 > before["dice_per_case"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| run | before | 2 | 0.500 | 1.000 |" in report and "| run | after | 1 | 1.000 | 1.000 | 1.000 |" in report
    result = CliRunner().invoke(main, ["evaluate", "--model", str(run), "--input", str(tmp_path / "lits"),
                                       "--out", str(tmp_path / "r2"), "--lesion-filter", str(tmp_path / "none.json")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: {tmp_path / 'none.json'}: cannot read the lesion filter")
