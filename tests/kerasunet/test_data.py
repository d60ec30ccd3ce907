import numpy as np
import pytest

from kerasunet.augment import AugmentSettings
from kerasunet.data import (RecordsError, get_dataset, load_split_examples, read_manifest, targets_from_labels,
                            verify_records)
from kerasunet.core.labels import targets_from_labels_np
from kerasunet.core.preprocessing import normalize_np
from tests.helpers import LPS, build_settings, phantom, save_nifti, write_lits
from tfrecords_builder.build import build_records


@pytest.fixture(scope="module")
def ct_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src = write_lits(root / "lits", n=5, affines={1: LPS})
    out = root / "ct"
    build_records(build_settings(src, out, context=1, liver_slices=4, non_liver_slices=4,
                                 val_fraction=0.2, test_fraction=0, shard_mb=0.02))
    return out


@pytest.fixture(scope="module")
def mri_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri")
    for i in range(3):
        image, label = phantom(i)
        (root / "src" / f"P{i}").mkdir(parents=True)
        save_nifti(root / "src" / f"P{i}" / "artery.nii.gz", image.astype(np.float32) * 3 + 5000)
        save_nifti(root / "src" / f"P{i}" / "label.nii.gz", (label == 2).astype(np.uint8))
    build_records(build_settings(root / "src", root / "out", dataset="mri", val_fraction=0, test_fraction=0))
    return root / "out"


def _all(ds):
    xs, ys = zip(*ds.as_numpy_iterator())
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("records, modality", [("ct_records", "ct"), ("mri_records", "mri")])
def test_reader_normalises_with_case_stats_and_carries_uint8_labels(records, modality, request):
    out = request.getfixturevalue(records)
    examples = list(load_split_examples(out, "train"))
    ds = get_dataset(out, "train", batch_size=4, training=False)
    assert ds.element_spec[1].dtype == "uint8"
    x, y = _all(ds)
    assert len(x) == len(examples) == read_manifest(out)["splits"]["train"]["num_examples"]
    expected_x = np.stack([normalize_np(e["image"], e["norm_stats"]) for e in examples])
    np.testing.assert_allclose(x, expected_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y, np.stack([e["label"] for e in examples]))
    assert y.dtype == np.uint8 and y.max() == (2 if modality == "ct" else 1)
    # The steps' expansion on the device gives the multi-label targets of the numpy rule.
    outputs = read_manifest(out)["outputs"]
    targets = targets_from_labels(y, outputs).numpy()
    assert targets.dtype == np.float32 and targets.shape[-1] == len(outputs)
    np.testing.assert_array_equal(targets, targets_from_labels_np(y, outputs))
    # a tumour-only model trained on these labels (a cascade's second stage) takes the last column
    if modality == "ct":
        np.testing.assert_array_equal(targets_from_labels(y, ("tumour",), outputs).numpy(), targets[..., 1:])


def test_static_shapes_and_pad_to_multiple(ct_records):
    ds = get_dataset(ct_records, "train", batch_size=2, training=False, pad_to_multiple=16, drop_remainder=True)
    assert ds.element_spec[0].shape.as_list() == [2, 32, 32, 3]
    assert ds.element_spec[1].shape.as_list() == [2, 32, 32]
    x, y = next(iter(ds))
    ex = next(load_split_examples(ct_records, "train"))
    lo, hi, mean, std = ex["norm_stats"]
    np.testing.assert_allclose(x[0, 24:], (lo - mean) / std)  # padded rows hold the normalised floor
    np.testing.assert_allclose(x[0, :, 20:], (lo - mean) / std)
    assert int(np.max(y[:, 24:])) == 0 and int(np.max(y[:, :, 20:])) == 0  # padded labels are background
    np.testing.assert_allclose(x[0, :24, :20], normalize_np(ex["image"], ex["norm_stats"]), atol=1e-6)
    np.testing.assert_array_equal(y[0, :24, :20], ex["label"])


@pytest.mark.parametrize("image_size, pad, static", [((16, 12), None, [16, 12]), ((20, 12), 16, [32, 16])])
def test_image_size_resizes_bilinear_image_and_nearest_mask(ct_records, image_size, pad, static):
    import tensorflow as tf

    ds = get_dataset(ct_records, "train", batch_size=3, training=False, image_size=image_size, pad_to_multiple=pad)
    assert ds.element_spec[0].shape.as_list() == [None, *static, 3]
    x, y = _all(ds)
    assert x.shape[1:3] == y.shape[1:3] == tuple(static) and y.dtype == np.uint8
    ex = next(load_split_examples(ct_records, "train"))
    image = normalize_np(ex["image"], ex["norm_stats"])
    h, w = image_size
    np.testing.assert_allclose(x[0, :h, :w], tf.image.resize(image, image_size, "bilinear"), atol=1e-5)
    np.testing.assert_array_equal(y[0, :h, :w], tf.image.resize(ex["label"][..., None], image_size, "nearest")[..., 0])


