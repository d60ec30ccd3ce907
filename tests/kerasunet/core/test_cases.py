"""Tests of kerasunet.core.cases: layouts, their detection, labels by structure and the one case loader's checks."""

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kerasunet.core.cases import (
    LAYOUTS,
    CaseError,
    CaseFiles,
    case_entry,
    case_from_entry,
    find_cases,
    find_dataset_cases,
    ircadb_structure,
    load_case,
    load_image,
    mask_path,
    open_dataset,
)
from kerasunet.core.nifti import VolumeError
from kerasunet.synth import ct_phantom, mri_phantom
from kerasunet.synth_layouts import SYNTH_LAYOUTS, atlas_label, ircadb_masks
from tests.helpers import LAYOUT_CT, LAYOUT_MRI, phantom, save_nifti


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


# --------------------------------------------------------------------------- layouts

CASES = {
    "lits": ("ct", [f"volume-{i}" for i in range(4)]),
    "fzmc": ("mri", [f"FZMC00{i}" for i in range(1, 5)]),
    "msd": ("ct", [f"liver_{i}" for i in range(4)]),
    "nnunet": ("ct", [f"liver_{i:03d}" for i in range(4)]),
    "atlas": ("mri", [f"im{i}" for i in range(4)]),
    "ircadb": ("ct", [f"3Dircadb1.{i}" for i in range(1, 5)]),
    "dicom": ("ct", [f"case0{i}" for i in range(4)]),
}
MASKS = {"lits": "segmentation-1.nii", "fzmc": "FZMC002/prediction.nii.gz", "msd": "liver_1.nii.gz",
         "nnunet": "liver_001.nii.gz", "atlas": "lb1.nii.gz", "ircadb": "3Dircadb1.2.nii.gz", "dicom": "case01.nii.gz"}


def test_every_synth_layout_has_its_expectations():
    assert set(CASES) == set(SYNTH_LAYOUTS) == set(MASKS)


@pytest.mark.parametrize("layout", list(CASES))
def test_each_layout_is_detected_and_named_the_same(layout_phantoms, layout):
    modality, case_ids = CASES[layout]
    detected = open_dataset(layout_phantoms / layout)
    named = open_dataset(layout_phantoms / layout, layout)
    assert (detected.layout, detected.modality) == (named.layout, named.modality) == (layout, modality)
    assert [c.case_id for c in detected.cases] == [c.case_id for c in named.cases] == case_ids
    assert mask_path(layout, detected.cases[1]) == MASKS[layout]


@pytest.mark.parametrize("layout", list(CASES))
def test_each_layout_loads_the_phantom_it_was_written_from(layout_phantoms, layout):
    dataset = open_dataset(layout_phantoms / layout)
    loaded = 0
    for i, case in enumerate(dataset.cases):
        truth = ct_phantom(i, 0, LAYOUT_CT) if dataset.modality == "ct" else mri_phantom(i, 0, LAYOUT_MRI)
        try:
            image, label = load_case(case, dataset.outputs)
        except CaseError:
            continue  # the defects are checked below
        np.testing.assert_array_equal(image.data, truth.image)
        # project values: liver 1 / tumour 2 where the labels hold both (ATLAS MRI too), FZMC tumour 1
        np.testing.assert_array_equal(label, atlas_label(truth) if layout == "atlas" else truth.label)
        assert image.spacing == tuple(np.float32(truth.grid.spacing))
        loaded += 1
    assert loaded == {"fzmc": 2, "msd": 3}.get(layout, 4)


def test_the_layouts_defects_are_reasons(layout_phantoms):
    msd = {c.case_id: c for c in open_dataset(layout_phantoms / "msd").cases}
    assert msd["liver_3"].image.parent.name == "imagesTs" and msd["liver_3"].label is None
    with pytest.raises(CaseError, match="^label missing$"):
        load_case(msd["liver_3"], "ct")
    fzmc = {c.case_id: c for c in open_dataset(layout_phantoms / "fzmc").cases}
    with pytest.raises(CaseError, match=r"^image shape \(24, 20, 4\) differs from label shape \(24, 20, 3\)$"):
        load_case(fzmc["FZMC002"], "mri")


