import signal
import subprocess
import sys
import time

import pytest

from kerasunet.data import RecordsError, load_split_examples, read_manifest, verify_records
from tests.helpers import LPS, REPO, build_settings, write_lits
from tfrecords_builder.build import STATE_FILE, build_records

SETTINGS = dict(val_fraction=0.2, test_fraction=0.2, liver_slices=4, non_liver_slices=3, shard_mb=0.01)
# Runs a build in which closing the shard named argv[3] announces itself on stderr and then
# blocks, so the test can SIGKILL the build at that point. The failure is injected here,
# from outside the builder: the writer's fsync step is wrapped.
DRIVER = """
import sys, time
from tfrecords_builder import writer
from tfrecords_builder.build import BuildSettings, build_records

src, out, target = sys.argv[1:4]
synced = writer._sync

def sync_then_block(path):
    synced(path)
    if path.name == target:
        print("closed " + path.name, file=sys.stderr, flush=True)
        time.sleep(600)

writer._sync = sync_then_block
build_records(BuildSettings(source=src, dataset="lits", out=out, workers=1, **SETTINGS))
"""


def _kill_after_shard(src, out, shard: str, timeout=120.0) -> None:
    """Runs a build in a subprocess, SIGKILLs it once ``shard`` is closed (and before it is renamed)."""
    code = f"SETTINGS = {SETTINGS!r}\n{DRIVER}"
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(out), shard], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    deadline, seen = time.monotonic() + timeout, []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.strip() == f"closed {shard}" or time.monotonic() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert seen and seen[-1].strip() == f"closed {shard}", "".join(seen[-20:])


def test_kill_mid_build_then_rerun_resumes_to_the_same_records(tmp_path):
    src = write_lits(tmp_path / "lits", n=6, affines={1: LPS})
    out = tmp_path / "out"
    _kill_after_shard(src, out, ".tmp-lits-val.tfrecord-00000")
    leftovers = {p.name for p in out.iterdir()}
    assert STATE_FILE in leftovers and "manifest.json" not in leftovers
    assert any(name.startswith(".tmp-lits-val") for name in leftovers)
    with pytest.raises(RecordsError, match=r"manifest\.json: not found"):  # what inspect-records reads
        read_manifest(out)
    train_shards = {p.name: p.stat().st_mtime_ns for p in out.glob("lits-train.tfrecord-*")}
    assert train_shards  # the train split was complete when the build was killed

    messages = []
    manifest = build_records(build_settings(src, out, **SETTINGS), log=messages.append)
    assert "resuming; splits already written: train" in messages[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("lits-train.tfrecord-*")} == train_shards
    shards = {s["file"] for e in manifest["splits"].values() for s in e["shards"]}
    assert {p.name for p in out.iterdir()} == shards | {"manifest.json"}  # no temp or stray files
    assert verify_records(out) == []
    for split, entry in manifest["splits"].items():
        assert len(list(load_split_examples(out, split))) == entry["num_examples"]
    reference = build_records(build_settings(src, tmp_path / "clean", **SETTINGS))
    assert manifest["splits"] == reference["splits"]  # same files, counts and SHA-256 as an unbroken build
