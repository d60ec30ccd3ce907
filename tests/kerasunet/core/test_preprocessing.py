import numpy as np
import pytest

from kerasunet.core.preprocessing import NormSettings, case_stats, normalize, normalize_np, stats_in_graph


def test_ct_window_maps_to_unit_range():
    s = NormSettings("ct", hu_window=(-200, 250))
    x = np.array([-1000.0, -200.0, 25.0, 250.0, 3000.0], np.float32)
    np.testing.assert_allclose(normalize_np(x, case_stats(x, s)), [-1, -1, 0, 1, 1], atol=1e-6)


def test_mri_stats_in_graph_match_numpy_and_normalise_to_z_scores():
    rng = np.random.default_rng(1)
    vol = rng.gamma(2.0, 300.0, size=(16, 12, 6)).astype(np.float32)
    s = NormSettings("mri")
    ref = case_stats(vol, s)
    np.testing.assert_allclose(np.asarray(stats_in_graph(vol, s)), ref, rtol=1e-4)
    z = normalize_np(vol, ref)
    assert abs(z.mean()) < 1e-3 and abs(z.std() - 1) < 1e-3
    batch = np.moveaxis(vol, 2, 0)[..., None]
    per_example = np.repeat(ref[None], batch.shape[0], axis=0)
    np.testing.assert_allclose(np.asarray(normalize(batch, per_example)), normalize_np(batch, ref), atol=1e-5)


def test_bad_settings_are_rejected_with_the_value():
    with pytest.raises(ValueError, match=r"Received: modality='pet'"):
        NormSettings("pet")
