"""Tests of the gRPC client (kerasunet.serving_grpc) against the gRPC test double on 127.0.0.1.

The double (``tests/helpers.py`` ``GrpcServingDouble``) uses tensorflow-serving-api's own
message classes and TensorFlow; the client builds its messages without TensorFlow, so every
exchange here also checks that both sides agree on the wire.
"""

import re
import socket
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from kerasunet import serving_grpc
from kerasunet.export import export_model
from kerasunet.postprocess import PostprocessSettings
from kerasunet.predict import PredictSettings, predict_path, predict_path_served
from kerasunet.serving_client import (MESSAGE_OVERHEAD_BYTES, RemoteModel, ServingError, fetch_model, predict_batch,
                                      predict_probabilities)
from tests.helpers import REPO, GrpcServingDouble, ServingDouble, free_port, reference_outputs, write_unet_run

QUIET = {"progress": lambda line: None}
RAW = PredictSettings(batch_size=2, postprocess=PostprocessSettings(enabled=False))


def write_not_kerasunet(folder):
    """A SavedModel whose serving_default is ``x [b, 3] -> y``: servable, but not a kerasunet export."""
    import tensorflow as tf

    module = tf.Module()
    module.serve = tf.function(lambda x: {"y": x * 2.0}, input_signature=[tf.TensorSpec([None, 3], tf.float32, "x")])
    tf.saved_model.save(module, str(folder / "1"), signatures={"serving_default": module.serve})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One CT U-Net (context 1) exported once, served over gRPC (both answer forms) and REST."""
    root = tmp_path_factory.mktemp("grpc")
    run = write_unet_run(root / "runs/ct", "ct", seed=1)
    export_model(run, root / "saved_models/liver")
    write_not_kerasunet(root / "saved_models/other")
    with GrpcServingDouble(root / "saved_models/liver") as grpc_double, \
            GrpcServingDouble(root / "saved_models/liver", as_fields=True) as fields, \
            GrpcServingDouble(root / "saved_models/other") as other, \
            ServingDouble(root / "saved_models/liver") as rest:
        yield {"run": run, "grpc": grpc_double, "fields": fields, "other": other, "rest": rest}


@pytest.fixture(autouse=True)
def clean(served):
    for key in ("grpc", "fields", "other", "rest"):
        served[key].requests.clear()


def ct_volume(path, shape=(40, 36, 5), seed=3):
    data = np.random.default_rng(seed).uniform(-300, 400, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([-0.8, 0.8, 2.5, 1.0])), str(path))
    return data


def expected_probs(run, data):
    """Keras model + NumPy preprocessing on independent 2.5D stacks, canonical ``(x, y, z, N)``."""
    last = data.shape[2] - 1
    stacks = np.stack([np.stack([data[:, :, max(k - 1, 0)], data[:, :, k], data[:, :, min(k + 1, last)]], -1)
                       for k in range(data.shape[2])])
    probs, _ = reference_outputs(run, stacks)
    return np.moveaxis(probs, 0, 2)


def test_grpc_rest_and_local_masks_are_equal(served, tmp_path):
    folder = tmp_path / "lits"
    folder.mkdir()
    ct_volume(folder / "volume-0.nii")
    settings = PredictSettings(batch_size=2, postprocess=PostprocessSettings(enabled=False), save_probabilities=True)
    over_grpc = predict_path_served(served["grpc"].url, "liver", folder, tmp_path / "grpc", settings,
                                    label="stable", **QUIET)
    over_rest = predict_path_served(served["rest"].url, "liver", folder, tmp_path / "rest", settings,
                                    label="stable", **QUIET)
    local = predict_path(served["run"], folder, tmp_path / "local", settings, **QUIET)
    assert not (over_grpc.failures or over_rest.failures or local.failures)
    ways = ("grpc", "rest", "local")
    masks = {k: np.asarray(nib.load(str(tmp_path / k / "segmentation-0.nii")).dataobj) for k in ways}
    probs = {k: nib.load(str(tmp_path / k / "probabilities-0.nii.gz")).get_fdata() for k in ways}
    # gRPC and REST carry the same float32 values: identical results
    np.testing.assert_array_equal(probs["grpc"], probs["rest"])
    np.testing.assert_array_equal(masks["grpc"], masks["rest"])
    # local predict computes the same function on another path: equal up to float rounding
    np.testing.assert_allclose(probs["grpc"], probs["local"], atol=1e-5)
    decisive = np.abs(probs["local"] - 0.5).min(axis=-1) > 1e-4
    np.testing.assert_array_equal(masks["grpc"][decisive], masks["local"][decisive])
    assert decisive.mean() > 0.99 and set(np.unique(masks["grpc"])) == {0, 1, 2}

    calls = served["grpc"].requests
    assert [method for method, _ in calls] == ["GetModelMetadata", "Predict", "Predict", "Predict"]
    assert list(calls[0][1].metadata_field) == ["signature_def"]
    for _, request in calls[1:]:
        assert (request.model_spec.name, request.model_spec.version_label) == ("liver", "stable")
        assert request.model_spec.signature_name == "serving_default"
        assert list(request.output_filter) == ["probabilities"]  # no mask over the wire
        image = request.inputs["image"]
        assert image.tensor_content and not image.float_val  # raw bytes, not one number at a time
    assert [[d.size for d in r.inputs["image"].tensor_shape.dim] for _, r in calls[1:]] == [
        [n, 40, 36, 3] for n in (2, 2, 1)]


def test_typed_value_answers_decode_the_same(served, tmp_path):
    data = ct_volume(tmp_path / "v.nii", (12, 10, 3))
    with fetch_model(served["grpc"].url, "liver") as a, fetch_model(served["fields"].url, "liver") as b:
        from_bytes, from_fields = (predict_probabilities(m, data, batch_size=4) for m in (a, b))
    np.testing.assert_array_equal(from_fields, from_bytes)
    np.testing.assert_allclose(from_bytes, expected_probs(served["run"], data), atol=1e-5)


def test_512_slices_are_split_to_fit_the_default_4_mib(served):
    # One 512x512 slice with 3 channels is 3 MiB: two would exceed gRPC's default 4 MiB.
    data = np.random.default_rng(5).uniform(-300, 400, (512, 512, 3)).astype(np.float32)
    with fetch_model(served["grpc"].url, "liver") as model:
        assert model.max_message_bytes == 4 * 2**20
        probs = predict_probabilities(model, data, batch_size=16)
    sizes = [r.ByteSize() for m, r in served["grpc"].requests if m == "Predict"]
    assert len(sizes) == 3 and max(sizes) <= 4 * 2**20
    np.testing.assert_allclose(probs, expected_probs(served["run"], data), atol=1e-5)


def test_smaller_limits_give_smaller_batches(served, tmp_path):
    data = ct_volume(tmp_path / "v.nii", (32, 32, 7))
    slice_bytes = 32 * 32 * 3 * 4
    with fetch_model(served["grpc"].url, "liver", max_message_bytes=MESSAGE_OVERHEAD_BYTES + 2 * slice_bytes) as model:
        predict_probabilities(model, data, batch_size=16)
    assert [r.inputs["image"].tensor_shape.dim[0].size for m, r in served["grpc"].requests if m == "Predict"] == [
        2, 2, 2, 1]


def test_a_slice_over_the_limit_is_refused_before_sending(served):
    with fetch_model(served["grpc"].url, "liver") as model:
        with pytest.raises(ServingError, match=r"^grpc://127\.0\.0\.1:\d+: one slice of 360000 voxels x 3 channels "
                                               r"is 4\.1 MiB, over the 4 MiB message limit; raise "
                                               r"--grpc-max-message-mb here and grpc.max_receive_message_length"):
            predict_probabilities(model, np.zeros((600, 600, 2), np.float32))
    assert [m for m, _ in served["grpc"].requests] == ["GetModelMetadata"]


def test_server_limit_below_the_clients_is_one_line(served):
    # The client may send 8 MiB; the server, like TF Serving by default, receives 4 MiB.
    with fetch_model(served["grpc"].url, "liver", max_message_bytes=8 * 2**20) as model:
        with pytest.raises(ServingError) as raised:
            predict_batch(model, np.zeros((2, 512, 512, 3), np.float32), timeout=30)
    message = str(raised.value)
    assert "\n" not in message and raised.value.status == "RESOURCE_EXHAUSTED"
    assert re.match(r"^grpc://127\.0\.0\.1:\d+ liver: Predict: message over a size limit \(raise "
                    r"--grpc-max-message-mb here and grpc.max_receive_message_length on the server\): "
                    r"RESOURCE_EXHAUSTED: ", message)


def test_server_not_up_names_the_address():
    address = f"grpc://127.0.0.1:{free_port()}"
    with pytest.raises(ServingError) as raised:
        fetch_model(address, "liver", timeout=10)
    assert raised.value.status == "UNAVAILABLE" and "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"{address} liver: GetModelMetadata: server not reachable "
                                        "(is it running, and is this its gRPC port?): UNAVAILABLE: ")


def test_timeout():
    with socket.socket() as s:  # accepts connections (backlog) but never speaks HTTP/2
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        address = f"grpc://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(ServingError, match=rf"^{re.escape(address)} liver: GetModelMetadata: no answer within "
                                               r"0\.3 s \(timeout\)$"):
            fetch_model(address, "liver", timeout=0.3)


@pytest.mark.parametrize("name, version, label, expected", [
    ("nope", None, None, r"nope: GetModelMetadata: NOT_FOUND: Servable not found for request: Latest\(nope\) "
                         r"\(model 'nope' is not served there; check --model-name/--model-version\)$"),
    ("liver", 7, None, r"liver version 7: GetModelMetadata: NOT_FOUND: Servable not found for request: "
                       r"Specific\(liver, 7\) \(model 'liver' version 7 is not served there"),
    ("liver", None, "canary", r"liver label canary: GetModelMetadata: INVALID_ARGUMENT: Unrecognized servable "
                              r"version label: canary \(label 'canary' is not set for model 'liver'; "
                              r"check --model-label"),
])
def test_unknown_model_version_or_label(served, tmp_path, name, version, label, expected):
    ct_volume(tmp_path / "v.nii", (8, 8, 2))
    with pytest.raises(ServingError, match=rf"^{re.escape(served['grpc'].url)} {expected}"):
        predict_path_served(served["grpc"].url, name, tmp_path / "v.nii", tmp_path / "m.nii", RAW,
                            version=version, label=label, **QUIET)
    assert [m for m, _ in served["grpc"].requests] == ["GetModelMetadata"] and not (tmp_path / "m.nii").exists()


def test_wrong_signature_name(served):
    with pytest.raises(ServingError, match=r"liver: GetModelMetadata: no signature 'other' "
                                           r"\(has \['__saved_model_init_op', 'model_info', 'serving_default'\]\)$"):
        fetch_model(served["grpc"].url, "liver", signature="other")


def test_a_signature_that_is_not_a_kerasunet_export(served):
    with pytest.raises(ServingError, match=r"other: GetModelMetadata: signature 'serving_default' is not a kerasunet "
                                           r"export \(expected float32 input 'image' .*; has inputs x: DT_FLOAT "
                                           r"\[-1, 3\]; outputs y: DT_FLOAT \[-1, 3\]\)$"):
        fetch_model(served["other"].url, "other")


def test_predict_on_a_missing_signature_is_the_servers_error(served):
    # A model object made by hand, bypassing the metadata check: the server's answer is kept.
    channel = serving_grpc.open_channel(served["grpc"].url)
    model = RemoteModel(url=served["grpc"].url, channels=3, num_outputs=2, signature="nope", name="liver",
                        max_message_bytes=4 * 2**20, channel=channel)
    with model, pytest.raises(ServingError, match=r"liver: Predict: FAILED_PRECONDITION: Serving signature key "
                                                  r"\"nope\" not found\.$"):
        predict_batch(model, np.zeros((1, 8, 8, 3), np.float32), timeout=30)


def test_modality_of_the_input_folder_must_match(served, tmp_path):
    case = tmp_path / "mri" / "FZMC001"
    case.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 3), np.float32), np.eye(4)), str(case / "artery.nii"))
    with pytest.raises(ServingError, match=r"liver: GetModelMetadata: the input is MRI but the model was exported "
                                           r"for CT \(its 'probabilities' are liver, tumour\); use a model trained "
                                           r"on MRI$"):
        predict_path_served(served["grpc"].url, "liver", tmp_path / "mri", tmp_path / "out", RAW, **QUIET)
    assert [m for m, _ in served["grpc"].requests] == ["GetModelMetadata"] and not (tmp_path / "out").exists()


def test_stacks_of_another_context_are_refused(served):
    with fetch_model(served["grpc"].url, "liver") as model:
        with pytest.raises(ServingError, match=r"input has 5 channels \(2.5D context K=2\) but the model was exported "
                                               r"for 3 \(K=1\); build the stacks with context 1$"):
            predict_batch(model, np.zeros((1, 8, 8, 5), np.float32), timeout=30)
    assert [m for m, _ in served["grpc"].requests] == ["GetModelMetadata"]


CLIENT_ONLY = textwrap.dedent("""
    import sys
    import numpy as np
    from kerasunet.serving_client import fetch_model, predict_probabilities
    with fetch_model(sys.argv[1], "liver", label="stable", modality="ct") as model:
        probs = predict_probabilities(model, np.full((8, 8, 2), 40.0, np.float32))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
    print(probs.shape, loaded)
