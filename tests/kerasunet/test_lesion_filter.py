"""kerasunet.lesion_filter: per-lesion features, the filter, and thresholds fitted on candidates."""

import math

import numpy as np
import pytest

from kerasunet.lesion_filter import (CT_OUTPUTS, Candidate, LesionFilter, case_candidates, detection_scores,
                                     filter_lesions, fit_lesion_filter, lesion_features)

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


# --- the run's own volume floor from the labels -------------------------------------------------


def test_size_floor_is_a_quarter_of_the_smallest_labelled_lesion_below_any_found_true_one():
    from kerasunet.lesion_filter import with_size_floor

    found = [cand(400, 0.9, [("a", 1)]), cand(30, 0.7)]
    assert with_size_floor(LesionFilter(), found, 1000.0).volume_mm3 == 250.0
    # validation found a true lesion smaller than the floor: the floor stops there
    small = [cand(100, 0.9, [("a", 1)]), cand(30, 0.7)]
    assert with_size_floor(LesionFilter(), small, 1000.0).volume_mm3 == 100.0
    assert detection_scores(small, 1, with_size_floor(LesionFilter(), small, 1000.0))["recall"] == 1.0
    # a fitted threshold above the floor stays; no labelled lesion leaves the fit as it is
    assert with_size_floor(LesionFilter(volume_mm3=300.0, mean_prob=0.5), found, 1000.0) == LesionFilter(
        volume_mm3=300.0, mean_prob=0.5)
    assert with_size_floor(LesionFilter(mean_prob=0.5), found, None) == LesionFilter(mean_prob=0.5)


def save_nifti(path, data, spacing=SPACING):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([*spacing, 1.0])), str(path))
    return path


def test_smallest_lesion_reads_labels_and_skips_an_unreadable_one(tmp_path):
    from kerasunet.core.cases import CaseFiles
    from kerasunet.lesion_filter import smallest_lesion_mm3

    label = np.zeros((10, 10, 4), np.uint8)
    label[1:9, 1:9, :] = 1
    label[2:5, 2:5, 1:3] = 2  # 18 voxels
    label[7, 7, 3] = 2  # 1 voxel, not touching the first (26-connectivity)
    save_nifti(tmp_path / "a.nii", label)
    bare = np.where(label == 2, 1, label)  # no tumour
    save_nifti(tmp_path / "b.nii", bare)
    (tmp_path / "c.nii").write_text("not a volume")
    cases = [CaseFiles(f"case-{n}", tmp_path / "image.nii", tmp_path / f"{n}.nii") for n in "abc"]
    lines = []
    assert smallest_lesion_mm3(cases, CT_OUTPUTS, lines.append) == 1 * 2.0  # one voxel of 1 x 1 x 2 mm
    assert len(lines) == 1 and lines[0].startswith("lesion filter: case-c's label skipped: ") and "c.nii" in lines[0]
    assert smallest_lesion_mm3(cases[1:2], CT_OUTPUTS) is None


def floor_volume(specks=False):
    """Air, a liver block (100 HU) with a 6x6x3 tumour (200 HU, 216 mm³); ``specks``: two hot
    spots in the liver that the labels call liver, of 16 and 36 voxels (32 and 72 mm³)."""
    hu = np.full((32, 32, 8), -500.0, np.float32)
    hu[6:22, 5:20, 1:7] = 100.0
    hu[8:14, 7:13, 2:5] = 200.0
    if specks:
        hu[16:20, 15:19, 1] = 200.0
        hu[16:19, 6:9, 3:7] = 200.0
    return hu


def test_a_run_whose_validation_shows_no_false_positive_still_drops_specks(tmp_path):
    """Validation finds its one true lesion and nothing else, so the fit alone keeps everything;
    the labels' smallest lesion (216 mm³) puts the volume threshold at a quarter, 54 mm³, and
    predict drops a 32 mm³ speck but keeps a 72 mm³ one (both above post-processing's 10 voxels)."""
    import nibabel as nib

    from kerasunet.lesion_filter import fit_run_lesion_filter
    from kerasunet.predict import PredictSettings, predict_path
    from tests.helpers import build_settings, expected_ct_labels, threshold_model, write_run
    from tfrecords_builder.build import build_records

    (tmp_path / "lits").mkdir()
    for i in range(2):
        save_nifti(tmp_path / "lits" / f"volume-{i}.nii", floor_volume())
        save_nifti(tmp_path / "lits" / f"segmentation-{i}.nii", expected_ct_labels(floor_volume()))
    build_records(build_settings(tmp_path / "lits", tmp_path / "records", val_fraction=0.5, test_fraction=0.0))
    run = write_run(tmp_path / "run", threshold_model())
    lines = []
    assert fit_run_lesion_filter(run, tmp_path / "records", lines.append) == LesionFilter(volume_mm3=54.0)
    assert "1 predicted lesion(s) of 1 validation case(s) (1 true; labels of 2 case(s): smallest lesion 216 mm³)" \
        in lines[-1], lines
    volume = save_nifti(tmp_path / "specks.nii", floor_volume(specks=True))
    masks = {}
    for name, settings in (("on", PredictSettings()), ("off", PredictSettings(run_lesion_filter=False))):
        result = predict_path(run, volume, tmp_path / name, settings, progress=lambda line: None)
        assert not result.failures
        masks[name] = np.asarray(nib.load(str(result.written[0])).dataobj)
    assert (masks["off"][16:20, 15:19, 1] == 2).all() and (masks["on"][16:20, 15:19, 1] == 1).all()
    assert (masks["on"][16:19, 6:9, 3:7] == 2).all() and (masks["on"][8:14, 7:13, 2:5] == 2).all()
