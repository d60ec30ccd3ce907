"""2.5D context stacks: an axial slice with K neighbours on each side as channels.

The one convention for the record builder, local prediction and the TF Serving client:
channel K is the centre slice, and slices beyond the volume's ends repeat the border slice.
"""

from __future__ import annotations

import numpy as np


def stack_slices(data: np.ndarray, indices, context: int) -> np.ndarray:
    """Stacks each chosen slice with ``context`` neighbours on each side as channels.

    Args:
        data: volume ``(H, W, D)``.
        indices: axial indices of the centre slices.
        context: K; slices beyond the volume's ends repeat the border slice.

    Returns:
        float32 ``(n, H, W, 2K + 1)``; channel K is the centre slice.
    """
    indices = np.asarray(indices, dtype=int)
    offsets = np.arange(-context, context + 1)
    picks = np.clip(indices[:, None] + offsets[None, :], 0, data.shape[-1] - 1)
    return np.ascontiguousarray(np.moveaxis(data[:, :, picks], 2, 0), dtype=np.float32)
