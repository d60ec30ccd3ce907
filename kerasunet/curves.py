"""Learning curves from ``history.csv`` files: one run, or the mean ± spread of repeats.

A history is a list of rows (dicts) or anything with ``to_dict("records")`` (a pandas
DataFrame), with an ``epoch`` column, ``loss``/``val_loss`` and per-channel
``dice_<channel>``/``val_dice_<channel>`` columns as written by :mod:`kerasunet.train`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from kerasunet.figures import save_figure


def read_history(path: str | Path) -> list[dict]:
    """Rows of a ``history.csv`` with numbers as floats (``epoch`` as int); [] if absent."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: (int(v) if k == "epoch" else _to_float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def _to_float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def as_rows(history) -> list[dict]:
    """A history as a list of dicts, whether given as rows or as a DataFrame."""
    if hasattr(history, "to_dict"):
        return history.to_dict("records")
    return list(history)


def panels(histories: dict) -> list[str]:
    """The metrics to plot: ``loss`` then each ``dice_<channel>`` found in any history."""
    names = {k for runs in histories.values() for h in runs for row in as_rows(h) for k in row}
    dice = sorted(n for n in names if n.startswith("dice_"))
    return ["loss", *dice]


def mean_and_spread(runs: list, column: str):
    """Per epoch: epochs, mean, min and max of ``column`` over runs (NaN and absent skipped).

    Returns:
        Four lists (epochs, means, lows, highs); empty when no run has the column.
    """
    by_epoch: dict[int, list[float]] = {}
    for h in runs:
        for row in as_rows(h):
            value = row.get(column)
            if value is not None and not math.isnan(float(value)):
                by_epoch.setdefault(int(row["epoch"]), []).append(float(value))
    epochs = sorted(by_epoch)
    values = [by_epoch[e] for e in epochs]
    return (epochs, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def plot_learning_curves(histories: dict, path: str | Path, title: str | None = None) -> Path:
    """Plots train (solid) and validation (dashed) loss and per-channel Dice per epoch.

    Each label gets one colour; with several runs under a label the line is their mean
    and the shaded band spans their min to max.

    Args:
        histories: ``{label: [history, ...]}``; a history is rows or a DataFrame.
        path: PNG file to write (atomically).
        title: Figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: no history has any rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not any(as_rows(h) for runs in histories.values() for h in runs):
        raise ValueError(f"Expected at least one history with rows. Received: labels={list(histories)}")
    names = panels(histories)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, (label, runs) in enumerate(histories.items()):
            _plot_label(ax, runs, name, label, f"C{i}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _plot_label(ax, runs: list, name: str, label: str, color: str) -> None:
    for prefix, style in (("", "-"), ("val_", "--")):
        epochs, mean, low, high = mean_and_spread(runs, prefix + name)
        if not epochs:
            continue
        ax.plot(epochs, mean, style, color=color, marker=".", label=f"{label} {'val' if prefix else 'train'}")
        if len(runs) > 1:
            ax.fill_between(epochs, low, high, color=color, alpha=0.15, linewidth=0)
