"""predict on every dataset layout, end to end; a DICOM series' mask is its NIfTI twin's mask in world space."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kerasunet.core.cases import load_image, mask_path, open_dataset
from kerasunet.core.dicom import SeriesTags, write_series
from kerasunet.core.nifti import load_volume
from kerasunet.postprocess import PostprocessSettings
from kerasunet.predict import PredictSettings, predict_path
from kerasunet.synth_layouts import SYNTH_LAYOUTS
from tests.helpers import ct_phantom, expected_ct_labels, threshold_model, write_run

RAW = PredictSettings(postprocess=PostprocessSettings(enabled=False))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout_runs")
    return {"ct": write_run(root / "ct", threshold_model()),
            "mri": write_run(root / "mri", threshold_model(modality="mri"), modality="mri")}


def _quiet(line):
    pass


@pytest.mark.parametrize("layout", SYNTH_LAYOUTS)
def test_each_layout_gets_a_mask_per_image_in_the_images_geometry(layout_phantoms, runs, tmp_path, layout):
    dataset = open_dataset(layout_phantoms / layout)
    images = [c for c in dataset.cases if Path(c.image).exists()]
    result = predict_path(runs[dataset.modality], layout_phantoms / layout, tmp_path, RAW, progress=_quiet)
    assert result.failures == []
    assert result.written == [tmp_path / mask_path(layout, c) for c in images]
    for case, written in zip(images, result.written):
        image, mask = load_image(case.image), nib.load(str(written))
        assert mask.shape == image.image.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-9)
        if dataset.modality == "ct":
            np.testing.assert_array_equal(load_volume(written).data, expected_ct_labels(image.data))


def _same_world(mask_a: Path, mask_b: Path):
    a, b = load_volume(mask_a), load_volume(mask_b)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(nib.as_closest_canonical(a.image).affine, nib.as_closest_canonical(b.image).affine,
                               atol=1e-6)
    assert a.data.any()


def test_a_dicom_series_mask_is_its_nifti_twins_mask_in_world_space(layout_phantoms, runs, tmp_path):
    # lits/volume-0 is stored RAS, its DICOM twin LPS: the masks are stored differently, the same in the world
    nifti = predict_path(runs["ct"], layout_phantoms / "lits" / "volume-0.nii", tmp_path / "n.nii.gz", progress=_quiet)
    dicom = predict_path(runs["ct"], layout_phantoms / "dicom" / "case00", tmp_path / "d.nii.gz", progress=_quiet)
    assert nifti.written == [tmp_path / "n.nii.gz"] and dicom.written == [tmp_path / "d.nii.gz"]
    assert nib.aff2axcodes(nib.load(str(tmp_path / "d.nii.gz")).affine) == ("L", "P", "S")
    _same_world(tmp_path / "n.nii.gz", tmp_path / "d.nii.gz")


def _oblique():
    angle = 0.4
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                               [0, 0, 1]]) @ np.diag([-0.8, -0.8, 2.5])
    affine[:3, 3] = (30.0, 10.0, -40.0)
    return affine


@pytest.mark.parametrize("affine, backwards", [(np.diag([-0.8, -0.8, 2.5, 1.0]), True), (_oblique(), False)])
def test_reversed_file_order_and_oblique_series_give_the_twins_world_mask(runs, tmp_path, affine, backwards):
    hu = ct_phantom((24, 20, 6))
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "twin.nii.gz"))
    names = [f"slice{k}" for k in range(hu.shape[2])]
    write_series(tmp_path / "series", hu.astype(np.int16), affine, SeriesTags("1.2.3.1", "1.2.3", intercept=-1024),
                 names=names[::-1] if backwards else names)
    for source, out in (("twin.nii.gz", "n.nii.gz"), ("series", "d.nii.gz")):
        assert predict_path(runs["ct"], tmp_path / source, tmp_path / out, progress=_quiet).written == [tmp_path / out]
    _same_world(tmp_path / "n.nii.gz", tmp_path / "d.nii.gz")
