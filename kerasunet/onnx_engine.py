"""ONNX export of the 2D U-Net and an onnxruntime predictor: CPU inference without TensorFlow.

``model.onnx`` holds the network of a run: input ``image`` float32 ``[b, h, w, 2K+1]`` of
*normalised*, padded slices (height and width multiples of ``2**depth``), output
``probabilities`` float32 ``[b, h, w, N]``, the same tensors as the Keras model's. The
preprocessing (per-case normalisation, 2.5D stacking, padding or resizing) and the labels
(threshold, post-processing) are kerasunet.predict's numpy code, the same for both engines,
so ``kerasunet predict --engine onnx`` gives the Keras engine's masks. The run's config is
stored in the file's metadata (``kerasunet_config``), so ``model.onnx`` alone is enough to
predict on a machine that has neither TensorFlow nor a GPU.

The graph is written here from the Keras layers with the ``onnx`` package, layer by layer in
NCHW (onnxruntime's native layout; one transpose in, one out). Keras 3's own
``model.export(format="onnx")`` needs tf2onnx under the TensorFlow backend (jax2onnx under
JAX), which kerasunet does not install; the U-Net has nine layer types, each one ONNX operator
(Dropout none), so the conversion is direct and any other layer is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kerasunet.core.runs import RunError, RunInfo

ONNX_FILE = "model.onnx"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
CONFIG_KEY = "kerasunet_config"
OPSET = 17


class _Graph:
    """The nodes and weights of the ONNX graph being written; tensors are named after the Keras layers."""

    def __init__(self):
        self.nodes, self.weights = [], []

    def weight(self, name: str, value) -> str:
        from onnx import numpy_helper

        self.weights.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output


def _conv(graph: _Graph, layer, source: str) -> str:
    kernel_size, strides = tuple(layer.kernel_size), tuple(layer.strides)
    same_odd = layer.padding == "same" and strides == (1, 1) and all(k % 2 for k in kernel_size)
    if not (same_odd or layer.padding == "valid") or tuple(layer.dilation_rate) != (1, 1):
        raise ValueError(f"layer {layer.name!r}: only stride-1 'same' convs of odd kernel size and "
                         "'valid' convs convert")
    pads = [k // 2 for k in kernel_size] * 2 if layer.padding == "same" else [0, 0, 0, 0]
    inputs = [source, graph.weight(f"{layer.name}/kernel", np.transpose(layer.kernel.numpy(), (3, 2, 0, 1)))]
    if layer.use_bias:
        inputs.append(graph.weight(f"{layer.name}/bias", layer.bias.numpy()))
    return graph.node("Conv", inputs, layer.name, kernel_shape=list(kernel_size), strides=list(strides),
                      pads=pads)


def _conv_transpose(graph: _Graph, layer, source: str) -> str:
    # kernel == strides with 'same' padding: every input pixel writes its own k x k tile, no overlap.
    if tuple(layer.kernel_size) != tuple(layer.strides) or tuple(layer.dilation_rate) != (1, 1):
        raise ValueError(f"layer {layer.name!r}: only transposed convs with kernel_size == strides convert")
    inputs = [source, graph.weight(f"{layer.name}/kernel", np.transpose(layer.kernel.numpy(), (3, 2, 0, 1)))]
    if layer.use_bias:
        inputs.append(graph.weight(f"{layer.name}/bias", layer.bias.numpy()))
    return graph.node("ConvTranspose", inputs, layer.name, kernel_shape=list(layer.kernel_size),
                      strides=list(layer.strides))


def _batch_norm(graph: _Graph, layer, source: str) -> str:
    channels = layer.moving_mean.shape[0]
    gamma = layer.gamma.numpy() if layer.scale else np.ones(channels)
    beta = layer.beta.numpy() if layer.center else np.zeros(channels)
    inputs = [source] + [graph.weight(f"{layer.name}/{part}", value) for part, value in
                         (("gamma", gamma), ("beta", beta), ("mean", layer.moving_mean.numpy()),
                          ("variance", layer.moving_variance.numpy()))]
    return graph.node("BatchNormalization", inputs, layer.name, epsilon=float(layer.epsilon))


def _layer_node(graph: _Graph, layer, sources: list[str]) -> str:
    """The ONNX node of one Keras layer (NCHW tensors); raises ValueError for other layers."""
    kind = type(layer).__name__
    if kind in ("Conv2D", "Conv2DTranspose") and layer.activation.__name__ != "linear":
        raise ValueError(f"layer {layer.name!r}: a conv with a fused activation does not convert")
    if kind == "Conv2D":
        return _conv(graph, layer, sources[0])
    if kind == "Conv2DTranspose":
        return _conv_transpose(graph, layer, sources[0])
    if kind == "BatchNormalization":
        return _batch_norm(graph, layer, sources[0])
    if kind == "MaxPooling2D" and layer.padding == "valid":
        return graph.node("MaxPool", sources, layer.name, kernel_shape=list(layer.pool_size),
                          strides=list(layer.strides))
    if kind == "Add":
        return graph.node("Add", sources, layer.name)
    if kind == "Concatenate" and layer.axis in (-1, 3):
        return graph.node("Concat", sources, layer.name, axis=1)
    if kind == "ReLU" and layer.max_value is None and not layer.negative_slope and not layer.threshold:
        return graph.node("Relu", sources, layer.name)
    if kind == "Activation" and layer.activation.__name__ == "sigmoid":
        return graph.node("Sigmoid", sources, layer.name)
    if kind == "Dropout":  # inference: the identity
        return sources[0]
    raise ValueError(f"layer {layer.name!r} ({kind}) has no ONNX conversion here")


def to_onnx(model, info: RunInfo):
    """The ONNX ``ModelProto`` of a 2D kerasunet U-Net, with the run's config in its metadata.

    Args:
        model: the loaded Keras model of ``info`` (float32 or mixed_float16; the ONNX graph
            computes in float32).
        info: the run, whose ``config`` is stored as metadata ``kerasunet_config``.

    Raises:
        ValueError: a layer without a conversion (3D models among them); the message names it.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = _Graph()
    names = {}  # Keras layer name -> ONNX tensor name
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            names[layer.name] = graph.node("Transpose", [INPUT_NAME], "input_nchw", perm=[0, 3, 1, 2])
            continue
        inbound = layer.input if isinstance(layer.input, list) else [layer.input]
        names[layer.name] = _layer_node(graph, layer, [names[t._keras_history.operation.name] for t in inbound])
    graph.node("Transpose", [names[model.layers[-1].name]], OUTPUT_NAME, perm=[0, 2, 3, 1])
    channels, outputs = model.input_shape[-1], model.output_shape[-1]
    onnx_graph = helper.make_graph(
        graph.nodes, model.name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", "height", "width", channels])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", "height", "width", outputs])],
        graph.weights)
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="kerasunet")
    helper.set_model_props(proto, {CONFIG_KEY: json.dumps(info.config)})
    onnx.checker.check_model(proto)
    return proto


