"""kerasunet.train: the run folder, transfer modes end to end, resume, NaN stop, mixed precision.

Tiny sizes throughout (32x32 or the MRI phantoms' 48x40, filters 4, depth 2, a few steps).
"""

import csv
import json

import numpy as np
import pytest

from kerasunet.train import LOSSES, MODES, TrainError, TrainSettings, fit, train

TINY = dict(batch_size=4, filters=4, depth=2, dropout=0.0, augment=False, oversample_tumour=0.0,
            mixed_precision="off")


def build(source, dataset, out):
    from tfrecords_builder.build import BuildSettings, build_records

    build_records(BuildSettings(source=str(source), dataset=dataset, out=str(out), val_fraction=0.2,
                                test_fraction=0.0, workers=1))
    return out


@pytest.fixture(scope="session")
def ct_records(tiny_phantoms, tmp_path_factory):
    return build(tiny_phantoms / "lits", "lits", tmp_path_factory.mktemp("records") / "lits")


@pytest.fixture(scope="session")
def mri_records(tiny_phantoms, tmp_path_factory):
    return build(tiny_phantoms / "mri", "mri", tmp_path_factory.mktemp("records") / "mri")


@pytest.fixture(scope="module")
def learned(ct_records, tmp_path_factory):
    """A scratch CT run long enough to learn (6 epochs x 6 steps at 32x32)."""
    settings = TrainSettings(records=str(ct_records), out=str(tmp_path_factory.mktemp("runs") / "ct"),
                             epochs=6, steps_per_epoch=6, lr=1e-2, image_size=(32, 32),
                             **{**TINY, "batch_size": 8})
    lines = []
    return fit(settings, progress=lines.append), lines


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tensorboard_scalars(folder):
    """{tag: [value per step]} of the scalar summaries in a TensorBoard log folder."""
    import tensorflow as tf

    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return scalars


def test_resume_refuses_other_model_settings(tmp_path):
    from kerasunet.train import check_run_dir

    old = TrainSettings(records="r", out=str(tmp_path), filters=4)
    (tmp_path / "config.json").write_text(json.dumps({"train": old.to_dict()}))
    check_run_dir(tmp_path, TrainSettings(**{**old.__dict__, "resume": True, "epochs": 9}))
    with pytest.raises(TrainError, match=rf"^{tmp_path}: cannot resume with filters=8; the run used 4$"):
        check_run_dir(tmp_path, TrainSettings(**{**old.__dict__, "resume": True, "filters": 8}))


def test_choices_match_the_library():
    from kerasunet import losses, transfer

    assert MODES == transfer.MODES
    assert LOSSES == losses.LOSSES


def test_run_folder_holds_the_contract(learned, ct_records):
    result, lines = learned
    run = result.run_dir
    for name in ("best.keras", "config.json", "history.csv", "timing.csv", "learning_curves.png"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("ckpt-*.index"))
    assert list((run / "logs" / "train").glob("events.out.tfevents.*"))
    assert tensorboard_scalars(run / "logs" / "validation")["loss"] == pytest.approx(
        [h["val_loss"] for h in result.history], rel=1e-6)
    assert set(tensorboard_scalars(run / "logs" / "train")) >= {"loss", "dice_liver", "iou_tumour", "lr"}
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == {"input_channels": 1, "num_outputs": 2, "filters": 4, "depth": 2, "dropout": 0.0}
    assert set(config["data"]) == {"modality", "context", "norm", "image_size", "records", "manifest_sha256"}
    assert config["data"]["modality"] == "ct" and config["data"]["image_size"] == [32, 32]
    import hashlib
    assert config["data"]["manifest_sha256"] == hashlib.sha256((ct_records / "manifest.json").read_bytes()).hexdigest()
    assert config["train"] == TrainSettings(**{**config["train"], "image_size": (32, 32)}).to_dict()
    assert set(config["train"]) == {f for f in TrainSettings.__dataclass_fields__}
    assert "git_commit" in config and config["kerasunet_version"]
    history = read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "val_loss", "dice_liver", "val_dice_tumour", "iou_tumour", "lr"} <= set(history[0])
    assert [int(r["epoch"]) for r in read_csv(run / "timing.csv")] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["seconds"]) > 0 for r in read_csv(run / "timing.csv"))
    assert any(line.startswith("epoch 1/6 step 6/6 loss ") and " eta " in line for line in lines)
    from kerasunet.core.runs import load_model, resolve_run
    info = resolve_run(run)
    assert info.modality == "ct" and load_model(info).output_shape == (None, None, None, 2)


