"""Output channels and label values, shared by training targets, predict and export.

CT models have two sigmoid channels (liver, tumour) and write LiTS labels
(0 background, 1 liver, 2 tumour). MRI models have one channel (tumour) and write 0/1.
"""

from __future__ import annotations

import numpy as np

OUTPUTS = {"ct": ("liver", "tumour"), "mri": ("tumour",)}
LABEL_VALUES = {"liver": 1, "tumour": 2}
VALID_LABELS = {"ct": (0, 1, 2), "mri": (0, 1)}


def output_names(modality: str) -> tuple[str, ...]:
    return OUTPUTS[modality]


def targets_from_labels_np(label: np.ndarray, modality: str) -> np.ndarray:
    """Label map ``(...)`` -> multi-label float32 targets ``(..., channels)``.

    CT: liver = label >= 1 (the liver includes its tumours), tumour = label == 2. MRI: tumour = label >= 1.
    """
    if modality == "ct":
        return np.stack([label >= 1, label == 2], axis=-1).astype(np.float32)
    return (label >= 1)[..., None].astype(np.float32)


def labels_from_probabilities_np(probs: np.ndarray, modality: str, threshold: float = 0.5) -> np.ndarray:
    """Sigmoid probabilities ``(..., channels)`` -> uint8 label map in the dataset's convention."""
    fg = probs >= threshold
    if modality == "ct":
        out = np.zeros(probs.shape[:-1], np.uint8)
        out[fg[..., 0]] = 1
        out[fg[..., 1]] = 2  # tumour wins: it lies inside the liver
        return out
    return fg[..., 0].astype(np.uint8)


def labels_from_probabilities(probs, modality: str, threshold: float = 0.5):
    """keras.ops twin of :func:`labels_from_probabilities_np` (used inside the export graph)."""
    from keras import ops

    fg = ops.cast(probs >= threshold, "uint8")
    if modality == "ct":
        liver, tumour = fg[..., 0], fg[..., 1]
        return ops.maximum(liver, tumour * 2)
    return fg[..., 0]
