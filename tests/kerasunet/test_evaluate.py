"""Tests of kerasunet.evaluate and kerasunet.figures: metrics files, summary, report, overlays."""

import csv
import json
import re
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from kerasunet.evaluate import EvaluateError, EvaluateSettings, evaluate, find_eval_cases, name_models
from kerasunet.figures import display, overlay_figure, pick_slice
from tests.helpers import build_settings
from tests.helpers import ct_phantom, expected_ct_labels, lits_folder, threshold_model, write_run
from tfrecords_builder.build import build_records

QUIET = {"progress": lambda line: None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_runs")
    exact = write_run(root / "exact", threshold_model())
    # "liver_only" never predicts tumour: its cut for the tumour channel is above any voxel
    liver_only = threshold_model()
    kernel, bias = liver_only.get_layer("head_conv").get_weights()
    bias[1] = -1e6
    liver_only.get_layer("head_conv").set_weights([kernel, bias])
    return {"exact": exact, "liver_only": write_run(root / "liver_only", liver_only)}


def test_compare_writes_metrics_summary_report_and_shared_figures(tmp_path, runs):
    data = lits_folder(tmp_path / "lits")
    out = tmp_path / "report"
    summary = evaluate(runs, data, out, EvaluateSettings(n_overlays=2), **QUIET)
    assert summary["cases"] == ["volume-0", "volume-1", "volume-2"]
    assert summary["skipped"] == [{"case": "volume-9", "reason": "label missing"}]
    exact, liver_only = (summary["models"][m]["structures"] for m in ("exact", "liver_only"))
    assert exact["liver"]["dice_per_case"] == 1.0 and exact["tumour"]["global_dice"] == 1.0
    assert exact["tumour"]["assd"] == {"mean": 0.0, "std": 0.0, "n": 3, "n_undefined": 0}
    assert exact["tumour"]["lesion_recall"] == 1.0 and exact["tumour"]["lesion_precision"] == 1.0
    assert liver_only["tumour"]["dice_per_case"] == 0.0 and liver_only["tumour"]["lesion_recall"] == 0.0
    # CT defaults to the LiTS organisers' convention: no detected lesion gives their defaults
    assert summary["convention"] == "lits2017" and summary["models"]["exact"]["convention"] == "lits2017"
    assert liver_only["tumour"]["assd"] == {"mean": 9001.0, "std": 0.0, "n": 0, "n_undefined": 0}
    assert liver_only["tumour"]["lesion_precision"] == 0.0  # no predicted lesion: 0, as the organisers
    baseline = summary["baselines"]["all-background"]["structures"]
    assert baseline["liver"]["global_dice"] == 0.0 and baseline["liver"]["rvd"]["mean"] == 9001.0

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["model"]) for r in rows] == [
        (c, m) for c in ["volume-0", "volume-1", "volume-2"] for m in ["exact", "liver_only"]]
    assert float(rows[0]["tumour_dice"]) == 1.0 and rows[1]["tumour_lesion_assd_mm"] == ""
    assert {"liver_voe", "liver_rvd", "liver_mssd_mm", "liver_rmsd_mm", "tumour_truth_lesions",
            "tumour_burden_error"} <= set(rows[0]) and {r["convention"] for r in rows} == {"lits2017"}
    assert json.loads((out / "summary.json").read_text())["overlays"] == ["overlays/volume-0.png",
                                                                         "overlays/volume-1.png"]
    report = (out / "report.md").read_text()
    assert "![volume-0](overlays/volume-0.png)" in report and "![volume-1](overlays/volume-1.png)" in report
    assert re.search(r"\| exact \| 1\.000 \| 1\.000 \|", report)
    assert "| baseline: all-background | " in report and "skipped `volume-9`: label missing" in report
    # one figure per case holding image, truth and both models: 4 panels of 2.6 in at 100 dpi
    png = matplotlib.image.imread(out / "overlays" / "volume-0.png")
    assert png.shape[1] == 4 * 260
    assert not (out / "overlays" / "volume-2.png").exists()


