"""Structures, output channels and label values, shared by case loading, training targets, predict and export.

Labels are read by structure, not by value: each dataset layout says which structure each of
its label values (or mask folders) holds, and :func:`structure_of` names the structure of a
label name as datasets write it. Inside kerasunet a label map holds the project's values:
each modality's structures are numbered in the order of ``OUTPUTS`` (index + 1), so CT models
(two sigmoid channels: liver, tumour) write LiTS labels (0 background, 1 liver, 2 tumour) and
MRI models (one channel: tumour) write 0/1. A structure a modality's models do not segment
(liver in MRI) reads as background.
"""

from __future__ import annotations

import re

import numpy as np

STRUCTURES = ("liver", "tumour")
OUTPUTS = {"ct": ("liver", "tumour"), "mri": ("tumour",)}
# the project's value of each structure, per modality: its position in OUTPUTS, from 1
MODALITY_LABELS = {m: {name: i + 1 for i, name in enumerate(names)} for m, names in OUTPUTS.items()}
LABEL_VALUES = MODALITY_LABELS["ct"]
VALID_LABELS = {m: (0, *values.values()) for m, values in MODALITY_LABELS.items()}
# label names datasets use for each structure (dataset.json, mask folders); compared word by word
STRUCTURE_WORDS = {"liver": ("liver",),
                   "tumour": ("tumour", "tumor", "tumours", "tumors", "lesion", "lesions", "cancer")}


def structure_of(name: str) -> str | None:
    """The structure a dataset's label name stands for, or None (background, other organs).

    A name holding a tumour word is tumour ("liver tumor", "cancer", "lesion"); a name that is
    only the word liver is liver; anything else ("background", "spleen", "cyst") is None.
    """
    words = re.findall(r"[a-z]+", str(name).lower())
    if any(word in STRUCTURE_WORDS["tumour"] for word in words):
        return "tumour"
    if words and all(word in STRUCTURE_WORDS["liver"] for word in words):
        return "liver"
    return None


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
