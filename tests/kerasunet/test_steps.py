"""kerasunet.steps: the training step's loss and update are those of the global batch on any replica count.

Two logical CPU devices must be made before TensorFlow starts, so the distributed checks
run in one fresh subprocess (``CHECK``) that writes its numbers to JSON; the tests compare them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kerasunet.core.choices import LOSSES

ROOT = Path(__file__).resolve().parents[2]

# 1. For every loss: one SGD step with kerasunet.steps.make_train_step under the default
#    strategy (1 replica) and under MirroredStrategy over 2 logical CPUs, from the same
#    weights on the same global batch, next to a plain one-device reference (GradientTape
#    around the loss's ordinary __call__). The model has no BatchNorm and no dropout: BatchNorm
#    normalises with each replica's local batch, which would differ from one device on purpose.
# 2. kerasunet.train.fit on 2 replicas with one fixed batch as both training and validation set
#    (data.get_dataset replaced, and the strategy above reused) and a learning rate of 1e-9: history's loss must be the loss of
#    that batch with BatchNorm in training mode on each replica's half, and val_loss the loss in
#    inference mode, both computed by the plain loss on the whole batch.
CHECK = r"""
import json, sys
import numpy as np
from kerasunet.distribute import make_logical_cpus
make_logical_cpus(2)
import keras
import tensorflow as tf
from kerasunet import data, distribute
from kerasunet.core.choices import LOSSES
from kerasunet.core.labels import targets_from_labels_np
from kerasunet.data import targets_from_labels
from kerasunet.losses import get_loss
from kerasunet.steps import make_train_step
from kerasunet.train import TrainSettings, fit

records, out, result_path = sys.argv[1:4]
NAMES, LR = ("liver", "tumour"), 0.5
rng = np.random.default_rng(0)
x = rng.normal(size=(4, 8, 8, 1)).astype("float32")
labels = np.zeros((4, 8, 8), "uint8")  # what the reader delivers; the step expands it
labels[:, 1:6, 1:7] = 1  # liver
labels[:2, 2:4, 2:4] = 2  # tumour (inside the liver) on the first replica's examples only
labels[3, 4:6, 3:6] = 2
y = targets_from_labels_np(labels, NAMES)


def tiny_model():
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(2, 1, activation="sigmoid")(hidden))


keras.utils.set_random_seed(0)
initial = tiny_model().get_weights()


def distributed_step(strategy, name):
    with strategy.scope():
        model = tiny_model()
        model.set_weights(initial)
        optimizer = keras.optimizers.SGD(LR)
        optimizer.build(model.trainable_variables)
    step = make_train_step(model, optimizer, get_loss(name, NAMES), [], strategy,
                           lambda labels: targets_from_labels(labels, NAMES))
    batches = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, labels)))
    loss = float(step(iter(batches)))
    return {"loss": loss, "weights": [w.tolist() for w in model.get_weights()]}


def reference_step(name):
    model = tiny_model()
    model.set_weights(initial)
    with tf.GradientTape() as tape:
        loss = get_loss(name, NAMES)(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    for variable, grad in zip(model.trainable_variables, grads):
        variable.assign_sub(LR * grad)
    return {"loss": float(loss), "weights": [w.tolist() for w in model.get_weights()]}


two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
steps = {name: {"reference": reference_step(name), "one": distributed_step(tf.distribute.get_strategy(), name),
                "two": distributed_step(two, name)} for name in LOSSES}

# --- 2. history.csv through fit on 2 replicas ---
batch = next(iter(data.get_dataset(records, "train", 4, training=False, image_size=(32, 32))))
real_get_dataset = data.get_dataset
data.get_dataset = lambda *args, training, **kwargs: (
    tf.data.Dataset.from_tensors(batch).repeat() if training else tf.data.Dataset.from_tensors(batch))
distribute.select_strategy = lambda: two  # one MirroredStrategy per process: collective keys are per instance
history, lines = {}, []
for name in ("bce",):
    settings = TrainSettings(records=records, out=f"{out}/{name}", epochs=1, steps_per_epoch=1, batch_size=4,
                             lr=1e-9, loss=name, filters=4, depth=2, dropout=0.0, image_size=(32, 32),
                             augment=False, oversample_tumour=0.0, mixed_precision="off")
    result = fit(settings, progress=lines.append)
    model, loss_fn = result.model, get_loss(name, NAMES)
    bx, by = batch[0], targets_from_labels_np(batch[1].numpy(), NAMES)
    val_reference = float(loss_fn(by, model(bx, training=False)))  # before training=True moves BatchNorm
    halves = tf.concat([model(bx[:2], training=True), model(bx[2:], training=True)], axis=0)
    history[name] = {"row": result.history[0], "train_reference": float(loss_fn(by, halves)),
                     "val_reference": val_reference,
                     "csv": open(f"{out}/{name}/history.csv").read(), "run": f"{out}/{name}"}
json.dump({"replicas": two.num_replicas_in_sync, "lines": lines, "initial": [w.tolist() for w in initial],
           "steps": steps, "history": history}, open(result_path, "w"))
"""


@pytest.fixture(scope="module")
def checked(tiny_records, tmp_path_factory):
    """The numbers of ``CHECK``, run once in a fresh process with 2 logical CPUs."""
    tmp = tmp_path_factory.mktemp("steps")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "KERASUNET_DEVICES")}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
               KERASUNET_DEVICES="cpu:2")
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tiny_records("lits")), str(tmp / "runs"),
                           str(tmp / "result.json")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads((tmp / "result.json").read_text())


@pytest.mark.parametrize("name", LOSSES)
def test_one_and_two_replicas_take_the_same_step(checked, name):
    assert checked["replicas"] == 2
    runs = checked["steps"][name]
    reference = runs["reference"]
    for replicas in ("one", "two"):
        assert runs[replicas]["loss"] == pytest.approx(reference["loss"], abs=1e-5), replicas
        for got, want in zip(runs[replicas]["weights"], reference["weights"]):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=replicas)
    moved = max(np.abs(np.subtract(w, i)).max() for w, i in zip(reference["weights"], checked["initial"]))
    assert moved > 1e-3  # the step changed the weights, so a wrong gradient scale would show


def test_history_loss_and_val_loss_are_both_the_batch_loss(checked):
    entry = checked["history"]["bce"]
    row = entry["row"]
    assert row["loss"] == pytest.approx(entry["train_reference"], rel=1e-4)
    assert row["val_loss"] == pytest.approx(entry["val_reference"], rel=1e-4)
    header, values = entry["csv"].splitlines()[:2]
    written = dict(zip(header.split(","), values.split(",")))
    assert float(written["loss"]) == pytest.approx(row["loss"]) and float(written["val_loss"]) == pytest.approx(
        row["val_loss"])
    assert "training on MirroredStrategy with 2 replica(s)" in checked["lines"][0]
    assert (Path(entry["run"]) / "best.keras").is_file()
