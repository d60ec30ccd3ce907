"""Helpers shared by test modules. Test modules import from here, never from each other."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: str | Path | None = None, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``kerasunet ARGS...`` as a real subprocess (``python -m cli.main``).

    The child gets the test environment minus ``TF_CPP_MIN_LOG_LEVEL``, so the command's own
    quiet start is what keeps TensorFlow's start-up lines out of its output.

    Args:
        *args: command-line arguments after ``kerasunet``; converted with ``str``.
        cwd: working directory of the child; the repository root by default.
        env: extra environment variables for the child.
        timeout: seconds before the child is killed (the test then fails).

    Returns:
        The finished process, with ``stdout`` and ``stderr`` as text.
    """
    child_env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=cwd or REPO,
                          env=child_env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str) -> str:
    """Asserts a user error: non-zero exit, no traceback, exactly one line on stderr.

    Usage errors (exit 2) are one line too (``cli.main.OneLineErrors``).

    Args:
        proc: a finished ``run_cli`` process.
        match: regular expression searched for in that line.

    Returns:
        The error line.
    """
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, f"exit 0; stdout={proc.stdout!r} stderr={proc.stderr!r}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    return lines[0]


# --- NIfTI phantoms for the record builder and case loading -------------------------------

RAS = np.diag([0.8, 0.7, 2.5, 1.0])
LPS = np.diag([-0.8, -0.7, 2.5, 1.0])
PHANTOM_SHAPE = (24, 20, 14)


def phantom(seed: int, shape=PHANTOM_SHAPE, liver=(3, 10), tumour=(5, 7)) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (HU) and a LiTS label: liver in z range ``liver``, tumour in ``tumour``."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 400, size=shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[4:18, 3:15, liver[0]:liver[1]] = 1
    label[8:12, 6:10, tumour[0]:tumour[1]] = 2
    return image, label


def save_nifti(path, data, affine=RAS, slope=None) -> None:
    """Writes ``data`` as NIfTI with ``affine`` and, when given, ``slope = (scl_slope, scl_inter)``."""
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nib.save(img, str(path))


