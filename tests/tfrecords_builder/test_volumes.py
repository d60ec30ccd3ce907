"""Volume records: the feature spec's round trip and ``build-records --volumes`` on tiny phantoms."""

import re

import numpy as np
import pytest
from click.testing import CliRunner

from cli.records import build_records as build_records_cli
from kerasunet.core.labels import STRUCTURES
from kerasunet.core.nifti import load_volume
from kerasunet.data import verify_records
from kerasunet.patches import load_split_volumes
from tests.helpers import LPS, build_settings, write_lits
from tfrecords_builder.build import build_records
from tfrecords_builder.features import VOLUME_POINTS, decode_volume, parse_volume, volume_example

ALL_TRAIN = dict(val_fraction=0, test_fraction=0)


def test_volume_example_round_trip():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 4, 5)).astype(np.float32)
    label = rng.integers(0, 3, size=(3, 4, 5)).astype(np.uint8)
    points = {name: (rng.integers(0, 3, size=(VOLUME_POINTS, 3)), 7 + i) for i, name in enumerate(STRUCTURES)}
    ex = decode_volume(parse_volume(volume_example("case-1", image, label, (2.5, 0.8, 0.7), (4, 5, 6),
                                                   (-200, 250, 25, 225), points)))
    np.testing.assert_array_equal(ex["image"].numpy(), image[..., None])
    np.testing.assert_array_equal(ex["label"].numpy(), label)
    np.testing.assert_allclose(ex["spacing"].numpy(), (2.5, 0.8, 0.7))
    np.testing.assert_array_equal(ex["crop_offset"].numpy(), (4, 5, 6))
    np.testing.assert_array_equal(ex["norm_stats"].numpy(), (-200, 250, 25, 225))
    for name in STRUCTURES:
        np.testing.assert_array_equal(ex["points"][name].numpy(), points[name][0])
        assert int(ex["point_counts"][name]) == points[name][1]
    assert ex["case_id"].numpy() == ex["source_id"].numpy() == b"case-1"


def test_volume_example_rejects_a_label_of_another_shape():
    message = "Expected image (D, H, W[, C]) and label (D, H, W). Received: image.shape=(3, 4, 5, 1), label.shape=(3, 4)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        volume_example("c", np.zeros((3, 4, 5)), np.zeros((3, 4)), (1, 1, 1), (0, 0, 0), (0, 1, 0, 1), {})


def test_build_crops_around_the_liver_and_keeps_the_source_voxels(tmp_path):
    # helpers.phantom: liver at x 4:18, y 3:15, z 3:10 of 24x20x14 voxels of 0.8 x 0.7 x 2.5 mm;
    # a 2 mm margin is 3, 3 and 1 voxels, so the crop is x 1:21, y 0:18 (clipped), z 2:11; the
    # LPS case's liver is at canonical x 6:20, y 5:17, so its crop is x 3:23, y 2:20, z 2:11.
    src = write_lits(tmp_path / "src", n=3, affines={1: LPS})
    boxes = {"volume-0": (1, 0, 2), "volume-1": (3, 2, 2), "volume-2": (1, 0, 2)}  # crop start (x, y, z)
    out = tmp_path / "out"
    manifest = build_records(build_settings(src, out, volumes=True, crop_margin_mm=2.0, **ALL_TRAIN))
    assert manifest["kind"] == "volumes" and manifest["channels"] == 1
    assert manifest["splits"]["train"]["num_examples"] == 3
    assert verify_records(out) == []
    volumes = {v["case_id"]: v for v in load_split_volumes(out, "train")}
    assert sorted(volumes) == ["volume-0", "volume-1", "volume-2"]
    for case_id, v in volumes.items():
        case = manifest["cases"][case_id]
        x, y, z = boxes[case_id]
        assert case["crop_offset"] == [z, x, y] and case["shape"] == [9, 20, 18]
        np.testing.assert_array_equal(v["crop_offset"], [z, x, y])
        np.testing.assert_allclose(v["spacing"], (2.5, 0.8, 0.7))
        image, label = load_volume(case["image"]).data, load_volume(case["label"]).data  # canonical
        box = np.s_[x:x + 20, y:y + 18, z:z + 9]
        np.testing.assert_array_equal(v["image"][..., 0], np.moveaxis(image[box], 2, 0))
        np.testing.assert_array_equal(v["label"], np.moveaxis(label[box], 2, 0))
        liver, tumour = v["points"]["liver"], v["points"]["tumour"]
        assert v["point_counts"]["liver"] == VOLUME_POINTS and len({tuple(p) for p in liver}) == VOLUME_POINTS
        assert np.all(v["label"][tuple(liver.T)] >= 1)
        # 32 tumour voxels (4 x 4 x 2): every one of them, each twice
        assert v["point_counts"]["tumour"] == 32
        assert {tuple(p) for p in tumour} == {tuple(p) for p in np.argwhere(v["label"] == 2)}


