"""The Beam engine builds the local engine's records: the same examples, splits, skips and manifest facts.

One module-scoped pair of builds of the MRI phantoms (two of them defective): the local engine
in-process, and Beam's DirectRunner in multi-process mode with 2 workers (slow to start, so it
is built once and shared).
"""

import collections
import os
import sys

import pytest
import tensorflow as tf
from click.testing import CliRunner

from cli.records import build_records as build_records_cli
from cli.records import inspect_records
from kerasunet.core.records_format import SHARD_RE, TEMP_PREFIX, shard_name
from kerasunet.data import RecordsError, read_manifest, verify_records
from tfrecords_builder.build import RUN_ONLY, BuildError, BuildSettings, build_records
from tfrecords_builder.writer import record_size

MULTI_PROCESS = "--direct_num_workers=2 --direct_running_mode=multi_processing"
SETTINGS = dict(dataset="mri", val_fraction=0.25, test_fraction=0.25, shard_mb=0.04)
SHARD_BYTES = int(SETTINGS["shard_mb"] * 1e6)
DEFECTS = {"FZMC002", "FZMC004"}  # label one slice short; no label file (see tiny_phantoms)


def _settings(source, out, **kw) -> BuildSettings:
    return BuildSettings(source=str(source), out=str(out), workers=1, **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def builds(tiny_phantoms, tmp_path_factory):
    """``{"local": (out, manifest), "beam": (out, manifest)}`` of the same MRI phantoms."""
    pytest.importorskip("apache_beam")
    root = tmp_path_factory.mktemp("engines")
    source = tiny_phantoms / "mri"
    return {
        "local": (root / "local", build_records(_settings(source, root / "local"))),
        "beam": (root / "beam", build_records(_settings(source, root / "beam", engine="beam",
                                                        beam_options=MULTI_PROCESS))),
    }


def _records(out, manifest, split) -> list[bytes]:
    files = [str(out / s["file"]) for s in manifest["splits"][split]["shards"]]
    return [r.numpy() for r in tf.data.TFRecordDataset(files)]


def test_same_examples_per_split(builds):
    (local_out, local), (beam_out, beam) = builds["local"], builds["beam"]
    assert set(beam["splits"]) == set(local["splits"]) == {"train", "val", "test"}
    for split in local["splits"]:
        local_records, beam_records = _records(local_out, local, split), _records(beam_out, beam, split)
        assert local_records  # not two empty builds
        assert collections.Counter(beam_records) == collections.Counter(local_records), split


def test_same_manifest_facts_and_engine_named(builds):
    local, beam = builds["local"][1], builds["beam"][1]
    assert (local["engine"], beam["engine"]) == ("local", "beam")
    assert beam["settings"]["beam_options"] == MULTI_PROCESS
    assert beam["settings_hash"] == local["settings_hash"]  # the engine does not change what is built
    for key in set(local) - {"engine", "settings", "splits"}:
        assert beam[key] == local[key], key
    assert set(beam) == set(local)
    for split, entry in local["splits"].items():
        assert {k: v for k, v in beam["splits"][split].items() if k != "shards"} == \
               {k: v for k, v in entry.items() if k != "shards"}
    own = {k: v for k, v in local["settings"].items() if k not in RUN_ONLY}
    assert {k: v for k, v in beam["settings"].items() if k not in RUN_ONLY} == own


def test_bad_cases_are_skipped_with_the_same_reasons(builds):
    local, beam = builds["local"][1], builds["beam"][1]
    assert {s["case_id"] for s in beam["skipped"]} == DEFECTS
    assert beam["skipped"] == local["skipped"]
    reasons = {s["case_id"]: s["reason"] for s in beam["skipped"]}
    assert reasons["FZMC004"] == "label missing"
    assert "differs from label shape" in reasons["FZMC002"]
    assert not DEFECTS & set(beam["cases"])


def test_beam_shards_have_tfds_names_and_the_local_size_rule(builds):
    out, manifest = builds["beam"]
    assert verify_records(out) == []  # SHA-256 and counts, as inspect-records checks them
    files = {p.name for p in out.iterdir()}
    listed = {s["file"] for e in manifest["splits"].values() for s in e["shards"]}
    assert files == listed | {"manifest.json"}  # no temporary folder or stray file left
    for split, entry in manifest["splits"].items():
        total = len(entry["shards"])
        assert [s["file"] for s in entry["shards"]] == [shard_name("mri", split, i, total) for i in range(total)]
        for i, shard in enumerate(entry["shards"]):
            sizes = [record_size(r.numpy()) for r in tf.data.TFRecordDataset(str(out / shard["file"]))]
            if i < total - 1:  # closed at the target size, not before
                assert sum(sizes) >= SHARD_BYTES > sum(sizes[:-1])
            else:
                assert sum(sizes[:-1]) < SHARD_BYTES
    assert len(manifest["splits"]["train"]["shards"]) > 1  # the rule was exercised


def test_inspect_records_accepts_the_beam_build(builds):
    out, manifest = builds["beam"]
    result = CliRunner().invoke(inspect_records, [str(out)])
    assert result.exit_code == 0, result.output
    total = sum(len(e["shards"]) for e in manifest["splits"].values())
    assert f"verified {total} shards: OK" in result.output


def test_a_finished_build_is_kept_whichever_engine_reruns_it(builds, tiny_phantoms):
    source, out = tiny_phantoms / "mri", builds["local"][0]
    messages = []
    again = build_records(_settings(source, out, engine="beam"), log=messages.append)
    assert again == read_manifest(out) and again["engine"] == "local"
    assert "already built with these settings" in messages[0]
    with pytest.raises(BuildError, match="holds a finished build with different settings .*seed: 0 -> 1"):
        build_records(_settings(source, out, engine="beam", seed=1))


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way up handles it."""


def test_killed_build_leaves_no_valid_folder_and_a_rerun_builds_the_same_records(
        builds, tiny_phantoms, tmp_path, monkeypatch):
    pytest.importorskip("apache_beam")
    out, source = tmp_path / "out", tiny_phantoms / "mri"
    rename, renamed = os.rename, []

    def rename_then_die(src, dst):  # the build dies after moving one shard into place
        if renamed:
            raise Killed()
        rename(src, dst)
        renamed.append(dst)

    monkeypatch.setattr(os, "rename", rename_then_die)
    with pytest.raises(Killed):
        build_records(_settings(source, out, engine="beam"))  # in-process DirectRunner
    monkeypatch.undo()

    assert len(renamed) == 1 and SHARD_RE.match(os.path.basename(renamed[0]))
    assert any(p.name.startswith(TEMP_PREFIX) for p in out.iterdir())  # the rest is still in the temp folder
    assert not list(tmp_path.rglob("manifest.json"))  # no folder here can pass inspect-records
    with pytest.raises(RecordsError, match=r"manifest\.json: not found"):
        read_manifest(out)

    manifest = build_records(_settings(source, out, engine="beam"))
    assert verify_records(out) == []
    assert {p.name for p in out.iterdir()} == {s["file"] for e in manifest["splits"].values()
                                              for s in e["shards"]} | {"manifest.json"}
    # byte-identical to the 2-worker build: shard contents do not depend on the runner or workers
    assert manifest["splits"] == builds["beam"][1]["splits"]


def test_missing_beam_names_the_extra(tiny_phantoms, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if apache-beam were not installed
    out = tmp_path / "out"
    result = CliRunner().invoke(build_records_cli, ["--mri", str(tiny_phantoms / "mri"), "--out", str(out),
                                                    "--engine", "beam"])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --engine beam needs Apache Beam, which is not installed: pip install 'kerasunet[beam]'"]
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--beam-options", "--runner=DirectRunner"], "--beam-options needs --engine beam."),
    (["--engine", "beam", "--workers", "2"], "--workers is the local engine's"),
    (["--engine", "beam", "--beam-options", "--runner=NoSuchRunner"], "NoSuchRunner"),
    (["--engine", "beam", "--beam-options", "--project='unclosed"], "Expected --beam-options as command-line"),
])
def test_bad_engine_options_give_one_line(args, message, tiny_phantoms, tmp_path):
    pytest.importorskip("apache_beam")
    result = CliRunner().invoke(build_records_cli, ["--mri", str(tiny_phantoms / "mri"),
                                                    "--out", str(tmp_path / "out"), *args])
    assert isinstance(result.exception, SystemExit) and result.exit_code in (1, 2)
    assert message in result.output
    assert not (tmp_path / "out").exists()
