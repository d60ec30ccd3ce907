"""Tests of kerasunet.export: signature, fresh-process equivalence, versions, atomicity, configs."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kerasunet import export as export_mod
from kerasunet.export import BatchingSettings, ExportError, export_model, numeric_versions, update_labels
from kerasunet.core.preprocessing import NormSettings
from kerasunet.core.runs import RunError
from tests.helpers import (UNET_DEPTH, batching_parameters_message, parse_models_config, reference_outputs,
                           write_unet_run)

BIN = Path(sys.executable).parent
KEYS = ("ct", "mri", "mixed", "resized")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {"ct": write_unet_run(root / "runs/ct", "ct"), "mri": write_unet_run(root / "runs/mri", "mri"),
            "mixed": write_unet_run(root / "runs/mixed", "ct", policy="mixed_float16"),
            "resized": write_unet_run(root / "runs/resized", "mri", image_size=[16, 16]), "root": root}


@pytest.fixture(scope="module")
def exported(runs):
    out = runs["root"] / "saved_models"
    return {key: export_model(runs[key], out / f"liver-{key}") for key in KEYS}


def test_saved_model_cli_lists_signature(exported):
    result = subprocess.run([str(BIN / "saved_model_cli"), "show", "--dir", str(exported["ct"]), "--all"],
                            capture_output=True, text=True, timeout=120, check=True)
    sig = result.stdout.split("signature_def['serving_default']:")[1].split("Method name is:")[0]
    flat = " ".join(sig.split())
    assert "inputs['image'] tensor_info: dtype: DT_FLOAT shape: (-1, -1, -1, 3)" in flat
    assert "outputs['probabilities'] tensor_info: dtype: DT_FLOAT shape: (-1, -1, -1, 2)" in flat
    assert "outputs['mask'] tensor_info: dtype: DT_UINT8 shape: (-1, -1, -1)" in flat
    assert sorted(re.findall(r"(inputs|outputs)\['(\w+)'\]", flat)) == [
        ("inputs", "image"), ("outputs", "mask"), ("outputs", "probabilities")]


# Loads each SavedModel in a process with TensorFlow and tensorflow-serving-api only, runs
# it on the raw inputs, then replays every request of the CT model's warm-up file as TF
# Serving does at load (parsed with tensorflow_serving.apis' own PredictionLog).
FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2
    data = dict(np.load(sys.argv[1]))
    out = {}
    for i, key in enumerate(("ct", "mri", "mixed", "resized")):
        fn = tf.saved_model.load(sys.argv[2 + i]).signatures["serving_default"]
        result = fn(image=tf.constant(data[key]))
        assert result["probabilities"].dtype == tf.float32 and result["mask"].dtype == tf.uint8
        out[key + "_probs"], out[key + "_mask"] = result["probabilities"].numpy(), result["mask"].numpy()
    warmup = []
    signatures = tf.saved_model.load(sys.argv[2]).signatures
    for record in tf.data.TFRecordDataset(sys.argv[2] + "/assets.extra/tf_serving_warmup_requests"):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        fn = signatures[request.model_spec.signature_name]
        result = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
        warmup.append({"log_type": log.WhichOneof("log_type"), "model": request.model_spec.name,
                       "inputs": {k: [list(tf.make_ndarray(v).shape), tf.make_ndarray(v).dtype.name,
                                      float(tf.make_ndarray(v).min()), float(tf.make_ndarray(v).max())]
                                  for k, v in request.inputs.items()},
                       "outputs": {k: [v.shape.as_list(), v.dtype.name, bool(np.isfinite(v.numpy()).all())]
                                   for k, v in result.items()}})
    assert "kerasunet" not in sys.modules, "the SavedModel must not need kerasunet"
    np.savez(sys.argv[6], **out)
    print(json.dumps(warmup))
""")