def test_training_stream_with_augmentation_keeps_label_values_and_batches(ct_records):
    ds = get_dataset(ct_records, "train", batch_size=4, training=True, augment=AugmentSettings(elastic_prob=0.5),
                     seed=1, repeat=True)
    seen = set()
    for x, y in ds.take(3):
        assert x.shape == (4, 24, 20, 3) and y.shape == (4, 24, 20) and y.dtype == "uint8"
        seen |= set(np.unique(y.numpy()))
        assert np.isfinite(x.numpy()).all()
    assert 1 in seen and seen <= {0, 1, 2}  # nearest-neighbour resampling: label values only


def test_oversampling_raises_the_tumour_slice_fraction(ct_records):
    def tumour_fraction(**kw):
        ds = get_dataset(ct_records, "train", batch_size=8, training=True, seed=0, repeat=True, **kw)
        y = np.concatenate([y for _, y in ds.take(30).as_numpy_iterator()])
        return (y.max(axis=(1, 2)) == 2).mean()

    base = tumour_fraction()
    assert tumour_fraction(oversample_tumour=0.6) > base + 0.25


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_oversampled_share_of_tumour_slices_reaches_the_batches(ct_records, fraction):
    # The training path of kerasunet train: augmented, resized, repeated, full batches. A slice
    # is drawn from the tumour slices with probability f, else from all slices (tumour share
    # p), so batches hold f + (1 - f) p tumour slices; 4 standard errors of 320 draws allow
    # for the shuffle buffer's correlation.
    stats = read_manifest(ct_records)["class_stats"]["train"]
    p = stats["tumour_slices"] / stats["num_slices"]
    expected = fraction + (1 - fraction) * p
    ds = get_dataset(ct_records, "train", batch_size=8, training=True, image_size=(32, 32),
                     augment=AugmentSettings(affine_prob=0.0), oversample_tumour=fraction, seed=1234,
                     repeat=True, drop_remainder=True)
    y = np.concatenate([y for _, y in ds.take(40).as_numpy_iterator()])
    share = (y.max(axis=(1, 2)) == 2).mean()
    assert 0.1 < p < 0.6 and len(y) == 320
    assert abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / len(y)) + 0.02, (share, expected)


def test_finite_oversampled_epoch_ends(ct_records):
    n = read_manifest(ct_records)["splits"]["train"]["num_examples"]
    ds = get_dataset(ct_records, "train", batch_size=1, training=True, seed=0, oversample_tumour=0.5)
    assert n < sum(1 for _ in ds) < 10 * n


def test_empty_split_and_missing_manifest_are_clear_errors(ct_records, tmp_path):
    empty = r"manifest.json: split 'test' is empty \(splits with examples: \['train', 'val'\]\)"
    with pytest.raises(RecordsError, match=empty):
        get_dataset(ct_records, "test", batch_size=2, training=False)
    with pytest.raises(RecordsError, match=r"manifest.json: not found \(build it with `kerasunet build-records`\)"):
        read_manifest(tmp_path)


def test_verify_records_names_a_corrupt_shard(ct_records, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ct_records, copy)
    shard = sorted(copy.glob("lits-val.tfrecord-*"))[0]
    blob = bytearray(shard.read_bytes())
    blob[100] ^= 0xFF
    shard.write_bytes(bytes(blob))
    (problem,) = verify_records(copy)
    assert problem.startswith(f"{shard}: SHA-256 mismatch")


def test_shard_cut_at_a_record_boundary_stops_the_reader_and_is_named(ct_records, tmp_path):
    import shutil
    import struct

    import tensorflow as tf

    from kerasunet.train import unreadable_shard

    copy = tmp_path / "copy"
    shutil.copytree(ct_records, copy)
    manifest = read_manifest(copy)
    entry = max(manifest["splits"]["train"]["shards"], key=lambda s: s["num_examples"])
    assert entry["num_examples"] >= 2
    shard = copy / entry["file"]
    # Keep the first record whole (TFRecord: 8-byte length, 4-byte CRC, data, 4-byte CRC): to
    # TFRecordDataset the cut file is a clean end of file with one example.
    content = shard.read_bytes()
    shard.write_bytes(content[:struct.unpack("<Q", content[:8])[0] + 16])
    expected = rf"expected to contain {entry['num_examples']} elements but contained only 1 element"
    with pytest.raises(tf.errors.FailedPreconditionError, match=expected) as caught:
        _all(get_dataset(copy, "train", batch_size=2, training=False))
    assert unreadable_shard(copy, manifest, "train", caught.value).startswith(f"{shard}: SHA-256 mismatch")
