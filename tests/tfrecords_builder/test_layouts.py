"""build-records on every dataset layout, end to end on phantoms.

A DICOM series builds the records of its NIfTI twin.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli.records import build_records as build_records_cli
from kerasunet.synth_layouts import SYNTH_LAYOUTS
from tfrecords_builder.build import build_records
from tests.helpers import build_settings

# layout -> (modality, cases written, {skipped case: reason})
EXPECTED = {
    "lits": ("ct", [f"volume-{i}" for i in range(4)], {}),
    "fzmc": ("mri", ["FZMC001", "FZMC003"], {"FZMC002": "image shape (24, 20, 4) differs from label shape (24, 20, 3)",
                                             "FZMC004": "label missing"}),
    "msd": ("ct", ["liver_0", "liver_1", "liver_2"], {"liver_3": "label missing"}),
    "nnunet": ("ct", [f"liver_{i:03d}" for i in range(4)], {}),
    "atlas": ("mri", [f"im{i}" for i in range(4)], {}),
    "ircadb": ("ct", [f"3Dircadb1.{i}" for i in range(1, 5)], {}),
    "dicom": ("ct", [f"case0{i}" for i in range(4)], {}),
}
# the structures each layout's labels hold, so its records too (label values 1.. in this order)
OUTPUTS = {layout: ("tumour",) if layout == "fzmc" else ("liver", "tumour") for layout in EXPECTED}
ALL_TRAIN = {"val_fraction": 0.0, "test_fraction": 0.0, "all_slices": True}


def test_every_synth_layout_is_built():
    assert set(EXPECTED) == set(SYNTH_LAYOUTS)


@pytest.fixture(scope="module")
def built(layout_phantoms, tmp_path_factory):
    """``built(layout) -> records folder`` of the layout's phantoms, every slice of every usable case in train."""
    out, done = tmp_path_factory.mktemp("layout_records"), {}

    def build(layout):
        if layout not in done:
            done[layout] = out / layout
            build_records(build_settings(layout_phantoms / layout, out / layout, dataset=layout, **ALL_TRAIN))
        return done[layout]

    return build


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_each_layout_builds_its_usable_cases_and_names_the_others(built, layout):
    modality, cases, skipped = EXPECTED[layout]
    manifest = json.loads((built(layout) / "manifest.json").read_text())
    assert (manifest["name"], manifest["modality"]) == (layout, modality)
    assert tuple(manifest["outputs"]) == OUTPUTS[layout]
    assert set(manifest["class_stats"]["train"]["foreground_fraction"]) == set(OUTPUTS[layout])
    assert manifest["splits"]["train"]["cases"] == cases
    assert {s["case_id"]: s["reason"] for s in manifest["skipped"]} == skipped
    first = manifest["cases"][cases[0]]
    assert first["label_map"] is not None and first["series"] is None


def test_a_dicom_series_builds_the_records_of_its_nifti_twin(built):
    from kerasunet.data import load_split_examples

    nifti = {(e["case_id"].replace("volume-", "case0"), e["slice_index"]): e
             for e in load_split_examples(built("lits"), "train")}
    dicom = {(e["case_id"], e["slice_index"]): e for e in load_split_examples(built("dicom"), "train")}
    assert sorted(nifti) == sorted(dicom) and len(dicom) == sum(
        len(c["slices"]) for c in json.loads((built("dicom") / "manifest.json").read_text())["cases"].values())
    for key, twin in nifti.items():
        for field in ("image", "label", "norm_stats", "spacing", "has_tumour"):
            np.testing.assert_array_equal(dicom[key][field], twin[field], err_msg=f"{key} {field}")


def test_atlas_records_hold_liver_and_tumour_as_1_and_2(built):
    from kerasunet.data import load_split_examples
    from kerasunet.synth import mri_phantom
    from kerasunet.synth_layouts import atlas_label
    from tests.helpers import LAYOUT_MRI

    examples = list(load_split_examples(built("atlas"), "train"))
    for e in examples:
        truth = atlas_label(mri_phantom(int(e["case_id"][2:]), 0, LAYOUT_MRI))[:, :, e["slice_index"]]
        np.testing.assert_array_equal(e["label"], truth)
    assert {int(v) for e in examples for v in np.unique(e["label"])} == {0, 1, 2}


def test_cli_detects_the_layout_of_input(layout_phantoms, tmp_path):
    args = ["--workers", "1", "--val-fraction", "0.25", "--test-fraction", "0"]
    result = CliRunner().invoke(build_records_cli, ["--input", str(layout_phantoms / "ircadb"),
                                                    "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["name"] == "ircadb" and manifest["settings"]["dataset"] == "ircadb"
    wrong = CliRunner().invoke(build_records_cli, ["--input", str(layout_phantoms / "ircadb"), "--layout", "msd",
                                                   "--out", str(tmp_path / "w"), *args])
    assert wrong.exit_code == 1 and wrong.output == (f"Error: {layout_phantoms / 'ircadb'}: no msd cases found "
                                                     "(expected imagesTr/ and labelsTr/ with dataset.json)\n")
    both = CliRunner().invoke(build_records_cli, ["--lits", str(layout_phantoms / "lits"), "--layout", "lits",
                                                  "--out", str(tmp_path / "b")])
    assert both.exit_code == 2 and "--layout applies to --input" in both.output


def test_a_dicom_folder_with_two_series_is_skipped_with_its_listing_unless_series_chooses(layout_phantoms, tmp_path):
    import shutil

    from kerasunet.core.dicom import list_series

    root = tmp_path / "clinic"
    for case in ("case00", "case01", "case02"):
        shutil.copytree(layout_phantoms / "dicom" / case, root / case)
    for path in (layout_phantoms / "dicom" / "case03").iterdir():  # a second series in case02's folder
        if path.name != "label.nii.gz":
            shutil.copy(path, root / "case02" / f"b-{path.name}")
    uids = [s.uid for s in list_series(root / "case02")]
    manifest = build_records(build_settings(root, tmp_path / "r", dataset="dicom", **ALL_TRAIN))
    assert manifest["splits"]["train"]["cases"] == ["case00", "case01"]
    (skip,) = manifest["skipped"]
    assert skip["case_id"] == "case02" and skip["reason"].startswith(
        f"{(root / 'case02').resolve()}: holds 2 image series; choose one with --series UID: {uids[0]} (phantom CT ")
    chosen = next(s.uid for s in list_series(root / "case02") if s.description == "phantom CT 2")
    manifest = build_records(build_settings(root, tmp_path / "s", dataset="dicom", series=chosen, **ALL_TRAIN))
    # the UID names one series: the case that holds it is read, the others have no such series
    assert manifest["splits"]["train"]["cases"] == ["case02"]
    assert manifest["cases"]["case02"]["series"] == chosen
    assert [s["case_id"] for s in manifest["skipped"]] == ["case00", "case01"]
    assert "no series" in manifest["skipped"][0]["reason"]