def test_mri_is_the_fzmc_layout_under_its_old_name(layout_phantoms):
    dataset = open_dataset(layout_phantoms / "fzmc", "mri")
    assert dataset.layout == "fzmc" and dataset.modality == "mri" and LAYOUTS["mri"] is LAYOUTS["fzmc"]
    assert find_cases(layout_phantoms / "fzmc", layout="mri")[0] == "fzmc"


def test_nothing_found_is_one_line_saying_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(VolumeError) as info:
        find_cases(tmp_path, phase="portal")
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: no cases found (looked for atlas: imagesTr/imN.nii.gz with labelsTr/lbN")
    for part in ["nnunet: imagesTr/CASE_0000.nii.gz", "msd: imagesTr/ and labelsTr/ with dataset.json",
                 "lits: volume-N.nii[.gz] files", "fzmc: case folders holding portal.nii[.gz]",
                 "ircadb: patient folders holding PATIENT_DICOM/", "dicom: folders of DICOM files"]:
        assert part in message
    assert "\n" not in message


def test_a_named_layout_looks_only_for_itself(layout_phantoms, tmp_path):
    with pytest.raises(VolumeError, match=r"lits: no msd cases found \(expected imagesTr/ and labelsTr/ with "
                                          r"dataset\.json\)$"):
        find_dataset_cases(layout_phantoms / "lits", "msd")
    with pytest.raises(VolumeError, match=r"nowhere: not a folder$"):
        find_dataset_cases(tmp_path / "nowhere", "fzmc")
    with pytest.raises(ValueError, match=r"^Expected layout in \('lits', 'fzmc', 'msd', 'nnunet', 'atlas', 'ircadb', "
                                         r"'dicom'\)\. Received: layout='decathlon'$"):
        open_dataset(layout_phantoms / "msd", "decathlon")


def test_msd_resource_forks_are_ignored_silently(layout_phantoms):
    forks = sorted(p.name for p in (layout_phantoms / "msd" / "imagesTr").iterdir() if p.name.startswith("._"))
    assert forks == ["._liver_0.nii.gz", "._liver_1.nii.gz", "._liver_2.nii.gz"]
    cases = open_dataset(layout_phantoms / "msd").cases
    assert all(not c.image.name.startswith("._") and (c.label is None or not c.label.name.startswith("._"))
               for c in cases)


def _nnunet_copy(layout_phantoms, tmp_path, dataset_json=None):
    root = shutil.copytree(layout_phantoms / "nnunet", tmp_path / "Dataset003_Liver")
    if dataset_json is not None:
        (root / "dataset.json").write_text(dataset_json if isinstance(dataset_json, str) else json.dumps(dataset_json))
    return root


def _relabel(root, case, mapping):
    """Rewrites one label file with its values renumbered by ``mapping`` (old -> new)."""
    path = root / "labelsTr" / f"{case}.nii.gz"
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    out = np.zeros_like(data)
    for old, new in mapping.items():
        out[data == old] = new
    nib.save(nib.Nifti1Image(out, image.affine), str(path))
    return data


@pytest.mark.parametrize("labels", [
    {"background": 0, "tumor": 1, "liver": 2},  # nnU-Net v2: name -> value, any order
    {"0": "background", "1": "cancer", "2": "liver"},  # MSD / nnU-Net v1: value -> name
    {"background": 0, "liver": [1, 2], "lesion": 1},  # v2 regions: the tumour region wins its values
])
def test_labels_are_read_by_name(layout_phantoms, tmp_path, labels):
    root = _nnunet_copy(layout_phantoms, tmp_path, {"channel_names": {"0": "CT"}, "labels": labels,
                                                    "file_ending": ".nii.gz"})
    original = _relabel(root, "liver_000", {1: 2, 2: 1})  # the files hold tumour 1, liver 2
    case = open_dataset(root).cases[0]
    _, label = load_case(case, "ct")
    np.testing.assert_array_equal(label, original)  # back in the project's values: liver 1, tumour 2


@pytest.mark.parametrize("content, message", [
    ('{"labels": {', r"dataset\.json: not valid JSON \(Expecting"),
    ({"channel_names": {"0": "CT"}}, r'dataset\.json: no "labels" map$'),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "spleen": 1}},
     r"dataset\.json: no liver or tumour label \(labels: background, spleen\); kerasunet reads labels named liver, "
     r"and tumour, tumor, lesion or cancer$"),
    ({"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "lesion": 1}},
     r"dataset\.json: Expected one image channel \(kerasunet models take one image\)\. Received: "
     r"channel_names=\{'0': 'T2', '1': 'ADC'\}$"),
    ({"channel_names": {"0": "CT"}, "labels": {"liver": 1, "tumor": 2}, "file_ending": ".mha"},
     r"dataset\.json: Expected file_ending \.nii\.gz or \.nii\. Received: file_ending='\.mha'$"),
])
def test_a_bad_dataset_json_is_one_line(layout_phantoms, tmp_path, content, message):
    root = _nnunet_copy(layout_phantoms, tmp_path, content)
    with pytest.raises(VolumeError, match=f"^{re.escape(str(root))}/{message}"):
        open_dataset(root, "nnunet")


