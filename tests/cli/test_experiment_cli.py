from click.testing import CliRunner

from cli.main import main
from tests.helpers import assert_one_line_error, run_cli


def _transfer(tmp_path, *extra):
    (tmp_path / "lits").mkdir(exist_ok=True)
    (tmp_path / "mri").mkdir(exist_ok=True)
    return ["experiment", "transfer", "--lits", tmp_path / "lits", "--mri", tmp_path / "mri",
            "--out", tmp_path / "exp", *extra]


def test_transfer_rejects_bad_options(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["experiment", "transfer", "--lits", str(tmp_path / "nope"), "--mri",
                                  str(tmp_path), "--out", str(tmp_path / "exp")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "'--lits'" in result.output and "does not exist" in result.output
    for extra, message in ((["--repeats", "0"], "--repeats"), (["--preset", "big"], "'big' is not one of"),
                           (["--config", "paper"], "No such option '--config'")):
        result = runner.invoke(main, [str(a) for a in _transfer(tmp_path, *extra)])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert message in result.output


def test_transfer_reports_a_data_error_in_one_line(tmp_path):
    result = CliRunner().invoke(main, [str(a) for a in _transfer(tmp_path, "--workers", "1")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "lits" in last


def test_transfer_names_an_unreadable_state_file_in_a_real_process(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "state.json").write_text('{"version": 2, "steps": {')
    proc = run_cli(*_transfer(tmp_path))
    assert_one_line_error(proc, r"^Error: .*exp/state\.json: unreadable \(.*\); delete it to rerun every step$")
