"""TF Serving's gRPC API (``PredictionService``, port 8500) without importing TensorFlow.

The messages are tensorflow-serving-api's own (``PredictRequest``, ``GetModelMetadataRequest``,
``PredictionLog``, TensorFlow's ``TensorProto``), but they are not imported from its
``*_pb2`` modules: those import ``tensorflow.core.framework.tensor_pb2``, and any import under
``tensorflow`` runs ``tensorflow/__init__.py``, which loads the whole TensorFlow runtime
(about 4 s here, before the first request). :func:`protos` instead reads the serialized
``FileDescriptorProto`` that each installed ``*_pb2.py`` file hands to ``AddSerializedFile``
(parsed with :mod:`ast`, never executed) into a private descriptor pool. The classes it
builds are the same schema, so their bytes on the wire are the same.

Tensors travel as ``tensor_content`` (raw little-endian bytes, no JSON float encoding);
answers are decoded from ``tensor_content`` or from the typed value fields (``float_val``,
``int_val``, ...), with TensorFlow's rule that a short value list repeats its last value.

This module holds only the gRPC transport. What to send and how to check the served
signature is shared with the REST client and lives in :mod:`kerasunet.serving_client`.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from kerasunet.export import INPUT_NAME, OUTPUT_NAMES
from kerasunet.serving_client import GRPC_SCHEME, ServingError

# gRPC's default message limit. TF Serving keeps it for what it receives unless started with
# --grpc_channel_arguments=grpc.max_receive_message_length=N.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_SERVICE = "tensorflow.serving.PredictionService"
_ROOT_MODULES = ("tensorflow_serving.apis.prediction_service_pb2", "tensorflow_serving.apis.prediction_log_pb2")
_MESSAGES = ("PredictRequest", "PredictResponse", "GetModelMetadataRequest", "GetModelMetadataResponse",
             "SignatureDefMap", "ModelSpec", "PredictionLog", "PredictLog")
# DataType name -> (numpy dtype, TensorProto field holding typed values)
_DTYPES = {"DT_FLOAT": (np.float32, "float_val"), "DT_DOUBLE": (np.float64, "double_val"),
           "DT_UINT8": (np.uint8, "int_val"), "DT_INT32": (np.int32, "int_val"),
           "DT_INT64": (np.int64, "int64_val")}
_DTYPE_NAMES = {np.dtype(np_type): name for name, (np_type, _) in _DTYPES.items()}
_HINTS = {"UNAVAILABLE": "server not reachable (is it running, and is this its gRPC port?)",
          "RESOURCE_EXHAUSTED": "message over a size limit (raise --grpc-max-message-mb here and "
                                "grpc.max_receive_message_length on the server)"}


class _NotGencode(LookupError):
    """A ``*_pb2.py`` file without the ``AddSerializedFile(b'...')`` call this module reads."""


def _source_file(module: str) -> Path:
    # find_spec of the top-level name only: a dotted name would import its parent packages.
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ServingError(f"gRPC needs {top!r} (tensorflow-serving-api): pip install 'kerasunet[grpc]'")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*rest).with_suffix(".py")


def _add_file(pool, module: str, added: set[str]) -> None:
    """Adds the descriptor of ``module`` (a ``*_pb2`` name) and its dependencies to ``pool``."""
    from google.protobuf import descriptor_pb2

    if module in added:
        return
    added.add(module)
    if module.startswith("google.protobuf."):  # protobuf's own well-known types: cheap to import
        proto = descriptor_pb2.FileDescriptorProto()
        importlib.import_module(module).DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
        return
    serialized = None
    for node in ast.walk(ast.parse(_source_file(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if alias.name.endswith("_pb2"):
                    _add_file(pool, f"{node.module}.{alias.name}", added)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile"
              and node.args and isinstance(node.args[0], ast.Constant)):
            serialized = node.args[0].value
    if not isinstance(serialized, bytes):
        raise _NotGencode(module)
    pool.AddSerializedFile(serialized)


def _descriptor_pool():
    from google.protobuf import descriptor_pool

    pool, added = descriptor_pool.DescriptorPool(), set()
    try:
        for module in _ROOT_MODULES:
            _add_file(pool, module, added)
    except _NotGencode:
        # Generated code of another shape: import the modules (this loads TensorFlow).
        for module in _ROOT_MODULES:
            importlib.import_module(module)
        return descriptor_pool.Default()
    return pool


@functools.lru_cache(maxsize=None)
def protos() -> SimpleNamespace:
    """TF Serving's message classes, the ``DataType`` enum and the service's method paths.

    Returns:
        A namespace with the classes named in ``_MESSAGES``, ``TensorProto``, ``DataType``
        (an enum wrapper: ``DataType.Value("DT_FLOAT")``) and ``methods``
        (``{"Predict": "/tensorflow.serving.PredictionService/Predict", ...}``).

    Raises:
        ServingError: tensorflow-serving-api is not installed.
    """
    from google.protobuf import message_factory
    from google.protobuf.internal import enum_type_wrapper

    pool = _descriptor_pool()
    classes = {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
               for name in _MESSAGES}
    classes["TensorProto"] = message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.TensorProto"))
    service = pool.FindServiceByName(_SERVICE)
    return SimpleNamespace(**classes, DataType=enum_type_wrapper.EnumTypeWrapper(
        pool.FindEnumTypeByName("tensorflow.DataType")),
        methods={m.name: f"/{service.full_name}/{m.name}" for m in service.methods})


def tensor_proto(array: np.ndarray):
    """A ``TensorProto`` holding ``array`` as ``tensor_content`` (little-endian bytes)."""
    p = protos()
    array = np.asarray(array)
    if array.dtype not in _DTYPE_NAMES:
        raise ValueError(f"Expected one of {sorted(map(str, _DTYPE_NAMES))}. Received: dtype={array.dtype}")
    proto = p.TensorProto(dtype=p.DataType.Value(_DTYPE_NAMES[array.dtype]),
                          tensor_content=np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def filled_tensor_proto(shape, value: float):
    """A float32 ``TensorProto`` of ``shape`` whose every element is ``value``.

    It holds ``value`` once: TensorFlow fills a tensor whose value list is shorter than its
    shape with the last value, so a [16, 512, 512, 3] warm-up input is a few bytes on disk.
    """
    p = protos()
    proto = p.TensorProto(dtype=p.DataType.Value("DT_FLOAT"), float_val=[value])
    for size in shape:
        proto.tensor_shape.dim.add(size=int(size))
    return proto


def to_array(proto) -> np.ndarray:
    """The numpy array of a ``TensorProto`` (``tensor_content`` or typed values).

    Raises:
        ValueError: a dtype this client does not read, or a size that does not match the shape.
    """
    name = protos().DataType.Name(proto.dtype)
    if name not in _DTYPES:
        raise ValueError(f"tensor dtype {name} is not one of {sorted(_DTYPES)}")
    np_type, field = _DTYPES[name]
    shape = [d.size for d in proto.tensor_shape.dim]
    count = math.prod(shape)
    if proto.tensor_content:
        flat = np.frombuffer(proto.tensor_content, dtype=np.dtype(np_type).newbyteorder("<"))
    else:
        flat = np.asarray(getattr(proto, field), dtype=np_type)
        if 0 < flat.size < count:  # TensorFlow's rule: the last value fills the rest
            flat = np.concatenate([flat, np.full(count - flat.size, flat[-1], np_type)])
        elif flat.size == 0:
            flat = np.zeros(count, np_type)
    if flat.size != count:
        raise ValueError(f"tensor of shape {shape} holds {flat.size} values")
    return flat.astype(np_type).reshape(shape)


def model_spec(name: str, version: int | None = None, label: str | None = None, signature: str = ""):
    """``ModelSpec``: the model, and a version number or a version label (else the latest)."""
    p = protos()
    spec = p.ModelSpec(name=name, signature_name=signature)
    if version is not None:
        spec.version.value = int(version)
    if label is not None:
        spec.version_label = label
    return spec


def spec_text(name: str, version: int | None = None, label: str | None = None) -> str:
    """How messages name the requested model: ``liver``, ``liver version 2``, ``liver label canary``."""
    if version is not None:
        return f"{name} version {version}"
    return f"{name} label {label}" if label is not None else name


def check_address(server: str) -> str:
    """``HOST:PORT`` of ``grpc://HOST:PORT``.

    Raises:
        ServingError: no ``grpc://`` scheme, no port, or a path after the port.
    """
    address = server[len(GRPC_SCHEME):] if server.startswith(GRPC_SCHEME) else ""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ServingError(f"{server}: gRPC server must be grpc://HOST:PORT (TF Serving's gRPC port is 8500)")
    return address


def open_channel(server: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
    """An insecure channel to ``grpc://HOST:PORT`` that sends and receives up to ``max_message_bytes``."""
    import grpc

    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes)]
    return grpc.insecure_channel(check_address(server), options=options)


