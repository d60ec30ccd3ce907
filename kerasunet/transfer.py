"""The three transfer modes of the research (Wang & Tang), as one function.

* ``scratch`` (model A): new Glorot-normal weights.
* ``init`` (model B): every layer starts from the CT-pretrained model; its head
  columns are matched by structure name: a CT head (liver, tumour) into an MRI head
  with liver and tumour (ATLAS) is copied whole, into a tumour-only head (FZMC) only
  its tumour column is kept.
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
from kerasunet.core.labels import OUTPUTS, check_outputs
from kerasunet.core.records_format import channels_context
from kerasunet.model import block_of, build_unet, layers_in_blocks
from kerasunet.core.runs import CONFIG_FILE, MODEL_FILE, RunError, resolve_run

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


def outputs_by_count(channels: int) -> tuple[str, ...]:
    """The structures of a head with ``channels`` outputs when nothing names them: the
    modality default of that size (2: liver, tumour; 1: tumour)."""
    for names in OUTPUTS.values():
        if len(names) == channels:
            return names
    raise ValueError(f"Expected a head of {sorted({len(n) for n in OUTPUTS.values()})} channels, or a run "
                     f"config.json naming its outputs. Received: {channels} channels")


def pretrained_outputs(pretrained, source: keras.Model) -> tuple[str, ...]:
    """The structures of the pretrained head's columns: its run's config.json (``RunInfo.outputs``)
    when there is one, else by channel count (:func:`outputs_by_count`) for bare ``.keras`` files
    and models."""
    if not isinstance(pretrained, keras.Model):
        path = Path(pretrained)
        if (path if path.is_dir() else path.parent).joinpath(CONFIG_FILE).exists():
            return resolve_run(path).outputs
    return outputs_by_count(source.output_shape[-1])


def head_columns(source_outputs, target_outputs) -> list[int] | None:
    """Columns of the pretrained head to copy, by structure name, or None when the new head
    has a structure the pretrained one lacks.

    A CT head (liver, tumour) into a liver-and-tumour head copies both columns; into a
    tumour-only head it keeps the tumour column.
    """
    source, target = check_outputs(source_outputs), check_outputs(target_outputs)
    if any(name not in source for name in target):
        return None
    return [source.index(name) for name in target]


def mismatch(source_label: str, layer: str, detail: str) -> ValueError:
    return ValueError(f"{source_label}: architecture does not match the new model; first mismatching "
                      f"layer {layer!r} ({detail}). Use the pretrained run's --filters, --depth and "
                      "input channels")


def transfer_weights(model: keras.Model, source: keras.Model, source_label: str = "pretrained model",
                     source_outputs=None, target_outputs=None) -> dict:
    """Copies every layer's weights from ``source`` into ``model`` by layer name.

    BatchNorm moving statistics are weights too and are copied. The head kernel
    and bias are copied column by column, matched by structure (see :func:`head_columns`).

    Args:
        model: The new model (same architecture, any number of outputs).
        source: The pretrained model.
        source_label: Names the source in error messages (its path).
        source_outputs: The structures of ``source``'s head; None: by its channel count.
        target_outputs: The structures of ``model``'s head; None: by its channel count.

    Returns:
        ``{layer_name: "copied" | "head columns [1]"}`` for every layer with weights.

    Raises:
        ValueError: the input channels (the records' 2.5D context) differ, a layer is missing
            on either side, its weight shapes differ, or the new head has a structure the
            pretrained one lacks.
    """
    given, wanted = source.inputs[0].shape[-1], model.inputs[0].shape[-1]
    if given != wanted:  # the records' 2.5D context (2K+1 channels), the commonest mismatch: say so plainly
        k_given, k_wanted = channels_context(given), channels_context(wanted)
        raise ValueError(f"{source_label}: the pretrained model takes {given} input channels (2.5D context "
                         f"{k_given}), the new one {wanted} (context {k_wanted}); build the records with "
                         f"--context {k_given}")
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
            source_outputs = source_outputs or outputs_by_count(weights[0].shape[-1])
            target_outputs = target_outputs or outputs_by_count(layer.weights[0].shape[-1])
            columns = head_columns(source_outputs, target_outputs)
            if columns is None:
                raise mismatch(source_label, layer.name, f"the pretrained head segments {', '.join(source_outputs)}; "
                                                         f"the new one {', '.join(target_outputs)}")
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
                   outputs=None, **unet_kwargs) -> keras.Model:
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
        outputs: The structures of the new model's channels (``RunInfo.outputs``), which
            pick the pretrained head's columns by name; None: by ``num_outputs``
            (:func:`outputs_by_count`).
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
    if outputs is not None and len(check_outputs(outputs)) != num_outputs:
        raise ValueError(f"Expected num_outputs == len(outputs). Received: num_outputs={num_outputs}, "
                         f"outputs={tuple(outputs)}")
    source, label = load_pretrained(pretrained)
    transfer_weights(model, source, label, pretrained_outputs(pretrained, source), outputs)
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
