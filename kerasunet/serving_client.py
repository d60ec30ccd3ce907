"""Ask a model served by TF Serving for the probabilities of a volume, over REST or gRPC.

The client needs no knowledge of the training settings: it reads the model's signature
from the server (REST ``GET /v1/models/NAME[/versions/N|/labels/L]/metadata``, gRPC
``GetModelMetadata``), checks it in :func:`check_signature`, builds the 2.5D stacks itself
(``core.stacking.stack_slices``, the builder's convention) and sends raw intensities.
Normalisation and padding happen in the exported graph (``kerasunet.export``). The served
``probabilities`` come back; thresholding and post-processing happen on the client, in
:func:`kerasunet.predict.predict_volume_served`, exactly as for a local model.

What the signature says, and what is refused before any volume is sent (one line each):

* the ``image`` input's static channel size is ``2K+1``, the 2.5D context the model was
  exported with; stacks with another channel count are refused (:func:`predict_batch`);
* the output keys of the ``model_info`` signature (``kerasunet.export``), which the metadata
  lists, name the served modality and the structures of the ``probabilities`` channels
  (``RemoteModel.outputs``: CT liver + tumour, MRI tumour, or an ATLAS-like MRI model's
  liver + tumour); their number must be the static channel size of ``probabilities``.
  Exports without ``model_info`` (older ones, cascades) are read by that channel size
  (2: CT liver + tumour, 1: MRI tumour). An input of the other modality
  (``fetch_model(modality=...)``, which ``predict_path_served`` takes from the input
  folder's layout) is refused.

One home for what both transports share: :class:`RemoteModel`, :func:`check_signature`,
:func:`plan_batches` and :func:`predict_probabilities`. The transports are REST (here: the
standard library and numpy, no TensorFlow) and gRPC (:mod:`kerasunet.serving_grpc`, chosen
by a ``grpc://HOST:PORT`` server; needs the ``grpc`` extra, still no TensorFlow).

Batches: MRI models normalise with statistics of the whole request, so a request must hold
one whole case: an MRI volume is sent in ONE request when it has at most
``max_case_voxels`` voxels (and, over gRPC, fits the message limit), else in batches with a
warning, as each batch is then normalised on its own. CT models use a fixed window, so any
batching gives the same probabilities. Over gRPC no request or answer exceeds the message
limit (4 MiB by default, gRPC's own default, which TF Serving also keeps for what it
receives): batches shrink until they fit.

3D exports (``kerasunet.export``, ``dims`` 3) serve patches: their ``image`` input is
``[n, D, H, W, C]`` with the patch size fixed, plus ``stats [n, 4]``. :func:`fetch_model`
recognises them by that five-axis input and returns a :class:`RemoteVolumeModel`, which also
holds the ``volume_settings`` signature's answer (modality, normalisation, spacing). The
sliding window then runs on the client (``kerasunet.predict.predict_volume_served_3d``),
which sends raw windows with the case's statistics (:func:`predict_windows`).
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, replace

import numpy as np

from kerasunet.cascade import SPACING_INPUT
from kerasunet.core.labels import OUTPUTS, STRUCTURES, check_outputs
from kerasunet.core.preprocessing import MODALITIES, NormSettings
from kerasunet.core.records_format import channels_context
from kerasunet.core.stacking import stack_slices
from kerasunet.export import (INPUT_NAME, LESION_FILTER_SIGNATURE, MODEL_INFO_SIGNATURE, OUTPUT_NAMES,
                              SETTINGS_OUTPUTS, SETTINGS_SIGNATURE, SIGNATURE, STATS_NAME)

MAX_CASE_VOXELS = 8_000_000
# Room left in a gRPC message for everything but the tensor bytes (model spec, shape, framing).
MESSAGE_OVERHEAD_BYTES = 64 * 1024
PROBABILITIES_OUTPUT, MASK_OUTPUT = OUTPUT_NAMES
GRPC_SCHEME = "grpc://"  # a server address with this scheme is spoken to over gRPC (kerasunet.serving_grpc)


class ServingError(RuntimeError):
    """A failed exchange with the model server. The message starts with the URL or address.

    Attributes:
        status: the HTTP status (REST) or the gRPC status name (``"NOT_FOUND"``) when the
            server answered with an error, else None.
    """

    def __init__(self, message: str, status: int | str | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RemoteModel:
    """What the client learns from the server's metadata, and where it sends requests.

    Attributes:
        url: REST ``{server}/v1/models/NAME[/versions/V|/labels/L]``, or ``grpc://HOST:PORT``.
        channels: input channels ``2K+1`` of the ``image`` input.
        num_outputs: channels of the ``probabilities`` output (2 CT, 1 MRI).
        signature: the signature called.
        name: the served model's name.
        version: the version asked for (None: the server's latest, or ``label``'s).
        label: the version label asked for (``stable``, ``canary``), or None.
        max_message_bytes: gRPC: the largest request or answer; None for REST.
        channel: gRPC: the open channel (closed by :meth:`close`); None for REST.
        served: ``(modality, outputs)`` from the ``model_info`` signature; None for exports
            without it (then both follow from ``num_outputs``).
        lesion_filter: the run's own ``kerasunet.lesion_filter.LesionFilter``, from the
            ``lesion_filter`` signature (:func:`served_lesion_filter`); None for exports
            without one.
    """

    url: str
    channels: int
    num_outputs: int
    signature: str = SIGNATURE
    name: str = ""
    version: int | None = None
    label: str | None = None
    max_message_bytes: int | None = None
    channel: object = field(default=None, compare=False, repr=False)
    cascade: bool = False  # a liver-ROI cascade (kerasunet.cascade): one whole case and its spacing per request
    served: tuple[str, tuple[str, ...]] | None = None
    lesion_filter: object = None

    @property
    def context(self) -> int:
        return channels_context(self.channels)

    @property
    def modality(self) -> str:
        """``ct`` or ``mri``: ``model_info``'s, else the modality whose outputs (``labels.OUTPUTS``)
        number ``num_outputs``."""
        return self.served[0] if self.served else served_modality(self.num_outputs)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The structures of the ``probabilities`` channels, in order."""
        return self.served[1] if self.served else OUTPUTS[self.modality]

    @property
    def one_case_per_request(self) -> bool:
        return self.modality == "mri" or self.cascade

    @property
    def protocol(self) -> str:
        return "grpc" if self.url.startswith(GRPC_SCHEME) else "rest"

    def close(self) -> None:
        """Closes the gRPC channel (nothing to do for REST)."""
        if self.channel is not None:
            self.channel.close()

    def __enter__(self) -> "RemoteModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def served_modality(num_outputs: int) -> str | None:
    """The modality whose output channels number ``num_outputs`` (None when none or several do)."""
    found = [m for m, names in OUTPUTS.items() if len(names) == num_outputs]
    return found[0] if len(found) == 1 else None