@pytest.fixture(scope="module")
def fresh(runs, exported, tmp_path_factory):
    """The FRESH process's outputs: ``(raw inputs, outputs npz, warm-up replay)``."""
    tmp_path = tmp_path_factory.mktemp("fresh")
    rng = np.random.default_rng(0)
    # Odd sizes (37x29, 21x16) check the in-graph padding to multiples of 4 and the crop back;
    # 23x30 the resize path of a run trained with image_size [16, 16].
    raw = {"ct": rng.uniform(-1000, 1000, (2, 37, 29, 3)).astype(np.float32),
           "mri": rng.gamma(2.0, 300.0, (3, 21, 16, 3)).astype(np.float32),
           "mixed": rng.uniform(-1000, 1000, (2, 37, 29, 3)).astype(np.float32),
           "resized": rng.gamma(2.0, 300.0, (2, 23, 30, 3)).astype(np.float32)}
    np.savez(tmp_path / "in.npz", **raw)
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "in.npz"),
                           *(str(exported[k]) for k in KEYS), str(tmp_path / "out.npz")],
                          timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return raw, np.load(tmp_path / "out.npz"), json.loads(done.stdout.splitlines()[-1])


def test_fresh_tensorflow_process_matches_keras(runs, fresh):
    raw, got, _ = fresh
    # Tolerances: 1e-5 for float32 (measured <= 2e-6); 1e-2 for mixed_float16 (measured 0.0 on
    # CPU, where the export runs the same float16 ops as Keras; other devices may differ).
    for key, tol in (("ct", 1e-5), ("mri", 1e-5), ("mixed", 1e-2), ("resized", 1e-5)):
        probs, mask = reference_outputs(runs[key], raw[key])
        assert got[f"{key}_probs"].shape == probs.shape == raw[key].shape[:3] + probs.shape[-1:]
        np.testing.assert_allclose(got[f"{key}_probs"], probs, atol=tol, rtol=0)
        decisive = np.abs(probs - 0.5).min(axis=-1) > tol  # labels may flip only at 0.5 +- tol
        np.testing.assert_array_equal(got[f"{key}_mask"][decisive], mask[decisive])
        assert decisive.mean() > 0.95


def test_warmup_requests_replay_in_a_tensorflow_process(fresh):
    _, _, replayed = fresh
    sizes = BatchingSettings().allowed_batch_sizes
    assert sizes == (1, 2, 4, 8, 16)
    assert replayed == [{"log_type": "predict_log", "model": "liver-ct",
                         "inputs": {"image": [[b, 512, 512, 3], "float32", 0.0, 0.0]},
                         "outputs": {"probabilities": [[b, 512, 512, 2], "float32", True],
                                     "mask": [[b, 512, 512], "uint8", True]}} for b in sizes]


def test_warmup_file_is_small_and_recorded(exported):
    for key in KEYS:
        warmup = exported[key] / "assets.extra" / "tf_serving_warmup_requests"
        assert 0 < warmup.stat().st_size < 2000  # five requests of up to 16 x 512 x 512 x 3 floats
        entry = json.loads((exported[key].parent / "export.json").read_text())["versions"]["1"]
        assert entry["warmup_requests"] == [[b, 512, 512, 3] for b in (1, 2, 4, 8, 16)]


def test_without_tensorflow_serving_api_there_is_no_warmup_file(runs, tmp_path, monkeypatch, capsys):
    from kerasunet import serving_grpc
    from kerasunet.serving_client import ServingError

    def missing():
        raise ServingError("gRPC needs 'tensorflow_serving' (tensorflow-serving-api): pip install 'kerasunet[grpc]'")

    def stub_saved_model(model, info, path):  # the SavedModel itself is tested above; keep this test fast
        (path / "saved_model.pb").write_bytes(b"stub")

    monkeypatch.setattr(serving_grpc, "protos", missing)
    monkeypatch.setattr(export_mod, "write_saved_model", stub_saved_model)
    target = export_model(runs["ct"], tmp_path / "liver")
    assert sorted(p.name for p in target.iterdir()) == ["saved_model.pb"]  # no assets.extra/
    assert capsys.readouterr().err == (f"warning: {target}: no warm-up file (gRPC needs 'tensorflow_serving' "
                                       "(tensorflow-serving-api): pip install 'kerasunet[grpc]')\n")
    info = json.loads((tmp_path / "liver" / "export.json").read_text())
    assert info["warmup_file"] is None and info["versions"]["1"]["warmup_requests"] is None