def test_best_model_is_the_lowest_validation_loss(learned, ct_records):
    import keras

    from kerasunet.data import get_dataset
    from kerasunet.losses import get_loss
    from kerasunet.core.runs import load_model, resolve_run

    history = learned[0].history
    model = load_model(resolve_run(learned[0].run_dir))
    loss_fn = get_loss("bce_dice", ("liver", "tumour"))
    total = count = 0.0
    for x, y in get_dataset(ct_records, "val", 8, training=False, image_size=(32, 32)):  # run batch size
        total += float(loss_fn(y, model(x, training=False))) * len(x)
        count += len(x)
    assert total / count == pytest.approx(min(h["val_loss"] for h in history), rel=1e-4)
    assert keras.mixed_precision.global_policy().name == "float32"


def test_tiny_model_learns_tiny_phantoms(learned):
    history = learned[0].history
    losses = [h["loss"] for h in history]
    assert losses[-1] < 0.8 * losses[0]
    # Chance level: predicting liver everywhere gives Dice 2p/(1+p) ~ 0.1 (liver covers ~5%).
    assert history[0]["dice_liver"] < 0.3
    assert max(h["dice_liver"] for h in history[-3:]) > 0.4


def test_refuses_a_used_run_folder_without_resume(learned, ct_records):
    with pytest.raises(TrainError, match=r"exists and is not empty; pass --resume to continue its run"):
        train(TrainSettings(records=str(ct_records), out=str(learned[0].run_dir), **TINY))


def test_resume_after_interruption_continues_history_and_optimiser(ct_records, tmp_path):
    import tensorflow as tf

    settings = TrainSettings(records=str(ct_records), out=str(tmp_path / "run"), epochs=3, steps_per_epoch=2,
                             lr=1e-3, image_size=(32, 32), **TINY)

    class Killed(Exception):
        pass

    def kill_in_epoch_2(line):
        if line.startswith("epoch 2/3 step"):
            raise Killed()

    with pytest.raises(Killed):
        fit(settings, progress=kill_in_epoch_2)
    first = read_csv(tmp_path / "run" / "history.csv")
    assert [r["epoch"] for r in first] == ["1"]
    lines = []
    result = fit(TrainSettings(**{**settings.__dict__, "resume": True}), progress=lines.append)
    assert any(line.startswith("resuming ") and "after epoch 1" in line for line in lines)
    history = read_csv(tmp_path / "run" / "history.csv")
    assert [r["epoch"] for r in history] == ["1", "2", "3"]
    assert history[0] == first[0]
    assert [r["epoch"] for r in read_csv(tmp_path / "run" / "timing.csv")] == ["1", "2", "3"]
    ckpt = tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
    # 3 epochs x 2 steps: the 2 steps of epoch 1 came back with the optimiser.
    assert tf.train.load_variable(ckpt, "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 6
    assert len(result.history) == 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ct_records, tmp_path, monkeypatch):
    import tensorflow as tf

    from kerasunet import data

    real = data.get_dataset

    def poisoned(*args, training, **kwargs):
        ds = real(*args, training=training, **kwargs)
        if not training:
            return ds
        # batches 0-1 are epoch 1; from batch 2 (epoch 2, step 1) on the images are NaN
        return ds.enumerate().map(lambda i, xy: (tf.where(i >= 2, np.nan, xy[0]), xy[1]))

    monkeypatch.setattr(data, "get_dataset", poisoned)
    settings = TrainSettings(records=str(ct_records), out=str(tmp_path / "run"), epochs=3, steps_per_epoch=2,
                             image_size=(32, 32), **TINY)
    with pytest.raises(TrainError, match=r"^loss became NaN at epoch 2 step 1; last good checkpoint kept at "
                                         r".*checkpoints/ckpt-1$"):
        train(settings)
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("ckpt-1")
    assert [r["epoch"] for r in read_csv(tmp_path / "run" / "history.csv")] == ["1"]


def test_mixed_precision_policy_applies_during_training_and_is_restored(ct_records, tmp_path):
    import keras

    before = keras.mixed_precision.global_policy().name
    lines = []
    settings = TrainSettings(records=str(ct_records), out=str(tmp_path / "run"), epochs=1, steps_per_epoch=1,
                             image_size=(32, 32), **{**TINY, "mixed_precision": "on"})
    result = fit(settings, progress=lines.append)
    assert keras.mixed_precision.global_policy().name == before == "float32"
    assert result.model.get_layer("encoder_1_conv_a").dtype_policy.name == "mixed_float16"
    assert result.model.get_layer("head_sigmoid").dtype_policy.name == "float32"
    assert result.model.output.dtype == "float32"
    assert any("mixed precision on CPU is slow" in line for line in lines)
    assert any("policy mixed_float16" in line for line in lines)
    saved = keras.saving.load_model(tmp_path / "run" / "best.keras")
    assert saved.get_layer("encoder_1_conv_a").dtype_policy.name == "float32"


