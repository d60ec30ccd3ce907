"""Tests of ``kerasunet synth`` through click's CliRunner, and one real subprocess."""

import nibabel as nib
import pytest
from click.testing import CliRunner

from cli.main import main
from cli.synth import synth
from tests.helpers import assert_one_line_error, run_cli

TINY = ["--ct-cases", "2", "--mri-cases", "4", "--size", "32", "--mri-shape", "16x16x4",
        "--ct-slices", "6:8", "--seed", "3"]


def test_synth_writes_both_layouts_and_reports_progress(tmp_path):
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path), *TINY, "--phase", "portal"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("[ct 1/2] volume-0.nii 32x32x")
    assert lines[1].startswith("[ct 2/2] volume-1.nii")
    assert lines[2].startswith("[mri 1/4] FZMC001/portal.nii 16x16x4")
    assert lines[-2] == f"CT phantoms:  {tmp_path / 'lits'} (2 cases)"
    assert lines[-1].startswith(f"MRI phantoms: {tmp_path / 'mri'} (4 cases; defects FZMC002: ")
    assert "FZMC004: no label file" in lines[-1]
    assert nib.load(str(tmp_path / "lits" / "volume-1.nii")).shape[:2] == (32, 32)
    assert (tmp_path / "mri" / "FZMC003" / "label.nii").exists()
    assert not (tmp_path / "mri" / "FZMC004" / "label.nii").exists()


def test_compress_and_seed_are_reproducible(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(synth, ["--out", str(tmp_path / name), *TINY, "--compress"])
        assert result.exit_code == 0, result.output
    first = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
    assert len(first) == 2 * 2 + 2 * 4 - 1  # FZMC004 has no label
    for rel in first:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_only_one_modality(tmp_path):
    result = CliRunner().invoke(synth, ["--out", str(tmp_path), *TINY, "--mri-cases", "0"])
    assert result.exit_code == 0, result.output
    assert "MRI phantoms" not in result.output and not (tmp_path / "mri").exists()


@pytest.mark.parametrize("args, message", [
    (["--size", "0"], "Invalid value for '--size': 0 is not in the range 32<=x<=2048"),
    (["--size", "4096"], "Invalid value for '--size'"),
    (["--mri-shape", "320x260"], "Invalid value for '--mri-shape': Expected HxWxD with three positive "
                                 "integers, e.g. 320x260x72. Received: '320x260'"),
    (["--mri-shape", "8x8x8"], "Invalid value for --mri-shape: Expected shape=(H, W, D)"),
    (["--ct-slices", "80"], "Invalid value for '--ct-slices': Expected MIN:MAX"),
    (["--ct-slices", "90:80"], "Invalid value for --ct-slices: Expected slices=(min, max)"),
    (["--phase", "label"], "Invalid value for --phase: Expected phase"),
    (["--seed", "-1"], "Invalid value for '--seed'"),
    (["--ct-cases", "0", "--mri-cases", "0"], "Expected ct_cases >= 0, mri_cases >= 0 and at least one case"),
])
def test_bad_options_give_one_clear_error(tmp_path, args, message):
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # click's usage error, not a crash
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_subprocess_bad_option_is_one_line_on_stderr(tmp_path):
    proc = run_cli("synth", "--out", tmp_path / "out", *TINY, "--ct-slices", "90:80")
    assert_one_line_error(proc, r"^Error: Invalid value for --ct-slices: Expected slices=\(min, max\)")
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "out").exists()


def test_out_is_required_and_help_is_one_line():
    runner = CliRunner()
    result = runner.invoke(synth, [])
    assert result.exit_code == 2 and "Missing option '--out'" in result.output
    listing = runner.invoke(main, ["--help"]).output
    assert any(line.split()[:1] == ["synth"] and "phantoms" in line for line in listing.splitlines())
    assert "--mri-shape HxWxD" in runner.invoke(synth, ["--help"]).output
