import numpy as np
import pytest
from matplotlib.axes import Axes

from kerasunet import figures
from kerasunet.figures import COLOURS


@pytest.fixture
def shown(monkeypatch):
    """The arrays handed to ``imshow`` with the origin asked for; they are still drawn."""
    calls = []
    imshow = Axes.imshow

    def spy(self, data, *args, **kwargs):
        calls.append((np.asarray(data).copy(), kwargs.get("origin")))
        return imshow(self, data, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", spy)
    return calls


def _marked_slice():
    """A canonical (x, y) slice, 8 x 6, marked at high x and high y: the patient's right, anterior."""
    image = np.zeros((8, 6), np.float32)
    image[6:, 4:] = 1.0
    label = np.zeros((8, 6), np.uint8)
    label[6:, 4:] = 2  # CT tumour
    return image, label


def test_example_grid_shows_slices_as_the_evaluate_overlays_do(tmp_path, shown):
    image, label = _marked_slice()
    figures.overlay_figure(image, label, {}, tmp_path / "overlay.png", outputs="ct")
    overlay_image, _, overlay_labels = shown[:3]  # "image" panel, then "ground truth": image + labels
    shown.clear()
    other = np.zeros_like(image)
    other[0, 0] = 5.0  # neighbour slices, marked elsewhere: only the centre channel is shown
    example = {"key": "volume-0/3", "image": np.stack([other, image, other], axis=-1), "label": label,
               "norm_stats": np.array([0.0, 1.0, 0.0, 1.0], np.float32)}  # clip to [0, 1], identity
    path = figures.save_example_grid([example], "ct", tmp_path / "grid.png", columns=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (grid_image, origin_image), (grid_labels, origin_labels) = shown
    assert origin_image in (None, "upper") and origin_labels in (None, "upper")
    # radiological display: anterior at the top, the patient's right on the viewer's left
    expected = np.zeros((6, 8), np.float32)
    expected[:2, :2] = 1.0
    np.testing.assert_array_equal(grid_image, expected)
    np.testing.assert_array_equal(grid_image, overlay_image[0])
    np.testing.assert_array_equal(grid_labels, overlay_labels[0])
    assert (grid_labels[:2, :2, :3] == np.float32(COLOURS["tumour"])).all()
    assert (grid_labels[:2, :2, 3] > 0).all() and grid_labels[..., 3].sum() == grid_labels[:2, :2, 3].sum()


def test_example_grid_needs_an_example(tmp_path):
    with pytest.raises(ValueError, match=r"^Expected at least one example to show. Received: 0 examples$"):
        figures.save_example_grid([], "ct", tmp_path / "grid.png")


def test_overlays_colour_the_structures_a_label_map_holds():
    labels = np.array([[0, 1, 2]], np.uint8)
    both = figures.colour_labels(labels, ("liver", "tumour"))  # CT, or an ATLAS MRI model
    assert (both[0, 1, :3] == np.float32(COLOURS["liver"])).all()
    assert (both[0, 2, :3] == np.float32(COLOURS["tumour"])).all()
    tumour_only = figures.colour_labels(labels, "mri")
    assert (tumour_only[0, 1, :3] == np.float32(COLOURS["tumour"])).all() and tumour_only[0, 2, 3] == 0
