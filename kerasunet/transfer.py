"""The three transfer modes of the research (Wang & Tang), as one function.

* ``scratch`` (model A): new Glorot-normal weights.
* ``init`` (model B): every layer starts from the CT-pretrained model; of its
  head only the tumour column is kept.
* ``freeze`` (model C): as ``init``, and the first ``freeze_blocks`` encoder
  blocks are frozen (``trainable = False``) before ``compile``.

Freezing and BatchNorm: in Keras 3 a BatchNormalization layer with
``trainable=False`` runs in inference mode, also inside ``fit``. The frozen
blocks therefore normalise MRI features with the *CT* moving mean and variance
learned in pre-training, and never update them. Later, trainable blocks see
those CT-normalised activations and adapt to them; the frozen statistics are
not re-estimated for MRI intensities.
"""

from __future__ import annotations

from pathlib import Path

import keras

from kerasunet.core.choices import MODES
from kerasunet.core.labels import OUTPUTS
from kerasunet.model import block_of, build_unet, layers_in_blocks
from kerasunet.core.runs import MODEL_FILE, RunError

HEAD = "head_conv"


def load_pretrained(pretrained) -> tuple[keras.Model, str]:
    """The pretrained model and a label for messages, from a model, run folder or ``.keras`` file.

    Raises:
        RunError: no model file there, or it is not a loadable Keras model.
    """
    if isinstance(pretrained, keras.Model):
        return pretrained, f"pretrained model {pretrained.name!r}"
    path = Path(pretrained)
    model_path = path / MODEL_FILE if path.is_dir() else path
    if not model_path.is_file():
        raise RunError(f"{model_path}: no pretrained model (expected a run folder holding "
                       f"{MODEL_FILE} or a .keras file)")
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise RunError(f"{model_path}: not a loadable kerasunet model ({type(exc).__name__}: {first_line})") from None
    return model, str(model_path)


def head_columns(source_outputs: int, target_outputs: int):
    """Columns of the pretrained head to copy, or None when the sizes cannot be mapped.

    Equal sizes copy every column; a CT head (liver, tumour) into a one-channel
    MRI head keeps only the tumour column.
    """
    if source_outputs == target_outputs:
        return list(range(target_outputs))
    if (source_outputs, target_outputs) == (len(OUTPUTS["ct"]), len(OUTPUTS["mri"])):
        return [OUTPUTS["ct"].index(name) for name in OUTPUTS["mri"]]
    return None


def mismatch(source_label: str, layer: str, detail: str) -> ValueError:
    return ValueError(f"{source_label}: architecture does not match the new model; first mismatching "
                      f"layer {layer!r} ({detail}). Use the pretrained run's --filters, --depth and "
                      "input channels")


def transfer_weights(model: keras.Model, source: keras.Model, source_label: str = "pretrained model") -> dict:
    """Copies every layer's weights from ``source`` into ``model`` by layer name.

    BatchNorm moving statistics are weights too and are copied. The head kernel
    and bias are copied column by column (see :func:`head_columns`).

    Args:
        model: The new model (same architecture, any number of outputs).
        source: The pretrained model.
        source_label: Names the source in error messages (its path).

    Returns:
        ``{layer_name: "copied" | "head columns [1]"}`` for every layer with weights.

    Raises:
        ValueError: a layer is missing on either side or its weight shapes differ.
    """
    source_layers = {layer.name: layer for layer in source.layers if layer.weights}
    target_names = {layer.name for layer in model.layers if layer.weights}
    report = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in source_layers:
            raise mismatch(source_label, layer.name, "missing in the pretrained model")
        weights = source_layers[layer.name].get_weights()
        if layer.name == HEAD:
            columns = head_columns(weights[0].shape[-1], layer.weights[0].shape[-1])
            if columns is not None:
                weights = [w[..., columns] for w in weights]
        source_shapes = [tuple(w.shape) for w in weights]
        target_shapes = [tuple(w.shape) for w in layer.weights]
        if source_shapes != target_shapes:
            raise mismatch(source_label, layer.name,
                           f"weight shapes {source_shapes} in the pretrained model, {target_shapes} in the new one")
        layer.set_weights(weights)
        report[layer.name] = "copied" if layer.name != HEAD else f"head columns {columns}"
    extra = [name for name in source_layers if name not in target_names]
    if extra:
        raise mismatch(source_label, extra[0], "missing in the new model")
    return report


def build_for_mode(mode: str, input_shape, num_outputs: int, pretrained=None, freeze_blocks: int = 2,
                   **unet_kwargs) -> keras.Model:
    """Builds the model a transfer mode trains, with weights loaded and blocks frozen.

    ``freeze`` sets ``trainable = False`` on every layer of ``encoder_1`` …
    ``encoder_{freeze_blocks}``; call it before ``compile``. Frozen BatchNorm
    layers run in inference mode (Keras 3), so they normalise MRI features with
    the CT moving statistics of the pretrained model (see the module docstring).

    Args:
        mode: One of :data:`kerasunet.core.choices.MODES`.
        input_shape: ``(height, width, channels)`` of the new model.
        num_outputs: Output channels of the new model (1 for MRI tumour).
        pretrained: For ``init``/``freeze``: a run folder holding ``best.keras``,
            a ``.keras`` file or a ``keras.Model``. Must be None for ``scratch``.
        freeze_blocks: Encoder blocks to freeze in ``freeze`` mode (0..depth).
        **unet_kwargs: Passed to :func:`kerasunet.model.build_unet` (filters,
            depth, dropout, ...); must match the pretrained architecture.

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        ValueError: unknown mode, ``pretrained`` missing (or given for scratch),
            ``freeze_blocks`` out of range, or an architecture mismatch.
        RunError: ``pretrained`` is a path without a loadable model.
    """
    if mode not in MODES:
        raise ValueError(f"Expected mode in {MODES}. Received: mode={mode!r}")
    if mode == "scratch" and pretrained is not None:
        raise ValueError(f"Expected no pretrained model for mode='scratch'. Received: pretrained={pretrained!r}")
    if mode != "scratch" and pretrained is None:
        raise ValueError(f"Expected a pretrained model (run folder or .keras file) for mode={mode!r}. "
                         "Received: pretrained=None")
    model = build_unet(input_shape, num_outputs, **unet_kwargs)
    depth = sum(layer.name.endswith("_pool") for layer in model.layers)
    if mode == "freeze" and not 0 <= freeze_blocks <= depth:
        raise ValueError(f"Expected 0 <= freeze_blocks <= depth={depth}. Received: freeze_blocks={freeze_blocks}")
    if mode == "scratch":
        return model
    source, label = load_pretrained(pretrained)
    transfer_weights(model, source, label)
    if mode == "freeze" and freeze_blocks:
        for layer in layers_in_blocks(model, [f"encoder_{i}" for i in range(1, freeze_blocks + 1)]):
            layer.trainable = False
    return model


def frozen_blocks(model: keras.Model) -> list[str]:
    """Blocks whose layers with weights are all non-trainable (for logs and tests)."""
    blocks: dict[str, bool] = {}
    for layer in model.layers:
        if layer.weights:
            block = block_of(layer.name)
            blocks[block] = blocks.get(block, True) and not layer.trainable
    return [block for block, frozen in blocks.items() if frozen]
