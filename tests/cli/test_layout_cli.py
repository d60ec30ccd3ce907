"""CLI tests of the --layout and --series options of predict and evaluate, and of synth --layout."""

import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from kerasunet.core.dicom import list_series, read_series
from tests.helpers import threshold_model, write_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout_cli_runs")
    return {"ct": write_run(root / "ct", threshold_model()),
            "mri": write_run(root / "mri", threshold_model(modality="mri"), modality="mri")}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_predict_on_one_dicom_series_writes_a_nifti_in_its_geometry(layout_phantoms, runs, tmp_path):
    series = layout_phantoms / "dicom" / "case01"
    result = invoke("predict", "--model", runs["ct"], "--input", series, "--output", tmp_path / "mask.nii.gz")
    assert result.exit_code == 0, result.output
    assert "[1/1] case01: " in result.output
    mask = nib.load(str(tmp_path / "mask.nii.gz"))
    reference = read_series(series)
    assert mask.shape == reference.shape
    np.testing.assert_allclose(mask.affine, reference.affine)


def test_two_series_in_one_folder_is_one_line_and_series_chooses(layout_phantoms, runs, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(layout_phantoms / "dicom" / "case00", folder)
    for path in (layout_phantoms / "dicom" / "case02").iterdir():
        shutil.copy(path, folder / f"b-{path.name}")
    uids = [s.uid for s in list_series(folder)]
    second = next(s.uid for s in list_series(folder) if s.description == "phantom CT 2")
    result = invoke("predict", "--model", runs["ct"], "--input", folder, "--output", tmp_path / "mask.nii.gz")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    (line,) = [line for line in result.output.splitlines() if line.startswith(("Error", "failed"))]
    assert line.startswith(f"Error: {folder}: holds 2 image series; choose one with --series UID: {uids[0]} "
                           f"(phantom CT ")
    assert uids[1] in line and not (tmp_path / "mask.nii.gz").exists()
    chosen = invoke("predict", "--model", runs["ct"], "--input", folder, "--series", second,
                    "--output", tmp_path / "mask.nii.gz")
    assert chosen.exit_code == 0, chosen.output
    np.testing.assert_allclose(nib.load(str(tmp_path / "mask.nii.gz")).affine,
                               read_series(layout_phantoms / "dicom" / "case02").affine)


def test_predict_layout_names_the_masks_like_the_labels(layout_phantoms, runs, tmp_path):
    result = invoke("predict", "--model", runs["ct"], "--input", layout_phantoms / "msd", "--layout", "msd",
                    "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"liver_{i}.nii.gz" for i in range(4)]
    wrong = invoke("predict", "--model", runs["ct"], "--input", layout_phantoms / "msd", "--layout", "atlas",
                   "--output", tmp_path / "w")
    assert wrong.exit_code == 1 and wrong.output == (f"Error: {layout_phantoms / 'msd'}: no atlas cases found "
                                                     "(expected imagesTr/imN.nii.gz with labelsTr/lbN.nii.gz)\n")


def test_evaluate_reads_a_layout(layout_phantoms, runs, tmp_path):
    result = invoke("evaluate", "--model", runs["ct"], "--input", layout_phantoms / "ircadb", "--layout", "ircadb",
                    "--out", tmp_path / "report", "--overlays", "0")
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "report" / "summary.json").read_text()
    assert '"modality": "ct"' in summary and '"n_cases": 4' in summary
    mri = invoke("evaluate", "--model", runs["mri"], "--input", layout_phantoms / "atlas",
                 "--out", tmp_path / "atlas", "--overlays", "0")
    assert mri.exit_code == 0, mri.output
    assert '"n_cases": 4' in (tmp_path / "atlas" / "summary.json").read_text()


def test_synth_layout_writes_each_layout_folder(tmp_path):
    result = invoke("synth", "--out", tmp_path, "--layout", "ircadb", "--layout", "atlas", "--ct-cases", "1",
                    "--mri-cases", "2", "--size", "32", "--ct-slices", "4:4", "--mri-shape", "16x16x4")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1] == f"ircadb: {tmp_path / 'ircadb'} (1 case)"
    assert lines[-1] == f"atlas: {tmp_path / 'atlas'} (2 cases)"
    assert sorted(p.name for p in (tmp_path / "atlas" / "labelsTr").iterdir()) == ["lb0.nii.gz", "lb1.nii.gz"]
    none = invoke("synth", "--out", tmp_path / "x", "--layout", "msd", "--ct-cases", "0")
    assert none.exit_code == 2 and "Expected at least one case for --layout msd. Received: 0" in none.output


def test_experiment_takes_the_layout_of_each_side_and_checks_its_modality(layout_phantoms, tmp_path):
    result = invoke("experiment", "transfer", "--lits", layout_phantoms / "atlas", "--ct-layout", "atlas",
                    "--mri", layout_phantoms / "atlas", "--mri-layout", "atlas", "--out", tmp_path / "exp",
                    "--workers", "1")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.splitlines()[-1] == (f"Error: Expected CT data for the lits side. Received: "
                                              f"{layout_phantoms / 'atlas'} (atlas layout, MRI)")


def test_dicom_seg_output_of_a_nifti_input_is_one_line(layout_phantoms, runs, tmp_path):
    volume = layout_phantoms / "lits" / "volume-0.nii"
    result = invoke("predict", "--model", runs["ct"], "--input", volume, "--output", tmp_path / "m.nii.gz",
                    "--output-format", "dicom-seg")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output == (f"Error: {volume}: --output-format dicom-seg needs DICOM series input (a DICOM "
                             "Segmentation references its source images); this is not a DICOM series folder\n")
    assert not (tmp_path / "m.nii.gz").exists() and not (tmp_path / "m.dcm").exists()