def call(channel, method: str, request, timeout: float, where: str):
    """Runs one unary call of ``PredictionService``; gRPC errors become a one-line ServingError.

    Args:
        channel: from :func:`open_channel`.
        method: ``Predict`` or ``GetModelMetadata``.
        request: the request message.
        timeout: the call's deadline in seconds.
        where: the start of error messages (server address and model).

    Raises:
        ServingError: with the gRPC status name in ``status``; the message names ``where``.
    """
    import grpc

    p = protos()
    answer_type = getattr(p, f"{method}Response")
    rpc = channel.unary_unary(p.methods[method], request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=answer_type.FromString)
    try:
        return rpc(request, timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() is not None else "UNKNOWN"
        details = (exc.details() or "").splitlines()[0] if exc.details() else ""
        if code == "DEADLINE_EXCEEDED":
            text = f"no answer within {timeout:g} s (timeout)"
        elif code in _HINTS:
            text = f"{_HINTS[code]}: {code}: {details}"
        else:
            text = f"{code}: {details}"
        raise ServingError(f"{where}: {method}: {text}", status=code) from None


def fetch_signatures(channel, server: str, name: str, version: int | None, label: str | None,
                     timeout: float) -> dict:
    """``GetModelMetadata``: the served signatures as :func:`serving_client.check_signature` reads them.

    Returns:
        ``{signature: {"inputs": {key: (dtype name, dims)}, "outputs": {...}}}``; ``dims`` has
        -1 for a free size and is None for an unknown rank.
    """
    p = protos()
    where = f"{server} {spec_text(name, version, label)}"
    request = p.GetModelMetadataRequest(model_spec=model_spec(name, version, label), metadata_field=["signature_def"])
    answer = call(channel, "GetModelMetadata", request, timeout, where)
    packed = answer.metadata.get("signature_def")
    if packed is None or not packed.type_url.endswith("/tensorflow.serving.SignatureDefMap"):
        raise ServingError(f"{where}: GetModelMetadata: answer has no signature_def map")
    signatures = p.SignatureDefMap.FromString(packed.value).signature_def

    def describe(infos):
        return {key: (p.DataType.Name(info.dtype),
                      None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim])
                for key, info in infos.items()}

    return {key: {"inputs": describe(sig.inputs), "outputs": describe(sig.outputs)} for key, sig in signatures.items()}


