import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kerasunet.data import load_split_examples, verify_records
from tests.tfrecords_builder.test_build import LPS, settings_for, write_lits
from tfrecords_builder.build import STATE_FILE, build_records
from tfrecords_builder.writer import PAUSE_ENV

REPO = Path(__file__).resolve().parents[2]
SETTINGS = dict(val_fraction=0.2, test_fraction=0.2, liver_slices=4, non_liver_slices=3, shard_mb=0.01)


def _run_until(src, out, shard: str, timeout=120.0):
    """Runs a build in a subprocess that pauses after writing ``shard``, then SIGKILLs it."""
    code = ("from tfrecords_builder.build import BuildSettings, build_records\n"
            f"build_records(BuildSettings(source={str(src)!r}, dataset='lits', out={str(out)!r}, "
            f"workers=1, **{SETTINGS!r}))\n")
    env = {**os.environ, PAUSE_ENV: shard, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline, seen, marker = time.monotonic() + timeout, [], f"test pause after shard {shard}"
    try:
        for line in proc.stderr:
            seen.append(line)
            if marker in line or time.monotonic() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(marker in line for line in seen), "".join(seen[-20:])


def test_kill_mid_build_then_rerun_resumes_to_the_same_records(tmp_path):
    src = write_lits(tmp_path / "lits", n=6, affines={1: LPS})
    out = tmp_path / "out"
    _run_until(src, out, ".tmp-lits-val.tfrecord-00000")
    leftovers = {p.name for p in out.iterdir()}
    assert STATE_FILE in leftovers and "manifest.json" not in leftovers
    assert any(name.startswith(".tmp-lits-val") for name in leftovers)
    train_shards = {p.name: p.stat().st_mtime_ns for p in out.glob("lits-train.tfrecord-*")}
    assert train_shards  # the train split was complete when the build was killed

    messages = []
    manifest = build_records(settings_for(src, out, **SETTINGS), log=messages.append)
    assert "resuming; splits already written: train" in messages[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("lits-train.tfrecord-*")} == train_shards
    shards = {s["file"] for e in manifest["splits"].values() for s in e["shards"]}
    assert {p.name for p in out.iterdir()} == shards | {"manifest.json"}  # no temp or stray files
    assert verify_records(out) == []
    for split, entry in manifest["splits"].items():
        assert len(list(load_split_examples(out, split))) == entry["num_examples"]
    reference = build_records(settings_for(src, tmp_path / "clean", **SETTINGS))
    assert manifest["splits"] == reference["splits"]  # same files, counts and SHA-256 as an unbroken build