def test_a_tumour_only_mri_dataset_keeps_the_tumour(layout_phantoms, tmp_path):
    root = _nnunet_copy(layout_phantoms, tmp_path, {"channel_names": {"0": "T1"}, "labels": {"background": 0,
                                                                                          "liver tumour": 2}})
    _relabel(root, "liver_000", {2: 2})  # the liver is not drawn
    dataset = open_dataset(root)
    assert dataset.modality == "mri" and dataset.cases[0].label_map == ((2, "tumour"),)
    assert dataset.outputs == ("tumour",)
    _, label = load_case(dataset.cases[0], dataset.outputs)
    np.testing.assert_array_equal(label, (ct_phantom(0, 0, LAYOUT_CT).label == 2).astype(np.uint8))
    with pytest.raises(CaseError, match=r"^label values \[1\] outside the expected set \[0, 2\]$"):
        load_case(dataset.cases[1], "mri")  # this file still holds liver = 1, which dataset.json does not list


@pytest.mark.parametrize("channel, labels, outputs", [
    ("T1", {"background": 0, "liver": 1, "tumor": 2}, ("liver", "tumour")),  # an ATLAS-like MRI set
    ("CT", {"background": 0, "cancer": 2}, ("tumour",)),  # a CT set without liver labels
])
def test_a_dataset_json_says_which_structures_the_records_hold(layout_phantoms, tmp_path, channel, labels, outputs):
    root = _nnunet_copy(layout_phantoms, tmp_path, {"channel_names": {"0": channel}, "labels": labels})
    if outputs == ("tumour",):
        _relabel(root, "liver_000", {2: 2})
    dataset = open_dataset(root)
    assert dataset.outputs == outputs
    _, label = load_case(dataset.cases[0], dataset.outputs)
    truth = ct_phantom(0, 0, LAYOUT_CT).label
    np.testing.assert_array_equal(label, truth if len(outputs) == 2 else (truth == 2).astype(np.uint8))


def test_layouts_hold_their_structures(layout_phantoms):
    assert open_dataset(layout_phantoms / "atlas").outputs == ("liver", "tumour")
    assert open_dataset(layout_phantoms / "fzmc").outputs == ("tumour",)
    assert open_dataset(layout_phantoms / "lits").outputs == ("liver", "tumour")


def test_label_and_image_without_their_pair_are_cases_with_a_reason(layout_phantoms, tmp_path):
    root = shutil.copytree(layout_phantoms / "msd", tmp_path / "Task03_Liver")
    (root / "imagesTr" / "liver_0.nii.gz").unlink()
    (root / "labelsTr" / "liver_1.nii.gz").unlink()
    cases = {c.case_id: c for c in open_dataset(root).cases}
    with pytest.raises(CaseError, match="^image missing$"):
        load_case(cases["liver_0"], "ct")
    with pytest.raises(CaseError, match="^label missing$"):
        load_case(cases["liver_1"], "ct")
    load_case(cases["liver_2"], "ct")