def test_records_folder_uses_the_manifest_test_split(tmp_path, runs):
    data = lits_folder(tmp_path / "lits")
    records = tmp_path / "records"
    records.mkdir()
    cases = {f"volume-{n}": {"image": str(data / f"volume-{n}.nii"), "label": str(data / f"segmentation-{n}.nii"),
                             "split": "test" if n == 1 else "train"} for n in range(3)}
    manifest = {"modality": "ct", "splits": {"train": {"cases": ["volume-0", "volume-2"]},
                                             "test": {"cases": ["volume-1"]}}, "cases": cases}
    (records / "manifest.json").write_text(json.dumps(manifest))
    summary = evaluate({"exact": runs["exact"]}, records, tmp_path / "out", EvaluateSettings(n_overlays=0), **QUIET)
    assert summary["cases"] == ["volume-1"] and summary["overlays"] == []
    with pytest.raises(EvaluateError, match=r"manifest\.json: no 'val' split \(has \['test', 'train'\]\)"):
        find_eval_cases(records, "val")


def test_errors_are_one_line_and_name_the_path(tmp_path, runs):
    data = lits_folder(tmp_path / "lits")
    mri_run = write_run(tmp_path / "mri_run", threshold_model(modality="mri"), "mri")
    with pytest.raises(EvaluateError, match=r"mri_run/best\.keras: a mri model cannot be evaluated on ct data"):
        evaluate({"m": mri_run}, data, tmp_path / "out", **QUIET)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(unlabelled / "volume-1.nii"))
    with pytest.raises(EvaluateError,
                       match=r"unlabelled: no labelled cases to evaluate \(1 cases, none with a label\)"):
        evaluate(runs, unlabelled, tmp_path / "out", **QUIET)


def test_unreadable_label_is_skipped_with_its_reason(tmp_path, runs):
    data = lits_folder(tmp_path / "lits")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), str(data / "segmentation-2.nii"))
    (data / "segmentation-1.nii").write_bytes((data / "segmentation-1.nii").read_bytes()[:200])
    summary = evaluate({"exact": runs["exact"]}, data, tmp_path / "out", EvaluateSettings(n_overlays=0), **QUIET)
    assert summary["cases"] == ["volume-0"]
    reasons = {s["case"]: s["reason"] for s in summary["skipped"]}
    assert reasons["volume-2"] == "image shape (24, 20, 8) differs from label shape (3, 3, 3)"
    assert reasons["volume-1"].startswith(f"{data / 'segmentation-1.nii'}: unreadable or truncated NIfTI")


