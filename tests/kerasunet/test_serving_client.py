"""Tests of kerasunet.serving_client against the REST test double (tests/helpers.py ``ServingDouble``)."""

import json
import re
import socket
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest

from kerasunet.core.nifti import load_volume, to_original_order
from kerasunet.export import export_model
from kerasunet.postprocess import PostprocessSettings
from kerasunet.predict import PredictSettings, predict_path_served
from kerasunet.serving_client import (RemoteModel, ServingError, call, fetch_model, model_url, plan_batches,
                                      predict_probabilities)
from tests.helpers import ServingDouble, reference_outputs, write_unet_run

QUIET = {"progress": lambda line: None}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One CT and one MRI model (context 1), exported and served by the test double."""
    root = tmp_path_factory.mktemp("serving")
    out = {}
    for modality in ("ct", "mri"):
        run = write_unet_run(root / f"runs/{modality}", modality, seed=1)
        export_model(run, root / f"saved_models/liver-{modality}")
        out[modality] = run
    with ServingDouble(root / "saved_models/liver-ct") as ct, ServingDouble(root / "saved_models/liver-mri") as mri:
        yield {"runs": out, "ct": ct, "mri": mri}


@pytest.fixture(autouse=True)
def clean_double(served):
    for double in (served["ct"], served["mri"]):
        double.requests.clear()
        double.fail_predict = None


def write_volume(path, data):
    # A non-canonical (LAS) affine: the mask must come back in the input's own voxel order.
    affine = np.diag([-1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return affine


def expected_outputs(run, volume_path):
    """The local computation: independent 2.5D stacks, Keras model, whole-volume statistics."""
    data = load_volume(volume_path).data
    last = data.shape[2] - 1
    stacks = np.stack([np.stack([data[:, :, max(k - 1, 0)], data[:, :, k], data[:, :, min(k + 1, last)]], -1)
                       for k in range(data.shape[2])])
    probs, mask = reference_outputs(run, stacks)
    decisive = np.abs(probs - 0.5).min(axis=-1) > 1e-4
    return np.moveaxis(probs, 0, 2), np.moveaxis(mask, 0, -1), np.moveaxis(decisive, 0, -1)


def check_mask(out, run, volume_path, affine, labels):
    got = nib.load(str(out))
    np.testing.assert_array_equal(got.affine, affine)
    assert got.get_data_dtype() == np.uint8
    _, mask_canonical, decisive = expected_outputs(run, volume_path)
    img = nib.load(str(volume_path))
    np.testing.assert_array_equal(np.asarray(got.dataobj)[to_original_order(decisive, img)],
                                  to_original_order(mask_canonical, img)[to_original_order(decisive, img)])
    assert decisive.mean() > 0.99 and set(np.unique(got.dataobj)) == set(labels)


def test_mri_whole_case_one_request(served, tmp_path):
    rng = np.random.default_rng(2)
    affine = write_volume(tmp_path / "case.nii.gz", rng.gamma(2.0, 300.0, (32, 28, 5)))
    settings = PredictSettings(batch_size=2, postprocess=PostprocessSettings(enabled=False))
    result = predict_path_served(served["mri"].url, "liver-mri", tmp_path / "case.nii.gz", tmp_path / "mask.nii.gz",
                                 settings, **QUIET)
    assert result.written == [tmp_path / "mask.nii.gz"] and not result.failures
    requests = served["mri"].requests
    assert [(m, p) for m, p, _ in requests] == [("GET", "/v1/models/liver-mri/metadata"),
                                                ("POST", "/v1/models/liver-mri:predict")]
    body = requests[1][2]
    assert set(body) == {"signature_name", "inputs"} and body["signature_name"] == "serving_default"
    assert list(body["inputs"]) == ["image"] and np.array(body["inputs"]["image"]).shape == (5, 32, 28, 3)
    check_mask(tmp_path / "mask.nii.gz", served["runs"]["mri"], tmp_path / "case.nii.gz", affine, {0, 1})


def test_ct_batches_and_version(served, tmp_path):
    rng = np.random.default_rng(3)
    affine = write_volume(tmp_path / "ct.nii", rng.uniform(-300, 400, (24, 20, 5)))
    settings = PredictSettings(batch_size=2, postprocess=PostprocessSettings(enabled=False))
    result = predict_path_served(served["ct"].url, "liver-ct", tmp_path / "ct.nii", tmp_path / "ct-mask.nii.gz",
                                 settings, version=1, **QUIET)
    assert result.written == [tmp_path / "ct-mask.nii.gz"]
    posts = [(p, np.array(b["inputs"]["image"]).shape) for m, p, b in served["ct"].requests if m == "POST"]
    assert posts == [("/v1/models/liver-ct/versions/1:predict", (n, 24, 20, 3)) for n in (2, 2, 1)]
    check_mask(tmp_path / "ct-mask.nii.gz", served["runs"]["ct"], tmp_path / "ct.nii", affine, {0, 1, 2})


def test_probabilities_are_the_models_in_canonical_order(served, tmp_path):
    write_volume(tmp_path / "ct.nii", np.random.default_rng(4).uniform(-300, 400, (12, 10, 3)))
    model = fetch_model(served["ct"].url, "liver-ct")
    assert (model.channels, model.num_outputs, model.modality, model.context) == (3, 2, "ct", 1)
    probs = predict_probabilities(model, load_volume(tmp_path / "ct.nii").data, batch_size=2)
    expected, _, _ = expected_outputs(served["runs"]["ct"], tmp_path / "ct.nii")
    assert probs.shape == (12, 10, 3, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_double_row_format_and_status(served):
    url = f"{served['mri'].url}/v1/models/liver-mri"
    image = np.zeros((2, 4, 4, 3)).tolist()
    rows = call(f"{url}:predict", {"instances": [{"image": image[0]}, image[1]]})
    assert len(rows["predictions"]) == 2 and set(rows["predictions"][0]) == {"probabilities", "mask"}
    assert np.array(rows["predictions"][0]["mask"]).shape == (4, 4)
    columns = call(f"{url}:predict", {"signature_name": "serving_default", "inputs": {"image": image}})
    assert np.array(columns["outputs"]["probabilities"]).shape == (2, 4, 4, 1)
    status = call(url)["model_version_status"][0]
    assert (status["version"], status["state"]) == ("1", "AVAILABLE")
    meta = call(f"{url}/metadata")["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert meta["inputs"]["image"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in meta["inputs"]["image"]["tensor_shape"]["dim"]] == ["-1", "-1", "-1", "3"]
    assert meta["outputs"]["mask"]["dtype"] == "DT_UINT8"


@pytest.mark.parametrize("name, version, which", [("nope", None, "Latest(nope)"),
                                                  ("liver-mri", 7, "Specific(liver-mri, 7)")])
def test_unknown_model_or_version(served, tmp_path, name, version, which):
    write_volume(tmp_path / "v.nii", np.zeros((8, 8, 2)))
    suffix = f"/versions/{version}" if version else ""
    expected = (rf"^{re.escape(served['mri'].url)}/v1/models/{name}{suffix}/metadata: HTTP 404: "
                rf"Servable not found for request: {re.escape(which)} \(model '{name}'")
    with pytest.raises(ServingError, match=expected):  # before any volume: the whole run stops
        predict_path_served(served["mri"].url, name, tmp_path / "v.nii", tmp_path / "m.nii", version=version,
                            **QUIET)
    assert not (tmp_path / "m.nii").exists()


def test_server_error_body_in_message(served, tmp_path):
    write_volume(tmp_path / "v.nii", np.zeros((8, 8, 2)))
    served["mri"].fail_predict = (400, "Input to reshape is a tensor with 12 values")
    result = predict_path_served(served["mri"].url, "liver-mri", tmp_path / "v.nii", tmp_path / "m.nii", **QUIET)
    [(path, message)] = result.failures  # one volume failed; the others would still run
    assert path == tmp_path / "v.nii" and not result.written and not (tmp_path / "m.nii").exists()
    assert re.fullmatch(rf"{re.escape(served['mri'].url)}/v1/models/liver-mri:predict: HTTP 400: "
                        r"Input to reshape is a tensor with 12 values", message)


def test_bad_signature_name(served):
    with pytest.raises(ServingError, match=r"liver-mri/metadata: no signature 'other' \(has \['model_info', 'serving_default'\]\)"):
        fetch_model(served["mri"].url, "liver-mri", signature="other")


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServingError, match=rf"^http://127.0.0.1:{port}/v1/models/x/metadata: connection refused"):
        call(f"http://127.0.0.1:{port}/v1/models/x/metadata", timeout=5)


def test_timeout():
    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1/models/x/metadata"
        with pytest.raises(ServingError, match=rf"^{re.escape(url)}: no answer within 0.3 s \(timeout\)$"):
            call(url, timeout=0.3)


def test_double_rejects_bad_json(served):
    request = urllib.request.Request(f"{served['mri'].url}/v1/models/liver-mri:predict", data=b"{bad")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert json.loads(raised.value.read())["error"].startswith("JSON Parse error")


def test_server_url_needs_scheme():
    with pytest.raises(ServingError, match=r"^localhost:8501: server URL must start with http://, https:// "
                                           r"or grpc://$"):
        model_url("localhost:8501", "liver")


def test_label_in_the_url_and_served_by_the_double(served, tmp_path):
    write_volume(tmp_path / "ct.nii", np.random.default_rng(6).uniform(-300, 400, (12, 10, 3)))
    result = predict_path_served(served["ct"].url, "liver-ct", tmp_path / "ct.nii", tmp_path / "m.nii.gz",
                                 PredictSettings(batch_size=4), label="stable", **QUIET)
    assert result.written == [tmp_path / "m.nii.gz"]
    assert [(m, p) for m, p, _ in served["ct"].requests] == [("GET", "/v1/models/liver-ct/labels/stable/metadata"),
                                                             ("POST", "/v1/models/liver-ct/labels/stable:predict")]
    assert model_url("http://h:8501/", "liver", label="canary") == "http://h:8501/v1/models/liver/labels/canary"
    with pytest.raises(ValueError, match=r"^Expected a version or a label, not both\. Received: version=1, "
                                         r"label='stable'$"):
        fetch_model(served["ct"].url, "liver-ct", 1, label="stable")


def test_input_of_the_other_modality_is_refused(served, tmp_path):
    folder = tmp_path / "lits"
    folder.mkdir()
    write_volume(folder / "volume-0.nii", np.zeros((8, 8, 2)))
    url = served["mri"].url
    with pytest.raises(ServingError, match=rf"^{re.escape(url)}/v1/models/liver-mri/metadata: the input is CT but the "
                                           r"model was exported for MRI \(its 'probabilities' are tumour\); use a "
                                           r"model trained on CT$"):
        predict_path_served(url, "liver-mri", folder, tmp_path / "out", **QUIET)
    assert [m for m, _, _ in served["mri"].requests] == ["GET"] and not (tmp_path / "out").exists()


MIB = 2**20


@pytest.mark.parametrize("outputs, voxels, limit, batch, expected, warning", [
    (1, 100, None, 2, [range(0, 5)], None),                                 # MRI case that fits: one request
    (1, 10_000_000, None, 2, [range(0, 2), range(2, 4), range(4, 5)],       # MRI too large: batches + warning
     "10000000 voxels exceed 8000000; sending 2 slices per request"),
    (2, 100, None, 2, [range(0, 2), range(2, 4), range(4, 5)], None),       # CT: fixed window, any batching
    # gRPC, 4 MiB: a 512x512 slice of 3 channels is 3 MiB, so one per request
    (2, 5 * 512 * 512, 4 * MIB, 16, [range(i, i + 1) for i in range(5)], None),
    (1, 5 * 512 * 512, 4 * MIB, 16, [range(i, i + 1) for i in range(5)],    # MRI over the limit: warned
     "5 slices exceed the 4 MiB gRPC message limit; sending 1 slices per request"),
    (1, 5 * 512 * 512, 64 * MIB, 16, [range(0, 5)], None),                  # ... unless the limit is raised
    (2, 5 * 100, 4 * MIB, 2, [range(0, 2), range(2, 4), range(4, 5)], None),  # small slices: batch_size rules
])
def test_plan_batches(capsys, outputs, voxels, limit, batch, expected, warning):
    model = RemoteModel(url="u", channels=3, num_outputs=outputs, max_message_bytes=limit)
    assert plan_batches(5, voxels // 5, batch, model) == expected
    warned = capsys.readouterr().err
    assert ("normalised with its own MRI statistics" in warned) == (warning is not None)
    assert warning is None or warned.startswith(f"warning: {warning}, so each batch is normalised")


@pytest.mark.parametrize("outputs, modality", [(2, "ct"), (1, "mri")])
def test_modality_follows_the_output_channels(outputs, modality):
    model = RemoteModel(url="u", channels=3, num_outputs=outputs)
    assert model.modality == modality and model.one_case_per_request == (modality == "mri")


def test_plan_batches_rejects_zero():
    with pytest.raises(ValueError, match=r"^Expected batch_size >= 1. Received: batch_size=0$"):
        plan_batches(5, 10, 0, RemoteModel(url="u", channels=3, num_outputs=2))


def test_an_mri_model_with_liver_and_tumour_is_served_as_such(tmp_path):
    from kerasunet.core.preprocessing import NormSettings

    run = write_unet_run(tmp_path / "runs/atlas", "ct", seed=2)  # two channels ...
    config = json.loads((run / "config.json").read_text())
    config["data"].update(modality="mri", norm=NormSettings("mri").to_dict())  # ... of an ATLAS-like MRI set
    config["model"]["outputs"] = ["liver", "tumour"]
    (run / "config.json").write_text(json.dumps(config))
    export_model(run, tmp_path / "saved_models/liver-atlas")
    with ServingDouble(tmp_path / "saved_models/liver-atlas") as double:
        model = fetch_model(double.url, "liver-atlas", modality="mri")
        assert (model.modality, model.outputs, model.num_outputs) == ("mri", ("liver", "tumour"), 2)
        assert model.one_case_per_request  # MRI: statistics of the whole request
        with pytest.raises(ServingError, match=r"the input is CT but the model was exported for MRI \(its "
                                               r"'probabilities' are liver, tumour\)"):
            fetch_model(double.url, "liver-atlas", modality="ct")