@pytest.mark.parametrize("name, structure", [
    ("liver", "liver"), ("Liver", "liver"), ("livertumor01", "tumour"), ("livertumor1", "tumour"),
    ("livertumors", "tumour"), ("tumor", "tumour"), ("liver_tumor_3", "tumour"), ("liverkyst", None),
    ("livercyst", None), ("portalvein", None), ("leftkidney", None), ("spleen", None),
])
def test_ircadb_mask_folders_by_structure(name, structure):
    assert ircadb_structure(name) == structure


def test_ircadb_cysts_are_not_tumour_and_a_missing_liver_mask_is_a_reason(layout_phantoms, tmp_path):
    masks = ircadb_masks(ct_phantom(0, 0, LAYOUT_CT))
    assert masks["liverkyst"].any() and not (masks["liverkyst"] & (ct_phantom(0, 0, LAYOUT_CT).label == 2)).any()
    case = open_dataset(layout_phantoms / "ircadb").cases[0]
    assert dict(case.label_map) == {"liver": "liver", "livertumor01": "tumour"}
    _, label = load_case(case, "ct")
    assert (label[masks["liverkyst"]] == 1).all()  # the cyst is liver
    root = shutil.copytree(layout_phantoms / "ircadb" / "3Dircadb1.1", tmp_path / "3Dircadb1.1")
    shutil.rmtree(root / "MASKS_DICOM" / "liver")
    (case,) = open_dataset(root).cases  # one patient's folder is a dataset of one case
    with pytest.raises(CaseError, match=rf"^{re.escape(str(root / 'MASKS_DICOM'))}: no liver mask folder$"):
        load_case(case, "ct")


def test_atlas_liver_and_tumour_become_the_mri_tumour_label(layout_phantoms):
    case = open_dataset(layout_phantoms / "atlas").cases[0]
    stored = np.asarray(nib.load(str(case.label)).dataobj)
    truth = mri_phantom(0, 0, LAYOUT_MRI)
    np.testing.assert_array_equal(stored, atlas_label(truth))
    assert set(np.unique(stored).tolist()) == {0, 1, 2}
    _, label = load_case(case, "mri")  # MRI models segment tumour only: liver reads as background
    np.testing.assert_array_equal(label, (stored == 2).astype(np.uint8))


def test_label_values_outside_the_datasets_set_are_a_reason(layout_phantoms, tmp_path):
    root = shutil.copytree(layout_phantoms / "msd", tmp_path / "Task03_Liver")
    _relabel(root, "liver_0", {1: 1, 2: 3})
    with pytest.raises(CaseError, match=r"^label values \[3\] outside the expected set \[0, 1, 2\]$"):
        load_case(open_dataset(root).cases[0], "ct")


def test_dicom_folders_anywhere_below_are_cases(layout_phantoms, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(layout_phantoms / "dicom" / "case00", root / "patient1" / "study" / "CT")
    shutil.copytree(layout_phantoms / "dicom" / "case01", root / "patient2")
    (root / "patient2" / "label.nii.gz").unlink()
    dataset = open_dataset(root)
    assert dataset.layout == "dicom" and dataset.modality == "ct"
    assert [(c.case_id, c.label is not None) for c in dataset.cases] == [("patient1_study_CT", True),
                                                                          ("patient2", False)]
    (series,) = open_dataset(root / "patient2").cases  # a folder holding one series is one case
    assert series.case_id == "patient2" and series.image == root / "patient2"
    image = load_image(series.image)
    np.testing.assert_array_equal(image.data, ct_phantom(1, 0, LAYOUT_CT).image)


def test_case_entries_round_trip_through_json(layout_phantoms):
    for layout in ("ircadb", "nnunet", "lits"):
        case = open_dataset(layout_phantoms / layout).cases[0]
        case = CaseFiles(case.case_id, case.image.resolve(), case.label.resolve(), case.label_map, "1.2.3")
        entry = json.loads(json.dumps(case_entry(case)))
        assert case_from_entry(case.case_id, entry) == case
    old = {"image": "/data/volume-1.nii", "label": "/data/segmentation-1.nii"}  # a manifest from before label maps
    assert case_from_entry("volume-1", old) == CaseFiles("volume-1", Path("/data/volume-1.nii"),
                                                         Path("/data/segmentation-1.nii"))
