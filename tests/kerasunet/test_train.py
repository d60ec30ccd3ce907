"""kerasunet.train: the run folder, transfer modes end to end, resume, NaN stop, unreadable shards, mixed precision.

Tiny sizes throughout (32x32 or the MRI phantoms' 48x40, filters 4, depth 2, a few steps).
"""

import csv
import json
import math
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from kerasunet.train import TrainError, TrainSettings, fit, train

TINY = dict(batch_size=4, filters=4, depth=2, dropout=0.0, augment=False, oversample_tumour=0.0,
            mixed_precision="off")


@pytest.fixture(scope="module")
def ct_records(tiny_records):
    return tiny_records("lits")


@pytest.fixture(scope="module")
def mri_records(tiny_records):
    return tiny_records("mri")


@pytest.fixture(scope="module")
def learned(ct_records, tmp_path_factory):
    """A scratch CT run long enough to learn (6 epochs x 6 steps at 32x32)."""
    settings = TrainSettings(records=str(ct_records), out=str(tmp_path_factory.mktemp("runs") / "ct"),
                             epochs=6, steps_per_epoch=6, lr=1e-2, schedule="none", image_size=(32, 32),
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
    channels = json.loads((ct_records / "manifest.json").read_text())["channels"]
    assert config["model"] == {"input_channels": channels, "num_outputs": 2, "outputs": ["liver", "tumour"], "filters": 4, "depth": 2, "dropout": 0.0}
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


@pytest.fixture(scope="module")
def learned_by_loss(ct_records, tmp_path_factory):
    """A short CT run whose best.keras is picked by validation loss (the research's rule)."""
    settings = TrainSettings(records=str(ct_records), out=str(tmp_path_factory.mktemp("runs") / "ct"),
                             epochs=4, steps_per_epoch=3, lr=1e-2, image_size=(32, 32), monitor="loss",
                             **{**TINY, "batch_size": 8})
    return fit(settings, progress=lambda line: None)


def validation_scores(run_dir, ct_records):
    """Loss and per-channel Dice of a run's best.keras on the validation split (run batch size)."""
    from kerasunet.core.runs import load_model, resolve_run
    from kerasunet.data import get_dataset, targets_from_labels
    from kerasunet.losses import get_loss
    from kerasunet.metrics import metrics_for

    model = load_model(resolve_run(run_dir))
    loss_fn, metrics = get_loss("bce_dice", ("liver", "tumour")), metrics_for(("liver", "tumour"))
    total = count = 0.0
    for x, labels in get_dataset(ct_records, "val", 8, training=False, image_size=(32, 32)):
        y, pred = targets_from_labels(labels, ("liver", "tumour")), model(x, training=False)
        total += float(loss_fn(y, pred)) * len(x)
        count += len(x)
        for metric in metrics:
            metric.update_state(y, pred)
    return total / count, {m.name: float(m.result()) for m in metrics if m.name.startswith("dice_")}


def assert_best_marks_each_improvement(history, key, sign):
    best = math.inf
    for row in history:
        assert row["best"] == int(sign * row[key] < best), row
        best = min(best, sign * row[key])


def test_best_model_has_the_highest_mean_validation_dice(learned, ct_records):
    import keras

    result = learned[0]
    _, dice = validation_scores(result.run_dir, ct_records)
    kept = max(result.history, key=lambda h: h["val_dice_ema"])  # the first of equals, as training keeps
    assert (dice["dice_liver"] + dice["dice_tumour"]) / 2 == pytest.approx(kept["val_dice"], rel=1e-3)
    assert all(h["val_dice"] == pytest.approx((h["val_dice_liver"] + h["val_dice_tumour"]) / 2)
               for h in result.history)
    ema = [result.history[0]["val_dice"]]
    for h in result.history[1:]:
        ema.append(0.9 * ema[-1] + 0.1 * h["val_dice"])
    assert [h["val_dice_ema"] for h in result.history] == pytest.approx(ema, rel=1e-6)
    assert_best_marks_each_improvement(result.history, "val_dice_ema", -1)
    assert [int(r["best"]) for r in read_csv(result.run_dir / "history.csv")] == [h["best"] for h in result.history]
    assert json.loads((result.run_dir / "config.json").read_text())["train"]["monitor"] == "dice"
    assert keras.mixed_precision.global_policy().name == "float32"


def test_monitor_loss_keeps_the_lowest_validation_loss(learned_by_loss, ct_records):
    loss, _ = validation_scores(learned_by_loss.run_dir, ct_records)
    history = learned_by_loss.history
    assert loss == pytest.approx(min(h["val_loss"] for h in history), rel=1e-4)
    assert_best_marks_each_improvement(history, "val_loss", 1)
    assert json.loads((learned_by_loss.run_dir / "config.json").read_text())["train"]["monitor"] == "loss"


@pytest.mark.parametrize("row, monitor, expected", [
    ({"loss": 0.5, "val_loss": 0.7, "val_dice": 0.4, "val_dice_ema": 0.3}, "dice", -0.3),
    ({"loss": 0.5, "val_loss": 0.7, "val_dice": 0.4, "val_dice_ema": 0.3}, "loss", 0.7),
    ({"loss": 0.5}, "dice", 0.5),  # no validation split: the training loss, best.keras the last epoch
])
def test_monitored_value_is_minimised(row, monitor, expected):
    from kerasunet.train import monitored

    assert monitored(row, monitor) == expected


def test_smoothed_val_dice_does_not_keep_an_early_spike():
    """The fifth quality run's pattern: a spike in epoch 2, then a steadily better model."""
    from kerasunet.train import smoothed_val_dice

    history = []
    for val_dice in (0.3, 0.81, 0.6, 0.78, 0.79, 0.80, 0.80, 0.80, 0.80, 0.80, 0.80, 0.80):
        history.append({"val_dice": val_dice, "val_dice_ema": smoothed_val_dice(history, val_dice)})
    ema = [h["val_dice_ema"] for h in history]
    assert ema[0] == 0.3 and ema[1] == pytest.approx(0.9 * 0.3 + 0.1 * 0.81)
    assert max(range(len(ema)), key=ema.__getitem__) == len(ema) - 1  # the raw maximum is epoch 2
    assert smoothed_val_dice([{"val_dice": 0.5}], 0.7) == 0.7  # a resumed run's rows without the column


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
    channels = json.loads((mri_records / "manifest.json").read_text())["channels"]
    pretrained = build_unet((None, None, channels), 2, filters=4, depth=2)
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

    channels = json.loads((ct_records / "manifest.json").read_text())["channels"]
    build_unet((None, None, channels), 2, filters=8, depth=2).save(tmp_path / "wide.keras")
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
    ("augment_intensity", "strong", r"Expected augment_intensity in \('standard', 'mild'\). "
                                    r"Received: augment_intensity='strong'"),
])
def test_settings_are_checked(field, value, message):
    with pytest.raises(TrainError, match=message):
        TrainSettings(records="r", out="o", depth=2, **{field: value})


