"""CLI tests of ``kerasunet evaluate`` (click CliRunner, and one real subprocess)."""

import json

import matplotlib.image
import pytest
from click.testing import CliRunner

from cli.main import main
from tests.helpers import assert_one_line_error, lits_folder, run_cli, threshold_model, write_run


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("cli_eval_runs") / "ct_run", threshold_model())


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_repeated_model_puts_both_models_in_one_table_and_figure(tmp_path, ct_run):
    other = write_run(tmp_path / "other_run", threshold_model(gain=5.0))
    data = lits_folder(tmp_path / "lits")
    result = invoke("evaluate", "--model", ct_run, "--model", other, "--input", data, "--out", tmp_path / "report",
                    "--overlays", "1")
    assert result.exit_code == 0, result.output
    assert "ct_run (lits2017): liver Dice/case 1.000" in result.output
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert list(summary["models"]) == ["ct_run", "other_run"] and summary["overlays"] == ["overlays/volume-0.png"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| ct_run | 1.000" in report and "| other_run | " in report
    assert matplotlib.image.imread(tmp_path / "report" / "overlays" / "volume-0.png").shape[1] == 4 * 260


def test_records_reads_the_manifest_split(tmp_path, ct_run):
    data = lits_folder(tmp_path / "lits")
    records = tmp_path / "records"
    records.mkdir()
    cases = {f"volume-{n}": {"image": str(data / f"volume-{n}.nii"), "label": str(data / f"segmentation-{n}.nii")}
             for n in range(3)}
    manifest = {"modality": "ct", "splits": {"train": {"cases": ["volume-0"]}, "val": {"cases": ["volume-2"]},
                                             "test": {"cases": ["volume-1"]}}, "cases": cases}
    (records / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("evaluate", "--model", ct_run, "--records", records, "--split", "val", "--out", tmp_path / "r",
                    "--overlays", "0")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["cases"] == ["volume-2"]
    # a records folder is not a folder of volumes, and the other way round
    as_input = invoke("evaluate", "--model", ct_run, "--input", records, "--out", tmp_path / "r")
    assert as_input.exit_code == 1 and isinstance(as_input.exception, SystemExit)
    assert as_input.output == (f"Error: {records}: holds manifest.json, so it is a records folder "
                               "(give it to --records)\n")
    as_records = invoke("evaluate", "--model", ct_run, "--records", data, "--out", tmp_path / "r")
    assert as_records.exit_code == 1 and as_records.output == (
        f"Error: {data}: no manifest.json, so not a records folder (a folder of volumes with labels goes to --input)\n")


@pytest.mark.parametrize("args, message", [
    ([], "Error: give --model (repeatable), or --pred DIR --truth DIR to score masks"),
    (["--model", "RUN"], "Error: give --records DIR (a records folder) or --input DIR (volumes with labels)"),
    (["--model", "RUN", "--records", "D", "--input", "D"], "Error: give --records DIR"),
    (["--model", "RUN", "--input", "D", "--split", "val"], "Error: --split applies to --records only"),
    (["--model", "RUN", "--data", "D"], "Error: No such option '--data'"),
    (["--model", "RUN", "--compare", "RUN", "--input", "D"], "Error: No such option '--compare'"),
])
def test_usage_errors(tmp_path, ct_run, args, message):
    args = [str(ct_run) if a == "RUN" else str(tmp_path) if a == "D" else a for a in args]
    result = invoke("evaluate", *args, "--out", tmp_path / "r")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert message in result.output


def test_no_cases_is_one_line(tmp_path, ct_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("evaluate", "--model", ct_run, "--input", empty, "--out", tmp_path / "r")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith(f"Error: {empty}: no cases found (looked for atlas: imagesTr/imN.nii.gz")
    assert "; fzmc: case folders holding artery.nii[.gz];" in result.output and result.output.count("\n") == 1


def test_subprocess_missing_model_is_one_line_on_stderr(tmp_path):
    data = lits_folder(tmp_path / "lits")
    proc = run_cli("evaluate", "--model", tmp_path / "nope", "--input", data, "--out", tmp_path / "r")
    assert_one_line_error(proc, rf"^Error: {tmp_path / 'nope'}: no model file")
    assert proc.returncode == 1 and not (tmp_path / "r").exists()


def test_pred_truth_scores_mask_folders_with_the_lits2017_convention(tmp_path):
    import shutil

    import nibabel as nib
    import numpy as np

    truth = lits_folder(tmp_path / "truth")
    pred = tmp_path / "pred"
    pred.mkdir()
    for path in sorted(truth.glob("segmentation-*")):
        shutil.copy(path, pred / path.name)
    # volume-1's prediction misses its tumour: tumour Dice 0 there, liver unchanged
    first = sorted(pred.glob("segmentation-*"))[0]
    img = nib.load(first)
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.where(data == 2, 1, data).astype(data.dtype), img.affine, img.header), first)
    result = invoke("evaluate", "--pred", pred, "--truth", truth, "--out", tmp_path / "scores")
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "(lits2017)" in result.output and "liver Dice/case 1.000" in result.output
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["convention"] == "lits2017"
    tumour = summary["models"]["pred"]["structures"]["tumour"]
    n = summary["n_cases"]
    assert n == len(list(truth.glob("segmentation-*"))) and tumour["dice_per_case"] < 1.0
    medpy = invoke("evaluate", "--pred", pred, "--truth", truth, "--out", tmp_path / "medpy", "--convention", "medpy")
    assert medpy.exit_code == 0, medpy.output
    assert json.loads((tmp_path / "medpy" / "summary.json").read_text())["convention"] == "medpy"
    # ATLAS-style MRI masks hold liver 1 and tumour 2: --structures says so, and both are scored
    mri = invoke("evaluate", "--pred", pred, "--truth", truth, "--out", tmp_path / "mri", "--modality", "mri",
                 "--structures", "liver,tumour")
    assert mri.exit_code == 0, mri.output
    scored = json.loads((tmp_path / "mri" / "summary.json").read_text())["models"]["pred"]["structures"]
    assert set(scored) == {"liver", "tumour"} and scored["liver"]["dice_per_case"] == pytest.approx(1.0)
    assert scored["tumour"]["dice_per_case"] == pytest.approx(tumour["dice_per_case"])


@pytest.mark.parametrize("args, message", [
    (["--pred", "p"], "--pred and --truth go together"),
    (["--pred", "p", "--truth", "t", "--model", "m"], "drop --model"),
    (["--pred", "p", "--truth", "t", "--structures", "tumour,liver"], "Expected structures from ('liver', 'tumour')"),
    (["--model", "m", "--input", "i", "--structures", "tumour"], "--structures applies to --pred/--truth"),
])
def test_pred_truth_misuse_is_refused(tmp_path, args, message):
    result = invoke("evaluate", *args, "--out", tmp_path / "o")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert message in result.output
