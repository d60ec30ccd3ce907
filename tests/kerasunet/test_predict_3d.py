"""Tests of 3D inference: kerasunet.predict's sliding window, evaluate through it, and serving.

3D runs are written by hand (tests/helpers.py ``write_run_3d``), as the run contract in
kerasunet/core/runs.py describes them.
"""

import json

import nibabel as nib
import numpy as np
import pytest

from kerasunet.core.nifti import load_volume
from kerasunet.core.preprocessing import NormSettings, case_stats, normalize_np
from kerasunet.evaluate import EvaluateSettings, evaluate
from kerasunet.export import SETTINGS_SIGNATURE, export_model
from kerasunet.postprocess import PostprocessSettings
from kerasunet.predict import PredictSettings, predict_path, predict_path_served, segment_volume_3d
from tests.helpers import (GrpcServingDouble, ServingDouble, expected_ct_labels, lits_folder, tensorflow_only,
                           threshold_model_3d, write_run_3d, write_unet_run_3d)

QUIET = {"progress": lambda line: None}
RAW = PredictSettings(postprocess=PostprocessSettings(enabled=False))
PATCH = (8, 16, 16)
# stored axis 0 is world z (flipped, 0.7 mm), axis 1 world x (0.8 mm), axis 2 world y (2.5 mm)
PERMUTED = np.array([[0, 0.8, 0, 0], [0, 0, 2.5, 0], [-0.7, 0, 0, 0], [0, 0, 0, 1]])
CANONICAL_DHW_SPACING = (0.7, 0.8, 2.5)  # (z, x, y)


def stored_phantom(z_constant: bool) -> np.ndarray:
    """CT in the PERMUTED stored order (z, x, y) = (10, 24, 16); off-centre blocks, no symmetry."""
    hu = np.full((10, 24, 16), -500.0, np.float32)
    z = slice(None) if z_constant else slice(2, 7)
    hu[z, 3:12, 2:9] = 100.0
    hu[z, 4:7, 3:6] = 200.0
    hu[(slice(None) if z_constant else slice(3, 5)), 15:18, 10:14] = 200.0
    return hu


def test_windows_are_canonical_z_x_y(tmp_path):
    # an asymmetric volume whose axes all differ in size: a window is np.moveaxis(data, 2, 0)[...]
    data = np.random.default_rng(0).normal(0, 300, (24, 16, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "v.nii"))
    volume = load_volume(tmp_path / "v.nii")
    norm, seen = NormSettings("ct"), []

    def predict_raw(raw, stats):
        seen.append(raw.copy())
        return normalize_np(raw, stats)  # a model that returns its (normalised) input

    labels, probs = segment_volume_3d(predict_raw, volume, norm, PATCH, None, ("tumour",), RAW, batch_size=3)
    dhw = np.moveaxis(data, 2, 0)
    assert [len(b) for b in seen] == [3, 1]  # windows: D starts 0, 4; H 0, 8; W 0
    assert np.array_equal(seen[0][0, ..., 0], dhw[:8, :16, :16])
    assert np.array_equal(seen[0][1, ..., 0], dhw[:8, 8:24, :16])  # second window moves along H = x
    assert np.array_equal(seen[0][2, ..., 0], dhw[4:12, :16, :16])
    expected = normalize_np(data, case_stats(data, norm))
    assert probs.shape == (24, 16, 12, 1) and np.allclose(probs[..., 0], expected, atol=1e-6)
    assert np.array_equal(labels, (probs[..., 0] >= 0.5).astype(np.uint8))


