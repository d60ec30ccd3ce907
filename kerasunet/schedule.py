"""Learning-rate schedules of ``kerasunet train``: constant, cosine decay, and halving on a plateau.

``cosine`` is a ``keras.optimizers.schedules.CosineDecay`` over the run's steps, so the
optimiser carries it (and a checkpoint restores it with the iteration count). ``plateau``
changes the optimiser's learning rate between epochs: :func:`plateau_update` is its rule,
:func:`apply_plateau` applies it; the epochs-without-improvement counter is a variable the
training checkpoint holds, so a resumed run continues the count.
"""

from __future__ import annotations

PLATEAU_FACTOR = 0.5
PLATEAU_PATIENCE = 2


def learning_rate(lr: float, schedule: str, total_steps: int):
    """The optimiser's learning rate: ``lr``, or a cosine decay from ``lr`` to 0 over ``total_steps``."""
    if schedule != "cosine":
        return lr
    import keras

    return keras.optimizers.schedules.CosineDecay(lr, decay_steps=total_steps)


def plateau_update(wait: int, improved: bool, patience: int = PLATEAU_PATIENCE) -> tuple[int, bool]:
    """One epoch of the plateau rule.

    Args:
        wait: Epochs without improvement before this one.
        improved: Whether this epoch lowered the monitored loss.
        patience: Epochs without improvement that lower the learning rate.

    Returns:
        The new count and whether to lower the learning rate now (the count then restarts).
    """
    wait = 0 if improved else wait + 1
    if wait >= patience:
        return 0, True
    return wait, False


def current_lr(optimizer) -> float:
    """The optimiser's learning rate now (a schedule's value at the current iteration)."""
    import keras

    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def apply_plateau(optimizer, wait, improved: bool) -> float | None:
    """Applies :func:`plateau_update` to an optimiser and its ``wait`` variable.

    Returns:
        The lowered learning rate, or None when it stays.
    """
    count, lower = plateau_update(int(wait.numpy()), improved)
    wait.assign(count)
    if not lower:
        return None
    optimizer.learning_rate = current_lr(optimizer) * PLATEAU_FACTOR
    return current_lr(optimizer)
