import json

import pytest
from click.testing import CliRunner

from cli.records import build_records, inspect_records
from tests.helpers import assert_one_line_error, run_cli, write_lits


@pytest.fixture(scope="module")
def cli_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src = write_lits(root / "lits", n=4)
    (root / "lits" / "segmentation-3.nii").unlink()
    out = root / "records"
    result = CliRunner().invoke(build_records, ["--lits", str(src), "--out", str(out), "--workers", "1",
                                                "--val-fraction", "0.3", "--test-fraction", "0",
                                                "--liver-slices", "3", "--non-liver-slices", "1"])
    assert result.exit_code == 0, result.output
    return src, out, result.output


def test_build_prints_splits_and_skips(cli_records):
    _, out, output = cli_records
    assert "train: 2 cases, 8 examples" in output and "val: 1 cases, 4 examples" in output
    assert "skipped volume-3: label missing" in output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["liver_slices"] == 3 and manifest["settings"]["workers"] == 1
    # 2.5D by default: each slice with 2 neighbours a side
    assert (manifest["context"], manifest["channels"], manifest["settings"]["context"]) == (2, 5, 2)
    assert "input: 5 channels a slice (2.5D context 2)" in output.splitlines()


def test_rerun_is_a_noop_with_a_message(cli_records):
    src, out, _ = cli_records
    result = CliRunner().invoke(build_records, ["--lits", str(src), "--out", str(out), "--workers", "2",
                                                "--val-fraction", "0.3", "--test-fraction", "0",
                                                "--liver-slices", "3", "--non-liver-slices", "1"])
    assert result.exit_code == 0 and "nothing to do (use --overwrite to rebuild)" in result.output


@pytest.mark.parametrize("args, message", [
    (["--out", "x"], "Expected exactly one of --input DIR, --lits DIR or --mri DIR."),
    (["--lits", "a", "--mri", "b", "--out", "x"], "Expected exactly one of --input DIR, --lits DIR or --mri DIR."),
    (["--lits", "a", "--out", "x", "--val-cases", "v", "--holdout", "last"], "replace --holdout"),
    (["--lits", "a", "--out", "x", "--hu-window", "5"], "Expected LO,HI (two numbers). Received: '5'"),
    (["--lits", "nowhere", "--out", "x"], "nowhere: not a folder"),
])
def test_bad_invocations_give_one_clear_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(build_records, args)
    # click's own exit (SystemExit), not an exception escaping the command
    assert isinstance(result.exception, SystemExit) and result.exit_code in (1, 2)
    assert message in result.output


def test_inspect_verifies_and_shows(cli_records, tmp_path):
    _, out, _ = cli_records
    png = tmp_path / "grid.png"
    result = CliRunner().invoke(inspect_records, [str(out), "--show", "3", "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert "verified 2 shards: OK" in result.output and "skipped volume-3: label missing" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_names_a_corrupt_shard(cli_records, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cli_records[1], copy)
    shard = next(copy.glob("lits-train.tfrecord-*"))
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    result = CliRunner().invoke(inspect_records, [str(copy)])
    assert result.exit_code == 1
    assert f"{shard}: SHA-256 mismatch" in result.output


def test_inspect_without_manifest(tmp_path):
    result = CliRunner().invoke(inspect_records, [str(tmp_path)])
    assert result.exit_code == 1 and "manifest.json: not found" in result.output


@pytest.mark.parametrize("args, match", [
    (["build-records", "--lits", "nowhere", "--out", "out"], r"^Error: nowhere: not a folder$"),
    (["inspect-records", "empty"], r"^Error: empty/manifest\.json: not found \(build it with"),
])
def test_user_errors_in_a_real_process_are_one_line(args, match, tmp_path):
    # each run imports TensorFlow (~5 s on 2 cores): one case per command
    (tmp_path / "empty").mkdir()
    proc = run_cli(*args, cwd=tmp_path)
    assert_one_line_error(proc, match)
    assert not (tmp_path / "out").exists()  # nothing written, not even an empty output folder