def test_build_resamples_to_the_spacing_and_skips_bad_cases_with_a_reason(tmp_path):
    src = write_lits(tmp_path / "src", n=2)
    (src / "segmentation-1.nii").unlink()
    out = tmp_path / "out"
    settings = build_settings(src, out, volumes=True, crop_margin_mm=2.0, spacing=(2.5, 1.6, 1.4), **ALL_TRAIN)
    manifest = build_records(settings)
    assert manifest["skipped"] == [{"case_id": "volume-1", "reason": "label missing"}]
    case = manifest["cases"]["volume-0"]
    assert case["crop_shape"] == [9, 20, 18] and case["shape"] == [9, 10, 9]
    (v,) = load_split_volumes(out, "train")
    assert v["image"].shape == (9, 10, 9, 1)
    np.testing.assert_allclose(v["spacing"], (2.5, 1.6, 1.4))
    source = np.moveaxis(load_volume(case["label"]).data[1:21, 0:18, 2:11], 2, 0)
    assert (v["label"] > 0).mean() == pytest.approx((source > 0).mean(), rel=0.15)
    assert set(np.unique(v["label"])) == {0, 1, 2}
    messages = []
    build_records(settings, log=messages.append)  # resumable like slice builds: a finished one is a no-op
    assert messages == [f"{out}: already built with these settings; nothing to do (use --overwrite to rebuild)"]


def test_volume_settings_leave_slice_builds_alone(tmp_path):
    plain = build_settings(tmp_path, tmp_path / "o")
    assert build_settings(tmp_path, tmp_path / "o", crop_margin_mm=5.0).settings_hash() == plain.settings_hash()
    assert build_settings(tmp_path, tmp_path / "o", volumes=True).settings_hash() != plain.settings_hash()


@pytest.mark.parametrize("extra, message", [
    (dict(engine="beam"), "Expected engine='local' with volumes (the Beam engine writes slices). Received: engine='beam'"),
    (dict(context=1), "Expected context=0 with volumes (a volume holds its neighbouring slices). Received: context=1"),
    (dict(spacing=(1.0, 0.0, 1.0)), "Expected spacing of 3 positive numbers in mm, (D, H, W). "
                                    "Received: spacing=(1.0, 0.0, 1.0)"),
])
def test_volume_settings_are_checked(tmp_path, extra, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_settings(tmp_path, tmp_path / "o", volumes=True, **extra)


def test_cli_volume_options_need_volumes(tmp_path):
    result = CliRunner().invoke(build_records_cli, ["--lits", str(tmp_path), "--out", str(tmp_path / "o"),
                                                    "--spacing", "3,1.2,1.2"])
    assert result.exit_code == 2 and "--spacing needs --volumes." in result.output
    result = CliRunner().invoke(build_records_cli, ["--lits", str(tmp_path), "--out", str(tmp_path / "o"),
                                                    "--volumes", "--spacing", "3,1.2"])
    assert result.exit_code == 2 and "Expected D,H,W (three numbers in mm). Received: '3,1.2'" in result.output
