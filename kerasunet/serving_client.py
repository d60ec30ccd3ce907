"""Ask a model served by TF Serving for the probabilities of a volume, over its REST API.

The client needs no knowledge of the training settings: it asks the server for the
model's metadata, reads the input channels ``C = 2K+1`` of the ``image`` input and the
output channels ``N`` of ``probabilities`` (2 CT, 1 MRI: ``labels.OUTPUTS``), builds the
2.5D stacks itself (``core.stacking.stack_slices``, the builder's convention) and sends raw
intensities. Normalisation and padding happen in the exported graph (``kerasunet.export``).
The served ``probabilities`` come back; thresholding and post-processing happen on the
client, in :func:`kerasunet.predict.predict_volume_served`, exactly as for a local model.

MRI models normalise with statistics of the whole request, so a request must hold one
whole case: an MRI volume is sent in ONE request when it has at most ``max_case_voxels``
voxels, else in batches with a warning, as each batch is then normalised on its own. CT
models use a fixed window, so any batching gives the same probabilities.

Only numpy and the standard library are used (no TensorFlow, no NIfTI I/O).
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import numpy as np

from kerasunet.core.labels import OUTPUTS
from kerasunet.core.stacking import stack_slices
from kerasunet.export import INPUT_NAME, OUTPUT_NAMES, SIGNATURE  # the export's contract (no TensorFlow)

MAX_CASE_VOXELS = 8_000_000
PROBABILITIES_OUTPUT, MASK_OUTPUT = OUTPUT_NAMES


class ServingError(RuntimeError):
    """A failed exchange with the model server. The message starts with the URL.

    Attributes:
        status: the HTTP status when the server answered with an error, else None.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RemoteModel:
    """What the client learns from the server's metadata.

    Attributes:
        url: ``{server}/v1/models/NAME[/versions/V]``.
        channels: input channels ``2K+1`` of the ``image`` input.
        num_outputs: channels of the ``probabilities`` output (2 CT, 1 MRI).
        signature: the signature called.
    """

    url: str
    channels: int
    num_outputs: int
    signature: str = SIGNATURE

    @property
    def context(self) -> int:
        return (self.channels - 1) // 2

    @property
    def modality(self) -> str:
        """``ct`` or ``mri``: the modality whose outputs (``labels.OUTPUTS``) the model has."""
        return next(m for m, names in OUTPUTS.items() if len(names) == self.num_outputs)

    @property
    def one_case_per_request(self) -> bool:
        return self.modality == "mri"


def model_url(server: str, model_name: str, version: int | None = None) -> str:
    """``{server}/v1/models/NAME[/versions/V]`` (TF Serving's REST model URL)."""
    if not server.startswith(("http://", "https://")):
        raise ServingError(f"{server}: server URL must start with http:// or https://")
    url = f"{server.rstrip('/')}/v1/models/{urllib.parse.quote(model_name, safe='')}"
    return f"{url}/versions/{int(version)}" if version is not None else url


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


def _dims(tensor_info: dict) -> list[int]:
    # TF Serving writes int64 sizes as JSON strings.
    return [int(d["size"]) for d in tensor_info["tensor_shape"]["dim"]]


