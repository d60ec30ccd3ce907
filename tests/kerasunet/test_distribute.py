"""kerasunet.distribute and the training loop under MultiWorkerMirroredStrategy.

Multi-worker strategies must be set up before TensorFlow starts, so those runs happen in
fresh subprocesses. Training under MirroredStrategy on 2 logical CPUs, against a one-device
reference, is tested in test_steps.py.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kerasunet.distribute import DistributeError, is_chief, parse_devices, tf_config

ROOT = Path(__file__).resolve().parents[2]

# Trains a tiny scratch model with kerasunet.train.fit, saves the final weights and losses.
WORKER = r"""
import json, sys
import numpy as np
from kerasunet.train import TrainSettings, fit
records, out, result = sys.argv[1:4]
settings = TrainSettings(records=records, out=out, epochs=2, steps_per_epoch=3, batch_size=4, lr=1e-2,
                         filters=4, depth=2, dropout=0.0, image_size=(32, 32), augment=False,
                         oversample_tumour=0.0, mixed_precision="off")
fit_result = fit(settings, progress=lambda line: print(line, flush=True))
np.savez(result + ".npz", *fit_result.model.get_weights())
json.dump([h["loss"] for h in fit_result.history], open(result + ".json", "w"))
"""


@pytest.fixture(scope="module")
def records(tiny_records):
    return tiny_records("lits")


def env_for(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "KERASUNET_DEVICES")}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow", **extra)
    return env


def start_worker(records, out, result, env):
    return subprocess.Popen([sys.executable, "-c", WORKER, str(records), str(out), str(result)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"worker timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return output


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("value, count", [("cpu:2", 2), (" cpu:4 ", 4)])
def test_parse_devices(value, count):
    assert parse_devices(value) == count


@pytest.mark.parametrize("value", ["gpu:2", "cpu:0", "cpu", "2"])
def test_parse_devices_rejects(value):
    with pytest.raises(DistributeError, match=r"^Expected KERASUNET_DEVICES=cpu:N with N >= 1. Received: "):
        parse_devices(value)


def test_tf_config_parsing(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert tf_config() is None
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}}')
    with pytest.raises(DistributeError, match=r"^Expected TF_CONFIG as JSON with 'cluster' and 'task'"):
        tf_config()
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}')
    assert tf_config()["task"]["index"] == 0


@pytest.mark.parametrize("cluster, task, chief", [
    ({"worker": ["a", "b"]}, ("worker", 0), True),
    ({"worker": ["a", "b"]}, ("worker", 1), False),
    ({"chief": ["c"], "worker": ["a"]}, ("worker", 0), False),
    ({"chief": ["c"], "worker": ["a"]}, ("chief", 0), True),
])
def test_is_chief(cluster, task, chief):
    assert is_chief({"cluster": cluster, "task": {"type": task[0], "index": task[1]}}) is chief
    assert is_chief(None)


def test_default_strategy_on_one_device(monkeypatch):
    from kerasunet.distribute import select_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("KERASUNET_DEVICES", raising=False)
    assert select_strategy().num_replicas_in_sync == 1


def test_two_local_workers_end_with_identical_weights(records, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    procs = [start_worker(records, tmp_path / "run", tmp_path / f"worker{i}",
                          env_for(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})))
             for i in range(2)]
    outputs = [finish(proc) for proc in procs]
    assert all("CollectiveAllReduceStrategy with 2 replica(s)" in out for out in outputs)
    first, second = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert first.files == second.files
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name])
    losses = json.loads((tmp_path / "worker0.json").read_text())
    assert losses == json.loads((tmp_path / "worker1.json").read_text())
    assert losses[-1] < losses[0]
    # Only the chief (worker 0) wrote the run folder; worker 1 wrote to a temporary folder.
    assert f"writing {tmp_path / 'run'}" in outputs[0] and f"writing {tmp_path / 'run'}" not in outputs[1]
    assert [r.split(",")[0] for r in (tmp_path / "run" / "history.csv").read_text().splitlines()[1:]] == ["1", "2"]


def test_num_workers(monkeypatch):
    from kerasunet.distribute import num_workers

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert num_workers() == 1
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["c:1"], "worker": ["a:1", "b:1"], "ps": ["p:1"]},
                                                "task": {"type": "worker", "index": 1}}))
    assert num_workers() == 3
