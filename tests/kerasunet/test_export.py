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
from kerasunet.export import ExportError, export_model, numeric_versions
from kerasunet.core.preprocessing import NormSettings
from kerasunet.core.runs import RunError
from tests.helpers import UNET_DEPTH, reference_outputs, write_unet_run

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


FRESH = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    data = dict(np.load(sys.argv[1]))
    out = {}
    for i, key in enumerate(("ct", "mri", "mixed", "resized")):
        fn = tf.saved_model.load(sys.argv[2 + i]).signatures["serving_default"]
        result = fn(image=tf.constant(data[key]))
        assert result["probabilities"].dtype == tf.float32 and result["mask"].dtype == tf.uint8
        out[key + "_probs"], out[key + "_mask"] = result["probabilities"].numpy(), result["mask"].numpy()
    assert "kerasunet" not in sys.modules, "the SavedModel must not need kerasunet"
    np.savez(sys.argv[6], **out)
""")


def test_fresh_tensorflow_process_matches_keras(runs, exported, tmp_path):
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
                          timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    # Tolerances: 1e-5 for float32 (measured <= 2e-6); 1e-2 for mixed_float16 (measured 0.0 on
    # CPU, where the export runs the same float16 ops as Keras; other devices may differ).
    for key, tol in (("ct", 1e-5), ("mri", 1e-5), ("mixed", 1e-2), ("resized", 1e-5)):
        probs, mask = reference_outputs(runs[key], raw[key])
        assert got[f"{key}_probs"].shape == probs.shape == raw[key].shape[:3] + probs.shape[-1:]
        np.testing.assert_allclose(got[f"{key}_probs"], probs, atol=tol, rtol=0)
        decisive = np.abs(probs - 0.5).min(axis=-1) > tol  # labels may flip only at 0.5 +- tol
        np.testing.assert_array_equal(got[f"{key}_mask"][decisive], mask[decisive])
        assert decisive.mean() > 0.95


def test_layout_config_and_info(runs, exported):
    out = exported["mri"].parent
    assert exported["mri"] == out / "1"
    assert (out / "1" / "saved_model.pb").is_file() and (out / "1" / "variables").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["1", "export.json", "models.config"]
    config = (out / "models.config").read_text()
    assert 'name: "liver-mri"' in config and 'base_path: "/models/liver-mri"' in config
    assert 'model_platform: "tensorflow"' in config
    assert " ".join(config.split()).count("model_version_policy { latest { num_versions: 1 } }") == 1
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


def test_versions_increment_and_overwrite(runs, tmp_path):
    out = tmp_path / "liver"
    assert export_model(runs["ct"], out) == out / "1"
    (out / "7").mkdir()  # a version made by hand: the next one is 8
    (out / "not-a-version").mkdir()
    assert export_model(runs["ct"], out) == out / "8"
    assert numeric_versions(out) == [1, 7, 8]
    info = json.loads((out / "export.json").read_text())
    assert sorted(info["versions"]) == ["1", "8"] and info["latest_version"] == 8
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