@pytest.mark.parametrize("dataset, expected", [
    ("lits", dict(epochs=5, batch_size=10, lr=1e-4)),
    ("mri", dict(epochs=8, batch_size=18, lr=5e-4)),
])
def test_paper_preset_is_the_research_settings_per_modality(tiny_records, dataset, expected):
    from kerasunet.train_settings import settings_from_options

    records = str(tiny_records(dataset))
    options = {**TrainSettings(records=records, out="o").to_dict(), "image_size": None, "preset": "paper"}
    settings = settings_from_options(options, given={"records", "out", "preset"})
    research = dict(loss="bce", filters=32, depth=4, dropout=0.5, schedule="none", augment=False,
                    oversample_tumour=0.0, monitor="loss", preset="paper")
    assert {k: getattr(settings, k) for k in {**expected, **research}} == {**expected, **research}
    # Options on the command line win over the preset's values.
    mine = settings_from_options({**options, "epochs": 2, "filters": 8}, given={"records", "out", "preset", "epochs",
                                                                              "filters"})
    assert (mine.epochs, mine.filters, mine.lr, mine.loss) == (2, 8, expected["lr"], "bce")
    # Without a preset every option counts as given: the defaults stay.
    plain = settings_from_options({**options, "preset": None})
    assert plain == TrainSettings(records=records, out="o")


