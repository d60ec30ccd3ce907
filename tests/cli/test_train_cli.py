"""``kerasunet train`` on the command line: one-line errors without tracebacks, NaN exit code."""

import hashlib
import json
import re

import pytest
from click.testing import CliRunner

from cli.main import main
from kerasunet.train_settings import TrainSettings
from tests.helpers import assert_one_line_error as assert_one_line_stderr
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def records(tiny_records):
    return tiny_records("mri")


TINY = ["--filters", "4", "--depth", "2", "--batch-size", "4", "--no-augment", "--mixed-precision", "off"]


def run(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def assert_one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, not a crash
    assert result.output == f"Error: {message}\n"


def test_init_without_pretrained(tmp_path):
    result = run("--records", tmp_path, "--out", tmp_path / "run", "--mode", "init")
    assert_one_line_error(result, "--mode init needs --pretrained (a CT run folder or .keras file)")


def test_mismatched_pretrained(records, tmp_path):
    from kerasunet.data import read_manifest
    from kerasunet.model import build_unet

    channels = read_manifest(records)["channels"] + 2  # another context than the records'
    build_unet((None, None, channels), 2, filters=4, depth=2).save(tmp_path / "ct.keras")
    result = run("--records", records, "--out", tmp_path / "run", "--mode", "freeze",
                 "--pretrained", tmp_path / "ct.keras", *TINY)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    last = result.output.splitlines()[-1]
    records_channels = channels - 2
    assert last == (f"Error: {tmp_path / 'ct.keras'}: the pretrained model takes {channels} input channels "
                    f"(2.5D context {(channels - 1) // 2}), the new one {records_channels} "
                    f"(context {(records_channels - 1) // 2}); "
                    f"build the records with --context {(channels - 1) // 2}")
    assert not (tmp_path / "run").exists()  # nothing written: the same --out works once fixed


def test_records_without_train_split(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"modality": "mri", "splits": {"test": {"num_examples": 4}}}))
    result = run("--records", tmp_path, "--out", tmp_path / "run")
    assert_one_line_error(result, f"{tmp_path}: no train split (0 training examples in manifest.json)")


def test_records_without_manifest(tmp_path):
    result = run("--records", tmp_path, "--out", tmp_path / "run")
    assert_one_line_error(result, f"{tmp_path}: no manifest.json; build records with `kerasunet build-records` first")


@pytest.mark.parametrize("size, message", [
    ("32x30", "Expected image_size height and width multiples of 2**depth=4. Received: image_size=(32, 30)"),
])
def test_image_size_must_fit_depth(tmp_path, size, message):
    assert_one_line_error(run("--records", tmp_path, "--out", tmp_path / "run", "--image-size", size, *TINY), message)


def test_image_size_format(tmp_path):
    result = run("--records", tmp_path, "--out", tmp_path / "run", "--image-size", "big")
    assert result.exit_code == 2 and "expected HxW, e.g. 256x256. Received: 'big'" in result.output


def test_trains_then_refuses_the_same_folder_and_stops_on_nan(records, tmp_path):
    out = tmp_path / "run"
    result = run("--records", records, "--out", out, "--epochs", 1, "--steps-per-epoch", 2, *TINY)
    assert result.exit_code == 0, result.output
    assert "epoch 1/1 step 2/2 loss " in result.output and result.output.endswith(f"wrote {out}\n")
    assert (out / "best.keras").is_file() and (out / "history.csv").is_file()
    # a run with a tumour output fits its own lesion filter on the validation cases last
    assert re.search(r"^lesion filter: (fitted on|no predicted lesions)", result.output, re.M), result.output
    again = run("--records", records, "--out", out, *TINY)
    assert_one_line_error(again, f"{out}: exists and is not empty; pass --resume to continue its run "
                                 "or choose a new --out")
    nan = run("--records", records, "--out", tmp_path / "nan", "--lr", "1e30", "--epochs", 2,
              "--steps-per-epoch", 4, *TINY)
    assert nan.exit_code == 1 and isinstance(nan.exception, SystemExit), nan.output
    last = nan.output.splitlines()[-1]
    assert last.startswith("Error: loss became NaN at epoch 1 step ") or last.startswith("Error: loss became Inf")
    assert last.endswith("; no checkpoint was written (no epoch had finished)")