def test_layout_config_and_info(runs, exported):
    out = exported["mri"].parent
    assert exported["mri"] == out / "1"
    assert (out / "1" / "saved_model.pb").is_file() and (out / "1" / "variables").is_dir()
    # MRI: no batching file (batching would merge cases into one normalisation)
    assert sorted(p.name for p in out.iterdir()) == ["1", "export.json", "models.config"]
    config = parse_models_config(out / "models.config")
    assert (config.name, config.base_path, config.model_platform) == ("liver-mri", "/models/liver-mri", "tensorflow")
    assert config.model_version_policy.latest.num_versions == 2
    assert dict(config.version_labels) == {"stable": 1}
    info = json.loads((out / "export.json").read_text())
    assert (info["modality"], info["context"], info["channels"], info["depth"]) == ("mri", 1, 3, UNET_DEPTH)
    assert info["norm"] == NormSettings("mri").to_dict() | {"hu_window": [-200.0, 250.0], "percentiles": [1.0, 99.0]}
    assert info["outputs"]["mask"]["labels"] == {"background": 0, "tumour": 1}
    assert info["outputs"]["probabilities"]["channels"] == ["tumour"]
    assert info["inputs"]["image"] == {"dtype": "float32", "shape": [None, None, None, 3], "units": "scanner units"}
    assert info["one_case_per_request"] is True and info["latest_version"] == 1
    assert list(info["versions"]) == ["1"] and info["source_run"] == str(runs["mri"].resolve())
    assert info["docker_run"] == ('docker run --rm -p 8501:8501 -p 8500:8500 -v '
                                  '"$PWD/saved_models/liver-mri:/models/liver-mri" -e MODEL_NAME=liver-mri '
                                  'tensorflow/serving')
    assert info["curl_predict"].startswith("curl -X POST http://localhost:8501/v1/models/liver-mri:predict -d ")
    body = json.loads(info["curl_predict"].split(" -d ")[1].strip("'"))
    assert np.array(body["inputs"]["image"]).shape == (1, 2, 2, 3)