def test_preset_needs_readable_records(tmp_path):
    from kerasunet.train_settings import settings_from_options

    options = {**TrainSettings(records=str(tmp_path), out="o").to_dict(), "image_size": None, "preset": "paper"}
    with pytest.raises(TrainError, match=rf"^{re.escape(str(tmp_path / 'manifest.json'))}: cannot read the "
                                         r"records' modality for --preset \(FileNotFoundError: [^\n]+\)$"):
        settings_from_options(options, given={"records", "out", "preset"})
    with pytest.raises(TrainError, match=r"^Expected preset in \(None, 'paper'\)\. Received: preset='fast'$"):
        TrainSettings(records="r", out="o", preset="fast")
    with pytest.raises(TrainError, match=r"^Expected monitor in \('dice', 'loss'\)\. Received: monitor='iou'$"):
        TrainSettings(records="r", out="o", monitor="iou")


def test_records_without_train_split_or_manifest(tmp_path):
    with pytest.raises(TrainError, match=r"no manifest\.json; build records with `kerasunet build-records` first"):
        train(TrainSettings(records=str(tmp_path), out=str(tmp_path / "run")))
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"modality": "ct", "splits": {"val": {"cases": ["a"], "num_examples": 3, "shards": []}}}))
    with pytest.raises(TrainError, match=r"no train split \(0 training examples in manifest\.json\)$"):
        train(TrainSettings(records=str(tmp_path), out=str(tmp_path / "run")))


def copy_records(records, tmp_path):
    """A private copy of a records folder that a test may damage."""
    return Path(shutil.copytree(records, tmp_path / "records"))


def train_shard(records):
    manifest = json.loads((records / "manifest.json").read_text())
    return records / manifest["splits"]["train"]["shards"][0]["file"]