@pytest.mark.parametrize("z_constant, model_spacing", [
    (False, CANONICAL_DHW_SPACING),  # the volume's own spacing: no resampling
    (True, (1.4, 0.8, 2.5)),  # z resampled to half its slices (shorter than the window) and back
])
def test_known_model_gives_the_expected_mask_in_the_input_geometry(tmp_path, z_constant, model_spacing):
    hu = stored_phantom(z_constant)
    nib.save(nib.Nifti1Image(hu, PERMUTED), str(tmp_path / "case.nii.gz"))
    run = write_run_3d(tmp_path / "run", threshold_model_3d(), patch_size=PATCH, spacing=model_spacing)
    result = predict_path(run, tmp_path / "case.nii.gz", tmp_path / "mask.nii.gz",
                          PredictSettings(postprocess=PostprocessSettings(enabled=False), save_probabilities=True,
                                          patch_batch_size=2), **QUIET)
    assert result.written == [tmp_path / "mask.nii.gz"] and not result.failures
    mask = nib.load(str(tmp_path / "mask.nii.gz"))
    assert np.allclose(mask.affine, PERMUTED) and mask.shape == hu.shape
    assert np.array_equal(np.asarray(mask.dataobj), expected_ct_labels(hu))
    probs = nib.load(str(tmp_path / "mask_probabilities.nii.gz"))
    assert probs.shape == (*hu.shape, 2)


def test_evaluate_runs_a_3d_model_through_predict(tmp_path):
    data = lits_folder(tmp_path / "lits")  # labels are what the threshold model finds
    run = write_run_3d(tmp_path / "exact3d", threshold_model_3d(), patch_size=PATCH)
    summary = evaluate({"exact3d": run}, data, tmp_path / "report", EvaluateSettings(n_overlays=0), **QUIET)
    scores = summary["models"]["exact3d"]["structures"]
    assert summary["cases"] == ["volume-0", "volume-1", "volume-2"]
    assert scores["liver"]["dice_per_case"] == 1.0 and scores["tumour"]["global_dice"] == 1.0


@pytest.fixture(scope="module")
def served_3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("served3d")
    run = write_unet_run_3d(root / "run", "mri", patch_size=PATCH, spacing=(1.4, 0.8, 2.5), seed=3)
    export_model(run, root / "saved_models" / "mri3d")
    rng = np.random.default_rng(1)
    hu = rng.gamma(2.0, 150.0, (10, 24, 16)).astype(np.float32)  # MRI units: stats are per case
    hu[2:7, 3:12, 2:9] += 400.0
    nib.save(nib.Nifti1Image(hu, PERMUTED), str(root / "case.nii.gz"))
    predict_path(run, root / "case.nii.gz", root / "local.nii.gz", RAW, **QUIET)
    return root, np.asarray(nib.load(str(root / "local.nii.gz")).dataobj)


@tensorflow_only
def test_export_records_dims_and_patch_size(served_3d):
    root, _ = served_3d
    info = json.loads((root / "saved_models" / "mri3d" / "export.json").read_text())
    assert info["dims"] == 3 and info["patch_size"] == list(PATCH) and info["spacing"] == [1.4, 0.8, 2.5]
    assert info["inputs"]["image"]["shape"] == [None, *PATCH, 1] and info["inputs"]["stats"]["shape"] == [None, 4]
    assert info["settings_signature"]["outputs"]["percentiles"] == [1.0, 99.0]
    assert info["batching_parameters"] is None and not (root / "saved_models/mri3d/batching_parameters.txt").exists()


@tensorflow_only
@pytest.mark.parametrize("double", [ServingDouble, GrpcServingDouble])
def test_served_masks_equal_local_ones(served_3d, tmp_path, double):
    root, local = served_3d
    assert 0 < local.mean() < 1  # both labels occur: the comparison means something
    with double(root / "saved_models" / "mri3d") as server:
        result = predict_path_served(server.url, "mri3d", root / "case.nii.gz", tmp_path / "served.nii.gz",
                                     RAW, **QUIET)
        requests = list(server.requests)
    assert not result.failures
    served = np.asarray(nib.load(str(tmp_path / "served.nii.gz")).dataobj)
    assert np.array_equal(served, local)
    if double is ServingDouble:  # metadata, the settings signature, then windows with one stats row each
        bodies = [body for method, _, body in requests if method == "POST"]
        assert bodies[0]["signature_name"] == SETTINGS_SIGNATURE
        windows = [np.array(b["inputs"]["image"]) for b in bodies[1:]]
        assert {w.shape[1:] for w in windows} == {(*PATCH, 1)}
        stats = np.array(bodies[1]["inputs"]["stats"])
        assert stats.shape == (len(windows[0]), 4) and stats[0, 0] < stats[0, 1]
