import re

import numpy as np
import pytest

from kerasunet.core.cases import find_dataset_cases
from kerasunet.core.preprocessing import NormSettings
from tests.helpers import build_settings, phantom, save_nifti, write_lits
from tfrecords_builder.build import BuildError, build_records
from tfrecords_builder.ingest import CaseTask, inspect_case
from tfrecords_builder.selection import SelectionSettings


def write_defects(root):
    """Two good LiTS cases (0, 1) and one case per defect (2..8)."""
    write_lits(root, n=2)
    image, label = phantom(0)
    save_nifti(root / "volume-2.nii", image)  # no segmentation-2
    save_nifti(root / "volume-3.nii", image)
    save_nifti(root / "segmentation-3.nii", label[:, :, :-1])
    save_nifti(root / "volume-4.nii", image)
    save_nifti(root / "segmentation-4.nii", label)
    (root / "volume-4.nii").write_bytes((root / "volume-4.nii").read_bytes()[:3000])
    nan = image.astype(np.float32)
    nan[2, 2, 2] = np.nan
    save_nifti(root / "volume-5.nii", nan)
    save_nifti(root / "segmentation-5.nii", label)
    bad = label.copy()
    bad[0, 0, 0] = 7
    save_nifti(root / "volume-6.nii", image)
    save_nifti(root / "segmentation-6.nii", bad)
    frac = label.astype(np.float32)
    frac[0, 0, 0] = 0.5
    save_nifti(root / "volume-7.nii", image)
    save_nifti(root / "segmentation-7.nii", frac)
    save_nifti(root / "volume-8.nii.gz", image)
    save_nifti(root / "segmentation-8.nii.gz", label)
    blob = (root / "volume-8.nii.gz").read_bytes()
    (root / "volume-8.nii.gz").write_bytes(blob[: len(blob) // 2])
    return root


EXPECTED_REASONS = {
    "volume-2": r"^label missing$",
    "volume-3": r"^image shape \(24, 20, 14\) differs from label shape \(24, 20, 13\)$",
    "volume-4": r"volume-4\.nii: unreadable or truncated NIfTI",
    "volume-5": r"^image contains NaN/Inf$",
    "volume-6": r"^label values \[7\] outside the expected set \[0, 1, 2\]$",
    "volume-7": r"^label has non-integer values$",
    "volume-8": r"volume-8\.nii\.gz: unreadable or truncated NIfTI",
}


def test_every_defect_case_is_skipped_with_its_reason(tmp_path):
    src = write_defects(tmp_path / "lits")
    manifest = build_records(build_settings(src, tmp_path / "out", val_fraction=0, test_fraction=0,
                                            liver_slices=2, non_liver_slices=1))
    reasons = {s["case_id"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(EXPECTED_REASONS)
    for case_id, pattern in EXPECTED_REASONS.items():
        assert re.search(pattern, reasons[case_id]), (case_id, reasons[case_id])
    assert manifest["splits"]["train"]["cases"] == ["volume-0", "volume-1"]
    assert set(manifest["cases"]) == {"volume-0", "volume-1"}


def test_mri_case_facts_use_percentile_stats(tmp_path):
    case = tmp_path / "mri" / "P1"
    case.mkdir(parents=True)
    image, label = phantom(3)
    save_nifti(case / "artery.nii.gz", image.astype(np.float32) + 2000)
    save_nifti(case / "label.nii.gz", (label == 2).astype(np.uint8))
    (files,) = find_dataset_cases(tmp_path / "mri", "mri")
    info = inspect_case(CaseTask(files, NormSettings("mri"), SelectionSettings(all_slices=True)))
    assert info["slices"] == list(range(14)) and info["tumour_slices"] == 2
    lo, hi, mean, std = info["norm_stats"]
    assert lo == pytest.approx(np.percentile(image + 2000.0, 1))
    assert hi == pytest.approx(np.percentile(image + 2000.0, 99))


def test_no_usable_case_is_a_clear_error(tmp_path):
    src = tmp_path / "lits"
    src.mkdir()
    image, _ = phantom(0)
    save_nifti(src / "volume-1.nii", image)
    with pytest.raises(BuildError, match=r"lits: no usable case left \(1 skipped: volume-1: label missing\)"):
        build_records(build_settings(src, tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_folder_without_cases_is_a_clear_error(tmp_path):
    with pytest.raises(BuildError, match=r"empty: no lits cases found \(expected volume-N\.nii\[\.gz\] files\)"):
        (tmp_path / "empty").mkdir()
        build_records(build_settings(tmp_path / "empty", tmp_path / "out"))
