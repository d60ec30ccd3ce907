import numpy as np
import pytest

from tfrecords_builder.features import FEATURES, decode_example, parse_example, serialize_example, slice_example


@pytest.mark.parametrize("shape", [(5, 7, 1), (6, 4, 3)])
def test_slice_example_round_trips_through_parse_and_decode(shape):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32) * 1000
    label = rng.integers(0, 3, size=shape[:2]).astype(np.uint8)
    blob = slice_example("volume-3", 17, image, label, (0.7, 0.8, 2.5), [-200, 250, 25, 225], True)
    assert blob == slice_example("volume-3", 17, image, label, (0.7, 0.8, 2.5), [-200, 250, 25, 225], True)
    ex = {k: v.numpy() for k, v in decode_example(parse_example(blob), channels=shape[2]).items()}
    np.testing.assert_array_equal(ex["image"], image)
    np.testing.assert_array_equal(ex["label"], label)
    assert ex["source_id"] == b"volume-3/17" and ex["case_id"] == b"volume-3" and ex["slice_index"] == 17
    np.testing.assert_allclose(ex["spacing"], [0.7, 0.8, 2.5], rtol=1e-6)
    np.testing.assert_array_equal(ex["norm_stats"], [-200, 250, 25, 225])
    assert ex["has_tumour"]


def test_serialize_example_needs_exactly_the_spec_keys():
    with pytest.raises(ValueError, match=r"Expected the keys \[.*\]. Received: keys=\['image/height'\]"):
        serialize_example({"image/height": 3})


def test_vector_features_check_their_length():
    values = dict.fromkeys(FEATURES, 0)
    values.update({"image/encoded": b"", "image/spacing": [1, 2], "image/norm_stats": [0, 1, 2, 3]})
    match = r"Expected 3 value\(s\) for 'image/spacing'. Received: image/spacing=\[1, 2\]"
    with pytest.raises(ValueError, match=match):
        serialize_example(values)


def test_label_must_match_the_image_plane():
    with pytest.raises(ValueError, match=r"Received: image.shape=\(4, 4, 1\), label.shape=\(4, 5\)"):
        slice_example("c", 0, np.zeros((4, 4, 1)), np.zeros((4, 5)), (1, 1, 1), [0, 1, 0, 1], False)
