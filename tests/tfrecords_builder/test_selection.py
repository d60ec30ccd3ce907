import numpy as np
import pytest

from tfrecords_builder.selection import SelectionSettings, select_slices


def label_with_liver(depth, lo, hi):
    label = np.zeros((4, 4, depth), np.uint8)
    label[1:3, 1:3, lo:hi] = 1
    return label


@pytest.mark.parametrize("depth, lo, hi, fg, bg, expected", [
    (40, 10, 30, 5, 4, [8, 9, 10, 15, 20, 24, 29, 30, 31]),   # evenly spaced + nearest both sides
    (12, 0, 5, 30, 3, [0, 1, 2, 3, 4, 5, 6, 7]),              # liver at the bottom: all above
    (6, 2, 4, 30, 20, [0, 1, 2, 3, 4, 5]),                     # fewer slices than asked: all of them
    (10, 3, 3, 2, 3, [0, 4, 9]),                               # no liver: evenly spaced slices
])
def test_select_slices(depth, lo, hi, fg, bg, expected):
    chosen = select_slices(label_with_liver(depth, lo, hi), SelectionSettings(fg, bg))
    assert chosen.tolist() == expected


def test_all_slices_keeps_every_slice():
    assert select_slices(label_with_liver(7, 2, 3), SelectionSettings(all_slices=True)).tolist() == list(range(7))


def test_negative_counts_are_rejected():
    with pytest.raises(ValueError, match=r"Expected context >= 0. Received: context=-1"):
        SelectionSettings(context=-1)