def write_lits(root, n=5, affines=None, suffixes=None, start=0) -> Path:
    """Writes ``n`` LiTS cases ``volume-i`` / ``segmentation-i`` (:func:`phantom` ``i``); returns the folder.

    Args:
        root: the folder (created).
        n: number of cases.
        affines: ``{i: affine}`` for cases not stored :data:`RAS`.
        suffixes: ``{i: ".nii.gz"}`` for cases not stored ``.nii``.
        start: the first case number.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        image, label = phantom(i)
        affine = (affines or {}).get(i, RAS)
        suffix = (suffixes or {}).get(i, ".nii")
        save_nifti(root / f"volume-{i}{suffix}", image, affine, slope=(1.0, 0.0) if i % 2 else None)
        save_nifti(root / f"segmentation-{i}{suffix}", label, affine)
    return root


def build_settings(src, out, **kw):
    """``BuildSettings`` for ``src`` -> ``out``: LiTS, one worker unless ``kw`` says otherwise."""
    from tfrecords_builder.build import BuildSettings

    kw.setdefault("workers", 1)
    kw.setdefault("dataset", "lits")
    return BuildSettings(source=str(src), out=str(out), **kw)


# --- Runs, threshold models and CT phantoms for predict / evaluate / export ---------------

# The threshold model's cut-offs, in CT normalised units: (HU - 25) / 225 for the default window.
LIVER_CUT, TUMOUR_CUT = 0.001, 0.601  # between integer HU values: no ties at p = 0.5
UNET_DEPTH = 2


def write_run(folder, model, modality="ct", context=0, depth=2, image_size=None) -> Path:
    """Saves ``model`` as a run folder (best.keras + config.json in runs.py's schema)."""
    from kerasunet.core.preprocessing import NormSettings

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "best.keras")
    config = {"model": {"input_channels": int(model.input_shape[-1]), "num_outputs": int(model.output_shape[-1]),
                        "filters": 4, "depth": depth, "dropout": 0.0},
              "data": {"modality": modality, "context": context, "norm": NormSettings(modality).to_dict(),
                       "image_size": image_size},
              "train": {}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def threshold_model(channels=1, source_channel=None, modality="ct", gain=50.0, size=(None, None)):
    """A 1x1-conv model whose sigmoid outputs threshold one input channel (deterministic).

    CT: liver = x > LIVER_CUT, tumour = x > TUMOUR_CUT; MRI: tumour = x > 0.
    """
    import keras

    cuts = [LIVER_CUT, TUMOUR_CUT] if modality == "ct" else [0.0]
    source = channels // 2 if source_channel is None else source_channel
    inputs = keras.Input((*size, channels))
    conv = keras.layers.Conv2D(len(cuts), 1, name="head_conv")
    outputs = keras.layers.Activation("sigmoid", name="head_sigmoid")(conv(inputs))
    kernel = np.zeros((1, 1, channels, len(cuts)), np.float32)
    kernel[0, 0, source, :] = gain
    conv.set_weights([kernel, -gain * np.array(cuts, np.float32)])
    return keras.Model(inputs, outputs)


def expected_ct_labels(hu):
    """What :func:`threshold_model` finds in a CT volume of HU ``hu`` (no post-processing)."""
    x = (np.clip(hu, -200, 250) - 25.0) / 225.0
    return np.where(x > TUMOUR_CUT, 2, np.where(x > LIVER_CUT, 1, 0)).astype(np.uint8)


def ct_phantom(shape=(20, 16, 6)):
    """Air with an off-centre liver block (100 HU) holding a tumour (200 HU): no symmetry."""
    hu = np.full(shape, -500.0, np.float32)
    hu[3:12, 2:9, 1:5] = 100.0
    hu[4:7, 3:6, 2:4] = 200.0
    return hu


def lits_folder(root) -> Path:
    """Three labelled CT cases (one LPS) and one unlabelled; labels are what a threshold model finds."""
    root = Path(root)
    root.mkdir()
    for n, affine in [(0, np.eye(4)), (1, LPS), (2, np.diag([0.7, 0.7, 2.0, 1]))]:
        hu = np.roll(ct_phantom((24, 20, 8)), n, axis=0)
        nib.save(nib.Nifti1Image(hu, affine), str(root / f"volume-{n}.nii"))
        nib.save(nib.Nifti1Image(expected_ct_labels(hu), affine), str(root / f"segmentation-{n}.nii"))
    nib.save(nib.Nifti1Image(ct_phantom(), np.eye(4)), str(root / "volume-9.nii.gz"))
    return root


def write_unet_run(folder, modality: str, context: int = 1, seed: int = 0, policy: str | None = None,
                   image_size: list[int] | None = None) -> Path:
    """A tiny U-Net run folder (best.keras + config.json) as ``kerasunet train`` writes it."""
    import keras

    from kerasunet.core.preprocessing import NormSettings
    from kerasunet.model import build_unet

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    channels, outputs = 2 * context + 1, 2 if modality == "ct" else 1
    keras.utils.set_random_seed(seed)
    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(policy or "float32")
    try:
        model = build_unet((None, None, channels), outputs, filters=4, depth=UNET_DEPTH, dropout=0.0)
    finally:
        keras.config.set_dtype_policy(previous)
    # A freshly initialised head gives probabilities near 0.5 (exactly 0.5 where every ReLU
    # before it is 0); a steeper head with a bias makes masks with every label and few
    # ties at 0.5, so comparing masks means something.
    head = model.get_layer("head_conv")
    kernel, _ = head.get_weights()
    head.set_weights([kernel * 20.0, np.array([0.5, -0.5][:outputs], np.float32)])
    model.save(folder / "best.keras")
    config = {"model": {"input_channels": channels, "num_outputs": outputs, "filters": 4,
                        "depth": UNET_DEPTH, "dropout": 0.0},
              "data": {"modality": modality, "context": context, "norm": NormSettings(modality).to_dict(),
                       "image_size": image_size},
              "train": {}, "git_commit": "test", "kerasunet_version": "test"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def reference_outputs(run, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keras model + kerasunet's NumPy preprocessing on raw ``[b, h, w, 2K+1]``: (probs, mask).

    Statistics are those of the centre channels (the requested slices); the image is padded
    bottom/right to a multiple of 2**depth with the normalised window low, then cropped
    (or, for a run with ``image_size``, resized to it and the probabilities resized back).
    """
    import keras

    from kerasunet.core.labels import labels_from_probabilities_np
    from kerasunet.core.preprocessing import case_stats, normalize_np
    from kerasunet.core.runs import resolve_run

    info = resolve_run(run)
    model = keras.saving.load_model(info.model_path, compile=False)
    stats = case_stats(raw[..., info.context], info.norm)
    x = normalize_np(raw, stats)
    m, (h, w), size = 2**info.depth, raw.shape[1:3], info.config["data"].get("image_size")
    if size:  # resized in, probabilities resized back (bilinear, as kerasunet.predict)
        x = keras.ops.image.resize(x, size, interpolation="bilinear", antialias=False)
        probs = np.asarray(keras.ops.image.resize(model(x, training=False), (h, w), interpolation="bilinear",
                                                  antialias=False), np.float32)
    else:
        x = np.pad(x, [(0, 0), (0, -h % m), (0, -w % m), (0, 0)],
                   constant_values=(stats[0] - stats[2]) / stats[3])
        probs = np.asarray(model(x, training=False), np.float32)[:, :h, :w]
    return probs, labels_from_probabilities_np(probs, info.outputs)


# --- A test double of TF Serving's REST API ------------------------------------------------
#
# This is NOT TF Serving (its binary cannot be installed here). It is a small
# ``http.server.ThreadingHTTPServer`` on 127.0.0.1 that answers the routes of
# https://www.tensorflow.org/tfx/serving/api_rest with the same JSON shapes, running the
# SavedModel with ``tf.saved_model.load`` (TensorFlow only, no kerasunet):
#
# * ``GET  /v1/models/NAME[/versions/V]``            model status
# * ``GET  /v1/models/NAME[/versions/V]/metadata``   signature_def map (dtypes as ``DT_*``,
#   shapes as ``{"dim": [{"size": "-1", "name": ""}, ...]}`` with sizes as strings)
# * ``POST /v1/models/NAME[/versions/V]:predict``    row (``instances`` -> ``predictions``) or
#   columnar (``inputs`` -> ``outputs``) format
#
# ``/labels/L`` may stand where ``/versions/V`` does: L is looked up in the ``version_labels``
# of ``base_path/models.config``.
#
# Errors are ``{"error": "..."}`` with 404 (unknown model or version, TF Serving's
# "Servable not found for request: ..." text) or 400 (bad request, unknown label). Versions
# are the numeric sub-folders of ``base_path`` (the newest ``num_versions`` when models.config
# has a ``latest`` policy); without a version the highest is used.
# Every request is recorded in ``requests`` so tests can check what a client sent.

_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
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
        """The versions served: all on disk, or the newest ``num_versions`` of models.config's policy."""
        found = sorted(int(p.name) for p in self.base_path.iterdir() if p.is_dir() and p.name.isdigit())
        policy = re.search(r"latest\s*{\s*num_versions:\s*(\d+)", self._config())
        return found[-int(policy[1]):] if policy else found

    def _config(self) -> str:
        config = self.base_path / "models.config"
        return config.read_text() if config.exists() else ""

    def servable(self, name: str, version: str | None, label: str | None = None):
        """The loaded SavedModel, or a ``(status, message)`` tuple as TF Serving words it.

        A label is looked up in models.config's ``version_labels`` (unknown: 400).
        """
        if label is not None and name == self.name:
            found = re.search(rf'version_labels\s*{{\s*key:\s*"{re.escape(label)}"\s*value:\s*(\d+)', self._config())
            if not found:
                return 400, f"Unrecognized servable version label: {label}"
            version = found[1]
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
        found = self.owner.servable(match["name"], match["version"], match["label"])
        if isinstance(found[1], str):
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


# --- The LiTS 2017 organisers' scoring, transcribed as a reference for tests and benchmarks ---
#
# An independent transcription of program/helpers/calc_metric.py (detect_lesions,
# compute_segmentation_scores, compute_tumor_burden), program/helpers/surface.py (Surface) and
# the per-case and final steps of program/evaluate.py, github.com/PatrickChrist/lits-challenge-
# scoring at HEAD. It works on whole masks, as the program does, not on overlap counts as
# kerasunet.lits_metrics does. Changes: only what numpy 2 / scipy >= 1.11 need (np.bool, list
# indices, find_objects on bool), and a tumour-free reference, where the program's
# detect_lesions returns five values and evaluate.py stops unpacking three, detects nothing
# (what that early return means). benchmarks/metrics.py times it; the library never uses it.

ORGANISERS_LARGE = 9001
ORGANISERS_METRICS = ("dice", "jaccard", "voe", "rvd", "assd", "rmsd", "msd")


def _organisers_sum_dims(x, axis, dims):
    """Collapses the indices ``dims`` of ``axis`` into the first of them, summed (calc_metric.sum_dims)."""
    x = np.array(x)
    if len(dims) < 2:
        return x
    shape = list(x.shape)
    shape[axis] -= len(dims) - 1
    out = np.zeros(shape, dtype=x.dtype)
    index = [slice(None)] * x.ndim
    index[axis] = list(dims)
    total = np.sum(x[tuple(index)], axis=axis, keepdims=True)
    keep = np.ones(x.shape, dtype=bool)
    index[axis] = list(dims[1:])
    keep[tuple(index)] = False
    out.ravel()[...] = x[keep]
    index[axis] = [dims[0]]
    out[tuple(index)] = total
    return out


def organisers_detect_lesions(prediction_mask, reference_mask, min_overlap=0.5):
    """calc_metric.detect_lesions: ``(detected_mask, mod_reference_mask, num_detected)``."""
    from scipy import ndimage

    detected_mask = np.zeros(prediction_mask.shape, dtype=np.uint8)
    mod_reference_mask = np.copy(reference_mask)
    if not np.any(reference_mask):
        return detected_mask, mod_reference_mask, 0
    p_ids = np.unique(prediction_mask[reference_mask.nonzero()])
    p_ids = p_ids[1:] if p_ids[0] == 0 else p_ids
    g_ids = np.unique(reference_mask)
    g_ids = g_ids[1:] if g_ids[0] == 0 else g_ids
    reduced = prediction_mask.copy()
    for p_id in np.unique(prediction_mask):
        if p_id not in p_ids and p_id != 0:
            reduced[(reduced == p_id).nonzero()] = 0
    box = ndimage.find_objects(np.logical_or(reference_mask, reduced).astype(np.int8))[0]
    r, p, d, m = reference_mask[box], prediction_mask[box], detected_mask[box], mod_reference_mask[box]
    inter = np.zeros((len(p_ids), len(g_ids)), dtype=np.int32)
    for i, p_id in enumerate(p_ids):
        for j, g_id in enumerate(g_ids):
            inter[i, j] = np.count_nonzero(np.logical_and(p == p_id, r == g_id))
    merge_count = {g_id: 1 for g_id in g_ids}
    for i, _ in enumerate(p_ids):  # merge the reference lesions each prediction overlaps most
        columns = inter[i].nonzero()[0]
        merge = [(g_ids[idx], idx) for idx in columns if np.argmax(inter[:, idx], axis=0) == i]
        for g_id, _ in merge:
            merge_count[g_id] = len(merge)
        g_ids = np.delete(g_ids, obj=[idx for _, idx in merge[1:]])
        for g_id, _ in merge:
            m[m == g_id] = merge[0][0]
        inter = _organisers_sum_dims(inter, 1, [idx for _, idx in merge])
    best_value, best = np.max(inter, axis=1), np.argmax(inter, axis=1)
    inter[...] = 0
    inter[np.arange(len(p_ids)), best] = best_value
    for j, g_id in enumerate(g_ids):  # merge the predictions matched to one reference lesion
        rows = inter[:, j].nonzero()[0]
        matched = p_ids[rows]
        inter = _organisers_sum_dims(inter, 0, rows)
        p_ids = np.delete(p_ids, obj=rows[1:])
        for p_id in matched:
            d[p == p_id] = g_id
    num_detected = len(p_ids)
    for i, p_id in enumerate(p_ids):
        for j, g_id in enumerate(g_ids):
            if inter[i, j] == 0:
                continue
            union = np.count_nonzero(np.logical_or(d == p_id, m == g_id))
            if float(inter[i, j]) / union <= min_overlap:
                d[d == g_id] = 0
                num_detected -= merge_count[g_id]
    return detected_mask, mod_reference_mask, num_detected


def organisers_surface(mask, reference, spacing) -> tuple[float, float, float]:
    """surface.Surface: ASSD, RMSD and MSD of two masks, edges by 18-neighbourhood erosion."""
    import math

    from scipy import ndimage, spatial

    footprint = ndimage.generate_binary_structure(3, 2)
    mask_pts, ref_pts = (np.argwhere(a ^ ndimage.binary_erosion(a, footprint)).astype(np.float64)
                         * np.array(spacing) for a in (mask, reference))
    mask_ref_nn = spatial.cKDTree(mask_pts).query(ref_pts)[0]
    ref_mask_nn = spatial.cKDTree(ref_pts).query(mask_pts)[0]
    n = len(mask_pts) + len(ref_pts)
    assd = 1.0 / n * (mask_ref_nn.sum() + ref_mask_nn.sum())
    rmsd = math.sqrt(1.0 / n) * math.sqrt((mask_ref_nn * mask_ref_nn).sum() + (ref_mask_nn * ref_mask_nn).sum())
    return assd, rmsd, max(mask_ref_nn.max(), ref_mask_nn.max())


def organisers_segmentation_scores(prediction_mask, reference_mask, spacing) -> dict[str, list]:
    """calc_metric.compute_segmentation_scores: per object id of the prediction."""
    from medpy.metric import binary
    from scipy import ndimage

    scores = {name: [] for name in ORGANISERS_METRICS}
    for obj_id in np.unique(prediction_mask):
        if obj_id == 0:
            continue
        target = (reference_mask == obj_id) | (prediction_mask == obj_id)
        box = ndimage.find_objects(target.astype(np.int8))[0]
        p, r = (prediction_mask == obj_id)[box], (reference_mask == obj_id)[box]
        if np.any(p) and np.any(r):
            dice = binary.dc(p, r)
            jaccard = dice / (2.0 - dice)
            assd, rmsd, msd = organisers_surface(p, r, spacing)
            values = (dice, jaccard, 1.0 - jaccard, binary.ravd(r, p), assd, rmsd, msd)
        else:
            values = (0, 0, 1.0) + (ORGANISERS_LARGE,) * 4
        for name, value in zip(ORGANISERS_METRICS, values):
            scores[name].append(value)
    return scores


def organisers_tumor_burden(prediction_mask, reference_mask) -> float:
    """calc_metric.compute_tumor_burden: reference burden minus predicted burden."""

    def burden(vol):
        return np.count_nonzero(vol == 2) / float(np.count_nonzero(vol >= 1))

    predicted = burden(prediction_mask) if np.count_nonzero(prediction_mask == 1) else ORGANISERS_LARGE
    return burden(reference_mask) - predicted


def organisers_case(submission, reference, spacing) -> dict:
    """The body of evaluate.py's loop over volumes: what one case adds to its running totals."""
    from medpy.metric import binary
    from scipy import ndimage

    submission, reference = submission.astype(np.int8), reference.astype(np.int8)
    pred_lesion, num_predicted = ndimage.label(submission == 2, output=np.int16)
    true_lesion, num_reference = ndimage.label(reference == 2, output=np.int16)
    pred_liver, true_liver = submission >= 1, reference >= 1
    liver_exists = np.any(submission == 1)
    case = {"detection": {}}
    for overlap in (0, 0.5):
        detected, mod_ref, num_detected = organisers_detect_lesions(pred_lesion, true_lesion, overlap)
        case["detection"][overlap] = (num_detected, num_predicted - num_detected, num_reference - num_detected)
    case["lesion"] = (organisers_segmentation_scores(detected, mod_ref, spacing) if num_detected > 0 else {})
    case["liver"] = (organisers_segmentation_scores(pred_liver, true_liver, spacing) if liver_exists else
                     dict(zip(ORGANISERS_METRICS, ([0], [0], [1], *[[ORGANISERS_LARGE]] * 4))))
    both_empty = not np.any(pred_lesion) and not np.any(true_lesion)
    case["lesion_dice"] = 1.0 if both_empty else binary.dc(pred_lesion, true_lesion)
    case["liver_dice"] = binary.dc(pred_liver, true_liver) if liver_exists else 0
    case["lesion_IS"] = (np.count_nonzero(np.logical_and(pred_lesion, true_lesion)),
                         np.count_nonzero(pred_lesion) + np.count_nonzero(true_lesion))
    case["liver_IS"] = ((np.count_nonzero(np.logical_and(pred_liver, true_liver)),
                         np.count_nonzero(pred_liver) + np.count_nonzero(true_liver)) if liver_exists
                        else (0, np.count_nonzero(true_liver)))
    case["tumor_burden"] = organisers_tumor_burden(submission, reference)
    return case


def organisers_scores(cases: list[dict]) -> dict[str, float]:
    """evaluate.py after its loop: the figures of scores.txt, under their names, from :func:`organisers_case`."""
    scores = {}
    for overlap, suffix in ((0.5, ""), (0, "_greater_zero")):
        tp, fp, fn = (sum(c["detection"][overlap][k] for c in cases) for k in range(3))
        scores["lesion_precision" + suffix] = float(tp) / (tp + fp) if tp + fp else 0
        scores["lesion_recall" + suffix] = float(tp) / (tp + fn) if tp + fn else 0
    defaults = dict(zip(ORGANISERS_METRICS, (0, 0, 1) + (ORGANISERS_LARGE,) * 4))
    for structure in ("lesion", "liver"):
        pooled = {name: [v for c in cases for v in c[structure].get(name, [])] for name in ORGANISERS_METRICS}
        for name in ORGANISERS_METRICS:
            scores[f"{structure}_{name}"] = np.mean(pooled[name]) if pooled[name] else defaults[name]
        scores[f"{structure}_dice_per_case"] = np.mean([c[f"{structure}_dice"] for c in cases])
        i, s = (sum(c[f"{structure}_IS"][k] for c in cases) for k in range(2))
        scores[f"{structure}_dice_global"] = 2.0 * i / s
    burden = [c["tumor_burden"] for c in cases]
    scores["RMSE_Tumorburden"] = np.sqrt(np.mean(np.square(burden)))
    scores["MAXERROR_Tumorburden"] = np.max(burden)
    return scores


# --- A test double of TF Serving's gRPC API ------------------------------------------------
#
# Not TF Serving either: an in-process ``grpcio`` server on 127.0.0.1 that implements
# ``tensorflow.serving.PredictionService``'s ``Predict`` and ``GetModelMetadata`` with
# tensorflow-serving-api's own messages, running the SavedModel with TensorFlow (no
# kerasunet). Versions and labels resolve as in ``ServingDouble`` (it is one, over another
# transport). Status codes are TF Serving's: unknown model or version NOT_FOUND, unknown label
# or bad input INVALID_ARGUMENT, unknown signature FAILED_PRECONDITION; other methods are
# UNIMPLEMENTED. Like TF Serving without --grpc_channel_arguments it receives at most gRPC's
# default 4 MiB per message. Metadata is the SavedModel's own ``signature_def`` map (as TF
# Serving returns it, ``__saved_model_init_op`` included).

GRPC_DEFAULT_MAX_BYTES = 4 * 1024 * 1024


class GrpcServingDouble(ServingDouble):
    """Serves ``base_path`` (``saved_models/NAME``) as model ``name`` over gRPC; a context manager.

    Attributes:
        url: ``grpc://127.0.0.1:PORT`` once started.
        requests: ``(method name, request message)`` of every call received.
        as_fields: answer with typed value fields (``float_val``, ``int_val``) instead of
            ``tensor_content``; TF Serving's answers may take either form.
    """

    def __init__(self, base_path: str | Path, name: str | None = None, as_fields: bool = False,
                 max_receive_bytes: int = GRPC_DEFAULT_MAX_BYTES):
        super().__init__(base_path, name)
        self.as_fields = as_fields
        self.max_receive_bytes = max_receive_bytes

    def __enter__(self) -> "GrpcServingDouble":
        from concurrent import futures

        import grpc
        from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

        handlers = {
            "Predict": grpc.unary_unary_rpc_method_handler(
                self._predict, request_deserializer=predict_pb2.PredictRequest.FromString,
                response_serializer=predict_pb2.PredictResponse.SerializeToString),
            "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                self._metadata, request_deserializer=get_model_metadata_pb2.GetModelMetadataRequest.FromString,
                response_serializer=get_model_metadata_pb2.GetModelMetadataResponse.SerializeToString),
        }
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                   options=[("grpc.max_receive_message_length", self.max_receive_bytes),
                                            ("grpc.max_send_message_length", -1)])
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", handlers),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.url = f"grpc://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(grace=None)

    def _resolve(self, spec, context):
        import grpc

        version = str(spec.version.value) if spec.HasField("version") else None
        found = self.servable(spec.name, version, spec.version_label or None)
        if isinstance(found[1], str):
            context.abort(grpc.StatusCode.NOT_FOUND if found[0] == 404 else grpc.StatusCode.INVALID_ARGUMENT,
                          found[1])
        return found

    def _metadata(self, request, context):
        import grpc
        from tensorflow.core.protobuf import saved_model_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2

        self.requests.append(("GetModelMetadata", request))
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Metadata field {list(request.metadata_field)} is not supported")
        version, _ = self._resolve(request.model_spec, context)
        saved = saved_model_pb2.SavedModel.FromString((self.base_path / str(version) / "saved_model.pb").read_bytes())
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in saved.meta_graphs[0].signature_def.items():
            signatures.signature_def[key].CopyFrom(signature)
        answer = get_model_metadata_pb2.GetModelMetadataResponse()
        answer.model_spec.name, answer.model_spec.version.value = request.model_spec.name, version
        answer.metadata["signature_def"].Pack(signatures)
        return answer

    def _predict(self, request, context):
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        self.requests.append(("Predict", request))
        version, loaded = self._resolve(request.model_spec, context)
        name = request.model_spec.signature_name or "serving_default"
        if name not in loaded.signatures:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.')
        fn = loaded.signatures[name]
        _, specs = fn.structured_input_signature
        if set(request.inputs) != set(specs):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Expected inputs {sorted(specs)}, got {sorted(request.inputs)}")
        for key, spec in specs.items():  # gRPC is strict: no dtype conversion, as TF Serving
            if request.inputs[key].dtype != spec.dtype.as_datatype_enum:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Expects arg {key} to be {spec.dtype.name}")
        try:
            result = fn(**{key: tf.constant(tf.make_ndarray(request.inputs[key])) for key in specs})
        except (ValueError, TypeError, tf.errors.OpError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        answer = predict_pb2.PredictResponse()
        answer.model_spec.name, answer.model_spec.version.value = request.model_spec.name, version
        answer.model_spec.signature_name = name
        for key in request.output_filter or sorted(result):
            answer.outputs[key].CopyFrom(_tensor_fields(result[key].numpy()) if self.as_fields
                                         else tf.make_tensor_proto(result[key].numpy()))
        return answer


def _tensor_fields(array: np.ndarray):
    """A TensorProto with ``array`` in its typed value field (float_val / int_val), not tensor_content."""
    import tensorflow as tf

    proto = tf.make_tensor_proto(np.zeros((), array.dtype))  # the dtype; shape and values set below
    proto.ClearField("float_val")
    proto.ClearField("int_val")
    proto.tensor_shape.CopyFrom(tf.TensorShape(array.shape).as_proto())
    (proto.float_val if array.dtype == np.float32 else proto.int_val).extend(array.ravel().tolist())
    return proto


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- TF Serving's config protos, for tests that parse what ``kerasunet export`` writes -------


def parse_models_config(path):
    """The one ``ModelConfig`` of a ``models.config`` file, parsed with tensorflow-serving-api's proto."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(Path(path).read_text(), model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    return model


def batching_parameters_message():
    """An empty ``tensorflow.serving.BatchingParameters`` message.

    tensorflow-serving-api does not ship this message; its fields are transcribed from TF
    Serving's ``tensorflow_serving/servables/tensorflow/session_bundle_config.proto``
    (``max_batch_size`` .. ``num_batch_threads`` are Int64Value wrappers, 1-4; ``thread_pool_name`` 5;
    ``allowed_batch_sizes`` repeated int64, 6; ``pad_variable_length_inputs`` bool, 7).
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    F = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(name="batching_parameters_test.proto", package="tensorflow.serving",
                                              syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    message = file.message_type.add(name="BatchingParameters")
    for number, name in enumerate(("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                                   "num_batch_threads"), 1):
        message.field.add(name=name, number=number, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                          type_name=".google.protobuf.Int64Value")
    message.field.add(name="thread_pool_name", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                      type_name=".google.protobuf.StringValue")
    message.field.add(name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))()


# --- Dataset layouts (kerasunet synth --layout) ---------------------------------------------

def _layout_settings():
    from kerasunet.synth import CtSettings, MriSettings

    return CtSettings(32, (4, 6)), MriSettings((24, 20, 4))


# the phantom settings of the ``layout_phantoms`` fixture (conftest.py)
LAYOUT_CT, LAYOUT_MRI = _layout_settings()


def backend_gradient(fn, x: np.ndarray) -> np.ndarray:
    """``d fn(x) / dx`` under the active Keras backend (tensorflow or jax), as numpy.

    Args:
        fn: scalar function of one tensor, written with ``keras.ops``.
        x: the point, float32.
    """
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.grad(fn)(jax.numpy.asarray(x)))
    import tensorflow as tf

    variable = tf.Variable(x)
    with tf.GradientTape() as tape:
        value = fn(variable)
    return tape.gradient(value, variable).numpy()


# Tests of TensorFlow itself (tf.distribute, tf.data, SavedModel): skipped when the suite runs a
# second time under KERAS_BACKEND=jax (tests/run_jax.sh).
tensorflow_only = pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
    reason="exercises TensorFlow itself; the JAX run covers the backend-neutral tests")


# --- 3D runs written by hand (the contract of kerasunet/core/runs.py), for predict/export tests ---

def write_run_3d(folder, model, modality="ct", patch_size=(8, 16, 16), spacing=None, depth=2) -> Path:
    """Saves a 3D ``model`` as a run folder: :func:`write_run` plus ``dims``, ``patch_size``, ``spacing``."""
    folder = write_run(folder, model, modality=modality, context=0, depth=depth)
    config = json.loads((folder / "config.json").read_text())
    config["model"].update(dims=3, patch_size=list(patch_size), spacing=list(spacing) if spacing else None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def threshold_model_3d(modality="ct", gain=50.0):
    """:func:`threshold_model` in 3D: a 1x1x1 conv + sigmoid on ``[n, D, H, W, 1]`` (pointwise)."""
    import keras

    cuts = [LIVER_CUT, TUMOUR_CUT] if modality == "ct" else [0.0]
    inputs = keras.Input((None, None, None, 1))
    conv = keras.layers.Conv3D(len(cuts), 1, name="head_conv")
    outputs = keras.layers.Activation("sigmoid", name="head_sigmoid")(conv(inputs))
    conv.set_weights([np.full((1, 1, 1, 1, len(cuts)), gain, np.float32), -gain * np.array(cuts, np.float32)])
    return keras.Model(inputs, outputs)


def write_unet_run_3d(folder, modality="ct", patch_size=(8, 16, 16), spacing=(2.0, 1.0, 1.0), seed=0) -> Path:
    """A tiny 3D U-Net run (filters 4, depth 2) with a steep head, as :func:`write_unet_run` for 2D.

    The head's bias puts the median logit of a standard-normal patch at 0 per channel, so masks
    of normalised inputs hold both labels and few ties at 0.5.
    """
    import keras

    from kerasunet.model import build_unet

    keras.utils.set_random_seed(seed)
    outputs = 2 if modality == "ct" else 1
    model = build_unet((None, None, None, 1), outputs, filters=4, depth=UNET_DEPTH, dropout=0.0, dims=3,
                       spacing=spacing)
    head = model.get_layer("head_conv")
    kernel, _ = head.get_weights()
    head.set_weights([kernel * 20.0, np.zeros(outputs, np.float32)])
    probe = np.random.default_rng(seed).normal(size=(1, *patch_size, 1)).astype(np.float32)
    logits = np.asarray(keras.Model(model.inputs, head.output)([probe])).reshape(-1, outputs)
    head.set_weights([kernel * 20.0, -np.median(logits, axis=0).astype(np.float32)])
    return write_run_3d(folder, model, modality, patch_size, spacing, UNET_DEPTH)
