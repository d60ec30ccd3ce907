from click.testing import CliRunner

from cli.main import main


def test_transfer_rejects_bad_options_without_a_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["experiment", "transfer", "--lits", str(tmp_path / "nope"), "--mri",
                                  str(tmp_path), "--out", str(tmp_path / "exp")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'--lits'" in result.output and "does not exist" in result.output
    result = runner.invoke(main, ["experiment", "transfer", "--lits", str(tmp_path), "--mri", str(tmp_path),
                                  "--out", str(tmp_path / "exp"), "--repeats", "0"])
    assert result.exit_code == 2 and "--repeats" in result.output


def test_transfer_reports_a_data_error_in_one_line(tmp_path):
    (tmp_path / "lits").mkdir()
    (tmp_path / "mri").mkdir()
    result = CliRunner().invoke(main, ["experiment", "transfer", "--lits", str(tmp_path / "lits"), "--mri",
                                       str(tmp_path / "mri"), "--out", str(tmp_path / "exp")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert "lits" in result.output.strip().splitlines()[-1]
