"""CLI tests of ``kerasunet predict`` (click CliRunner, and one real subprocess)."""

import json
import re

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from tests.helpers import (LPS, GrpcServingDouble, ServingDouble, assert_one_line_error, ct_phantom,
                           expected_ct_labels, free_port, run_cli, threshold_model, write_run)


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
    (["--model", "RUN", "--model-name", "m"], "Error: --model-name/--model-version/--timeout only apply with --server"),
    (["--model", "RUN", "--timeout", "5"], "Error: --model-name/--model-version/--timeout only apply with --server"),
    (["--server", "http://localhost:8501", "--model-name", "m", "--tta"],
     "Error: --tta needs a local --model: the served graph has no flips"),
    (["--model", "RUN", "--model-label", "stable"], "Error: --model-label only applies with --server"),
    (["--server", "grpc://localhost:8500", "--model-name", "m", "--model-version", "2", "--model-label", "stable"],
     "Error: --model-version and --model-label are mutually exclusive: a label names a version"),
    (["--server", "http://localhost:8501", "--model-name", "m", "--grpc-max-message-mb", "8"],
     "Error: --grpc-max-message-mb only applies with --server grpc://HOST:PORT"),
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


def test_served_and_local_masks_are_equal(tmp_path, ct_run):
    from kerasunet.export import export_model

    # a distant bright blob is a second "liver" component: post-processing drops it, on the client too
    hu = ct_phantom((40, 16, 6))
    hu[34:38, 10:14, 2:4] = 100.0
    nib.save(nib.Nifti1Image(hu, LPS), str(tmp_path / "volume-4.nii.gz"))
    export_model(ct_run, tmp_path / "saved_models" / "liver")
    options = ["--input", tmp_path / "volume-4.nii.gz", "--batch-size", "4", "--threshold", "0.6"]
    local = invoke("predict", "--model", ct_run, *options, "--output", tmp_path / "local")
    with ServingDouble(tmp_path / "saved_models" / "liver") as double:
        served = invoke("predict", "--server", double.url, "--model-name", "liver", "--model-version", "1",
                        "--timeout", "30", *options, "--output", tmp_path / "served")
        posts = [(path, len(body["inputs"]["image"])) for method, path, body in double.requests if method == "POST"]
    assert local.exit_code == 0 and served.exit_code == 0, served.output
    assert posts == [("/v1/models/liver/versions/1:predict", n) for n in (4, 2)]
    local_mask, served_mask = (np.asarray(nib.load(str(d / "segmentation-4.nii.gz")).dataobj)
                               for d in (tmp_path / "local", tmp_path / "served"))
    assert not local_mask[34:38, 10:14, 2:4].any() and (local_mask[4:7, 3:6, 2:4] == 2).all()
    np.testing.assert_array_equal(served_mask, local_mask)


def test_grpc_served_canary_and_local_masks_are_equal(tmp_path, ct_run):
    from kerasunet.export import export_model

    hu = ct_phantom((40, 16, 6))
    hu[34:38, 10:14, 2:4] = 100.0  # a second "liver" that post-processing drops, on the client
    nib.save(nib.Nifti1Image(hu, LPS), str(tmp_path / "volume-4.nii.gz"))
    export_model(ct_run, tmp_path / "saved_models" / "liver")
    export_model(ct_run, tmp_path / "saved_models" / "liver", label="canary")
    options = ["--input", tmp_path / "volume-4.nii.gz", "--batch-size", "4", "--threshold", "0.6"]
    local = invoke("predict", "--model", ct_run, *options, "--output", tmp_path / "local")
    with GrpcServingDouble(tmp_path / "saved_models" / "liver") as double:
        served = invoke("predict", "--server", double.url, "--model-name", "liver", "--model-label", "canary",
                        "--grpc-max-message-mb", "1", "--timeout", "30", *options, "--output", tmp_path / "served")
        calls = [(method, request.model_spec.version_label) for method, request in double.requests]
        batches = [request.inputs["image"].tensor_shape.dim[0].size for m, request in double.requests if m == "Predict"]
    assert local.exit_code == 0 and served.exit_code == 0, served.output
    assert calls == [("GetModelMetadata", "canary")] + [("Predict", "canary")] * 2 and batches == [4, 2]
    local_mask, served_mask = (np.asarray(nib.load(str(d / "segmentation-4.nii.gz")).dataobj)
                               for d in (tmp_path / "local", tmp_path / "served"))
    assert not local_mask[34:38, 10:14, 2:4].any() and (local_mask[4:7, 3:6, 2:4] == 2).all()
    np.testing.assert_array_equal(served_mask, local_mask)


def test_subprocess_grpc_server_not_up_is_one_line_on_stderr(tmp_path):
    nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(tmp_path / "v.nii"))
    address = f"grpc://127.0.0.1:{free_port()}"
    proc = run_cli("predict", "--server", address, "--model-name", "liver", "--model-label", "stable",
                   "--timeout", "10", "--input", tmp_path / "v.nii", "--output", tmp_path / "m.nii")
    assert_one_line_error(proc, rf"^Error: {re.escape(address)} liver label stable: GetModelMetadata: server not "
                                r"reachable \(is it running, and is this its gRPC port\?\): UNAVAILABLE: ")
    assert proc.returncode == 1 and not (tmp_path / "m.nii").exists()


def test_unreachable_server_is_one_line(tmp_path):
    nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(tmp_path / "v.nii"))
    result = invoke("predict", "--server", "http://127.0.0.1:1", "--model-name", "liver", "--timeout", "5",
                    "--input", tmp_path / "v.nii", "--output", tmp_path / "o.nii")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert error_lines(result) == ["Error: http://127.0.0.1:1/v1/models/liver/metadata: connection refused "
                                   "(is the server running, and on this port?)"]


def test_subprocess_missing_model_is_one_line_on_stderr(tmp_path):
    nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(tmp_path / "v.nii"))
    proc = run_cli("predict", "--model", tmp_path / "nope", "--input", tmp_path / "v.nii", "--output", tmp_path / "o")
    assert_one_line_error(proc, rf"^Error: {tmp_path / 'nope'}: no model file")
    assert proc.returncode == 1 and proc.stdout == ""


def test_help_documents_postprocessing_defaults():
    text = " ".join(invoke("predict", "--help").output.split())
    assert "CT keeps the largest 3D liver component" in text
    assert "smaller than this (0 keeps all). [default: 10" in text and "[default: 5.0" in text


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
