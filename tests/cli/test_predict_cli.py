"""CLI tests of ``kerasunet predict`` and ``kerasunet evaluate`` (click CliRunner)."""

import json

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from tests.kerasunet.test_evaluate import lits_folder
from tests.kerasunet.test_predict import LPS, ct_phantom, expected_ct_labels, threshold_model, write_run


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("cli_runs") / "ct_run", threshold_model())


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith(("Error", "failed"))]


def test_single_file_keeps_the_input_orientation(tmp_path, ct_run):
    hu = ct_phantom()
    nib.save(nib.Nifti1Image(hu, LPS), str(tmp_path / "scan.nii.gz"))
    result = invoke("predict", "--model", ct_run, "--input", tmp_path / "scan.nii.gz",
                    "--output", tmp_path / "mask.nii.gz", "--probabilities", "--tta")
    assert result.exit_code == 0, result.output
    assert "[1/1] scan: 6 slices" in result.output
    mask = nib.load(str(tmp_path / "mask.nii.gz"))
    np.testing.assert_allclose(mask.affine, LPS)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_ct_labels(hu))
    assert nib.load(str(tmp_path / "mask_probabilities.nii.gz")).shape == (*hu.shape, 2)


def test_bad_file_gives_one_error_line_and_the_others_are_written(tmp_path, ct_run):
    src = tmp_path / "lits"
    src.mkdir()
    for n in (1, 2, 3):
        nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(src / f"volume-{n}.nii"))
    (src / "volume-2.nii").write_bytes(b"not a nifti at all")
    result = invoke("predict", "--model", ct_run, "--input", src, "--output", tmp_path / "out")
    assert result.exit_code == 1
    lines = error_lines(result)
    assert lines[0].startswith(f"failed: {src / 'volume-2.nii'}: unreadable or truncated NIfTI")
    assert lines[1] == "Error: 1 of 3 volume(s) failed" and len(lines) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["segmentation-1.nii", "segmentation-3.nii"]


@pytest.mark.parametrize("args, message", [
    (["--model", "RUN", "--server", "http://localhost:8501", "--model-name", "m"],
     "Error: --model and --server are mutually exclusive"),
    ([], "Error: give --model RUN_DIR (local) or --server URL --model-name NAME"),
    (["--server", "http://localhost:8501"], "Error: --server needs --model-name"),
    (["--model", "RUN", "--model-name", "m"], "Error: --model-name/--model-version only apply with --server"),
])
def test_model_source_usage_errors(tmp_path, ct_run, args, message):
    args = [str(ct_run) if a == "RUN" else a for a in args]
    result = invoke("predict", *args, "--input", tmp_path, "--output", tmp_path / "o")
    assert result.exit_code == 2 and message in result.output


def test_model_errors_are_one_line(tmp_path, ct_run):
    nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(tmp_path / "v.nii"))
    missing = invoke("predict", "--model", tmp_path / "nope", "--input", tmp_path / "v.nii", "--output", tmp_path / "o")
    assert missing.exit_code == 1 and error_lines(missing) == [
        f"Error: {tmp_path / 'nope'}: no model file (expected a run folder holding best.keras "
        "or a .keras file)"]
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "best.keras").write_bytes(b"garbage")
    (fake / "config.json").write_text('{"model": {"depth": 2}, "data": {}}')
    not_ours = invoke("predict", "--model", fake, "--input", tmp_path / "v.nii", "--output", tmp_path / "o")
    assert not_ours.exit_code == 1 and error_lines(not_ours)[0].startswith(
        f"Error: {fake / 'config.json'}: not a kerasunet run config")
    (fake / "config.json").write_text(json.dumps({"model": {"depth": 2}, "data": {"modality": "ct", "norm": {}}}))
    garbage = invoke("predict", "--model", fake, "--input", tmp_path / "v.nii", "--output", tmp_path / "o")
    assert garbage.exit_code == 1 and error_lines(garbage)[0].startswith(
        f"Error: {fake / 'best.keras'}: not a loadable kerasunet model")
    mismatch = write_run(tmp_path / "mismatch", threshold_model(channels=5), context=1)
    bad = invoke("predict", "--model", mismatch, "--input", tmp_path / "v.nii", "--output", tmp_path / "o")
    assert bad.exit_code == 1 and "model takes 5 input channels but its config has context K=1" in bad.output
    assert len(error_lines(bad)) == 1


def test_server_options_call_the_serving_client(tmp_path, monkeypatch):
    import kerasunet.serving_client

    calls = []

    def fake_remote(input_path, output_path, server, model_name, version=None, batch_size=16, timeout=60.0):
        calls.append((input_path.name, output_path.name, server, model_name, version, batch_size, timeout))
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_bytes(b"mask")
        return output_path

    monkeypatch.setattr(kerasunet.serving_client, "predict_volume_remote", fake_remote)
    nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(tmp_path / "volume-4.nii.gz"))
    result = invoke("predict", "--server", "http://host:8501", "--model-name", "liver", "--model-version", "3",
                    "--batch-size", "8", "--input", tmp_path / "volume-4.nii.gz", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert calls == [("volume-4.nii.gz", "segmentation-4.nii.gz", "http://host:8501", "liver", 3, 8, 60.0)]


def test_help_documents_postprocessing_defaults():
    text = " ".join(invoke("predict", "--help").output.split())
    assert "CT keeps the largest 3D liver component" in text
    assert "smaller than this (0 keeps all). [default: 10" in text and "[default: 5.0" in text


@pytest.mark.parametrize("style", ["repeat", "list"])
def test_evaluate_compare_puts_both_models_in_one_table_and_figure(tmp_path, ct_run, style):
    other = write_run(tmp_path / "other_run", threshold_model(gain=5.0))
    data = lits_folder(tmp_path / "lits")
    models = (["--model", ct_run, "--compare", other] if style == "repeat" else ["--compare", ct_run, other])
    result = invoke("evaluate", *models, "--data", data, "--out", tmp_path / "report", "--overlays", "1")
    assert result.exit_code == 0, result.output
    assert "ct_run: liver Dice/case 1.000" in result.output
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert list(summary["models"]) == ["ct_run", "other_run"] and summary["overlays"] == ["overlays/volume-0.png"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| ct_run | 1.000" in report and "| other_run | " in report
    assert matplotlib.image.imread(tmp_path / "report" / "overlays" / "volume-0.png").shape[1] == 4 * 260


def test_evaluate_errors(tmp_path, ct_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("evaluate", "--model", ct_run, "--data", empty, "--out", tmp_path / "r")
    assert result.exit_code == 1 and error_lines(result) == [
        f"Error: {empty}: no cases found (expected volume-N.nii[.gz] files or case folders holding artery.nii[.gz])"]
    result = invoke("evaluate", "--data", empty, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "give --model RUN_DIR" in result.output


def test_postprocessing_switches_reach_the_settings(tmp_path, ct_run):
    # a distant bright blob is a second "liver" component: kept only with --no-largest-liver-component
    hu = ct_phantom((40, 16, 6))
    hu[34:38, 10:14, 2:4] = 100.0
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "v.nii"))
    for flag, blob_kept in [("--largest-liver-component", False), ("--no-largest-liver-component", True)]:
        result = invoke("predict", "--model", ct_run, "--input", tmp_path / "v.nii", "--output", tmp_path / "m.nii",
                        flag, "--min-tumour-voxels", "0")
        assert result.exit_code == 0, result.output
        mask = np.asarray(nib.load(str(tmp_path / "m.nii")).dataobj)
        assert mask[34:38, 10:14, 2:4].all() == blob_kept and (mask[4:7, 3:6, 2:4] == 2).all()