def predict(model, images: np.ndarray, timeout: float) -> np.ndarray:
    """One ``Predict`` call for the stacks ``images``; returns the ``probabilities`` output.

    Only ``probabilities`` is asked for (``output_filter``), so the answer carries no mask.

    Args:
        model: a ``serving_client.RemoteModel`` with an open ``channel``.
        images: float32 ``[b, h, w, C]``.
        timeout: the call's deadline in seconds.

    Raises:
        ServingError: the call fails or the answer has no readable ``probabilities``.
    """
    p = protos()
    where = f"{model.url} {spec_text(model.name, model.version, model.label)}"
    request = p.PredictRequest(model_spec=model_spec(model.name, model.version, model.label, model.signature),
                               output_filter=[OUTPUT_NAMES[0]])
    request.inputs[INPUT_NAME].CopyFrom(tensor_proto(np.asarray(images, np.float32)))
    answer = call(model.channel, "Predict", request, timeout, where)
    if OUTPUT_NAMES[0] not in answer.outputs:
        raise ServingError(f"{where}: Predict: answer has no output {OUTPUT_NAMES[0]!r}")
    try:
        return to_array(answer.outputs[OUTPUT_NAMES[0]]).astype(np.float32, copy=False)
    except ValueError as exc:
        raise ServingError(f"{where}: Predict: output {OUTPUT_NAMES[0]!r}: {exc}") from None


def warmup_records(name: str, channels: int, size: tuple[int, int], batch_sizes, value: float,
                   signature: str) -> list[bytes]:
    """Serialized ``PredictionLog`` records for TF Serving's ``tf_serving_warmup_requests``.

    One ``PredictRequest`` per batch size, each image ``[b, *size, channels]`` filled with
    ``value`` (see :func:`filled_tensor_proto`).
    """
    p = protos()
    records = []
    for batch in batch_sizes:
        request = p.PredictRequest(model_spec=model_spec(name, signature=signature))
        request.inputs[INPUT_NAME].CopyFrom(filled_tensor_proto((batch, *size, channels), value))
        records.append(p.PredictionLog(predict_log=p.PredictLog(request=request)).SerializeToString())
    return records