""")


def test_the_grpc_client_runs_without_tensorflow(served):
    done = subprocess.run([sys.executable, "-c", CLIENT_ONLY, served["grpc"].url], cwd=REPO, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(8, 8, 2, 2) []"


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5,
                                   np.arange(12, dtype=np.uint8).reshape(3, 4)])
def test_tensor_protos_match_tensorflows(array):
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    ours = serving_grpc.tensor_proto(array)
    np.testing.assert_array_equal(tf.make_ndarray(tensor_pb2.TensorProto.FromString(ours.SerializeToString())), array)
    theirs = tf.make_tensor_proto(array).SerializeToString()
    back = serving_grpc.to_array(serving_grpc.protos().TensorProto.FromString(theirs))
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_filled_tensor_is_tensorflows_repeated_last_value():
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    proto = serving_grpc.filled_tensor_proto((2, 5, 3), 40.0)
    assert proto.ByteSize() < 30
    np.testing.assert_array_equal(tf.make_ndarray(tensor_pb2.TensorProto.FromString(proto.SerializeToString())),
                                  np.full((2, 5, 3), 40.0, np.float32))
    np.testing.assert_array_equal(serving_grpc.to_array(proto), np.full((2, 5, 3), 40.0, np.float32))


def test_unreadable_tensors_are_refused():
    p = serving_grpc.protos()
    with pytest.raises(ValueError, match=r"^tensor dtype DT_STRING is not one of \['DT_DOUBLE', 'DT_FLOAT', "):
        serving_grpc.to_array(p.TensorProto(dtype=p.DataType.Value("DT_STRING")))
    short = serving_grpc.tensor_proto(np.zeros((2, 3), np.float32))
    short.tensor_content = short.tensor_content[:-4]
    with pytest.raises(ValueError, match=r"^tensor of shape \[2, 3\] holds 5 values$"):
        serving_grpc.to_array(short)
    with pytest.raises(ValueError, match=r"^Expected one of \[.*'float32'.*\]\. Received: dtype=complex64$"):
        serving_grpc.tensor_proto(np.zeros(2, np.complex64))


def test_protos_fall_back_to_importing_the_modules(monkeypatch):
    from google.protobuf import descriptor_pool

    def not_gencode(pool, module, added):
        raise serving_grpc._NotGencode(module)

    fast = serving_grpc.protos()
    assert fast.ModelSpec.DESCRIPTOR.file.pool is not descriptor_pool.Default()  # private pool, no TensorFlow
    spec = {"name": "liver", "version_label": "canary", "signature_name": "serving_default"}
    monkeypatch.setattr(serving_grpc, "_add_file", not_gencode)
    serving_grpc.protos.cache_clear()
    try:
        fallback = serving_grpc.protos()
        assert fallback.ModelSpec.DESCRIPTOR.file.pool is descriptor_pool.Default()  # tensorflow-serving-api's own
        assert fallback.ModelSpec(**spec).SerializeToString() == fast.ModelSpec(**spec).SerializeToString()
        assert fallback.methods == fast.methods == {
            name: f"/tensorflow.serving.PredictionService/{name}"
            for name in ("Classify", "Regress", "Predict", "MultiInference", "GetModelMetadata")}
    finally:
        serving_grpc.protos.cache_clear()


@pytest.mark.parametrize("server", ["grpc://localhost", "grpc://:8500", "grpc://host:port"])
def test_address_needs_host_and_port(server):
    with pytest.raises(ServingError, match=rf"^{re.escape(server)}: gRPC server must be grpc://HOST:PORT"):
        fetch_model(server, "liver")