def model_url(server: str, model_name: str, version: int | None = None, label: str | None = None) -> str:
    """``{server}/v1/models/NAME[/versions/V|/labels/L]`` (TF Serving's REST model URL)."""
    if not server.startswith(("http://", "https://")):
        raise ServingError(f"{server}: server URL must start with http://, https:// or grpc://")
    url = f"{server.rstrip('/')}/v1/models/{urllib.parse.quote(model_name, safe='')}"
    if version is not None:
        return f"{url}/versions/{int(version)}"
    return f"{url}/labels/{urllib.parse.quote(label, safe='')}" if label is not None else url


def call(url: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    """GETs (``body`` None) or POSTs JSON to ``url`` and returns the parsed JSON answer.

    Raises:
        ServingError: connection refused, timeout, an HTTP error (with TF Serving's
            ``{"error": ...}`` text) or an answer that is not JSON. The message names ``url``.
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise ServingError(f"{url}: HTTP {exc.code}: {_error_text(exc)}", status=exc.code) from None
    except urllib.error.URLError as exc:
        raise ServingError(f"{url}: {_reason_text(exc.reason, timeout)}") from None
    except (TimeoutError, socket.timeout):
        raise ServingError(f"{url}: no answer within {timeout:g} s (timeout)") from None
    except OSError as exc:  # connection reset mid-answer, etc.
        raise ServingError(f"{url}: {_reason_text(exc, timeout)}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise ServingError(f"{url}: answer is not JSON: {raw[:200]!r}") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    raw = exc.read()
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace").strip()[:500] or str(exc.reason)


def _reason_text(reason, timeout: float) -> str:
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s (timeout)"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server running, and on this port?)"
    return f"cannot connect ({reason})"


def _rest_signatures(where: str, answer: dict) -> dict:
    """TF Serving's metadata JSON as :func:`check_signature` reads it (sizes come as strings)."""

    def describe(infos: dict) -> dict:
        out = {}
        for key, info in infos.items():
            shape = info.get("tensor_shape", {})
            dims = None if shape.get("unknown_rank") else [int(d["size"]) for d in shape.get("dim", [])]
            out[key] = (info.get("dtype"), dims)
        return out

    try:
        signatures = answer["metadata"]["signature_def"]["signature_def"]
        return {key: {"inputs": describe(sig.get("inputs", {})), "outputs": describe(sig.get("outputs", {}))}
                for key, sig in signatures.items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ServingError(f"{where}: answer has no metadata.signature_def") from None


def check_signature(where: str, signatures: dict, signature: str = SIGNATURE,
                    modality: str | None = None, served: tuple[str, tuple[str, ...]] | None = None) -> tuple[int, int]:
    """Checks a served signature is a kerasunet export, and of ``modality`` when given.

    Args:
        where: the start of error messages (the metadata URL, or the gRPC address and model).
        signatures: ``{name: {"inputs": {key: (dtype, dims)}, "outputs": {...}}}``, dtypes as
            TF Serving names them (``DT_FLOAT``), dims with -1 for a free size.
        signature: the signature to call.
        modality: the input's modality (``ct``/``mri``), or None to accept either.
        served: ``(modality, outputs)`` of the ``model_info`` signature (:func:`served_structures`),
            or None to read both from the channel count.

    Returns:
        ``(channels, num_outputs)``: ``2K+1`` of ``image`` and N of ``probabilities``.

    Raises:
        ServingError: no such signature; not a kerasunet export (float32 ``image``
            ``[b, h, w, 2K+1]`` in, ``probabilities`` ``[b, h, w, N]`` and ``mask`` out);
            an even channel count; an N no modality has; or another modality than ``modality``.
    """
    if signature not in signatures:
        raise ServingError(f"{where}: no signature {signature!r} (has {sorted(signatures)})")
    sig = signatures[signature]
    image, probs = sig["inputs"].get(INPUT_NAME), sig["outputs"].get(PROBABILITIES_OUTPUT)
    if (image is None or probs is None or MASK_OUTPUT not in sig["outputs"]
            or any(t[0] != "DT_FLOAT" or t[1] is None or len(t[1]) != 4 for t in (image, probs))):
        has = "; ".join(f"{kind} " + ", ".join(f"{k}: {t[0]} {t[1]}" for k, t in sorted(sig[kind].items()))
                        for kind in ("inputs", "outputs"))
        raise ServingError(f"{where}: signature {signature!r} is not a kerasunet export (expected float32 input "
                           f"'image' [b, h, w, 2K+1] and outputs 'probabilities' [b, h, w, N], 'mask'; has {has})")
    channels, num_outputs = image[1][-1], probs[1][-1]
    if channels < 1 or channels % 2 == 0:
        raise ServingError(f"{where}: input 'image' has {channels} channels; expected 2K+1 (odd)")
    if served is None:
        found = served_modality(num_outputs)
        if found is None:
            counts = sorted({len(names) for names in OUTPUTS.values()})
            raise ServingError(f"{where}: output 'probabilities' has {num_outputs} channels; "
                               f"expected one of {counts} (CT liver+tumour, MRI tumour)")
        served = (found, OUTPUTS[found])
    elif len(served[1]) != num_outputs:
        raise ServingError(f"{where}: output 'probabilities' has {num_outputs} channels but {MODEL_INFO_SIGNATURE} "
                           f"names {len(served[1])} structures ({', '.join(served[1])})")
    if modality is not None and modality != served[0]:
        raise ServingError(f"{where}: the input is {modality.upper()} but the model was exported for "
                           f"{served[0].upper()} (its 'probabilities' are {', '.join(served[1])}); "
                           f"use a model trained on {modality.upper()}")
    return channels, num_outputs


def served_structures(where: str, signatures: dict) -> tuple[str, tuple[str, ...]] | None:
    """``(modality, outputs)`` named by the output keys of the ``model_info`` signature (one
    modality, the structures in ``labels.STRUCTURES`` order); None when the export has none.

    Raises:
        ServingError: its keys name not exactly one modality, or no structure, or others.
    """
    if MODEL_INFO_SIGNATURE not in signatures:
        return None
    keys = set(signatures[MODEL_INFO_SIGNATURE]["outputs"])
    modalities = [m for m in MODALITIES if m in keys]
    outputs = tuple(s for s in STRUCTURES if s in keys)
    if len(modalities) != 1 or not outputs or keys - set(modalities) - set(outputs):
        raise ServingError(f"{where}: signature {MODEL_INFO_SIGNATURE!r} has outputs {sorted(keys)}; expected one "
                           f"modality of {MODALITIES} and structures of {STRUCTURES}")
    return modalities[0], check_outputs(outputs)


def _not_served(exc: ServingError, model_name: str, version: int | None, label: str | None) -> ServingError:
    """``exc`` with a hint when the server does not know the model, version or label."""
    if exc.status in (404, "NOT_FOUND"):
        which = f"model {model_name!r}" + (f" version {version}" if version is not None else "")
        return ServingError(f"{exc} ({which} is not served there; check --model-name/--model-version)", exc.status)
    if label is not None and "label" in str(exc):
        return ServingError(f"{exc} (label {label!r} is not set for model {model_name!r}; check --model-label "
                            "and the server's models.config)", exc.status)
    return exc


def fetch_model(server: str, model_name: str, version: int | None = None, signature: str = SIGNATURE,
                timeout: float = 60.0, *, label: str | None = None, modality: str | None = None,
                max_message_bytes: int | None = None) -> "RemoteModel | RemoteVolumeModel":
    """Reads the served model's signature and checks it (:func:`check_signature`).

    Args:
        server: ``http://HOST:8501`` (REST) or ``grpc://HOST:8500`` (gRPC).
        model_name: the served model's name.
        version: a version number; default the latest (or ``label``'s).
        signature: the signature to call.
        timeout: seconds to wait for the answer.
        label: a version label (``stable``/``canary``) instead of a version number.
        modality: the input's modality, when known: a model of the other one is refused.
        max_message_bytes: gRPC only: the largest request or answer; default 4 MiB.

    Returns:
        The model (a :class:`RemoteVolumeModel` for a 3D export); over gRPC it holds an open
        channel: use it in a ``with`` block or ``close`` it.

    Raises:
        ValueError: both ``version`` and ``label``, or ``max_message_bytes`` for REST.
        ServingError: unreachable server, unknown model, version or label, no such
            signature, a signature that is not a kerasunet export, or the wrong modality.
    """
    from kerasunet import serving_grpc

    if version is not None and label is not None:
        raise ValueError(f"Expected a version or a label, not both. Received: version={version}, label={label!r}")
    if server.startswith(GRPC_SCHEME):
        limit = max_message_bytes or serving_grpc.DEFAULT_MAX_MESSAGE_BYTES
        channel = serving_grpc.open_channel(server, limit)
        try:
            try:
                signatures = serving_grpc.fetch_signatures(channel, server, model_name, version, label, timeout)
            except ServingError as exc:
                raise _not_served(exc, model_name, version, label) from None
            where = f"{server} {serving_grpc.spec_text(model_name, version, label)}: GetModelMetadata"
            if is_volume_signature(signatures, signature):  # a 3D export: patches
                return fetch_volume_settings(where, signatures, signature, modality, timeout, url=server,
                                             name=model_name, version=version, label=label,
                                             max_message_bytes=limit, channel=channel)
            remote = dict(url=server, signature=signature, name=model_name, version=version, label=label,
                          max_message_bytes=limit, channel=channel)
            served = served_structures(where, signatures)
            channels, num_outputs = check_signature(where, signatures, signature, modality, served)
            model = RemoteModel(channels=channels, num_outputs=num_outputs, served=served, **remote,
                                cascade=SPACING_INPUT in signatures[signature]["inputs"])
            return served_lesion_filter(model, signatures, timeout)
        except BaseException:
            channel.close()
            raise
    if max_message_bytes is not None:
        raise ValueError(f"Expected max_message_bytes only for a grpc:// server. Received: server={server!r}")
    url = model_url(server, model_name, version, label)
    try:
        answer = call(f"{url}/metadata", timeout=timeout)
    except ServingError as exc:
        raise _not_served(exc, model_name, version, label) from None
    signatures = _rest_signatures(f"{url}/metadata", answer)
    if is_volume_signature(signatures, signature):  # a 3D export: patches
        return fetch_volume_settings(f"{url}/metadata", signatures, signature, modality, timeout, url=url,
                                     name=model_name, version=version, label=label)
    remote = dict(url=url, signature=signature, name=model_name, version=version, label=label)
    served = served_structures(f"{url}/metadata", signatures)
    channels, num_outputs = check_signature(f"{url}/metadata", signatures, signature, modality, served)
    model = RemoteModel(channels=channels, num_outputs=num_outputs, served=served, **remote,
                        cascade=SPACING_INPUT in signatures[signature]["inputs"])
    return served_lesion_filter(model, signatures, timeout)


def served_lesion_filter(model: RemoteModel, signatures: dict, timeout: float) -> RemoteModel:
    """``model`` with the thresholds its ``lesion_filter`` signature returns (one call), or as it
    is when the export has no such signature (a run without its own filter, or an older export).

    Raises:
        ServingError: the call fails or its answer is not four usable thresholds.
    """
    from kerasunet.lesion_filter import FEATURES, LesionFilter

    if LESION_FILTER_SIGNATURE not in signatures:
        return model
    values = call_signature(model, LESION_FILTER_SIGNATURE, {INPUT_NAME: np.zeros(1, np.float32)}, FEATURES,
                            timeout)
    try:
        thresholds = LesionFilter(**{name: float(np.asarray(values[name]).reshape(())) for name in FEATURES})
    except (TypeError, ValueError) as exc:
        raise ServingError(f"{model.url}: {LESION_FILTER_SIGNATURE}: unusable answer ({exc})") from None
    return replace(model, lesion_filter=thresholds)


def plan_batches(num_slices: int, slice_voxels: int, batch_size: int, model: RemoteModel,
                 max_case_voxels: int = MAX_CASE_VOXELS) -> list[range]:
    """Slice ranges, one per request: the whole case for MRI when it fits, else ``batch_size``.

    Over gRPC (``model.max_message_bytes`` set) a request holds no more slices than fit in
    the message limit, counting 4 bytes per voxel and channel of the request (``2K+1``) or
    of its answer (N probabilities), whichever is larger.

    Raises:
        ValueError: ``batch_size`` below 1.
        ServingError: one slice alone exceeds the message limit.
    """
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    per_request, limit, fits = batch_size, model.max_message_bytes, None
    if limit is not None:
        slice_bytes = 4 * slice_voxels * max(model.channels, model.num_outputs)
        fits = (limit - MESSAGE_OVERHEAD_BYTES) // slice_bytes
        if fits < 1:
            raise ServingError(f"{model.url}: one slice of {slice_voxels} voxels x {model.channels} channels is "
                               f"{slice_bytes / 2**20:.1f} MiB, over the {limit / 2**20:g} MiB message limit; raise "
                               "--grpc-max-message-mb here and grpc.max_receive_message_length on the server")
        per_request = min(batch_size, fits)
    if model.one_case_per_request:
        if num_slices * slice_voxels > max_case_voxels:
            reason = f"{num_slices * slice_voxels} voxels exceed {max_case_voxels}"
        elif fits is not None and num_slices > fits:
            reason = f"{num_slices} slices exceed the {limit / 2**20:g} MiB gRPC message limit"
        else:
            return [range(num_slices)]
        print(f"warning: {reason}; sending {per_request} slices per request, so each batch is normalised with "
              "its own MRI statistics and results may differ from a whole-case request", file=sys.stderr)
    return [range(s, min(s + per_request, num_slices)) for s in range(0, num_slices, per_request)]


def predict_batch(model: RemoteModel, images: np.ndarray, timeout: float) -> np.ndarray:
    """Sends one request of 2.5D stacks and returns its float32 probabilities ``[b, X, Y, N]``.

    Raises:
        ServingError: ``images`` is not ``[b, h, w, C]`` with the model's ``C = 2K+1``
            (refused before sending), the request fails, or the answer has no probabilities
            of the right shape.
    """
    if images.ndim != 4:
        raise ServingError(f"{model.url}: expected stacks [batch, height, width, {model.channels}], "
                           f"got shape {images.shape}")
    if images.shape[-1] != model.channels:
        raise ServingError(f"{model.url}: input has {images.shape[-1]} channels (2.5D context "
                           f"K={channels_context(images.shape[-1])}) but the model was exported for {model.channels} "
                           f"(K={model.context}); build the stacks with context {model.context}")
    if model.protocol == "grpc":
        from kerasunet import serving_grpc

        where, probs = model.url, serving_grpc.predict(model, images, timeout)
    else:
        where, probs = f"{model.url}:predict", _rest_predict(model, images, timeout)
    expected = (*images.shape[:3], model.num_outputs)
    if probs.shape != expected:
        raise ServingError(f"{where}: probabilities have shape {probs.shape}, expected {expected}")
    return probs


def _rest_predict(model: RemoteModel, images: np.ndarray, timeout: float) -> np.ndarray:
    """One columnar REST predict request (JSON numbers) -> float32 probabilities."""
    url = f"{model.url}:predict"
    answer = call(url, {"signature_name": model.signature, "inputs": {INPUT_NAME: images.tolist()}}, timeout)
    try:
        return np.asarray(answer["outputs"][PROBABILITIES_OUTPUT], dtype=np.float32)
    except (KeyError, TypeError, ValueError):
        raise ServingError(f"{url}: answer has no outputs.{PROBABILITIES_OUTPUT}") from None


def predict_probabilities(model: RemoteModel, data: np.ndarray, batch_size: int = 16, timeout: float = 60.0,
                          max_case_voxels: int = MAX_CASE_VOXELS, spacing=None) -> np.ndarray:
    """The served model's probabilities for a volume of raw intensities.

    Args:
        model: from :func:`fetch_model`.
        data: the volume ``(x, y, z)`` in canonical order (axial slices ``data[:, :, k]``).
        batch_size: slices per request (CT; MRI volumes above ``max_case_voxels``); fewer
            over gRPC when they would not fit the message limit.
        timeout: seconds to wait for each answer.
        max_case_voxels: largest MRI volume sent as one request.
        spacing: the voxel size ``(x, y, z)`` in mm; a cascade (``model.cascade``) needs it and
            gets the whole volume in one request (its ROI is the case's liver box).

    Returns:
        float32 ``(x, y, z, N)``, as :func:`kerasunet.predict.predict_volume` returns them.

    Raises:
        ServingError: the server cannot be reached, times out or returns an error (its text
            is in the message).
    """
    if model.cascade:  # the ROI is the whole case's liver box: one request, with the voxel spacing
        images = stack_slices(data, np.arange(data.shape[2]), model.context)
        inputs = {INPUT_NAME: images, SPACING_INPUT: np.asarray(spacing, np.float32)}
        out = call_signature(model, model.signature, inputs, (PROBABILITIES_OUTPUT,),
                             timeout)[PROBABILITIES_OUTPUT].astype(np.float32, copy=False)
        if out.shape != (*images.shape[:3], model.num_outputs):
            raise ServingError(f"{model.url}: probabilities have shape {out.shape}, expected "
                               f"{(*images.shape[:3], model.num_outputs)}")
        return np.moveaxis(out, 0, 2)
    probs = np.zeros((*data.shape, model.num_outputs), dtype=np.float32)
    for batch in plan_batches(data.shape[2], data.shape[0] * data.shape[1], batch_size, model, max_case_voxels):
        out = predict_batch(model, stack_slices(data, batch, model.context), timeout)
        probs[:, :, batch.start:batch.stop] = np.moveaxis(out, 0, 2)
    return probs


# --- 3D exports: patches in, probabilities out; the sliding window runs here -----------------

@dataclass(frozen=True)
class RemoteVolumeModel:
    """A served 3D model (module docstring): the :class:`RemoteModel` it is called through, and
    what its ``volume_settings`` signature says.

    Attributes:
        model: url, channels, outputs, version, label and (gRPC) channel, as for 2D models.
        patch_size: the ``(D, H, W)`` window of the ``image`` input's static shape.
        norm: the run's normalisation, so the client computes the statistics ``case_stats``
            computes for a local model.
        spacing: the ``(D, H, W)`` spacing in mm the model expects, or None.
    """

    model: RemoteModel
    patch_size: tuple[int, int, int]
    norm: NormSettings
    spacing: tuple[float, float, float] | None = None
    dims = 3  # a class constant, not a field: RemoteModel (2D) has none

    @property
    def url(self) -> str:
        return self.model.url

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.model.outputs

    @property
    def lesion_filter(self):
        return self.model.lesion_filter

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> "RemoteVolumeModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_volume_signature(signatures: dict, signature: str = SIGNATURE) -> bool:
    """Whether ``signature``'s ``image`` input has five axes ``[n, D, H, W, C]`` (a 3D export)."""
    image = signatures.get(signature, {}).get("inputs", {}).get(INPUT_NAME)
    return image is not None and image[1] is not None and len(image[1]) == 5


def check_volume_signature(where: str, signatures: dict, signature: str = SIGNATURE, modality: str | None = None,
                           served: tuple[str, tuple[str, ...]] | None = None) -> tuple[tuple[int, int, int], int, int]:
    """Checks a 3D export's signature; the rest of the checks are :func:`check_signature`'s.

    Returns:
        ``(patch_size, channels, num_outputs)``.

    Raises:
        ServingError: no fixed patch size, no ``stats [n, 4]`` input, no five-axis
            ``probabilities``, or anything :func:`check_signature` refuses.
    """
    sig = signatures[signature]
    image, stats = sig["inputs"][INPUT_NAME], sig["inputs"].get(STATS_NAME)
    probs = sig["outputs"].get(PROBABILITIES_OUTPUT)
    if (stats is None or stats[1] != [-1, 4] or probs is None or probs[1] is None or len(probs[1]) != 5
            or any(size < 1 for size in image[1][1:4]) or SETTINGS_SIGNATURE not in signatures):
        raise ServingError(f"{where}: signature {signature!r} is not a kerasunet 3D export (expected float32 inputs "
                           f"'image' [n, D, H, W, C] of a fixed patch size and '{STATS_NAME}' [n, 4], outputs "
                           f"'probabilities' [n, D, H, W, N] and 'mask', and a '{SETTINGS_SIGNATURE}' signature)")
    # one slice of each patch looks like a 2D export's input: check_signature checks the rest
    flat = {kind: {key: (t[0], t[1] if t[1] is None or len(t[1]) != 5 else [t[1][0], *t[1][2:]])
                   for key, t in sig[kind].items() if key != STATS_NAME} for kind in ("inputs", "outputs")}
    channels, num_outputs = check_signature(where, {signature: flat}, signature, modality, served)
    return tuple(image[1][1:4]), channels, num_outputs


def fetch_volume_settings(where: str, signatures: dict, signature: str, modality: str | None, timeout: float,
                          **remote) -> RemoteVolumeModel:
    """A :class:`RemoteVolumeModel` of a checked 3D signature and its ``volume_settings`` answer.

    Args:
        where: the start of error messages.
        signatures: the served signatures (:func:`check_signature`'s form).
        signature: the signature to call.
        modality: the input's modality, or None to accept either.
        timeout: seconds to wait for the answer.
        **remote: the :class:`RemoteModel` fields other than channels, outputs and signature.

    Raises:
        ServingError: the signature is refused or the settings cannot be read.
    """
    served = served_structures(where, signatures)
    patch_size, channels, num_outputs = check_volume_signature(where, signatures, signature, modality, served)
    model = RemoteModel(channels=channels, num_outputs=num_outputs, signature=signature, served=served, **remote)
    model = served_lesion_filter(model, signatures, timeout)
    values = call_signature(model, SETTINGS_SIGNATURE, {INPUT_NAME: np.zeros(1, np.float32)}, SETTINGS_OUTPUTS,
                            timeout)
    try:
        norm = NormSettings(MODALITIES[int(values["modality"])], tuple(float(v) for v in values["hu_window"]),
                            tuple(float(v) for v in values["percentiles"]))
        spacing = tuple(float(v) for v in values["spacing"])
    except (IndexError, TypeError, ValueError) as exc:
        raise ServingError(f"{model.url}: {SETTINGS_SIGNATURE}: unusable answer ({exc})") from None
    return RemoteVolumeModel(model, patch_size, norm, spacing if any(spacing) else None)


def call_signature(model: RemoteModel, signature: str, inputs: dict, outputs, timeout: float) -> dict:
    """One predict call of ``signature`` with several named inputs; the named outputs as arrays.

    Raises:
        ServingError: the call fails or an output is missing.
    """
    if model.protocol == "grpc":
        from kerasunet import serving_grpc

        p = serving_grpc.protos()
        where = f"{model.url} {serving_grpc.spec_text(model.name, model.version, model.label)}"
        request = p.PredictRequest(model_spec=serving_grpc.model_spec(model.name, model.version, model.label,
                                                                      signature), output_filter=list(outputs))
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(serving_grpc.tensor_proto(value))
        answer = serving_grpc.call(model.channel, "Predict", request, timeout, where)
        try:
            return {key: serving_grpc.to_array(answer.outputs[key]) for key in outputs}
        except (KeyError, ValueError) as exc:
            raise ServingError(f"{where}: Predict {signature}: unusable output ({exc})") from None
    url = f"{model.url}:predict"
    answer = call(url, {"signature_name": signature, "inputs": {k: v.tolist() for k, v in inputs.items()}}, timeout)
    try:
        return {key: np.asarray(answer["outputs"][key]) for key in outputs}
    except (KeyError, TypeError, ValueError):
        raise ServingError(f"{url}: answer has no outputs {', '.join(outputs)}") from None


def windows_per_request(served: RemoteVolumeModel, batch_size: int) -> int:
    """Windows per request: ``batch_size``, fewer where a gRPC message would not hold them.

    Raises:
        ServingError: one window alone exceeds the gRPC message limit.
    """
    limit, model = served.model.max_message_bytes, served.model
    if limit is None:
        return batch_size
    window_bytes = 4 * int(np.prod(served.patch_size)) * max(model.channels, model.num_outputs)
    fits = (limit - MESSAGE_OVERHEAD_BYTES) // window_bytes
    if fits < 1:
        raise ServingError(f"{model.url}: one {'x'.join(map(str, served.patch_size))} window is "
                           f"{window_bytes / 2**20:.1f} MiB, over the {limit / 2**20:g} MiB message limit; raise "
                           "--grpc-max-message-mb here and grpc.max_receive_message_length on the server")
    return min(batch_size, fits)


def predict_windows(served: RemoteVolumeModel, raw: np.ndarray, stats: np.ndarray, timeout: float) -> np.ndarray:
    """The served probabilities ``[n, D, H, W, N]`` of raw windows ``[n, D, H, W, C]``.

    Args:
        served: from :func:`fetch_model` (a 3D export).
        raw: windows of raw intensities, the served patch size.
        stats: the case's ``[lo, hi, mean, std]`` (``case_stats`` of the whole volume).
        timeout: seconds to wait for the answer.

    Raises:
        ServingError: the request fails or the answer has the wrong shape.
    """
    model = served.model
    raw = np.asarray(raw, np.float32)
    rows = np.tile(np.asarray(stats, np.float32), (len(raw), 1))
    probs = call_signature(model, model.signature, {INPUT_NAME: raw, STATS_NAME: rows}, (PROBABILITIES_OUTPUT,),
                           timeout)[PROBABILITIES_OUTPUT].astype(np.float32, copy=False)
    expected = (*raw.shape[:-1], model.num_outputs)
    if probs.shape != expected:
        raise ServingError(f"{model.url}: probabilities have shape {probs.shape}, expected {expected}")
    return probs
