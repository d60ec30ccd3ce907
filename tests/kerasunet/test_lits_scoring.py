"""Tests of kerasunet.lits_scoring: summaries over cases in both conventions (hand-computed and
against a transcription of the LiTS organisers' program), CSV rows, and scoring of mask folders."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from kerasunet.lits_metrics import LARGE, case_metrics
from kerasunet.lits_scoring import (ScoringError, metrics_row, score_folders, summarize_cases, summarize_medpy)
from tests.helpers import organisers_case, organisers_scores

SPACING = (0.7, 0.9, 2.5)
QUIET = {"progress": lambda line: None}


def liver(shape=(6, 14, 6)):
    labels = np.zeros(shape, np.uint8)
    labels[0:5, 0:13, 0:5] = 1  # 325 voxels
    return labels


def hand_cases():
    """Three cases: a bar merging two lesions (IoU 2/3), a false positive on a tumour-free liver,
    and an empty prediction (no liver, one missed lesion)."""
    merged_truth = liver()
    merged_truth[1:3, 1:3, 1:3] = 2
    merged_truth[1:3, 5:7, 1:3] = 2
    merged_pred = merged_truth.copy()
    merged_pred[1:3, 1:7, 1:3] = 2
    free_truth = liver()
    free_pred = free_truth.copy()
    free_pred[1:3, 8:10, 1] = 2
    missed_truth = liver()
    missed_truth[2:4, 8:10, 2:4] = 2
    return [(merged_pred, merged_truth), (free_pred, free_truth), (np.zeros_like(missed_truth), missed_truth)]


def test_lits2017_summary_of_hand_cases():
    summary = summarize_cases([case_metrics(p, t, "ct", SPACING, "lits2017") for p, t in hand_cases()], "ct",
                              "lits2017")
    tumour, liver_summary = summary["structures"]["tumour"], summary["structures"]["liver"]
    # IoU > 0.5: TP 1 (the merged pair), FP 1 (the false positive), FN 2 (one of the pair, the missed one)
    assert (tumour["lesion_precision"], tumour["lesion_recall"]) == (1 / 2, 1 / 3)
    assert (tumour["lesion_precision_gt0"], tumour["lesion_recall_gt0"]) == (1 / 2, 1 / 3)
    assert tumour["dice_per_case"] == pytest.approx((32 / 40 + 0 + 0) / 3)
    assert tumour["global_dice"] == pytest.approx(2 * 16 / (40 + 4 + 8))
    assert tumour["voe"] == {"mean": pytest.approx(1 - 16 / 24), "std": 0.0, "n": 1, "n_undefined": 0}
    # the liver of the empty prediction is missing: Dice 0, RVD 9001, and no predicted voxels pooled
    assert liver_summary["dice_per_case"] == pytest.approx(2 / 3) and liver_summary["missing_liver_cases"] == 1
    assert liver_summary["rvd"]["mean"] == pytest.approx(LARGE / 3)
    assert liver_summary["global_dice"] == pytest.approx(2 * 650 / (4 * 325 + 325))
    errors = [16 / 325 - 24 / 325, 0 - 4 / 325, 8 / 325 - LARGE]
    assert summary["tumour_burden"]["rmse"] == pytest.approx(math.sqrt(np.mean(np.square(errors))))
    assert summary["tumour_burden"]["max_error"] == pytest.approx(-4 / 325)  # signed, as the organisers
    scores = summary["lits2017_scores"]
    assert (scores["lesion_msd"], scores["liver_rvd"]) == (tumour["mssd"]["mean"], liver_summary["rvd"]["mean"])
    theirs = organisers_scores([organisers_case(p, t, SPACING) for p, t in hand_cases()])
    assert scores == pytest.approx(theirs, rel=1e-12)


def test_lits2017_summary_without_any_tumour():
    truth = liver()
    per_case = [case_metrics(truth, truth, "ct", SPACING, "lits2017")]
    tumour = summarize_cases(per_case, "ct", "lits2017")["structures"]["tumour"]
    assert tumour["dice_per_case"] == tumour["global_dice"] == 1.0  # (the program divides by 0 here)
    assert (tumour["lesion_precision"], tumour["lesion_recall"]) == (0.0, 0.0)
    assert {k: tumour[k]["mean"] for k in ("dice", "voe", "rvd", "assd", "mssd", "rmsd")} == {
        "dice": 0.0, "voe": 1.0, "rvd": LARGE, "assd": LARGE, "mssd": LARGE, "rmsd": LARGE}


def random_labels(rng, shape):
    def blobs(fraction, sigma):
        smooth = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
        return smooth > np.quantile(smooth, 1 - fraction)

    truth = np.where(blobs(0.4, 3), 1, 0).astype(np.uint8)
    truth[blobs(0.08, 1.0) & (truth == 1)] = 2
    pred = truth.copy()
    pred[blobs(0.08, 1.0) & (pred >= 1)] = 2
    pred[blobs(0.05, 1.0)] = rng.integers(0, 3)
    return pred, truth


@pytest.mark.parametrize("seed", range(3))
def test_lits2017_summary_matches_the_organisers_program(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for kind in ("plain", "no liver label", "tumour-free"):
        pred, truth = random_labels(rng, (28, 24, 12))
        if kind == "no liver label":
            pred[pred == 1] = 0
        if kind == "tumour-free":
            truth[truth == 2] = 1
        cases.append((pred, truth, tuple(np.float32(rng.uniform(0.5, 3.0, 3)).tolist())))
    ours = summarize_cases([case_metrics(p, t, "ct", s, "lits2017") for p, t, s in cases], "ct", "lits2017")
    theirs = organisers_scores([organisers_case(p, t, s) for p, t, s in cases])
    assert set(ours["lits2017_scores"]) == set(theirs)
    for name, value in theirs.items():
        assert ours["lits2017_scores"][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_medpy_summary_pools_voxels_and_drops_nan():
    a = {"overlap": 10, "pred_voxels": 10, "truth_voxels": 30, "dice": 0.5, "voe": 0.75, "rvd": -2 / 3,
         "assd": 1.0, "mssd": 2.0, "rmsd": 1.5, "truth_lesions": 2, "detected_lesions": 1, "pred_lesions": 1,
         "correct_lesions": 1}
    b = {"overlap": 0, "pred_voxels": 0, "truth_voxels": 10, "dice": 0.0, "voe": 1.0, "rvd": -1.0,
         "assd": math.nan, "mssd": math.nan, "rmsd": math.nan, "truth_lesions": 1, "detected_lesions": 0,
         "pred_lesions": 0, "correct_lesions": 0}
    summary = summarize_medpy([a, b])
    assert summary["dice_per_case"] == pytest.approx(0.25) and summary["global_dice"] == pytest.approx(20 / 50)
    assert summary["assd"] == {"mean": 1.0, "std": 0.0, "n": 1, "n_undefined": 1}
    assert summary["lesion_recall"] == pytest.approx(1 / 3) and summary["lesion_precision"] == 1.0
    assert summarize_medpy([])["global_dice"] == 1.0 and math.isnan(summarize_medpy([])["dice_per_case"])


def test_medpy_summary_of_hand_cases_has_burden_without_missing_livers():
    summary = summarize_cases([case_metrics(p, t, "ct", SPACING, "medpy") for p, t in hand_cases()], "ct", "medpy")
    assert "lits2017_scores" not in summary and summary["convention"] == "medpy"
    errors = [16 / 325 - 24 / 325, 0 - 4 / 325]  # the empty prediction has no burden
    assert summary["tumour_burden"] == {"rmse": pytest.approx(math.sqrt(np.mean(np.square(errors)))),
                                        "max_error": pytest.approx(-4 / 325), "n": 2, "n_undefined": 1}


def test_metrics_row_names_the_convention_and_averages_lesions():
    pred, truth = hand_cases()[0]
    row = metrics_row("c1", "m", case_metrics(pred, truth, "ct", SPACING, "lits2017"), "lits2017")
    assert (row["case"], row["model"], row["convention"]) == ("c1", "m", "lits2017")
    assert row["tumour_lesion_rvd"] == pytest.approx(-1 / 3) and row["tumour_lesion_mssd_mm"] == pytest.approx(0.9)
    assert (row["tumour_truth_lesions"], row["tumour_detected_lesions"], row["liver_predicted"]) == (2, 1, True)
    assert row["liver_rmsd_mm"] == 0.0 and "tumour_voe" not in row
    medpy = metrics_row("c1", "m", case_metrics(pred, truth, "ct", SPACING, "medpy"), "medpy")
    assert medpy["convention"] == "medpy" and medpy["tumour_voe"] == pytest.approx(1 - 16 / 24)
    assert medpy["tumour_correct_lesions"] == 1 and not any(k.startswith("tumour_lesion_") for k in medpy)


# ----------------------------------------------------------------------------- folders

LPS = np.diag([-0.8, -0.7, 2.5, 1.0])


def order_sensitive_case():
    """Two predicted lesions whose ids decide the organisers' result (their IoU quirk)."""
    truth = np.ones((4, 4, 8), np.uint8)
    truth[1:3, 1:3, 1:3] = 2
    truth[1:3, 1:3, 5:7] = 2
    pred = np.ones_like(truth)
    pred[1:3, 1:3, 5:7] = 2
    pred[0, 1, 5] = 2
    pred[1:3, 1:3, 0:3] = 2
    return pred, truth


