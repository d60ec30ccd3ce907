"""Structures, output channels and label values, shared by case loading, training targets, predict and export.

Labels are read by structure, not by value: each dataset layout says which structure each of
its label values (or mask folders) holds, and :func:`structure_of` names the structure of a
label name as datasets write it. Inside kerasunet a label map holds the project's values:
each modality's structures are numbered in the order of ``OUTPUTS`` (index + 1), so CT models
(two sigmoid channels: liver, tumour) write LiTS labels (0 background, 1 liver, 2 tumour) and
MRI models (one channel: tumour) write 0/1. A structure a modality's models do not segment
(liver in MRI) reads as background. ``OUTPUTS`` is each modality's default; a run's own
structures (``RunInfo.outputs``, the records manifest's ``outputs``) may differ: an MRI set
with liver and tumour (ATLAS) trains both, a cascade's second stage only tumour.
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
    """The structures a modality's models segment by default (``OUTPUTS``)."""
    return OUTPUTS[modality]


def check_outputs(outputs) -> tuple[str, ...]:
    """``outputs`` as a tuple of structure names, in the order of ``STRUCTURES``.

    Raises:
        ValueError: an unknown, repeated or out-of-order structure, or none.
    """
    outputs = tuple(outputs)
    if not outputs or any(o not in STRUCTURES for o in outputs) or list(outputs) != sorted(
            set(outputs), key=STRUCTURES.index):
        raise ValueError(f"Expected structures from {STRUCTURES}, in that order. Received: outputs={outputs}")
    return outputs


def label_values(outputs) -> dict[str, int]:
    """Each structure's value in a label map that holds ``outputs``: its position, from 1."""
    return {name: i + 1 for i, name in enumerate(check_outputs(outputs))}


def targets_from_labels_np(label: np.ndarray, outputs, label_outputs=None) -> np.ndarray:
    """Label map ``(...)`` -> multi-label float32 targets ``(..., len(outputs))``.

    The label map holds ``label_outputs`` (default: ``outputs``), valued by
    :func:`label_values`. Structures are nested in ``STRUCTURES`` order (a tumour lies
    inside the liver), so a structure's target is ``label >= its value``: CT liver =
    label >= 1 (the liver includes its tumours), tumour = label == 2; a tumour-only map
    gives tumour = label >= 1. ``outputs`` may be a subset of ``label_outputs`` (a
    tumour-only model trained on liver-and-tumour labels).

    Raises:
        ValueError: ``outputs`` names a structure the label map does not hold.
    """
    values = label_values(label_outputs if label_outputs is not None else outputs)
    missing = [o for o in check_outputs(outputs) if o not in values]
    if missing:
        raise ValueError(f"Expected outputs held by the labels {tuple(values)}. Received: outputs={tuple(outputs)}")
    return np.stack([label >= values[o] for o in outputs], axis=-1).astype(np.float32)


def labels_from_probabilities_np(probs: np.ndarray, outputs, threshold: float = 0.5) -> np.ndarray:
    """Sigmoid probabilities ``(..., channels)`` -> uint8 label map valued by :func:`label_values`.

    Later structures win where channels overlap (a tumour lies inside the liver).
    """
    fg = probs >= threshold
    out = np.zeros(probs.shape[:-1], np.uint8)
    for name, value in label_values(outputs).items():
        out[fg[..., value - 1]] = value
    return out


def labels_from_probabilities(probs, outputs, threshold: float = 0.5):
    """keras.ops twin of :func:`labels_from_probabilities_np` (used inside the export graph)."""
    from keras import ops

    fg = ops.cast(probs >= threshold, "uint8")
    out = fg[..., 0]
    for value in range(2, len(label_values(outputs)) + 1):
        out = ops.maximum(out, fg[..., value - 1] * value)
    return out


def as_outputs(outputs) -> tuple[str, ...]:
    """``outputs`` (structure names) checked by :func:`check_outputs`; a modality name ("ct",
    "mri") stands for its default structures (``OUTPUTS``).

    Raises:
        ValueError: an unknown modality or bad structure names.
    """
    if isinstance(outputs, str):
        if outputs not in OUTPUTS:
            raise ValueError(f"Expected structures or a modality in {tuple(OUTPUTS)}. Received: outputs={outputs!r}")
        return OUTPUTS[outputs]
    return check_outputs(outputs)


def shared_outputs(*groups) -> tuple[str, ...]:
    """The structures every group of ``outputs`` holds, in ``STRUCTURES`` order (maybe none)."""
    held = [set(as_outputs(g)) for g in groups]
    return tuple(s for s in STRUCTURES if all(s in h for h in held))


def relabel_np(label: np.ndarray, from_outputs, to_outputs) -> np.ndarray:
    """A uint8 label map valued for ``from_outputs`` re-valued for ``to_outputs``.

    Structures are nested (``STRUCTURES`` order), so value ``v`` of ``from_outputs`` holds its
    first ``v`` structures; each voxel gets the value of the last of them ``to_outputs`` holds,
    0 when it holds none (a liver-and-tumour map read as tumour-only turns liver into background).

    Raises:
        ValueError: ``to_outputs`` names a structure ``from_outputs`` does not hold.
    """
    source, target = as_outputs(from_outputs), label_values(as_outputs(to_outputs))
    if any(s not in source for s in target):
        raise ValueError(f"Expected outputs held by the labels {source}. Received: outputs={tuple(target)}")
    if source == tuple(target):
        return np.asarray(label, np.uint8)
    lut = np.zeros(max(256, len(source) + 1), np.uint8)
    for v in range(1, len(source) + 1):
        lut[v] = max((target[s] for s in source[:v] if s in target), default=0)
    return lut[np.asarray(label, np.int64)]