def test_bad_labels_are_skipped_with_the_reason_build_records_gives(tmp_path, runs):
    data = lits_folder(tmp_path / "lits")
    hu = np.roll(ct_phantom((24, 20, 8)), 3, axis=0)
    for n, value in [(3, 7), (4, np.nan), (5, 0.5)]:
        label = expected_ct_labels(hu).astype(np.float32)
        label[0, 0, 0] = value
        nib.save(nib.Nifti1Image(hu, np.eye(4)), str(data / f"volume-{n}.nii"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(data / f"segmentation-{n}.nii"))
    summary = evaluate({"exact": runs["exact"]}, data, tmp_path / "out", EvaluateSettings(n_overlays=0), **QUIET)
    assert summary["cases"] == ["volume-0", "volume-1", "volume-2"]
    manifest = build_records(build_settings(data, tmp_path / "records", val_fraction=0, test_fraction=0,
                                            liver_slices=1, non_liver_slices=0))
    expected = {"volume-3": "label values [7] outside the expected set [0, 1, 2]",
                "volume-4": "label contains NaN/Inf", "volume-5": "label has non-integer values",
                "volume-9": "label missing"}
    assert {s["case"]: s["reason"] for s in summary["skipped"]} == expected
    assert {s["case_id"]: s["reason"] for s in manifest["skipped"]} == expected
    report = (tmp_path / "out" / "report.md").read_text()
    assert "- skipped `volume-3`: label values [7] outside the expected set [0, 1, 2]" in report


def test_name_models_uses_run_folders_and_deduplicates(tmp_path):
    (tmp_path / "a" / "runA").mkdir(parents=True)
    (tmp_path / "b" / "runA").mkdir(parents=True)
    names = name_models([tmp_path / "a" / "runA", tmp_path / "b" / "runA", tmp_path / "runC" / "best.keras",
                         tmp_path / "x" / "epoch3.keras"])
    assert list(names) == ["runA", "runA-2", "runC", "epoch3"]


def test_display_is_radiological_and_pick_slice_finds_most_tumour():
    canonical = np.zeros((4, 3))
    canonical[3, 2] = 1.0  # patient's right-most (max x), anterior-most (max y) voxel
    shown = display(canonical)
    assert shown.shape == (3, 4) and shown[0, 0] == 1.0  # top-left: anterior, patient's right
    labels = np.zeros((5, 5, 6), np.uint8)
    labels[:, :, 1] = 1
    labels[1:3, 1:3, 4] = 2
    labels[1:2, 1:2, 2] = 2
    assert pick_slice(labels, "tumour", "ct") == 4
    assert pick_slice((labels >= 1).astype(np.uint8), "tumour", "mri") == 1
    assert pick_slice(np.zeros((2, 2, 7), np.uint8)) == 3


def test_overlay_figure_draws_one_panel_per_prediction(tmp_path):
    image = np.random.default_rng(0).normal(size=(30, 20))
    truth = np.zeros((30, 20), np.uint8)
    truth[5:15, 5:15], truth[8:10, 8:10] = 1, 2
    path = overlay_figure(image, truth, {"A": truth, "B": np.zeros_like(truth), "C": truth}, tmp_path / "f.png",
                          title="case")
    png = matplotlib.image.imread(path)
    assert png.shape[1] == 5 * 260 and not list(tmp_path.glob(".tmp-*"))


def test_mri_phantoms_end_to_end_with_defect_cases(tmp_path, tiny_phantoms):
    run = write_run(tmp_path / "mri_run", threshold_model(modality="mri"), "mri")
    summary = evaluate({"mri_run": run}, tiny_phantoms / "mri", tmp_path / "out", EvaluateSettings(n_overlays=2),
                       **QUIET)
    assert summary["cases"] == ["FZMC001", "FZMC003", "FZMC005", "FZMC006"]
    reasons = {s["case"]: s["reason"] for s in summary["skipped"]}
    assert reasons == {"FZMC002": "image shape (48, 40, 12) differs from label shape (48, 40, 11)",
                       "FZMC004": "label missing"}
    assert set(summary["models"]["mri_run"]["structures"]) == {"tumour"}
    report = (tmp_path / "out" / "report.md").read_text()
    for png in summary["overlays"]:
        assert f"]({png})" in report and (tmp_path / "out" / png).stat().st_size > 1000


def test_records_or_volume_folder_as_asked(tmp_path):
    data = lits_folder(tmp_path / "lits")
    with pytest.raises(EvaluateError, match=r"lits: no manifest\.json, so not a records folder \(a folder of "
                                            r"volumes with labels goes to --input\)$"):
        find_eval_cases(data, records=True)
    assert find_eval_cases(data, records=False)[0] == "ct"
    records = tmp_path / "records"
    records.mkdir()
    (records / "manifest.json").write_text("{}")
    with pytest.raises(EvaluateError, match=r"records: holds manifest\.json, so it is a records folder "
                                            r"\(give it to --records\)$"):
        find_eval_cases(records, records=False)


def test_scored_structures_are_those_the_labels_and_every_model_hold():
    from kerasunet.core.runs import RunInfo
    from kerasunet.evaluate import scored_outputs

    def run(name, outputs):
        return RunInfo(Path(f"{name}/best.keras"), {"model": {"outputs": list(outputs)}, "data": {"modality": "mri"}})

    atlas, fzmc = run("atlas", ("liver", "tumour")), run("fzmc", ("tumour",))
    assert scored_outputs({"a": (None, atlas)}, ("liver", "tumour"), "data") == ("liver", "tumour")
    assert scored_outputs({"a": (None, atlas), "f": (None, fzmc)}, ("liver", "tumour"), "data") == ("tumour",)
    with pytest.raises(EvaluateError, match=r"^data: its labels hold tumour, which no model segments "
                                            r"\(liver/best\.keras: liver\)$"):
        scored_outputs({"l": (None, run("liver", ("liver",)))}, ("tumour",), "data")
