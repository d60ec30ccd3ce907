"""Tests of ``kerasunet export`` through click's CliRunner, and one real subprocess."""

import json

import pytest
from click.testing import CliRunner

from cli.main import main
from tests.helpers import assert_one_line_error, parse_models_config, run_cli, write_unet_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_unet_run(tmp_path_factory.mktemp("cli-export") / "run", "ct")


def test_export_then_refuse_existing_version(run, tmp_path):
    out = tmp_path / "saved_models" / "liver"
    result = CliRunner().invoke(main, ["export", "--model", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / '1'} (signature serving_default)" in result.output
    assert ('-v "$PWD/saved_models/liver:/models/liver" tensorflow/serving '
            "--model_config_file=/models/liver/models.config") in result.output
    assert (out / "1" / "saved_model.pb").is_file()
    assert json.loads((out / "export.json").read_text())["latest_version"] == 1

    again = CliRunner().invoke(main, ["export", "--model", str(run / "best.keras"), "--out", str(out),
                                      "--version", "1"])
    assert again.exit_code == 1
    assert again.output == (f"Error: {out / '1'}: version 1 exists; pass --overwrite to replace it "
                            "or omit --version for the next one\n")


def test_canary_label_and_a_third_version_that_would_unserve_stable(run, tmp_path):
    out = tmp_path / "saved_models" / "liver"
    first = CliRunner().invoke(main, ["export", "--model", str(run), "--out", str(out)])
    canary = CliRunner().invoke(main, ["export", "--model", str(run), "--out", str(out), "--label", "canary"])
    assert first.exit_code == 0 and canary.exit_code == 0, canary.output
    assert f"{out / 'models.config'} (labels: stable -> 1, canary -> 2)" in canary.output
    assert f"{out / '2' / 'assets.extra' / 'tf_serving_warmup_requests'}, {out / 'batching_parameters.txt'}" \
        in canary.output
    assert "--enable_batching --batching_parameters_file=/models/liver/batching_parameters.txt" in canary.output
    assert ("then: kerasunet predict --server grpc://localhost:8500 --model-name liver --model-label stable "
            "--input VOL.nii.gz --output MASK.nii.gz") in canary.output
    config = parse_models_config(out / "models.config")
    assert dict(config.version_labels) == {"stable": 1, "canary": 2}
    assert config.model_version_policy.latest.num_versions == 2

    third = CliRunner().invoke(main, ["export", "--model", str(run), "--out", str(out), "--label", "canary"])
    assert third.exit_code == 1 and isinstance(third.exception, SystemExit)
    assert third.output == (f"Error: {out}: label 'stable' would point to version 1, which the policy (the 2 newest "
                            "versions live) no longer serves once version 3 is written (live: 2, 3); export with "
                            "--label stable to move it, or move the newer versions away\n")
    assert sorted(p.name for p in out.iterdir() if p.name.isdigit()) == ["1", "2"]  # nothing written


def test_label_must_be_known(run, tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(run), "--out", str(tmp_path / "liver"),
                                       "--label", "beta"])
    assert result.exit_code == 2 and "Invalid value for '--label'" in result.output
    assert not (tmp_path / "liver").exists()


def test_missing_model(tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "nothing"),
                                       "--out", str(tmp_path / "liver")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith(f"Error: {tmp_path / 'nothing'}: no model file")
    assert not (tmp_path / "liver").exists()


def test_subprocess_bad_model_name_is_one_line_on_stderr(run, tmp_path):
    proc = run_cli("export", "--model", run, "--out", tmp_path / "my model")
    assert_one_line_error(proc, rf"^Error: {tmp_path / 'my model'}: model name 'my model' must be letters")
    assert proc.returncode == 1 and not (tmp_path / "my model").exists()


def test_version_must_be_positive(run, tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(run), "--out", str(tmp_path / "liver"),
                                       "--version", "0"])
    assert result.exit_code == 2 and "Invalid value for '--version'" in result.output


def test_listed_in_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "export" in result.output