def fetch_model(server: str, model_name: str, version: int | None = None,
                signature: str = SIGNATURE, timeout: float = 60.0) -> RemoteModel:
    """Reads the model's metadata and the shapes of its ``image`` input and outputs.

    Raises:
        ServingError: unknown model or version (404), no such signature, or a signature
            that is not a kerasunet export (no ``image`` input / ``probabilities``, ``mask``
            outputs, or a number of output channels no modality has).
    """
    url = model_url(server, model_name, version)
    try:
        answer = call(f"{url}/metadata", timeout=timeout)
    except ServingError as exc:
        if exc.status == 404:
            which = f"model {model_name!r}" + (f" version {version}" if version is not None else "")
            raise ServingError(f"{exc} ({which} is not served there; check --model-name/--model-version)") from None
        raise
    try:
        signatures = answer["metadata"]["signature_def"]["signature_def"]
    except (KeyError, TypeError):
        raise ServingError(f"{url}/metadata: answer has no metadata.signature_def") from None
    if signature not in signatures:
        raise ServingError(f"{url}/metadata: no signature {signature!r} (has {sorted(signatures)})")
    sig = signatures[signature]
    try:
        channels = _dims(sig["inputs"][INPUT_NAME])[-1]
        num_outputs = _dims(sig["outputs"][PROBABILITIES_OUTPUT])[-1]
        sig["outputs"][MASK_OUTPUT]
    except (KeyError, TypeError, ValueError, IndexError):
        raise ServingError(f"{url}/metadata: signature {signature!r} is not a kerasunet export "
                           "(expected input 'image' and outputs 'probabilities', 'mask')") from None
    if channels < 1 or channels % 2 == 0:
        raise ServingError(f"{url}/metadata: input 'image' has {channels} channels; expected 2K+1 (odd)")
    counts = sorted({len(names) for names in OUTPUTS.values()})
    if num_outputs not in counts:
        raise ServingError(f"{url}/metadata: output 'probabilities' has {num_outputs} channels; "
                           f"expected one of {counts} (CT liver+tumour, MRI tumour)")
    return RemoteModel(url=url, channels=channels, num_outputs=num_outputs, signature=signature)


def plan_batches(num_slices: int, slice_voxels: int, batch_size: int, model: RemoteModel,
                 max_case_voxels: int = MAX_CASE_VOXELS) -> list[range]:
    """Slice ranges, one per request: the whole case for MRI when it fits, else ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    if model.one_case_per_request:
        if num_slices * slice_voxels <= max_case_voxels:
            return [range(num_slices)]
        print(f"warning: {num_slices * slice_voxels} voxels exceed {max_case_voxels}; sending "
              f"{batch_size} slices per request, so each batch is normalised with its own MRI "
              "statistics and results may differ from a whole-case request", file=sys.stderr)
    return [range(s, min(s + batch_size, num_slices)) for s in range(0, num_slices, batch_size)]


def predict_batch(model: RemoteModel, images: np.ndarray, timeout: float) -> np.ndarray:
    """Sends one columnar predict request and returns its float32 probabilities ``[b, X, Y, N]``.

    Raises:
        ServingError: the request fails or the answer has no probabilities of the right shape.
    """
    url = f"{model.url}:predict"
    answer = call(url, {"signature_name": model.signature, "inputs": {INPUT_NAME: images.tolist()}}, timeout)
    try:
        probs = np.asarray(answer["outputs"][PROBABILITIES_OUTPUT], dtype=np.float32)
    except (KeyError, TypeError, ValueError):
        raise ServingError(f"{url}: answer has no outputs.{PROBABILITIES_OUTPUT}") from None
    expected = (*images.shape[:3], model.num_outputs)
    if probs.shape != expected:
        raise ServingError(f"{url}: probabilities have shape {probs.shape}, expected {expected}")
    return probs


def predict_probabilities(model: RemoteModel, data: np.ndarray, batch_size: int = 16, timeout: float = 60.0,
                          max_case_voxels: int = MAX_CASE_VOXELS) -> np.ndarray:
    """The served model's probabilities for a volume of raw intensities.

    Args:
        model: from :func:`fetch_model`.
        data: the volume ``(x, y, z)`` in canonical order (axial slices ``data[:, :, k]``).
        batch_size: slices per request (CT; MRI volumes above ``max_case_voxels``).
        timeout: seconds to wait for each answer.
        max_case_voxels: largest MRI volume sent as one request.

    Returns:
        float32 ``(x, y, z, N)``, as :func:`kerasunet.predict.predict_volume` returns them.

    Raises:
        ServingError: the server cannot be reached, times out or returns an error (its text
            is in the message).
    """
    probs = np.zeros((*data.shape, model.num_outputs), dtype=np.float32)
    for batch in plan_batches(data.shape[2], data.shape[0] * data.shape[1], batch_size, model, max_case_voxels):
        out = predict_batch(model, stack_slices(data, batch, model.context), timeout)
        probs[:, :, batch.start:batch.stop] = np.moveaxis(out, 0, 2)
    return probs