def test_resume_with_another_learning_rate_names_it(records, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    old = TrainSettings(records=str(records), out=str(out), filters=4, depth=2, batch_size=4, augment=False,
                        mixed_precision="off")
    sha = hashlib.sha256((records / "manifest.json").read_bytes()).hexdigest()
    (out / "config.json").write_text(json.dumps({"train": old.to_dict(), "data": {"manifest_sha256": sha}}))
    result = run("--records", records, "--out", out, "--resume", "--lr", "0.01", *TINY)
    assert_one_line_error(result, f"{out}: cannot resume with lr=0.01; the run used lr=0.001 (pass --lr 0.001 "
                                  "to continue it, or choose a new --out for a new run)")


def test_bad_setting_in_a_real_process_is_one_line(tmp_path):
    proc = run_cli("train", "--records", tmp_path, "--out", tmp_path / "run", "--mode", "freeze")
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_line_stderr(proc, r"^Error: --mode freeze needs --pretrained \(a CT run folder or \.keras file\)$")


def test_corrupt_config_on_resume_in_a_real_process_is_one_line(records, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"train": {"lr": ')
    proc = run_cli("train", "--records", records, "--out", out, "--resume", *TINY)
    assert proc.returncode == 1
    assert_one_line_stderr(proc, f"^Error: {re.escape(str(out / 'config.json'))}: unreadable run config "
                                 r"\(Expecting value: line 1 column 18 \(char 17\)\); restore it, or choose a "
                                 "new --out for a new run$")


def test_preset_fills_the_options_not_given(records, tmp_path, monkeypatch):
    import kerasunet.train

    seen = []
    monkeypatch.setattr(kerasunet.train, "train", lambda settings, progress: seen.append(settings) or settings.out)
    result = run("--records", records, "--out", tmp_path / "run", "--preset", "paper", "--epochs", 3,
                 "--batch-size", 10, "--monitor", "dice")
    assert result.exit_code == 0, result.output
    (settings,) = seen
    # MRI records: the research's MRI settings, except what the command line says.
    assert (settings.preset, settings.lr, settings.loss, settings.augment, settings.dropout) == (
        "paper", 5e-4, "bce", False, 0.5)
    assert (settings.epochs, settings.batch_size, settings.monitor) == (3, 10, "dice")
    run("--records", records, "--out", tmp_path / "plain")
    assert seen[1] == TrainSettings(records=str(records), out=str(tmp_path / "plain"))


def test_3d_patch_over_the_memory_budget_is_refused_in_one_line(tmp_path):
    from tests.helpers import build_settings, write_lits
    from tfrecords_builder.build import build_records

    records = tmp_path / "records"
    build_records(build_settings(write_lits(tmp_path / "src", n=2), records, volumes=True, val_fraction=0,
                                 test_fraction=0))
    result = run("--records", records, "--out", tmp_path / "run", "--dims", "3", "--patch-size", "8x16x16",
                 "--memory-budget", "0.001", "--batch-size", "2", *TINY[:4], "--mixed-precision", "off")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    *estimates, error = result.output.splitlines()
    assert [line.split(",")[2].split(":")[0] for line in estimates] == [" float32", " mixed_float16"]
    match = re.fullmatch(r"Error: Expected a patch that fits the memory budget of 0\.001 GiB\. Received: "
                         r"patch_size=8x16x16 \(estimated [\d.]+ GiB, float32, batch 2\); the largest patch of "
                         r"that shape that fits is (\d+)x(\d+)x(\d+) \([\d.]+ GiB\)", error)
    assert match, error
    from kerasunet.planner import estimate_memory

    named = tuple(int(v) for v in match.groups())
    arch = dict(num_outputs=2, filters=4, depth=2, spacing=(2.5, 0.8, 0.7))
    assert named[1:] == (2 * named[0],) * 2 and named < (8, 16, 16)
    assert estimate_memory(named, 2, **arch).total <= 0.001 * 2**30 < estimate_memory((8, 16, 16), 2, **arch).total
    assert not (tmp_path / "run").exists()
