"""The 2.5D context <-> input channels arithmetic of ``kerasunet.core.records_format``."""

import pytest

from kerasunet.core.records_format import DEFAULT_CONTEXT, channels_context, context_channels


@pytest.mark.parametrize("context, channels", [(0, 1), (1, 3), (2, 5), (7, 15)])
def test_context_and_channels_are_inverse(context, channels):
    assert context_channels(context) == channels
    assert channels_context(channels) == context


def test_default_context_is_a_five_slice_stack():
    assert context_channels(DEFAULT_CONTEXT) == 5
