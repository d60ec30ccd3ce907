"""Tests of kerasunet.dicom_seg: predict --output-format dicom-seg on a DICOM phantom series."""

import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest

from kerasunet.core.dicom import ordered_slices
from kerasunet.core.nifti import VolumeError
from kerasunet.dicom_seg import seg_jobs
from kerasunet.postprocess import PostprocessSettings
from kerasunet.predict import Job, PredictSettings, predict_path
from tests.helpers import threshold_model, write_run

RAW = PredictSettings(postprocess=PostprocessSettings(enabled=False))


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("seg_run") / "ct", threshold_model())


def test_the_seg_references_the_series_and_holds_the_nifti_mask_in_world_space(layout_phantoms, ct_run, tmp_path):
    import highdicom as hd

    series = layout_phantoms / "dicom" / "case01"
    predict_path(ct_run, series, tmp_path / "mask.nii.gz", RAW, progress=lambda line: None)
    seg_settings = PredictSettings(postprocess=RAW.postprocess, output_format="dicom-seg")
    result = predict_path(ct_run, series, tmp_path / "mask.nii.gz", seg_settings, progress=lambda line: None)
    assert result.written == [tmp_path / "mask.dcm"] and not result.failures

    seg = hd.seg.segread(str(tmp_path / "mask.dcm"))
    slices = ordered_slices(series)
    sources = [pydicom.dcmread(str(s.path), stop_before_pixels=True) for s in slices]
    uids = [s.SOPInstanceUID for s in sources]
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.SegmentationType == "BINARY" and [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "tumour"]
    assert {ref.ReferencedSOPInstanceUID for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == set(uids)
    per_frame = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID:
                 [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                 for f in seg.PerFrameFunctionalGroupsSequence}
    for source in sources:  # every frame lies on its source slice
        np.testing.assert_allclose(per_frame[source.SOPInstanceUID], [float(v) for v in source.ImagePositionPatient])

    mask = nib.load(str(tmp_path / "mask.nii.gz"))  # the NIfTI mask, in the series' twin order
    stored = np.asarray(mask.dataobj)
    assert {1, 2} <= set(np.unique(stored).tolist())
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])  # (slice, row, column, segment)
    np.testing.assert_array_equal(pixels[..., 0], (stored >= 1).transpose(2, 1, 0))
    np.testing.assert_array_equal(pixels[..., 1], (stored == 2).transpose(2, 1, 0))


def test_seg_output_needs_a_dicom_series_and_highdicom(layout_phantoms, tmp_path, monkeypatch):
    nifti = layout_phantoms / "lits" / "volume-0.nii"
    with pytest.raises(VolumeError, match=rf"^{nifti}: --output-format dicom-seg needs DICOM series input "):
        seg_jobs([Job("volume-0", nifti, tmp_path / "m.nii.gz")])
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if the dicom extra were not installed
    with pytest.raises(VolumeError, match=r"^--output-format dicom-seg needs highdicom, which is not installed "
                                          r"\(pip install kerasunet\[dicom\]\)$"):
        seg_jobs([Job("case01", layout_phantoms / "dicom" / "case01", tmp_path / "m.nii.gz")])