def onnx_model_of(model_path: str | Path):
    """:func:`to_onnx` of a run folder or ``.keras`` file (loads the Keras model).

    Raises:
        RunError: not a usable run or model.
        ExportError: the model has a layer without a conversion (a 3D model, say), or the run is
            a cascade (its file holds stage 2 only; the liver ROI step has no ONNX graph here).
    """
    from kerasunet.core.runs import load_model, resolve_run
    from kerasunet.export import ExportError

    info = resolve_run(model_path)
    if info.cascade:
        raise ExportError(f"{info.model_path}: no ONNX export of a cascade (stage 2 alone would segment "
                          "tumour without its liver ROI); export it as a SavedModel")
    model = load_model(info)
    try:
        return to_onnx(model, info)
    except ValueError as exc:
        raise ExportError(f"{info.model_path}: no ONNX export: {exc}") from None


def write_onnx(proto, folder: str | Path) -> Path:
    """Writes ``proto`` to ``folder/model.onnx`` atomically; returns the path."""
    from kerasunet.core.atomic import atomic_path

    target = Path(folder) / ONNX_FILE
    with atomic_path(target) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return target


def find_onnx(path: str | Path) -> Path:
    """``model.onnx`` of a path: the file itself, a folder holding it, or an export folder
    ``saved_models/NAME`` (its newest version that has one).

    Raises:
        RunError: none found.
    """
    from kerasunet.export import numeric_versions

    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / ONNX_FILE] + [path / str(v) / ONNX_FILE for v in reversed(numeric_versions(path))]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise RunError(f"{path}: no {ONNX_FILE} (write one with kerasunet export --format onnx)")


class OnnxPredictor:
    """An onnxruntime session with the Keras model's ``predict_on_batch``, for kerasunet.predict."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
        # No busy-waiting between calls: spinning threads take the cores from predict's own
        # numpy work (and from other processes), and were slower on the shared 2-core machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise RunError(f"{path}: not a loadable ONNX model ({type(exc).__name__})") from None

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        """Probabilities ``[b, h, w, N]`` of normalised slices ``[b, h, w, 2K+1]``."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]


def load_onnx_predictor(path: str | Path, threads: int = 0) -> tuple[OnnxPredictor, RunInfo]:
    """The predictor and run settings of a ``model.onnx`` (see :func:`find_onnx` for ``path``).

    Raises:
        RunError: no ``model.onnx``, not loadable, or without kerasunet's config metadata.
    """
    onnx_path = find_onnx(path)
    predictor = OnnxPredictor(onnx_path, threads)
    metadata = predictor.session.get_modelmeta().custom_metadata_map
    try:
        config = json.loads(metadata[CONFIG_KEY])
        config["data"]["modality"], config["data"]["norm"], config["model"]["depth"]
    except (KeyError, ValueError, TypeError):
        raise RunError(f"{onnx_path}: not a kerasunet ONNX model (no {CONFIG_KEY} metadata)") from None
    return predictor, RunInfo(model_path=onnx_path, config=config)
