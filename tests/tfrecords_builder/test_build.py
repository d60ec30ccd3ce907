import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from kerasunet.data import load_split_examples, read_manifest, verify_records
from kerasunet.core.nifti import load_volume
from kerasunet.core.records_format import DEFAULT_CONTEXT
from tests.helpers import LPS, PHANTOM_SHAPE, build_settings, phantom, save_nifti, write_lits
from tfrecords_builder.build import BuildError, BuildSettings, assign_splits, build_records, split_counts


@pytest.fixture(scope="module")
def lits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "lits"
    return write_lits(root, n=6, affines={1: LPS}, suffixes={2: ".nii.gz"})


@pytest.fixture(scope="module")
def built(lits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "ct"
    return out, build_records(build_settings(lits_dir, out, val_fraction=0.2, test_fraction=0.2,
                                             liver_slices=4, non_liver_slices=3, shard_mb=0.01))


def _source_slices(manifest, case_id, context):
    case = manifest["cases"][case_id]
    image = load_volume(case["image"]).data
    label = load_volume(case["label"]).data.astype(np.uint8)
    depth = image.shape[2]
    # channel j of slice k is slice k - context + j, clamped to the volume (border repeated)
    stacks = [np.stack([image[:, :, min(max(k + d, 0), depth - 1)] for d in range(-context, context + 1)], -1)
              for k in case["slices"]]
    return np.stack(stacks), np.moveaxis(label[:, :, case["slices"]], 2, 0)


@pytest.mark.parametrize("context", [0, 1])
def test_round_trip_gives_back_canonical_voxels_and_labels(lits_dir, tmp_path, context):
    out = tmp_path / "rec"
    manifest = build_records(build_settings(lits_dir, out, context=context, liver_slices=4,
                                            non_liver_slices=3, val_fraction=0.2, test_fraction=0.2))
    assert manifest["channels"] == 2 * context + 1
    seen = set()
    for split, entry in manifest["splits"].items():
        examples = list(load_split_examples(out, split))
        assert len(examples) == entry["num_examples"] == sum(len(manifest["cases"][c]["slices"])
                                                             for c in entry["cases"])
        for case_id in entry["cases"]:
            mine = [e for e in examples if e["case_id"] == case_id]
            images, labels = _source_slices(manifest, case_id, context)
            assert [e["slice_index"] for e in mine] == manifest["cases"][case_id]["slices"]
            assert [e["key"] for e in mine] == [f"{case_id}/{e['slice_index']}" for e in mine]
            np.testing.assert_array_equal(np.stack([e["image"] for e in mine]), images)
            np.testing.assert_array_equal(np.stack([e["label"] for e in mine]), labels)
            seen.add(case_id)
    assert seen == {f"volume-{i}" for i in range(6)}


def test_lps_and_gz_cases_match_the_canonical_phantom(built, lits_dir):
    out, manifest = built
    # volume-1 is stored LPS: canonical order flips x and y back to the phantom's own order
    image, label = phantom(1)
    for case_id, expected_image, expected_label in (("volume-1", image[::-1, ::-1], label[::-1, ::-1]),
                                                    ("volume-2", *phantom(2))):
        split = manifest["cases"][case_id]["split"]
        ex = next(e for e in load_split_examples(out, split) if e["case_id"] == case_id)
        k = ex["slice_index"]
        centre = manifest["context"]  # channel K is the slice itself
        np.testing.assert_array_equal(ex["image"][..., centre], expected_image[:, :, k])
        np.testing.assert_array_equal(ex["label"], expected_label[:, :, k])


def test_manifest_lists_splits_shards_cases_and_stats(built):
    out, manifest = built
    assert read_manifest(out) == json.loads(json.dumps(manifest))
    assert manifest["name"] == "lits" and manifest["modality"] == "ct" and manifest["norm"]["modality"] == "ct"
    assert set(manifest["splits"]) == {"train", "val", "test"}
    for split, entry in manifest["splits"].items():
        assert len(entry["shards"]) > 1  # shard_mb=0.01 forces several shards
        total = len(entry["shards"])
        assert [s["file"] for s in entry["shards"]] == [
            f"lits-{split}.tfrecord-{i:05d}-of-{total:05d}" for i in range(total)]
        assert sum(s["num_examples"] for s in entry["shards"]) == entry["num_examples"]
        stats = manifest["class_stats"][split]
        assert 0 < stats["foreground_fraction"]["tumour"] < stats["foreground_fraction"]["liver"] < 1
        assert stats["tumour_slices"] > 0
    case = manifest["cases"]["volume-0"]
    assert case["shape"] == list(PHANTOM_SHAPE) and case["spacing"] == pytest.approx([0.8, 0.7, 2.5])
    # liver spans z 3..9: 4 evenly spaced + the 3 nearest slices without liver (below first on ties)
    assert case["slices"] == [1, 2, 3, 5, 7, 9, 10]
    assert verify_records(out) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_no_case_in_two_splits_and_split_is_seeded(lits_dir):
    ids = [f"volume-{i}" for i in range(10)]
    a = assign_splits(ids, build_settings(lits_dir, "x", seed=3, val_fraction=0.2, test_fraction=0.2))
    assert a == assign_splits(ids, build_settings(lits_dir, "x", seed=3, val_fraction=0.2, test_fraction=0.2))
    assert a != assign_splits(ids, build_settings(lits_dir, "x", seed=4, val_fraction=0.2, test_fraction=0.2))
    assert sorted(sum(a.values(), [])) == sorted(ids)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (6, 2, 2)


def test_holdout_last_holds_out_the_last_cases(lits_dir):
    ids = [f"volume-{i}" for i in range(10)]
    a = assign_splits(ids, build_settings(lits_dir, "x", holdout="last", val_fraction=0.1, test_fraction=0.2))
    assert a == {"train": ids[:7], "val": ["volume-7"], "test": ["volume-8", "volume-9"]}


def test_explicit_split_lists(lits_dir):
    ids = ["a", "b", "c", "d"]
    a = assign_splits(ids, build_settings(lits_dir, "x", val_cases=("b",), test_cases=("d",)))
    assert a == {"train": ["a", "c"], "val": ["b"], "test": ["d"]}
    with pytest.raises(BuildError, match=r"Expected test_cases to name usable cases. Received: \['zz'\]"):
        assign_splits(ids, build_settings(lits_dir, "x", test_cases=("zz",)))


@pytest.mark.parametrize("n, fractions, expected", [(3, (0.1, 0.1), (1, 1)), (10, (0.25, 0.15), (3, 2)),
                                                    (131, (0.2, 0.1), (26, 13)), (5, (0.0, 0.2), (0, 1))])
def test_split_counts_round_half_up_and_give_each_requested_split_a_case(n, fractions, expected):
    assert split_counts(n, *fractions) == expected


def test_too_few_cases_for_the_splits_is_an_error():
    with pytest.raises(BuildError, match=r"Received: 2 usable cases"):
        split_counts(2, 0.1, 0.1)


@pytest.mark.parametrize("kw, match", [
    ({"val_fraction": 1.0}, r"Expected 0 <= val_fraction < 1. Received: val_fraction=1.0"),
    ({"holdout": "first"}, r"Expected holdout in \('random', 'last'\). Received: holdout='first'"),
    ({"hu_window": (100, -100)}, r"Expected hu_window lo < hi"),
    ({"liver_slices": 0, "non_liver_slices": 0}, r"Expected at least one slice per case"),
    ({"val_cases": ("a",), "test_cases": ("a",)}, r"Expected no case in both"),
])
def test_invalid_settings_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        BuildSettings(source="s", dataset="lits", out="o", **kw)


def test_rerun_of_finished_build_is_a_noop_and_other_settings_need_overwrite(built, lits_dir):
    out, manifest = built
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    messages = []
    again = build_records(build_settings(lits_dir, out, val_fraction=0.2, test_fraction=0.2, liver_slices=4,
                                         non_liver_slices=3, shard_mb=0.01, workers=3), log=messages.append)
    assert again == json.loads(json.dumps(manifest))
    assert "nothing to do" in messages[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(BuildError, match=r"holds a finished build with different settings \(context: 2 -> 0\)"):
        build_records(build_settings(lits_dir, out, val_fraction=0.2, test_fraction=0.2, liver_slices=4,
                                     non_liver_slices=3, shard_mb=0.01, context=0))


def test_default_context_is_2_5d_for_slices_and_0_for_volumes(lits_dir):
    assert build_settings(lits_dir, "a").context == DEFAULT_CONTEXT == 2
    assert build_settings(lits_dir, "a", volumes=True).context == 0
    assert build_settings(lits_dir, "a", context=0).context == 0
    with pytest.raises(ValueError, match=r"^Expected context=0 with volumes"):
        build_settings(lits_dir, "a", volumes=True, context=1)


def test_settings_hash_ignores_run_only_fields_and_number_types(lits_dir):
    a = build_settings(lits_dir, "a", hu_window=(-200, 250), shard_mb=128, workers=1)
    b = build_settings(lits_dir, "b", hu_window=(-200.0, 250.0), workers=4, overwrite=True)
    assert a.settings_hash() == b.settings_hash()
    assert a.settings_hash() != build_settings(lits_dir, "a", context=0).settings_hash()


def test_overwrite_rebuilds_with_new_settings(lits_dir, tmp_path):
    out = tmp_path / "rec"
    build_records(build_settings(lits_dir, out, liver_slices=2, non_liver_slices=0, shard_mb=0.001))
    manifest = build_records(build_settings(lits_dir, out, liver_slices=1, non_liver_slices=0, overwrite=True))
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["manifest.json"] + [s["file"] for e in manifest["splits"].values() for s in e["shards"]])
    assert manifest["splits"]["train"]["num_examples"] == len(manifest["splits"]["train"]["cases"])


def test_parallel_workers_write_the_same_shards(lits_dir, tmp_path, built):
    out, manifest = built
    par = build_records(build_settings(lits_dir, tmp_path / "par", val_fraction=0.2, test_fraction=0.2,
                                       liver_slices=4, non_liver_slices=3, shard_mb=0.01, workers=2))
    assert par["splits"] == manifest["splits"]


def test_gzip_shards_read_back(lits_dir, tmp_path):
    out = tmp_path / "gz"
    manifest = build_records(build_settings(lits_dir, out, gzip=True, liver_slices=2, non_liver_slices=1,
                                            val_fraction=0, test_fraction=0))
    assert manifest["compression"] == "GZIP" and list(manifest["splits"]) == ["train"]
    assert len(list(load_split_examples(out, "train"))) == 6 * 3
    assert verify_records(out) == []


def _change_after_validation(changes):
    """A ``progress`` callback that applies ``changes()`` once every case is validated, before any is written."""
    def progress(stage, done, total, slices):
        if stage == "validate" and done == total:
            changes()
    return progress


def test_cases_that_change_while_shards_are_written_are_skipped_with_their_reason(tmp_path):
    src = write_lits(tmp_path / "lits", n=5)
    _, label = phantom(3)

    def corrupt():
        bad = label.copy()
        bad[0, 0, 0] = 7
        save_nifti(src / "segmentation-0.nii", bad)  # the first case of the split
        save_nifti(src / "segmentation-3.nii", label[:, :, :-1])  # a later one

    out = tmp_path / "out"
    manifest = build_records(build_settings(src, out, val_fraction=0, test_fraction=0, liver_slices=2,
                                            non_liver_slices=1), progress=_change_after_validation(corrupt))
    changed = " (the files changed during the build)"
    assert manifest["skipped"] == [
        {"case_id": "volume-0", "reason": "label values [7] outside the expected set [0, 1, 2]" + changed},
        {"case_id": "volume-3", "reason": "image shape (24, 20, 14) differs from label shape (24, 20, 13)" + changed}]
    kept = ["volume-1", "volume-2", "volume-4"]
    entry = manifest["splits"]["train"]
    assert entry["cases"] == kept and sorted(manifest["cases"]) == kept
    examples = list(load_split_examples(out, "train"))
    assert entry["num_examples"] == len(examples) == 3 * 3 == manifest["class_stats"]["train"]["num_slices"]
    assert sorted({e["case_id"] for e in examples}) == kept
    assert verify_records(out) == [] and read_manifest(out) == json.loads(json.dumps(manifest))
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json"] + [s["file"] for s in entry["shards"]])


def test_a_split_left_without_cases_stops_in_one_line_and_resumes_once_fixed(tmp_path):
    src = write_lits(tmp_path / "lits", n=3)
    image, label = phantom(2)
    settings = build_settings(src, tmp_path / "out", val_cases=("volume-2",), liver_slices=2, non_liver_slices=1)
    nan = image.astype(np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(BuildError) as raised:
        build_records(settings, progress=_change_after_validation(lambda: save_nifti(src / "volume-2.nii", nan)))
    assert str(raised.value) == (f"{tmp_path / 'out'}: split 'val' has zero examples (skipped volume-2: "
                                 f"image contains NaN/Inf (the files changed during the build))")
    assert not (tmp_path / "out" / "manifest.json").exists()
    save_nifti(src / "volume-2.nii", image)
    messages = []
    manifest = build_records(settings, log=messages.append)
    assert messages == [f"{tmp_path / 'out'}: resuming; splits already written: train"]
    assert manifest["splits"]["val"]["cases"] == ["volume-2"] and manifest["skipped"] == []
    assert verify_records(tmp_path / "out") == []


# What a spawned build worker does first: unpickle the step it runs, importing its module.
UNPICKLE_STEPS = """
import pickle, sys
pickle.loads(bytes.fromhex(sys.argv[1]))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
assert not loaded, f"a build worker imported {loaded[:3]}"
"""


def test_build_workers_start_without_tensorflow():
    """Each worker of a build (slices and volumes) starts without TensorFlow, whose import
    costs seconds per process and prints start-up lines."""
    from tfrecords_builder.build import SLICES, record_kind

    volumes = record_kind(BuildSettings(source="s", dataset="lits", out="o", volumes=True))
    steps = [SLICES.inspect, SLICES.extract, volumes.inspect, volumes.extract]
    result = subprocess.run([sys.executable, "-c", UNPICKLE_STEPS, pickle.dumps(steps).hex()],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]
