"""Tests of kerasunet.postprocess: liver component, tumour inside the liver, small specks."""

import numpy as np
import pytest

from kerasunet.postprocess import PostprocessSettings, largest_component, postprocess

CT, MRI = ("liver", "tumour"), ("tumour",)  # the structures each label map holds
SPACING = (1.0, 1.0, 3.0)


def ct_labels():
    labels = np.zeros((40, 30, 12), np.uint8)
    labels[5:25, 5:25, 2:10] = 1  # liver
    labels[10:16, 10:16, 4:8] = 2  # tumour inside the liver (144 voxels)
    labels[20, 20, 5] = 2  # a 1-voxel tumour speck inside the liver
    labels[33:37, 2:6, 2:6] = 1  # distant false-positive "liver" blob
    labels[34:36, 26:29, 8:10] = 2  # distant false-positive tumour (12 voxels)
    return labels


def test_ct_defaults_remove_distant_blobs_and_specks():
    out = postprocess(ct_labels(), CT, SPACING, PostprocessSettings())
    expected = np.zeros_like(out)
    expected[5:25, 5:25, 2:10] = 1
    expected[10:16, 10:16, 4:8] = 2
    np.testing.assert_array_equal(out, expected)  # the speck became liver, the blobs background


def test_disabled_returns_a_copy_unchanged():
    labels = ct_labels()
    out = postprocess(labels, CT, SPACING, PostprocessSettings(enabled=False))
    np.testing.assert_array_equal(out, labels)
    assert out is not labels


def test_each_switch_on_its_own():
    labels = ct_labels()
    only_size = PostprocessSettings(largest_liver_component=False, tumour_in_liver=False)
    out = postprocess(labels, CT, SPACING, only_size)
    assert out[33:37, 2:6, 2:6].all() and (out[34:36, 26:29, 8:10] == 2).all() and out[20, 20, 5] == 1
    no_size = PostprocessSettings(min_tumour_voxels=0)
    out = postprocess(labels, CT, SPACING, no_size)
    assert out[20, 20, 5] == 2 and not out[33:37].any()
    component_only = PostprocessSettings(tumour_in_liver=False, min_tumour_voxels=0)
    out = postprocess(labels, CT, SPACING, component_only)
    assert not out[33:37, 2:6, 2:6].any() and (out[34:36, 26:29, 8:10] == 2).all()


@pytest.mark.parametrize("gap_axis, gap, dilation, kept", [
    (0, 2, 5.0, True),    # 3 voxels x 1 mm from the liver: within 5 mm
    (0, 2, 2.0, False),   # ... but not within 2 mm
    (2, 2, 5.0, False),   # 3 voxels x 3 mm along z = 9 mm: outside
    (2, 1, 6.0, True),    # 2 voxels x 3 mm = 6 mm: inside
])
def test_tumour_near_the_liver_uses_the_dilation_in_mm(gap_axis, gap, dilation, kept):
    labels = np.zeros((30, 20, 20), np.uint8)
    labels[5:15, 5:15, 2:8] = 1
    start = [15, 7, 3] if gap_axis == 0 else [7, 7, 8]
    start[gap_axis] += gap  # a separate tumour component, `gap` empty voxels away
    labels[tuple(slice(s, s + 3) for s in start)] = 2
    out = postprocess(labels, CT, SPACING, PostprocessSettings(liver_dilation_mm=dilation, min_tumour_voxels=0))
    assert (out == 2).any() == kept
    assert (out == 1).sum() == 10 * 10 * 6  # the liver itself is untouched


def test_mri_only_filters_small_tumours():
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[2:6, 2:6, 2:5] = 1  # 48 voxels
    labels[15:17, 15:17, 7] = 1  # 4 voxels
    out = postprocess(labels, MRI, SPACING, PostprocessSettings(min_tumour_voxels=10))
    assert out.sum() == 48 and out[2:6, 2:6, 2:5].all()
    assert postprocess(labels, MRI, SPACING, PostprocessSettings(min_tumour_voxels=4)).sum() == 52


def test_largest_component_uses_full_connectivity_and_handles_empty():
    mask = np.zeros((6, 6, 6), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # diagonal chain: one component
    mask[5, 5, 0] = mask[5, 4, 0] = True
    assert largest_component(mask).sum() == 3
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"Expected min_tumour_voxels >= 0. Received: min_tumour_voxels=-1"):
        PostprocessSettings(min_tumour_voxels=-1)
    with pytest.raises(ValueError, match=r"Expected liver_dilation_mm >= 0. Received: liver_dilation_mm=-2.0"):
        PostprocessSettings(liver_dilation_mm=-2.0)


@pytest.mark.parametrize("seed", range(3))
def test_within_distance_matches_a_whole_volume_distance_transform(seed):
    from scipy import ndimage

    from kerasunet.postprocess import within_distance

    rng = np.random.default_rng(seed)
    region, candidates = rng.random((30, 26, 14)) > 0.995, rng.random((30, 26, 14)) > 0.97
    spacing = (0.8, 1.3, 2.5)
    expected = candidates & (ndimage.distance_transform_edt(~region, sampling=spacing) <= 4.0)
    np.testing.assert_array_equal(within_distance(region, candidates, spacing, 4.0), expected)


def test_holes_enclosed_by_liver_within_a_slice_become_liver():
    labels = ct_labels()
    labels[7:9, 18:20, 3] = 0  # a hole inside the liver (a missed vessel, say)
    labels[5:25, 5:7, 9] = 0  # a notch open to the outside: not a hole
    labels[14:16, 14:16, 6] = 0  # background inside the tumour: enclosed, so liver
    out = postprocess(labels, CT, SPACING, PostprocessSettings())
    assert (out[7:9, 18:20, 3] == 1).all() and (out[14:16, 14:16, 6] == 1).all()
    assert not out[5:25, 5:7, 9].any()
    kept = postprocess(labels, CT, SPACING, PostprocessSettings(fill_liver_holes=False))
    assert not kept[7:9, 18:20, 3].any() and not kept[14:16, 14:16, 6].any()
    np.testing.assert_array_equal(out[..., :3], kept[..., :3])  # slices without holes are unchanged
