"""Slice figures: overlays of image, ground truth and predictions side by side (as figures 11-13 of
the research), and grids of stored training examples (``inspect-records --show``).

Slices are canonical axial slices ``volume[:, :, k]`` (rows = canonical x, columns = y). They are
shown in radiological display orientation: anterior at the top and the patient's right on the
viewer's left, i.e. the slice is transposed (rows = y) and flipped in both axes, because RAS+
puts +x to the patient's right and +y anterior (:func:`display`).

Labels are drawn as filled colours, liver green and tumour red. A label map holds the structures
of its ``outputs`` valued by ``kerasunet.core.labels.label_values`` (liver 1 / tumour 2, or tumour
1 for tumour-only maps); a modality name ("ct", "mri") stands for its default structures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kerasunet.core.atomic import atomic_path
from kerasunet.core.labels import as_outputs, label_values
from kerasunet.lits_metrics import structure_masks

COLOURS = {"liver": (0.1, 0.8, 0.2), "tumour": (0.95, 0.1, 0.1)}
ALPHA = 0.45


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Lays out ``fig``, writes it as a PNG atomically, closes it and returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def display(slice_2d: np.ndarray) -> np.ndarray:
    """Canonical ``(x, y)`` slice -> radiological display array (rows: anterior->posterior,
    columns: patient right->left)."""
    return np.asarray(slice_2d).T[::-1, ::-1]


def pick_slice(label_volume: np.ndarray, structure: str = "tumour", outputs="ct") -> int:
    """The axial index with the most voxels of ``structure``.

    Falls back to the slice with the most foreground (label >= 1), then to the middle slice,
    so every case gets a figure.
    """
    masks = structure_masks(label_volume, outputs)
    for mask in (masks.get(structure), label_volume >= 1):
        if mask is not None and mask.any():
            return int(np.argmax(mask.sum(axis=(0, 1))))
    return label_volume.shape[2] // 2


def colour_labels(labels: np.ndarray, outputs) -> np.ndarray:
    """RGBA overlay ``(rows, cols, 4)`` of a display-oriented label slice; background transparent."""
    rgba = np.zeros((*labels.shape, 4), np.float32)
    for name, value in label_values(as_outputs(outputs)).items():
        rgba[labels == value] = (*COLOURS[name], ALPHA)
    return rgba


def draw_slice(ax, image_slice: np.ndarray, label_slice: np.ndarray | None, outputs,
               display_range: tuple[float, float] | None = None) -> None:
    """Draws a canonical slice in display orientation, its labels coloured on top, no axes.

    Every figure of a slice goes through here, so all show it the same way (:func:`display`).

    Args:
        ax: the matplotlib axes.
        image_slice: canonical ``(x, y)`` image slice.
        label_slice: canonical label slice of the same shape, or None for the image alone.
        outputs: the structures the labels hold (values and colours), or "ct"/"mri".
        display_range: grey-level window; default the slice's 1st-99th percentiles.
    """
    image = display(image_slice)
    vmin, vmax = display_range or tuple(np.percentile(image, [1, 99]))
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=max(vmax, vmin + 1e-6), interpolation="nearest")
    if label_slice is not None:
        ax.imshow(colour_labels(display(label_slice), outputs), interpolation="nearest")
    ax.axis("off")


def overlay_figure(image_slice: np.ndarray, truth_slice: np.ndarray, predictions: dict[str, np.ndarray],
                   path, title: str | None = None, outputs="ct",
                   display_range: tuple[float, float] | None = None) -> Path:
    """Writes a PNG: the image, then the image with the truth, then one panel per prediction.

    Args:
        image_slice: canonical ``(x, y)`` image slice (normalised or raw).
        truth_slice: canonical label slice, same shape.
        predictions: panel title -> canonical label slice (e.g. one per model).
        path: the PNG to write (atomically).
        title: figure title.
        outputs: the structures the labels hold (values and colours), or "ct"/"mri".
        display_range: grey-level window; default the slice's 1st-99th percentiles.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image", None), ("ground truth", truth_slice), *predictions.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, (name, labels) in zip(axes[0], panels):
        draw_slice(ax, image_slice, labels, outputs, display_range)
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_example_grid(examples: list[dict], outputs, path, columns: int = 4) -> Path:
    """Writes a PNG grid of stored examples (centre channel, normalised) with their labels overlaid.

    The slices are shown as the ``evaluate`` overlays show them (:func:`draw_slice`).

    Args:
        examples: dicts from :func:`kerasunet.data.load_split_examples`: ``image`` raw
            ``(H, W, C)`` canonical slices, ``label``, ``norm_stats`` and ``key``.
        outputs: the structures the labels hold (the manifest's ``outputs``), or "ct"/"mri".
        path: the PNG to write (atomically).
        columns: images per row.

    Returns:
        ``path``.

    Raises:
        ValueError: no example.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kerasunet.core.preprocessing import normalize_np

    if not examples:
        raise ValueError("Expected at least one example to show. Received: 0 examples")
    rows = -(-len(examples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, ex in zip(axes.ravel(), examples):
        centre = ex["image"][..., ex["image"].shape[-1] // 2]
        draw_slice(ax, normalize_np(centre, ex["norm_stats"]), ex["label"], outputs)
        ax.set_title(ex["key"], fontsize=8)
    return save_figure(fig, path, dpi=80)