def write_folders(root):
    truth_dir, pred_dir = root / "truth", root / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    pairs = {"segmentation-0": (*hand_cases()[0], np.diag([0.7, 0.9, 2.5, 1.0])),
             "segmentation-1": (*order_sensitive_case(), LPS)}
    for name, (pred, truth, affine) in pairs.items():
        nib.save(nib.Nifti1Image(truth, affine), str(truth_dir / f"{name}.nii"))
        nib.save(nib.Nifti1Image(pred, affine), str(pred_dir / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(liver(), np.eye(4)), str(truth_dir / "segmentation-2.nii"))  # no prediction
    nib.save(nib.Nifti1Image(liver(), np.eye(4)), str(truth_dir / "segmentation-3.nii"))
    nib.save(nib.Nifti1Image(liver((3, 3, 3)), np.eye(4)), str(pred_dir / "segmentation-3.nii"))
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4)), str(truth_dir / "volume-0.nii"))
    return pred_dir, truth_dir


def test_score_folders_writes_lits2017_outputs_as_the_organisers_score_the_files(tmp_path):
    pred_dir, truth_dir = write_folders(tmp_path)
    out = tmp_path / "scores"
    summary = score_folders(pred_dir, truth_dir, out, **QUIET)
    assert summary["convention"] == "lits2017" and summary["cases"] == ["segmentation-0", "segmentation-1"]
    assert [s["case"] for s in summary["skipped"]] == ["segmentation-2", "segmentation-3"]
    assert summary["skipped"][0]["reason"] == f"{pred_dir / 'segmentation-2.nii'}: no prediction file"
    assert "shape (3, 3, 3) differs from the truth's (6, 14, 6)" in summary["skipped"][1]["reason"]
    # the organisers read each file's array as stored, with the reference's zooms
    stored = []
    for case in summary["cases"]:
        image = nib.load(str(truth_dir / f"{case}.nii"))
        pred = np.asarray(nib.load(str(pred_dir / f"{case}.nii.gz")).dataobj)
        stored.append(organisers_case(pred, np.asarray(image.dataobj), image.header.get_zooms()[:3]))
    theirs = organisers_scores(stored)
    assert stored[1]["detection"][0.5][0] == 1  # the order-sensitive case: only the quirk drops a lesion
    assert json.loads((out / "summary.json").read_text())["models"]["pred"]["lits2017_scores"] == pytest.approx(
        theirs, rel=1e-9)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["model"], r["convention"]) for r in rows] == [
        ("segmentation-0", "pred", "lits2017"), ("segmentation-1", "pred", "lits2017")]
    assert {"liver_dice", "liver_rmsd_mm", "tumour_lesion_assd_mm", "tumour_detected_lesions_gt0",
            "tumour_burden_error"} <= set(rows[0])
    report = (out / "report.md").read_text()
    assert "convention `lits2017`" in report and "| RMSE_Tumorburden |" in report
    assert "skipped `segmentation-2`" in report and "## Tumour burden" in report
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "report.md", "summary.json"]


