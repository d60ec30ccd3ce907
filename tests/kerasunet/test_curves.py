"""kerasunet.curves: history rows, mean ± spread over repeats, and the PNG."""

import math

import pytest

from kerasunet.curves import mean_and_spread, panels, plot_learning_curves, read_history


class Frame:
    """Stands in for a pandas DataFrame: only ``to_dict("records")`` is used."""

    def __init__(self, rows):
        self.rows = rows

    def to_dict(self, orient):
        assert orient == "records"
        return self.rows


def rows(*losses, dice=0.5):
    return [{"epoch": i + 1, "loss": v, "val_loss": v + 0.1, "dice_tumour": dice, "val_dice_tumour": math.nan}
            for i, v in enumerate(losses)]


def test_mean_and_spread_over_runs_skips_nan_and_ragged_epochs():
    runs = [rows(1.0, 0.5), Frame(rows(3.0, 1.5, 1.0))]
    epochs, mean, low, high = mean_and_spread(runs, "loss")
    assert epochs == [1, 2, 3]
    assert mean == [2.0, 1.0, 1.0] and low == [1.0, 0.5, 1.0] and high == [3.0, 1.5, 1.0]
    assert mean_and_spread(runs, "val_dice_tumour") == ([], [], [], [])


def test_panels_are_loss_then_each_dice_channel():
    assert panels({"a": [rows(1.0)], "b": [[{"epoch": 1, "loss": 1, "dice_liver": 0.1}]]}) == \
        ["loss", "dice_liver", "dice_tumour"]


def test_plot_several_labels_and_read_back_csv(tmp_path):
    (tmp_path / "history.csv").write_text("epoch,loss,val_loss,dice_tumour\n1,0.9,1.0,0.2\n2,0.5,,0.4\n")
    history = read_history(tmp_path / "history.csv")
    assert history[0] == {"epoch": 1, "loss": 0.9, "val_loss": 1.0, "dice_tumour": 0.2}
    assert math.isnan(history[1]["val_loss"])
    assert read_history(tmp_path / "absent.csv") == []
    out = plot_learning_curves({"scratch": [history, rows(0.8, 0.6)], "freeze": [Frame(rows(0.7, 0.3))]},
                               tmp_path / "curves.png", title="MRI")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".tmp-*"))


def test_plot_needs_rows(tmp_path):
    with pytest.raises(ValueError, match=r"^Expected at least one history with rows. Received: labels=\['a'\]$"):
        plot_learning_curves({"a": [[]]}, tmp_path / "c.png")
