"""Tests of the ``kerasunet`` group: the command listing, lazy TensorFlow, quiet start."""

import subprocess
import sys

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from cli.main import COMMANDS, main
from tests.helpers import ct_phantom, run_cli, threshold_model, write_run


def test_help_lists_every_command_on_one_line():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and result.exception is None
    listing = result.output.splitlines()
    start = listing.index("Commands:")
    rows = [line.split(None, 1) for line in listing[start + 1:] if line.strip()]
    expected = {attr.replace("_", "-"): short for _, attr, short in COMMANDS}
    assert {name: text for name, text in rows} == expected  # every row is "name  one line"
    assert "--verbose" in result.output


def test_help_does_not_import_tensorflow():
    code = "import sys, cli.main; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_output_starts_with_kerasunet_lines(tmp_path):
    # A real run that loads TensorFlow and a model: on a CPU machine TensorFlow's C++ start-up
    # (absl's "All log messages before absl::InitializeLog()", oneDNN, "Could not find cuda
    # drivers", cuInit) writes to stderr unless the command keeps it quiet.
    run = write_run(tmp_path / "run", threshold_model())
    nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(tmp_path / "volume-1.nii"))
    proc = run_cli("predict", "--model", run, "--input", tmp_path / "volume-1.nii", "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("[1/1] volume-1: 6 slices")
    assert proc.stderr == ""


def test_verbose_leaves_tensorflow_logging_alone(monkeypatch):
    import cli.main

    calls = []
    monkeypatch.setattr(cli.main, "quiet_tensorflow", lambda: calls.append("quiet"))
    assert CliRunner().invoke(main, ["--verbose", "synth", "--help"]).exit_code == 0 and calls == []
    assert CliRunner().invoke(main, ["synth", "--help"]).exit_code == 0 and calls == ["quiet"]


def test_every_workers_option_has_the_one_default():
    from kerasunet.core.records_format import DEFAULT_WORKERS

    def options(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            yield from options(sub, f"{path} {name}")
        yield from ((path, p) for p in command.params if p.name == "workers")

    found = {path: param.default for path, param in options(main, "kerasunet")}
    assert "kerasunet build-records" in found and "kerasunet experiment transfer" in found
    assert found == {path: DEFAULT_WORKERS for path in found}


def test_a_usage_error_is_one_line_naming_the_help_to_read():
    from tests.helpers import assert_one_line_error, run_cli

    proc = run_cli("predict", "--no-such-flag")
    assert proc.returncode == 2
    line = assert_one_line_error(proc, r"^Error: No such option '--no-such-flag' \(see 'kerasunet predict --help'\)$")
    assert "Usage:" not in proc.stderr and line.startswith("Error:")