def test_truncated_shard_stops_in_one_line_and_keeps_the_last_checkpoint(ct_records, tmp_path):
    import tensorflow as tf

    records = copy_records(ct_records, tmp_path)
    settings = TrainSettings(records=str(records), out=str(tmp_path / "run"), epochs=1, steps_per_epoch=1,
                             image_size=(32, 32), **TINY)
    train(settings)
    shard = train_shard(records)
    # Cut inside the second record (TFRecord: 8-byte length, 4-byte CRC, data, 4-byte CRC). A cut
    # inside a record header reads as a clean end of file in TensorFlow and raises nothing.
    content = shard.read_bytes()
    length = struct.unpack("<Q", content[:8])[0]
    shard.write_bytes(content[:(length + 16) + 12 + length // 2])
    resumed = TrainSettings(**{**settings.__dict__, "epochs": 2, "resume": True})
    with pytest.raises(TrainError, match=rf"^{re.escape(str(shard))}: SHA-256 mismatch \(expected [0-9a-f]{{12}}…, "
                                         rf"got [0-9a-f]{{12}}…\); training stopped in epoch 2; last good checkpoint "
                                         rf"kept at .*ckpt-1$"):
        train(resumed)
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("ckpt-1")
    assert [r["epoch"] for r in read_csv(tmp_path / "run" / "history.csv")] == ["1"]


def test_deleted_validation_shard_is_named(ct_records, tmp_path):
    records = copy_records(ct_records, tmp_path)
    manifest = json.loads((records / "manifest.json").read_text())
    shard = records / manifest["splits"]["val"]["shards"][0]["file"]
    shard.unlink()
    settings = TrainSettings(records=str(records), out=str(tmp_path / "run"), epochs=1, steps_per_epoch=1,
                             image_size=(32, 32), **TINY)
    message = (f"{shard}: unreadable (NotFoundError: No such file or directory); training stopped in epoch 1; "
               "no checkpoint was written (no epoch had finished)")
    with pytest.raises(TrainError, match=f"^{re.escape(message)}$"):
        train(settings)


RESUMED = dict(records="r", out="o", epochs=5, lr=1e-4, filters=4, depth=2, image_size=(32, 32), resume=True)


@pytest.mark.parametrize("field, value, message", [
    ("lr", 1e-3, "lr=0.001; the run used lr=0.0001 (pass --lr 0.0001 to continue it"),
    ("schedule", "none", "schedule='none'; the run used schedule='cosine' (pass --schedule cosine"),
    ("monitor", "loss", "monitor='loss'; the run used monitor='dice' (pass --monitor dice"),
    ("loss", "bce", "loss='bce'; the run used loss='bce_dice' (pass --loss bce_dice"),
    ("seed", 3, "seed=3; the run used seed=0 (pass --seed 0"),
    ("batch_size", 8, "batch_size=8; the run used batch_size=10 (pass --batch-size 10"),
    ("augment", False, "augment=False; the run used augment=True (pass --augment"),
    ("oversample_tumour", 0.0, "oversample_tumour=0.0; the run used oversample_tumour=0.33 (pass "
                               "--oversample-tumour 0.33"),
    ("steps_per_epoch", 7, "steps_per_epoch=7; the run used steps_per_epoch=None (pass no --steps-per-epoch"),
    ("image_size", (64, 64), "image_size=[64, 64]; the run used image_size=[32, 32] (pass --image-size 32x32"),
    ("filters", 8, "filters=8; the run used filters=4 (pass --filters 4"),
    ("mixed_precision", "on", "mixed_precision='on'; the run used mixed_precision='auto' (pass "
                              "--mixed-precision auto"),
    ("epochs", 4, "epochs=4; the run used epochs=5 and --epochs may only be raised (pass --epochs 5 or more)"),
])
def test_resume_refuses_any_changed_setting_but_more_epochs(tmp_path, field, value, message):
    from kerasunet.rundir import check_run_dir

    old = TrainSettings(**{**RESUMED, "out": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({"train": old.to_dict(), "data": {"manifest_sha256": "ab"}}))
    check_run_dir(tmp_path, TrainSettings(**{**old.__dict__, "epochs": 9, "records": "moved"}), "ab")
    with pytest.raises(TrainError, match=f"^{re.escape(f'{tmp_path}: cannot resume with {message}')}"):
        check_run_dir(tmp_path, TrainSettings(**{**old.__dict__, field: value}), "ab")


def test_resume_refuses_other_records_and_pretrained(tmp_path):
    from kerasunet.rundir import check_run_dir

    old = TrainSettings(**{**RESUMED, "out": str(tmp_path), "mode": "init", "pretrained": "ct"})
    (tmp_path / "config.json").write_text(json.dumps(
        {"train": old.to_dict(), "data": {"records": "/data/ct", "manifest_sha256": "ab" * 32}}))
    with pytest.raises(TrainError, match=re.escape("cannot resume with pretrained='ct2'; the run used "
                                                   "pretrained='ct' (pass --pretrained ct to continue it")):
        check_run_dir(tmp_path, TrainSettings(**{**old.__dict__, "pretrained": "ct2"}), "ab" * 32)
    with pytest.raises(TrainError, match=f"^{re.escape(str(tmp_path))}: cannot resume on other records: r has "
                                         "manifest sha256 cdcdcdcdcdcd…, the run used abababababab… "
                                         r"\(/data/ct\); pass those records, or choose a new --out$"):
        check_run_dir(tmp_path, old, "cd" * 32)


@pytest.mark.parametrize("text", ["{not json", '{"model": {}}', "[1, 2]", ""])
def test_resume_with_a_corrupt_config_is_one_line(ct_records, tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    settings = TrainSettings(records=str(ct_records), out=str(run), resume=True, **TINY)
    with pytest.raises(TrainError, match=rf"^{re.escape(str(run / 'config.json'))}: unreadable run config "
                                         r"\([^\n]+\); restore it, or choose a new --out for a new run$"):
        train(settings)


@pytest.mark.parametrize("wait, improved, expected", [
    (0, True, (0, False)), (0, False, (1, False)), (1, False, (0, True)), (1, True, (0, False)),
])
def test_plateau_rule(wait, improved, expected):
    from kerasunet.schedule import plateau_update

    assert plateau_update(wait, improved) == expected


def test_plateau_halves_the_optimizer_rate_and_cosine_decays():
    import keras
    import tensorflow as tf

    from kerasunet.schedule import apply_plateau, current_lr, learning_rate

    optimizer = keras.optimizers.Adam(learning_rate(1e-3, "plateau", 10))
    wait = tf.Variable(0, dtype=tf.int64)
    assert apply_plateau(optimizer, wait, improved=False) is None and int(wait.numpy()) == 1
    assert apply_plateau(optimizer, wait, improved=False) == pytest.approx(5e-4)
    assert current_lr(optimizer) == pytest.approx(5e-4) and int(wait.numpy()) == 0
    cosine = keras.optimizers.Adam(learning_rate(1e-3, "cosine", 2))
    assert current_lr(cosine) == pytest.approx(1e-3)
    cosine.iterations.assign(1)
    assert current_lr(cosine) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi / 2)), rel=1e-4)


# --- 3D: patches of volume records ---------------------------------------------------------

TINY_3D = {**TINY, "batch_size": 2, "dims": 3, "patch_size": (8, 16, 16)}


@pytest.fixture(scope="module")
def ct_3d(tmp_path_factory):
    """Volume records of three helpers.phantom cases (9x20x18 crops) and a 3D CT run on them."""
    from tests.helpers import build_settings, write_lits
    from tfrecords_builder.build import build_records

    root = tmp_path_factory.mktemp("ct3d")
    build_records(build_settings(write_lits(root / "src", n=3), root / "records", volumes=True, crop_margin_mm=2.0,
                                 val_fraction=0.3, test_fraction=0))
    lines = []
    settings = TrainSettings(records=str(root / "records"), out=str(root / "run"), epochs=1, steps_per_epoch=2,
                             **TINY_3D)
    return fit(settings, progress=lines.append), lines


def test_3d_run_writes_the_run_folder_contract(ct_3d):
    from kerasunet.core.runs import load_model, resolve_run

    result, lines = ct_3d
    info = resolve_run(result.run_dir)
    assert (info.dims, info.patch_size, info.spacing) == (3, (8, 16, 16), (2.5, 0.8, 0.7))
    assert info.config["train"]["patch_size"] == [8, 16, 16] and info.config["data"]["context"] == 0
    model = load_model(info)
    assert model.input_shape == (None, None, None, None, 1) and model.output_shape[-1] == 2
    assert [line.split(":")[0] for line in lines[:2]] == ["memory estimate per replica"] * 2
    assert "float32" in lines[0] and "mixed_float16" in lines[1]
    assert {"val_loss", "val_dice_liver", "val_dice_tumour"} <= set(result.history[0])


def test_3d_ct_to_3d_mri_transfer_moves_the_right_weights(ct_3d, tiny_phantoms, tmp_path):
    import keras

    from kerasunet.transfer import build_for_mode
    from tests.helpers import build_settings
    from tfrecords_builder.build import build_records

    records = tmp_path / "mri"
    build_records(build_settings(tiny_phantoms / "mri", records, dataset="mri", volumes=True, val_fraction=0,
                                 test_fraction=0))
    ct_run = ct_3d[0].run_dir
    pretrained = keras.saving.load_model(ct_run / "best.keras")
    settings = TrainSettings(records=str(records), out=str(tmp_path / "run"), mode="freeze", pretrained=str(ct_run),
                             epochs=1, steps_per_epoch=2, lr=1e-2, freeze_blocks=1, **TINY_3D)
    trained = keras.saving.load_model(fit(settings).run_dir / "best.keras")
    for layer in pretrained.layers:
        if layer.weights and layer.name != "head_conv":
            same = all(np.array_equal(a, b) for a, b in
                       zip(layer.get_weights(), trained.get_layer(layer.name).get_weights()))
            if layer.name.startswith("encoder_1_"):
                assert same, f"{layer.name} changed although frozen"
            elif layer.name.endswith(("_conv_a", "_conv_b")):
                assert not same, f"{layer.name} did not train"
    init = build_for_mode("init", (None, None, None, 1), 1, pretrained=str(ct_run), filters=4, depth=2, dims=3,
                          spacing=(3.0, 1.0, 1.0))
    for layer in pretrained.layers:
        expected = layer.get_weights()
        if layer.name == "head_conv":  # the CT head's tumour column
            expected = [w[..., 1:2] for w in expected]
        for a, b in zip(expected, init.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)


def test_3d_settings_are_checked():
    with pytest.raises(TrainError, match=re.escape("Expected patch_size (D, H, W) with dims=3 and none with dims=2. "
                                                   "Received: patch_size=None")):
        TrainSettings(records="r", out="o", dims=3)
    with pytest.raises(TrainError, match=re.escape("Expected no image_size with dims=3 (use patch_size). "
                                                   "Received: image_size=(32, 32)")):
        TrainSettings(records="r", out="o", dims=3, patch_size=(8, 16, 16), image_size=(32, 32))


def test_3d_mixed_precision_on_cpu_is_refused(ct_3d, tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("the refusal is for machines without a GPU")
    records = ct_3d[0].run_dir.parent / "records"
    settings = TrainSettings(records=str(records), out=str(tmp_path / "run"), epochs=1,
                             **{**TINY_3D, "mixed_precision": "on"})
    with pytest.raises(TrainError, match=re.escape("--mixed-precision on with --dims 3 needs a GPU (TensorFlow has "
                                                   "no float16 3D max-pooling on CPU); use --mixed-precision auto or off")):
        fit(settings)
    assert not (tmp_path / "run").exists()
