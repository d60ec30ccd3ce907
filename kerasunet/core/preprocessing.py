"""Intensity normalisation, defined once and used by the reader, predict and the export graph.

Records store raw intensities (HU for CT, scanner units for MRI) plus, per example, the
statistics of its case: ``[lo, hi, mean, std]``. Normalising is then one formula for both
modalities::

    x_norm = (clip(x, lo, hi) - mean) / std

* CT: ``lo, hi`` is a fixed HU window and ``mean, std`` map it onto [-1, 1].
* MRI: ``lo, hi`` are percentiles of the case's voxels and ``mean, std`` the z-score of the
  clipped case (per case, as MRI units are arbitrary and vary between scans).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MODALITIES = ("ct", "mri")


@dataclass(frozen=True)
class NormSettings:
    """How raw intensities become network inputs.

    Attributes:
        modality: "ct" or "mri".
        hu_window: CT window in HU (lo, hi). The default covers liver, tumours and vessels.
        percentiles: MRI clip percentiles (lo, hi) of each case's voxels.
    """

    modality: str
    hu_window: tuple[float, float] = (-200.0, 250.0)
    percentiles: tuple[float, float] = (1.0, 99.0)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"Expected modality in {MODALITIES}. Received: modality={self.modality!r}")
        if not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"Expected hu_window lo < hi. Received: hu_window={self.hu_window}")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"Expected 0 <= lo < hi <= 100. Received: percentiles={self.percentiles}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NormSettings":
        return cls(modality=d["modality"], hu_window=tuple(d.get("hu_window", cls.hu_window)),
                   percentiles=tuple(d.get("percentiles", cls.percentiles)))


def case_stats(volume: np.ndarray, settings: NormSettings) -> np.ndarray:
    """Per-case normalisation statistics ``[lo, hi, mean, std]`` (float32) of a raw volume."""
    if settings.modality == "ct":
        lo, hi = settings.hu_window
        return np.array([lo, hi, (lo + hi) / 2.0, (hi - lo) / 2.0], dtype=np.float32)
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(v, settings.percentiles)
    clipped = np.clip(v, lo, hi)
    std = max(float(clipped.std()), 1e-6)
    return np.array([lo, hi, clipped.mean(), std], dtype=np.float32)


def stats_in_graph(x, settings: NormSettings):
    """``case_stats`` in ``keras.ops``, over all voxels of ``x`` (for the export graph).

    For MRI this treats the whole tensor as one case: a serving request should hold the
    slices of one case. Same formula and percentile method (linear) as ``case_stats``.
    """
    from keras import ops

    if settings.modality == "ct":
        return ops.convert_to_tensor(case_stats(None, settings))
    flat = ops.reshape(ops.cast(x, "float32"), (-1,))
    q = ops.quantile(flat, ops.convert_to_tensor(np.array(settings.percentiles, np.float32) / 100.0))
    clipped = ops.clip(flat, q[0], q[1])
    std = ops.maximum(ops.std(clipped), 1e-6)
    return ops.stack([q[0], q[1], ops.mean(clipped), std])


def normalize(x, stats):
    """``(clip(x, lo, hi) - mean) / std`` with ``stats = [lo, hi, mean, std]``; keras.ops, any backend.

    ``stats`` may also be ``[batch, 4]`` to normalise each example with its own case's stats.
    """
    from keras import ops

    x = ops.cast(x, "float32")
    stats = ops.cast(stats, "float32")
    if len(stats.shape) == 2:  # per-example stats, broadcast over H, W, C
        stats = ops.reshape(stats, (-1, 1, 1, 1, 4))
        lo, hi, mean, std = (stats[..., i] for i in range(4))
    else:
        lo, hi, mean, std = (stats[i] for i in range(4))
    return (ops.clip(x, lo, hi) - mean) / std


def normalize_np(x: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`normalize` for a single stats vector (predict's host-side path)."""
    lo, hi, mean, std = (float(s) for s in stats)
    return ((np.clip(x, lo, hi) - mean) / std).astype(np.float32)


def resampled_shape(shape, spacing, target) -> list[int]:
    """The size per axis after resampling from ``spacing`` to ``target`` (at least 1)."""
    if target is None:
        return [int(n) for n in shape]
    return [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target)]


def resample(volume: np.ndarray, shape, order: int) -> np.ndarray:
    """``volume`` resampled to ``shape`` (voxel extents aligned: scipy's ``grid_mode``)."""
    from scipy import ndimage

    if list(volume.shape) == list(shape):
        return volume
    zoom = [t / n for t, n in zip(shape, volume.shape)]
    return ndimage.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True)
