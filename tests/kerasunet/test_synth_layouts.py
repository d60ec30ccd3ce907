"""Tests of kerasunet.synth_layouts: the files of each layout are what the real datasets hold."""

import json

import nibabel as nib
import numpy as np
import pytest

from kerasunet.core.dicom import is_dicom_file, list_series, read_series, slice_headers
from kerasunet.synth import ct_phantom
from kerasunet.synth_layouts import APPLE_DOUBLE, ircadb_masks, synth_layout
from tests.helpers import LAYOUT_CT, LAYOUT_MRI


def test_msd_has_the_decathlon_files_and_resource_forks(layout_phantoms):
    root = layout_phantoms / "msd"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"} and meta["labels"] == {"0": "background", "1": "liver", "2": "cancer"}
    assert meta["training"][0] == {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}
    assert meta["test"] == ["./imagesTs/liver_3.nii.gz"] and meta["numTraining"] == 3
    fork = root / "labelsTr" / "._liver_2.nii.gz"
    assert fork.read_bytes().startswith(APPLE_DOUBLE) and fork.stat().st_size == 4096
    assert (root / "imagesTs" / "._liver_3.nii.gz").exists() and not (root / "labelsTs").exists()


def test_nnunet_v2_has_the_channel_suffix_and_names_its_labels(layout_phantoms):
    root = layout_phantoms / "nnunet"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert sorted(p.name for p in (root / "imagesTr").iterdir())[:2] == ["liver_000_0000.nii.gz",
                                                                         "liver_001_0000.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir())[0] == "liver_000.nii.gz"


def test_atlas_labels_hold_liver_and_tumour(layout_phantoms):
    label = np.asarray(nib.load(str(layout_phantoms / "atlas" / "labelsTr" / "lb0.nii.gz")).dataobj)
    assert label.dtype == np.uint8 and set(np.unique(label).tolist()) == {0, 1, 2}
    assert nib.load(str(layout_phantoms / "atlas" / "imagesTr" / "im0.nii.gz")).shape == LAYOUT_MRI.shape


def test_ircadb_patients_are_dicom_series_without_extensions(layout_phantoms):
    patient = layout_phantoms / "ircadb" / "3Dircadb1.1"
    truth = ct_phantom(0, 0, LAYOUT_CT)
    files = sorted((patient / "PATIENT_DICOM").iterdir())
    assert len(files) == truth.grid.shape[2] and all(is_dicom_file(f) and "." not in f.name for f in files)
    (series,) = list_series(patient / "PATIENT_DICOM")
    assert series.modality == "CT"
    headers = slice_headers(series)
    image_0 = next(s for s in headers if s.path.name == "image_0")
    assert image_0.position[2] == max(s.position[2] for s in headers)  # image_0 is the highest slice
    assert sorted(p.name for p in (patient / "MASKS_DICOM").iterdir()) == sorted(ircadb_masks(truth))
    liver = read_series(patient / "MASKS_DICOM" / "liver")
    assert set(np.unique(np.asarray(liver.dataobj)).tolist()) == {0, 255}
    np.testing.assert_allclose(liver.affine, read_series(patient / "PATIENT_DICOM").affine)


def test_dicom_cases_are_stored_like_a_scanner_and_odd_ones_name_files_backwards(layout_phantoms):
    for case, backwards in (("case00", False), ("case01", True)):
        (series,) = list_series(layout_phantoms / "dicom" / case)
        ordered = sorted(slice_headers(series), key=lambda s: s.position[2])
        names = [s.path.name for s in ordered]
        assert names == sorted(names, reverse=backwards)
        np.testing.assert_allclose(ordered[0].orientation, [1, 0, 0, 0, 1, 0])  # rows L, columns P
    image = read_series(layout_phantoms / "dicom" / "case00")
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")


def test_layouts_are_reproducible_and_checked(tmp_path):
    for name in ("a", "b"):
        synth_layout("nnunet", tmp_path / name, 2, seed=3, ct=LAYOUT_CT)
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    with pytest.raises(ValueError, match=r"^Expected layout in \('lits', 'fzmc', 'msd', 'nnunet', 'atlas', "
                                         r"'ircadb', 'dicom'\)\. Received: layout='kits'$"):
        synth_layout("kits", tmp_path / "c", 1)
    with pytest.raises(ValueError, match=r"^Expected n_cases >= 1\. Received: n_cases=0$"):
        synth_layout("msd", tmp_path / "c", 0)
