"""The step functions of ``kerasunet train``: training, validation and BatchNorm sync.

Each is a module-level function of (model, optimizer, loss, metrics, strategy) that returns
a ``tf.function``, so a test can run it under one replica and under several and compare.

Loss reduction across replicas: each loss in :mod:`kerasunet.losses` is computed from sums
over a batch's examples. Inside a replica, :func:`global_batch_loss` adds every replica's
sums (``all_reduce``) and computes the loss of the *global* batch from them, so BCE is the
mean over all pixels of the global batch and Dice is one Dice over the global batch, exactly
as on one device. The gradient is taken through the replica's own sums only (the other
replicas' sums enter as constants), so each replica's gradient is its share of the global
loss's gradient, and the sum over replicas that the optimiser applies is the gradient of the
global loss. Nothing here relies on Keras's own scaling of losses inside a replica context
(``Loss.__call__`` divides some losses by the replica count and not others); the step calls
the loss's ``batch_sums``/``from_sums`` directly.

BatchNorm normalises with each replica's local batch, as Keras does by default; only that
differs from one device. Its moving statistics are set to their mean over replicas once an
epoch (:func:`make_sync_step`).

The reader delivers uint8 label maps (``kerasunet.data``); each step expands them into the
float32 multi-label targets of the run's outputs on its own device (the ``to_targets`` it is given,
``data.targets_from_labels``), so the input pipeline moves a quarter of the bytes of one float32 channel per pixel.
"""

from __future__ import annotations

import tensorflow as tf

from kerasunet.losses import as_float


def global_batch_loss(loss_fn, y_true, y_pred):
    """The loss of the global batch, computed in a replica context.

    Args:
        loss_fn: A :class:`kerasunet.losses.BatchSumsLoss`.
        y_true: This replica's targets.
        y_pred: This replica's predictions.

    Returns:
        A scalar equal on every replica to ``loss_fn`` of the whole global batch, whose
        gradient on each replica flows through that replica's examples only.
    """
    local = loss_fn.batch_sums(*as_float(y_true, y_pred))
    total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, local)
    # Value of the global sums, gradient of the local ones.
    sums = tuple(mine + tf.stop_gradient(everyone - mine) for mine, everyone in zip(local, total))
    return loss_fn.from_sums(sums)


def make_train_step(model, optimizer, loss_fn, metrics, strategy, to_targets):
    """A training step: one global batch from a distributed iterator, one optimiser update.

    Args:
        model: Built under ``strategy.scope()``.
        optimizer: Built for ``model.trainable_variables`` under the same scope; a
            ``LossScaleOptimizer`` scales and unscales the loss for mixed precision.
        loss_fn: A :class:`kerasunet.losses.BatchSumsLoss`.
        metrics: Keras metrics updated with each replica's targets and predictions.
        strategy: The ``tf.distribute`` strategy.
        to_targets: Maps a batch's uint8 label maps to the model's float32 targets
            (``data.targets_from_labels`` with the run's outputs), on the replica's device.

    Returns:
        A ``tf.function`` taking an iterator over ``strategy.experimental_distribute_dataset``
        of ``(image, labels)`` batches and returning the global batch's loss (plus any
        regularisation losses of the model).
    """
    replicas = strategy.num_replicas_in_sync

    def replica_step(x, labels):
        y = to_targets(labels)
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = global_batch_loss(loss_fn, y, pred)
            # Regularisation terms are the same on every replica; the optimiser sums gradients.
            regular = tf.add_n(model.losses) if model.losses else tf.constant(0.0)
            scaled = optimizer.scale_loss(loss + regular / replicas)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        for metric in metrics:
            metric.update_state(y, pred)
        return loss + regular

    @tf.function
    def step(iterator):
        x, y = next(iterator)
        per_replica = strategy.run(replica_step, args=(x, y))
        # Every replica holds the same value; the mean returns it.
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    return step


def make_val_step(model, loss_fn, metrics, to_targets):
    """A validation step on the default device, outside ``strategy.run``.

    Returns:
        A ``tf.function`` ``(x, labels) -> (loss · batch size, batch size)`` of an
        ``(image, uint8 label map)`` batch; summing both over the split and dividing gives the
        mean of the per-batch losses, each batch weighted by its size (the same per-batch
        reduction as training, Dice included).
    """

    @tf.function
    def step(x, labels):
        y = to_targets(labels)
        pred = model(x, training=False)
        for metric in metrics:
            metric.update_state(y, pred)
        n = tf.cast(tf.shape(x)[0], "float32")
        return loss_fn.from_sums(loss_fn.batch_sums(*as_float(y, pred))) * n, n

    return step


def make_sync_step(model, strategy):
    """A step that sets each BatchNorm moving statistic to its mean over all replicas.

    Keras BatchNorm updates its moving mean/variance with the local batch on each replica,
    so under MultiWorkerMirroredStrategy the workers' copies drift apart. The moving
    averages are linear in the batch statistics, so averaging them once an epoch equals
    averaging every step. Frozen layers are left alone (they never change, and their
    weights stay bit-identical to the pretrained ones).

    Returns:
        A ``tf.function``, or None with one replica or nothing to synchronise.
    """
    variables = [w for layer in model.layers if layer.trainable
                 for w in layer.non_trainable_weights if "float" in str(w.dtype)]
    if strategy.num_replicas_in_sync == 1 or not variables:
        return None

    def replica_mean():
        context = tf.distribute.get_replica_context()
        return context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])

    @tf.function
    def sync():
        means = strategy.run(replica_mean)
        for variable, mean in zip(variables, means):
            variable.assign(strategy.experimental_local_results(mean)[0])

    return sync
