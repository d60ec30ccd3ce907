"""Choosing the ``tf.distribute`` strategy that ``kerasunet train`` runs its loop under.

One training loop (:mod:`kerasunet.train`) serves every case; only the strategy differs:

* ``TF_CONFIG`` set: ``MultiWorkerMirroredStrategy`` (several nodes). Keras 3's
  ``model.fit`` fails under it (keras-team/keras#20585: "Attempt to convert a value
  (PerReplica...)"), which is why training is a custom ``strategy.run`` step.
* several GPUs visible: ``MirroredStrategy`` over them.
* ``KERASUNET_DEVICES=cpu:N`` (a test and debugging hook): ``MirroredStrategy`` over N
  logical CPU devices. Logical devices can only be made before TensorFlow initialises
  its devices, so set the variable in a fresh process.
* otherwise: TensorFlow's default strategy (one device, no replication).

In multi-worker runs every worker runs the same code (collective ops need all of them),
but only the chief writes the run folder; the others write to a temporary folder that is
deleted at the end, as in TensorFlow's multi-worker tutorials.

Nothing here runs at import time; the strategy must be created before any other
TensorFlow op in the process (``MultiWorkerMirroredStrategy`` requires it).
"""

from __future__ import annotations

import json
import os
import re

DEVICES_ENV = "KERASUNET_DEVICES"


class DistributeError(ValueError):
    """A distribution setting (``TF_CONFIG``, ``KERASUNET_DEVICES``) that cannot be used."""


def parse_devices(value: str) -> int:
    """Number of logical CPU devices asked for by ``KERASUNET_DEVICES`` (``"cpu:N"``).

    Raises:
        DistributeError: the value is not ``cpu:N`` with N >= 1.
    """
    match = re.fullmatch(r"cpu:(\d+)", value.strip())
    if match is None or int(match.group(1)) < 1:
        raise DistributeError(f"Expected {DEVICES_ENV}=cpu:N with N >= 1. Received: {DEVICES_ENV}={value!r}")
    return int(match.group(1))


def tf_config() -> dict | None:
    """The parsed ``TF_CONFIG`` environment variable, or None when unset or empty.

    Raises:
        DistributeError: ``TF_CONFIG`` is not JSON with ``cluster`` and ``task``.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        config["cluster"], config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError):
        raise DistributeError("Expected TF_CONFIG as JSON with 'cluster' and 'task': {'type', 'index'}. "
                              f"Received: TF_CONFIG={raw[:200]!r}") from None
    return config


def is_chief(config: dict | None) -> bool:
    """Whether this process writes the run folder: the ``chief`` task, else worker 0."""
    if config is None:
        return True
    task_type, index = config["task"]["type"], int(config["task"]["index"])
    if "chief" in config["cluster"]:
        return task_type == "chief"
    return task_type == "worker" and index == 0


def num_workers() -> int:
    """Processes taking part in training: chief and workers of ``TF_CONFIG``, else 1."""
    config = tf_config()
    if config is None:
        return 1
    return sum(len(config["cluster"].get(kind, [])) for kind in ("chief", "worker"))


def make_logical_cpus(count: int) -> list:
    """Splits the first CPU into ``count`` logical devices and returns their names.

    Raises:
        DistributeError: TensorFlow already initialised its devices with another count.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        pass  # already initialised: fine if it already has the devices we want
    names = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(names) != count:
        raise DistributeError(f"Expected {DEVICES_ENV} to be set before TensorFlow starts; it already "
                              f"has {len(names)} CPU device(s). Received: {DEVICES_ENV}=cpu:{count}")
    return names


def select_strategy():
    """The strategy for this process (see the module docstring for the rules).

    Returns:
        A ``tf.distribute.Strategy``.

    Raises:
        DistributeError: ``TF_CONFIG`` or ``KERASUNET_DEVICES`` is malformed.
    """
    import tensorflow as tf

    if tf_config() is not None:
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = os.environ.get(DEVICES_ENV, "").strip()
    if devices:
        return tf.distribute.MirroredStrategy(make_logical_cpus(parse_devices(devices)))
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    return tf.distribute.get_strategy()


def describe(strategy) -> str:
    """One line naming the strategy and its replica count, for the progress log."""
    return f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)"