def test_score_folders_in_the_medpy_convention(tmp_path):
    pred_dir, truth_dir = write_folders(tmp_path)
    summary = score_folders(pred_dir, truth_dir, tmp_path / "out", convention="medpy", **QUIET)
    assert summary["convention"] == "medpy" and "lits2017_scores" not in summary["models"]["pred"]
    assert summary["models"]["pred"]["structures"]["tumour"]["truth_lesions"] == 4
    assert "convention `medpy`" in (tmp_path / "out" / "report.md").read_text()


def test_score_folders_errors(tmp_path):
    pred_dir, truth_dir = write_folders(tmp_path)
    with pytest.raises(ScoringError, match=r"missing: not a folder$"):
        score_folders(tmp_path / "missing", truth_dir, tmp_path / "out", **QUIET)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ScoringError, match=r"empty: no NIfTI label files \(\.nii or \.nii\.gz\)$"):
        score_folders(pred_dir, empty, tmp_path / "out", **QUIET)
    with pytest.raises(ScoringError, match=r"truth: none of the 4 cases could be scored$"):
        score_folders(empty, truth_dir, tmp_path / "out", **QUIET)
    with pytest.raises(ValueError, match=r"Expected convention in \('lits2017', 'medpy'\). Received: convention='x'"):
        score_folders(pred_dir, truth_dir, tmp_path / "out", convention="x", **QUIET)
    assert not (tmp_path / "out").exists()
