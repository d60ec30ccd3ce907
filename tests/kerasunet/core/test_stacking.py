import numpy as np
import pytest

from kerasunet.core.stacking import stack_slices


@pytest.mark.parametrize("context", [0, 1, 2])
def test_stack_slices_centre_channel_and_replicated_borders(context):
    data = np.arange(5, dtype=np.float32)[None, None, :] * np.ones((3, 2, 1), np.float32)
    stacks = stack_slices(data, [0, 2, 4], context)
    assert stacks.shape == (3, 3, 2, 2 * context + 1) and stacks.dtype == np.float32
    expected = [[min(max(k + d, 0), 4) for d in range(-context, context + 1)] for k in (0, 2, 4)]
    np.testing.assert_array_equal(stacks[:, 0, 0, :], expected)
