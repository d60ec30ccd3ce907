"""Tests of kerasunet.core.cases: layouts, case discovery and the one case loader's checks."""

import re

import nibabel as nib
import numpy as np
import pytest

from kerasunet.core.cases import (
    LAYOUTS,
    CaseError,
    CaseFiles,
    find_cases,
    find_dataset_cases,
    load_case,
    load_image,
)
from kerasunet.core.nifti import VolumeError
from tests.helpers import phantom, save_nifti


def _with_value(array, value, dtype=np.float32):
    out = array.astype(dtype)
    out[0, 0, 0] = value
    return out


IMAGE, LABEL = phantom(0)
# (image, label or None, modality) -> the reason, exactly as build-records and evaluate record it
DEFECTS = {
    "label value 7": (IMAGE, _with_value(LABEL, 7, np.uint8), "ct",
                      r"label values \[7\] outside the expected set \[0, 1, 2\]"),
    "label NaN": (IMAGE, _with_value(LABEL, np.nan), "ct", r"label contains NaN/Inf"),
    "label 0.5": (IMAGE, _with_value(LABEL, 0.5), "ct", r"label has non-integer values"),
    "label inf": (IMAGE, _with_value(LABEL, np.inf), "ct", r"label contains NaN/Inf"),
    "mri label 2": (IMAGE, LABEL, "mri", r"label values \[2\] outside the expected set \[0, 1\]"),
    "image NaN": (_with_value(IMAGE, np.nan), LABEL, "ct", r"image contains NaN/Inf"),
    "shape": (IMAGE, LABEL[:, :, :-1], "ct", r"image shape \(24, 20, 14\) differs from label shape \(24, 20, 13\)"),
    "no label": (IMAGE, None, "ct", r"label missing"),
}


@pytest.mark.parametrize("name", list(DEFECTS))
def test_load_case_gives_the_one_line_reason_of_each_defect(tmp_path, name):
    image, label, modality, reason = DEFECTS[name]
    save_nifti(tmp_path / "v.nii", image)
    if label is not None:
        save_nifti(tmp_path / "s.nii", label)
    files = CaseFiles("c", tmp_path / "v.nii", tmp_path / "s.nii" if label is not None else None)
    with pytest.raises(CaseError, match=f"^{reason}$"):
        load_case(files, modality)


@pytest.mark.parametrize("broken", ["image", "label"])
def test_unreadable_files_are_named_in_the_reason(tmp_path, broken):
    save_nifti(tmp_path / "v.nii", IMAGE)
    save_nifti(tmp_path / "s.nii", LABEL)
    path = tmp_path / ("v.nii" if broken == "image" else "s.nii")
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CaseError, match=rf"^{re.escape(str(path))}: unreadable or truncated NIfTI"):
        load_case(CaseFiles("c", tmp_path / "v.nii", tmp_path / "s.nii"), "ct")


def test_label_floats_within_the_tolerance_are_rounded(tmp_path):
    save_nifti(tmp_path / "v.nii", IMAGE)
    save_nifti(tmp_path / "s.nii", LABEL.astype(np.float32) + 1e-5)
    image, label = load_case(CaseFiles("c", tmp_path / "v.nii", tmp_path / "s.nii"), "ct")
    assert label.dtype == np.uint8 and image.data.shape == label.shape
    np.testing.assert_array_equal(label, LABEL)


def test_load_image_checks_the_image_alone(tmp_path):
    save_nifti(tmp_path / "ok.nii", IMAGE)
    np.testing.assert_array_equal(load_image(tmp_path / "ok.nii").data, IMAGE)
    save_nifti(tmp_path / "nan.nii", _with_value(IMAGE, np.nan))
    with pytest.raises(CaseError, match=r"^image contains NaN/Inf$"):
        load_image(tmp_path / "nan.nii")
    # a case error is a volume error, so callers that report bad volumes one by one report it too
    with pytest.raises(VolumeError, match=r"missing\.nii: file not found"):
        load_image(tmp_path / "missing.nii")


def test_find_cases_detects_both_layouts(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    lits = tmp_path / "lits"
    lits.mkdir()
    for name in ["volume-10.nii", "volume-2.nii.gz", "segmentation-2.nii.gz"]:
        nib.save(img, str(lits / name))
    layout, cases = find_cases(lits)
    assert layout == "lits" and LAYOUTS[layout].modality == "ct"
    assert [c.case_id for c in cases] == ["volume-2", "volume-10"]
    assert cases[0].label is not None and cases[1].label is None
    mri = tmp_path / "mri"
    (mri / "FZMC001").mkdir(parents=True)
    nib.save(img, str(mri / "FZMC001" / "artery.nii"))
    layout, cases = find_cases(mri)
    assert layout == "mri" and LAYOUTS[layout].modality == "mri"
    assert cases[0].case_id == "FZMC001" and cases[0].label is None
    with pytest.raises(VolumeError, match=r"mri: no cases found \(expected volume-N\.nii\[\.gz\] files or "
                                          r"case folders holding portal\.nii\[\.gz\]\)"):
        find_cases(mri, phase="portal")


def test_find_dataset_cases_uses_the_named_layout_only(tmp_path):
    mri = tmp_path / "mri"
    (mri / "P1").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(mri / "P1" / "portal.nii"))
    assert [c.case_id for c in find_dataset_cases(mri, "mri", phase="portal")] == ["P1"]
    with pytest.raises(VolumeError, match=r"mri: no lits cases found \(expected volume-N\.nii\[\.gz\] files\)$"):
        find_dataset_cases(mri, "lits")
    with pytest.raises(VolumeError, match=r"nowhere: not a folder$"):
        find_dataset_cases(tmp_path / "nowhere", "mri")
