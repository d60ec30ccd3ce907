"""Which axial slices of a case become examples, and their 2.5D context stacks.

The CT default follows the research this project comes from: per case up to 30 slices
with liver plus up to 20 slices without liver next to the liver range. Liver slices are
taken evenly spaced over the slices that contain liver, and the slices without liver are
the nearest ones to the liver range (below first on ties), so the choice is deterministic
and needs no random seed. MRI keeps every slice by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SelectionSettings:
    """Slice selection for one case.

    Attributes:
        foreground_slices: at most this many slices with foreground (label > 0).
        background_slices: at most this many slices without foreground, nearest first.
        all_slices: keep every slice (then the two counts are ignored).
        context: K slices on each side become extra channels (C = 2K + 1).
    """

    foreground_slices: int = 30
    background_slices: int = 20
    all_slices: bool = False
    context: int = 0

    def __post_init__(self):
        for name in ("foreground_slices", "background_slices", "context"):
            if getattr(self, name) < 0:
                raise ValueError(f"Expected {name} >= 0. Received: {name}={getattr(self, name)}")
        if not self.all_slices and self.foreground_slices + self.background_slices == 0:
            raise ValueError("Expected at least one slice per case. Received: "
                             "foreground_slices=0, background_slices=0")


def _evenly_spaced(indices: np.ndarray, n: int) -> np.ndarray:
    if len(indices) <= n:
        return indices
    return indices[np.round(np.linspace(0, len(indices) - 1, n)).astype(int)]


def select_slices(label: np.ndarray, settings: SelectionSettings) -> np.ndarray:
    """Returns the sorted axial indices (last axis of ``label``) to keep.

    A case without foreground gets ``background_slices`` evenly spaced slices.
    """
    depth = label.shape[-1]
    if settings.all_slices:
        return np.arange(depth)
    has_fg = label.reshape(-1, depth).any(axis=0)
    fg, bg = np.flatnonzero(has_fg), np.flatnonzero(~has_fg)
    if len(fg) == 0:
        return _evenly_spaced(bg, settings.background_slices)
    distance = np.where(bg < fg[0], fg[0] - bg, np.where(bg > fg[-1], bg - fg[-1], 0))
    nearest = bg[np.lexsort((bg, distance))][: settings.background_slices]
    chosen = np.concatenate([_evenly_spaced(fg, settings.foreground_slices), nearest])
    return np.sort(chosen).astype(int)
