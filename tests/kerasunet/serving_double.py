"""A test double of TF Serving's documented REST API, serving an exported SavedModel.

This is NOT TF Serving (its binary cannot be installed here). It is a small
``http.server.ThreadingHTTPServer`` on 127.0.0.1 that answers the routes of
https://www.tensorflow.org/tfx/serving/api_rest with the same JSON shapes, running the
SavedModel with ``tf.saved_model.load`` (TensorFlow only, no kerasunet):

* ``GET  /v1/models/NAME[/versions/V]``            model status
* ``GET  /v1/models/NAME[/versions/V]/metadata``   signature_def map (dtypes as ``DT_*``,
  shapes as ``{"dim": [{"size": "-1", "name": ""}, ...]}`` with sizes as strings)
* ``POST /v1/models/NAME[/versions/V]:predict``    row (``instances`` -> ``predictions``) or
  columnar (``inputs`` -> ``outputs``) format

Errors are ``{"error": "..."}`` with 404 (unknown model or version, TF Serving's
"Servable not found for request: ..." text) or 400 (bad request). Versions are the numeric
sub-folders of ``base_path``; without a version the highest is used (policy latest 1).
Every request is recorded in ``requests`` so tests can check what a client sent.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?"
                    r"(?P<action>/metadata|:predict)?$")


class ServingDouble:
    """Serves ``base_path`` (``saved_models/NAME``) as model ``name``; use as a context manager.

    Attributes:
        url: ``http://127.0.0.1:PORT`` once started.
        requests: ``(method, path, parsed JSON body or None)`` of every request received.
        fail_predict: set to ``(status, error_text)`` to answer predict requests with that error.
    """

    def __init__(self, base_path: str | Path, name: str | None = None):
        self.base_path = Path(base_path)
        self.name = name or self.base_path.name
        self.requests: list[tuple[str, str, object]] = []
        self.fail_predict: tuple[int, str] | None = None
        self._loaded: dict[int, object] = {}
        self._lock = threading.Lock()
        self._server = None
        self.url = ""

    def __enter__(self) -> "ServingDouble":
        double = self

        class Handler(_Handler):
            owner = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def versions(self) -> list[int]:
        return sorted(int(p.name) for p in self.base_path.iterdir() if p.is_dir() and p.name.isdigit())

    def servable(self, name: str, version: str | None):
        """The loaded SavedModel, or a ``(404, message)`` tuple as TF Serving words it."""
        request = f"Specific({name}, {version})" if version else f"Latest({name})"
        available = self.versions() if name == self.name else []
        chosen = int(version) if version else max(available, default=None)
        if chosen not in available:
            return 404, f"Servable not found for request: {request}"
        with self._lock:  # loads each version once, even with concurrent requests
            if chosen not in self._loaded:
                import tensorflow as tf

                self._loaded[chosen] = tf.saved_model.load(str(self.base_path / str(chosen)))
        return chosen, self._loaded[chosen]


def _tensor_info(spec, name: str) -> dict:
    from tensorflow.core.framework import types_pb2

    dims = [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape.as_list()]
    return {"dtype": types_pb2.DataType.Name(spec.dtype.as_datatype_enum),
            "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": name}


def signature_def_map(loaded) -> dict:
    """TF Serving's JSON of the SignatureDefMap of a loaded SavedModel."""
    out = {}
    for key, fn in loaded.signatures.items():
        _, inputs = fn.structured_input_signature
        out[key] = {
            "inputs": {k: _tensor_info(v, f"{key}_{k}:0") for k, v in inputs.items()},
            "outputs": {k: _tensor_info(v, f"StatefulPartitionedCall:{i}")
                        for i, (k, v) in enumerate(sorted(fn.structured_outputs.items()))},
            "method_name": "tensorflow/serving/predict",
        }
    return out


def run_predict(loaded, body: dict) -> tuple[int, dict]:
    """Runs one predict request in row or columnar format; returns (status, JSON answer)."""
    import tensorflow as tf

    signature = body.get("signature_name", "serving_default")
    if signature not in loaded.signatures:
        return 400, {"error": f"Serving signature name: \"{signature}\" not found in signature def"}
    fn = loaded.signatures[signature]
    _, specs = fn.structured_input_signature
    columnar = "inputs" in body
    if columnar == ("instances" in body):
        return 400, {"error": "JSON Value: must have one of 'instances' or 'inputs' (not both)"}
    if columnar:
        raw = body["inputs"] if isinstance(body["inputs"], dict) else {next(iter(specs)): body["inputs"]}
    else:
        rows = body["instances"]
        raw = {k: [r[k] if isinstance(r, dict) else r for r in rows] for k in specs}
    try:
        tensors = {k: tf.constant(raw[k], dtype=spec.dtype) for k, spec in specs.items()}
        result = {k: v.numpy().tolist() for k, v in fn(**tensors).items()}
    except KeyError as exc:
        return 400, {"error": f"Missing input: {exc.args[0]}"}
    except (ValueError, TypeError, tf.errors.OpError) as exc:
        return 400, {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    if columnar:
        return 200, {"outputs": result}
    count = len(next(iter(result.values())))
    return 200, {"predictions": [{k: v[i] for k, v in result.items()} for i in range(count)]}


class _Handler(BaseHTTPRequestHandler):
    owner: ServingDouble

    def log_message(self, *args):  # keep test output clean
        pass

    def _answer(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str):
        body = None
        if method == "POST":
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                body = json.loads(raw)
            except ValueError as exc:
                self.owner.requests.append((method, self.path, None))
                return 400, {"error": f"JSON Parse error: {exc}"}
        self.owner.requests.append((method, self.path, body))
        match = _ROUTE.match(self.path)
        if not match or (method == "POST") != (match["action"] == ":predict"):
            return 404, {"error": f"Malformed request: {method} {self.path}"}
        if method == "POST" and self.owner.fail_predict:
            status, text = self.owner.fail_predict
            return status, {"error": text}
        found = self.owner.servable(match["name"], match["version"])
        if found[0] == 404:
            return found[0], {"error": found[1]}
        version, loaded = found
        if match["action"] == ":predict":
            return run_predict(loaded, body if isinstance(body, dict) else {})
        if match["action"] == "/metadata":
            return 200, {"model_spec": {"name": match["name"], "signature_name": "", "version": str(version)},
                         "metadata": {"signature_def": {"signature_def": signature_def_map(loaded)}}}
        return 200, {"model_version_status": [{"version": str(version), "state": "AVAILABLE",
                                               "status": {"error_code": "OK", "error_message": ""}}]}

    def do_GET(self):
        self._answer(*self._route("GET"))

    def do_POST(self):
        self._answer(*self._route("POST"))
