"""End to end on the shared phantom set: NIfTI -> records -> reader, checked against load_volume."""

import numpy as np

from kerasunet.data import get_dataset, load_split_examples, verify_records
from kerasunet.core.nifti import load_volume
from kerasunet.core.preprocessing import normalize_np
from kerasunet.core.records_format import DEFAULT_CONTEXT
from tests.helpers import build_settings
from tfrecords_builder.build import build_records


def _check_voxels(out, manifest, context):
    for split in manifest["splits"]:
        for ex in load_split_examples(out, split):
            case = manifest["cases"][ex["case_id"]]
            image, label = load_volume(case["image"]).data, load_volume(case["label"]).data
            k, depth = ex["slice_index"], image.shape[2]
            expected = np.stack([image[:, :, min(max(k + d, 0), depth - 1)]
                                 for d in range(-context, context + 1)], -1)
            np.testing.assert_array_equal(ex["image"], expected)
            np.testing.assert_array_equal(ex["label"], label[:, :, k])


def test_lits_phantoms_round_trip_with_context_and_holdout_last(tiny_phantoms, tmp_path):
    out = tmp_path / "ct"
    manifest = build_records(build_settings(tiny_phantoms / "lits", out, context=1, holdout="last",
                                            liver_slices=5, non_liver_slices=2))
    assert manifest["splits"]["test"]["cases"] == ["volume-5"]  # stored PLI
    assert manifest["splits"]["val"]["cases"] == ["volume-4"]
    assert manifest["skipped"] == []
    _check_voxels(out, manifest, context=1)  # volume-2 is LPS, volume-3 gzipped
    assert verify_records(out) == []


def test_mri_phantoms_skip_defects_and_normalise_per_case(tiny_phantoms, tmp_path):
    out = tmp_path / "mri"
    manifest = build_records(build_settings(tiny_phantoms / "mri", out, dataset="mri", val_fraction=0.25,
                                            test_fraction=0, seed=1))
    reasons = {s["case_id"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {"FZMC002": "image shape (48, 40, 12) differs from label shape (48, 40, 11)",
                       "FZMC004": "label missing"}
    assert all(len(c["slices"]) == 12 for c in manifest["cases"].values())  # MRI: all slices
    _check_voxels(out, manifest, context=DEFAULT_CONTEXT)
    x, y = next(iter(get_dataset(out, "val", batch_size=12, training=False, pad_to_multiple=16)))
    assert x.shape == (12, 48, 48, 2 * DEFAULT_CONTEXT + 1) and y.shape == (12, 48, 48) and y.dtype == "uint8"
    (val_case,) = manifest["splits"]["val"]["cases"]
    raw = load_volume(manifest["cases"][val_case]["image"]).data[:, :, :, None]
    stats = np.array(manifest["cases"][val_case]["norm_stats"], np.float32)
    centre = x[:, :, :40, DEFAULT_CONTEXT:DEFAULT_CONTEXT + 1]  # the slice itself
    np.testing.assert_allclose(centre, np.moveaxis(normalize_np(raw, stats), 2, 0), atol=1e-5)