def test_ct_info_labels(exported):
    info = json.loads((exported["ct"].parent / "export.json").read_text())
    assert info["outputs"]["mask"]["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert info["inputs"]["image"]["units"] == "HU" and info["one_case_per_request"] is False
    assert info["version_labels"] == {"stable": 1} and info["model_version_policy"] == "latest {num_versions: 2}"
    assert info["docker_run_config_file"].endswith(
        "tensorflow/serving --model_config_file=/models/liver-ct/models.config "
        "--allow_version_labels_for_unavailable_models=true --enable_batching "
        "--batching_parameters_file=/models/liver-ct/batching_parameters.txt")
    assert info["docker_run_gpu"].startswith("docker run --rm --gpus all -p 8501:8501 -p 8500:8500 ")
    assert " tensorflow/serving:latest-gpu --model_config_file=" in info["docker_run_gpu"]


def test_ct_batching_parameters_parse_as_tf_servings_proto(exported):
    from google.protobuf import text_format

    path = exported["ct"].parent / "batching_parameters.txt"
    params = text_format.Parse(path.read_text(), batching_parameters_message())
    assert (params.max_batch_size.value, params.batch_timeout_micros.value, params.max_enqueued_batches.value,
            params.num_batch_threads.value, list(params.allowed_batch_sizes)) == (16, 2000, 8, 2, [1, 2, 4, 8, 16])
    info = json.loads((exported["ct"].parent / "export.json").read_text())
    assert info["batching_parameters"] == {"file": "batching_parameters.txt", "max_batch_size": 16,
                                           "batch_timeout_micros": 2000, "max_enqueued_batches": 8,
                                           "num_batch_threads": 2, "allowed_batch_sizes": [1, 2, 4, 8, 16]}


@pytest.mark.parametrize("sizes, max_size", [((1, 2, 4), 8), ((4, 2, 8), 8), ((), 8), ((0, 8), 8)])
def test_batching_sizes_must_increase_to_the_maximum(sizes, max_size):
    with pytest.raises(ValueError, match=r"^Expected increasing allowed_batch_sizes ending at max_batch_size\. "
                                         rf"Received: allowed_batch_sizes={re.escape(str(sizes))}, max_batch_size=8$"):
        BatchingSettings(max_batch_size=max_size, allowed_batch_sizes=sizes)


@pytest.mark.parametrize("previous, versions, version, label, expected", [
    ({}, [1], 1, "stable", {"stable": 1}),
    ({}, [1], 1, "canary", {"canary": 1}),
    ({"stable": 1}, [1, 2], 2, "canary", {"stable": 1, "canary": 2}),
    ({"stable": 1, "canary": 2}, [1, 2, 3], 3, "stable", {"stable": 3}),      # a new stable retires the canary
    ({"stable": 1, "canary": 2}, [1, 2], 2, "stable", {"stable": 2}),         # promote by re-exporting as stable
    ({"stable": 2, "canary": 3}, [2, 3], 2, "stable", {"stable": 2, "canary": 3}),  # a newer canary stays
    ({"stable": 1}, [2, 3], 3, "stable", {"stable": 3}),                      # version 1 deleted by hand
    ({"stable": 1, "other": 1}, [1, 2], 2, "canary", {"stable": 1, "canary": 2}),
])
def test_labels_after_an_export(previous, versions, version, label, expected):
    assert update_labels(Path("liver"), previous, versions, version, label) == expected


def test_a_label_on_a_version_no_longer_served_is_refused():
    with pytest.raises(ExportError, match=r"^liver: label 'stable' would point to version 1, which the policy \(the 2 "
                                          r"newest versions live\) no longer serves once version 3 is written \(live: "
                                          r"2, 3\); export with --label stable to move it"):
        update_labels(Path("liver"), {"stable": 1, "canary": 2}, [1, 2, 3], 3, "canary")
    with pytest.raises(ExportError, match=r"^liver: label must be one of stable, canary, got 'beta'$"):
        update_labels(Path("liver"), {}, [1], 1, "beta")


def test_versions_increment_and_overwrite(runs, tmp_path):
    out = tmp_path / "liver"
    assert export_model(runs["ct"], out) == out / "1"
    (out / "7").mkdir()  # a version made by hand: the next one is 8
    (out / "not-a-version").mkdir()
    assert export_model(runs["ct"], out) == out / "8"
    assert numeric_versions(out) == [1, 7, 8]
    info = json.loads((out / "export.json").read_text())
    assert sorted(info["versions"]) == ["1", "8"] and info["latest_version"] == 8
    assert info["version_labels"] == {"stable": 8}
    assert "version_labels" not in (out / "models.config").read_text().replace('version_labels { key: "stable" '
                                                                               'value: 8 }', "")
    with pytest.raises(ExportError, match=r"liver/8: version 8 exists; pass --overwrite to replace it"):
        export_model(runs["ct"], out, version=8)
    (out / "8" / "marker").write_text("old")
    assert export_model(runs["ct"], out, version=8, overwrite=True) == out / "8"
    assert not (out / "8" / "marker").exists() and (out / "8" / "saved_model.pb").is_file()


def test_failure_mid_export_leaves_no_version(runs, tmp_path, monkeypatch):
    seen = []

    def half_write(model, info, path):
        seen.append(path)
        (path / "variables").mkdir()
        (path / "saved_model.pb").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "write_saved_model", half_write)
    out = tmp_path / "liver"
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(runs["ct"], out)
    # Built inside saved_models/NAME under a name TF Serving ignores (not all digits).
    assert seen[0].parent == out and not seen[0].name.isdigit()
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("name, problem", [("12", "not all digits"), ("my model", "letters, digits")])
def test_bad_model_name(runs, tmp_path, name, problem):
    with pytest.raises(ExportError, match=rf"{re.escape(str(tmp_path / name))}: model name .*{problem}"):
        export_model(runs["ct"], tmp_path / name)


def test_version_below_one(runs, tmp_path):
    with pytest.raises(ExportError, match=r"liver: version must be an integer >= 1, got 0"):
        export_model(runs["ct"], tmp_path / "liver", version=0)


def test_channels_not_matching_config(runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.keras").write_bytes((runs["ct"] / "best.keras").read_bytes())
    config = json.loads((runs["ct"] / "config.json").read_text())
    config["data"]["context"] = 2
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match=r"best.keras: model takes 3 input channels but its config has context K=2"):
        export_model(run, tmp_path / "liver")
    assert not (tmp_path / "liver").exists()
