"""End to end on an ATLAS-layout phantom: records, a two-output MRI run initialised from a CT
run, its 0/1/2 masks and its liver and tumour scores; and the same for a liver-ROI cascade, each
stage initialised from its CT twin."""

import json

import keras
import nibabel as nib
import numpy as np
from click.testing import CliRunner

from cli.main import main
from kerasunet.core.records_format import DEFAULT_CONTEXT
from tests.helpers import write_unet_run


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0 and result.exception is None, result.output
    return result


def test_atlas_trains_liver_and_tumour_from_the_whole_ct_head(layout_phantoms, tmp_path):
    atlas = layout_phantoms / "atlas"
    invoke("build-records", "--input", atlas, "--out", tmp_path / "records", "--workers", "1",
           "--val-fraction", "0.25", "--test-fraction", "0")
    manifest = json.loads((tmp_path / "records" / "manifest.json").read_text())
    assert (manifest["modality"], manifest["outputs"]) == ("mri", ["liver", "tumour"])

    ct = write_unet_run(tmp_path / "ct", "ct", context=DEFAULT_CONTEXT, seed=3)
    invoke("train", "--records", tmp_path / "records", "--out", tmp_path / "mri", "--mode", "freeze",
           "--pretrained", ct, "--freeze-blocks", "2", "--filters", "4", "--depth", "2", "--epochs", "1",
           "--steps-per-epoch", "2", "--batch-size", "2", "--no-augment", "--mixed-precision", "off")
    config = json.loads((tmp_path / "mri" / "config.json").read_text())
    assert config["model"]["outputs"] == ["liver", "tumour"] and config["data"]["modality"] == "mri"
    mri_model = keras.saving.load_model(tmp_path / "mri" / "best.keras", compile=False)
    ct_model = keras.saving.load_model(ct / "best.keras", compile=False)
    assert mri_model.output_shape[-1] == 2
    for name in ("encoder_1_conv_a", "encoder_2_conv_b"):  # frozen: still the CT weights
        for new, old in zip(mri_model.get_layer(name).get_weights(), ct_model.get_layer(name).get_weights()):
            np.testing.assert_array_equal(new, old)

    invoke("predict", "--model", tmp_path / "mri", "--input", atlas, "--output", tmp_path / "masks",
           "--no-postprocess")
    masks = sorted((tmp_path / "masks").glob("lb*.nii.gz"))
    assert [p.name for p in masks] == [f"lb{i}.nii.gz" for i in range(4)]
    values = set().union(*(np.unique(np.asarray(nib.load(str(p)).dataobj)).tolist() for p in masks))
    assert values <= {0, 1, 2} and 2 in values  # liver 1, tumour 2, as the ATLAS labels

    invoke("evaluate", "--model", tmp_path / "mri", "--input", atlas, "--out", tmp_path / "eval", "--overlays", "1")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["outputs"] == ["liver", "tumour"] and summary["n_cases"] == 4
    model = next(iter(summary["models"].values()))
    assert list(model["structures"]) == ["liver", "tumour"] and "tumour_burden" in model
    assert "## Liver" in (tmp_path / "eval" / "report.md").read_text()


def test_atlas_cascade_transfers_both_stages_from_a_ct_cascade(layout_phantoms, tmp_path):
    """MRI stage 1 starts from CT stage 1, MRI stage 2 (tumour in the liver ROI) from CT stage 2."""
    atlas, tiny = layout_phantoms / "atlas", ("--filters", "4", "--depth", "2", "--epochs", "1",
                                              "--steps-per-epoch", "1", "--batch-size", "2", "--no-augment",
                                              "--mixed-precision", "off")
    stage_2 = ("--stage", "tumour", "--roi-size", "16x16")
    for name, source in (("ct_records", layout_phantoms / "lits"), ("mri_records", atlas)):
        invoke("build-records", "--input", source, "--out", tmp_path / name, "--workers", "1",
               "--val-fraction", "0.25", "--test-fraction", "0")
    ct_liver = write_unet_run(tmp_path / "ct_liver", "ct", context=DEFAULT_CONTEXT, seed=3)
    invoke("train", "--records", tmp_path / "ct_records", "--out", tmp_path / "ct_tumour", *stage_2,
           "--liver-model", ct_liver, *tiny)
    invoke("train", "--records", tmp_path / "mri_records", "--out", tmp_path / "mri_liver", "--mode", "init",
           "--pretrained", ct_liver, *tiny)
    invoke("train", "--records", tmp_path / "mri_records", "--out", tmp_path / "mri_tumour", *stage_2,
           "--liver-model", tmp_path / "mri_liver", "--mode", "freeze", "--pretrained", tmp_path / "ct_tumour",
           "--freeze-blocks", "1", *tiny)

    config = json.loads((tmp_path / "mri_tumour" / "config.json").read_text())
    assert config["model"]["outputs"] == ["tumour"] and config["data"]["modality"] == "mri"
    assert config["cascade"]["liver_model"] == str((tmp_path / "mri_liver").resolve())
    assert config["cascade"]["roi_size"] == [16, 16]
    mri_model, ct_model = (keras.saving.load_model(tmp_path / run / "best.keras", compile=False)
                           for run in ("mri_tumour", "ct_tumour"))
    assert mri_model.output_shape[-1] == ct_model.output_shape[-1] == 1
    for layer in ct_model.layers:  # encoder_1 frozen: still CT stage 2's weights, bit for bit
        if layer.name.startswith("encoder_1_") and layer.weights:
            for new, old in zip(mri_model.get_layer(layer.name).get_weights(), layer.get_weights()):
                np.testing.assert_array_equal(new, old)
    trained = [layer.name for layer in ct_model.layers if layer.name.startswith("encoder_2_") and layer.weights]
    assert any(not np.array_equal(new, old) for name in trained  # encoder_2 was not frozen: it trained
               for new, old in zip(mri_model.get_layer(name).get_weights(), ct_model.get_layer(name).get_weights()))
    for new, old in zip(mri_model.get_layer("head_conv").get_weights(), ct_model.get_layer("head_conv").get_weights()):
        np.testing.assert_allclose(new, old, atol=5e-3)  # the CT tumour head, one Adam step (lr 1e-3) on

    invoke("predict", "--model", tmp_path / "mri_tumour", "--input", atlas / "imagesTr" / "im0.nii.gz",
           "--output", tmp_path / "mask.nii.gz", "--no-postprocess")
    image, mask = nib.load(str(atlas / "imagesTr" / "im0.nii.gz")), nib.load(str(tmp_path / "mask.nii.gz"))
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2}