def test_freeze_keeps_first_blocks_bit_identical_and_trains_the_rest(mri_records, tmp_path):
    import keras

    from kerasunet.model import build_unet

    keras.utils.set_random_seed(1)
    pretrained = build_unet((None, None, 1), 2, filters=4, depth=2)
    pretrained.save(tmp_path / "ct.keras")
    settings = TrainSettings(records=str(mri_records), out=str(tmp_path / "run"), mode="freeze",
                             pretrained=str(tmp_path / "ct.keras"), epochs=1, steps_per_epoch=3,
                             lr=1e-2, freeze_blocks=2, **TINY)
    result = fit(settings)
    trained = keras.saving.load_model(result.run_dir / "best.keras")
    for layer in pretrained.layers:
        if not layer.weights:
            continue
        same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), trained.get_layer(layer.name).get_weights()))
        if layer.name.startswith(("encoder_1_", "encoder_2_")):
            assert same, f"{layer.name} changed although frozen"
        elif layer.name.endswith(("_conv_a", "_conv_b")):
            assert not same, f"{layer.name} did not train"
    head = trained.get_layer("head_conv").get_weights()[0]
    assert head.shape[-1] == 1  # CT head (liver, tumour) -> MRI head (tumour)


def test_init_without_pretrained_is_refused():
    with pytest.raises(TrainError, match=r"^--mode init needs --pretrained \(a CT run folder or \.keras file\)$"):
        TrainSettings(records="r", out="o", mode="init")


def test_mismatched_pretrained_is_one_clear_error(ct_records, tmp_path):
    from kerasunet.model import build_unet

    build_unet((None, None, 1), 2, filters=8, depth=2).save(tmp_path / "wide.keras")
    settings = TrainSettings(records=str(ct_records), out=str(tmp_path / "run"), mode="init",
                             pretrained=str(tmp_path / "wide.keras"), epochs=1, steps_per_epoch=1,
                             image_size=(32, 32), **TINY)
    with pytest.raises(TrainError, match=r"wide\.keras: architecture does not match the new model; "
                                         r"first mismatching layer 'encoder_1_conv_a'") as info:
        train(settings)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("field, value, message", [
    ("image_size", (32, 30), r"Expected image_size height and width multiples of 2\*\*depth=4. "
                             r"Received: image_size=\(32, 30\)"),
    ("epochs", 0, r"Expected epochs >= 1. Received: epochs=0"),
    ("schedule", "step", r"Expected schedule in \('none', 'cosine', 'plateau'\). Received: schedule='step'"),
    ("oversample_tumour", 1.0, r"Expected 0 <= oversample_tumour < 1. Received: oversample_tumour=1.0"),
])
def test_settings_are_checked(field, value, message):
    with pytest.raises(TrainError, match=message):
        TrainSettings(records="r", out="o", depth=2, **{field: value})


def test_records_without_train_split_or_manifest(tmp_path):
    with pytest.raises(TrainError, match=r"no manifest\.json; build records with `kerasunet build-records` first"):
        train(TrainSettings(records=str(tmp_path), out=str(tmp_path / "run")))
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"modality": "ct", "splits": {"val": {"cases": ["a"], "num_examples": 3, "shards": []}}}))
    with pytest.raises(TrainError, match=r"no train split \(0 training examples in manifest\.json\)$"):
        train(TrainSettings(records=str(tmp_path), out=str(tmp_path / "run")))


def test_plateau_halves_learning_rate_and_cosine_decays(ct_records, tmp_path):
    """The schedules on a real (untrained) Loop: plateau halves after 2 bad epochs, cosine decays."""
    from kerasunet.train import Loop

    history = []
    settings = TrainSettings(records=str(ct_records), out=str(tmp_path / "run"), schedule="plateau",
                             steps_per_epoch=1, image_size=(32, 32), lr=1e-3, **TINY)
    from kerasunet.distribute import select_strategy
    from kerasunet.train import read_manifest
    manifest, sha = read_manifest(ct_records)
    loop = Loop(settings, select_strategy(), manifest, sha, tmp_path / "run", tmp_path / "run", history.append)
    loop.plateau(improved=False)
    assert loop.current_lr() == pytest.approx(1e-3)
    loop.plateau(improved=False)
    assert loop.current_lr() == pytest.approx(5e-4)
    assert any("plateau: learning rate now 0.0005" in line for line in history)
    cosine = Loop(TrainSettings(**{**settings.__dict__, "schedule": "cosine", "epochs": 2}), select_strategy(),
                  manifest, sha, tmp_path / "run", tmp_path / "run", history.append)
    assert cosine.current_lr() == pytest.approx(1e-3)
    cosine.optimizer.iterations.assign(1)
    assert cosine.current_lr() == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi / 2)), rel=1e-4)
