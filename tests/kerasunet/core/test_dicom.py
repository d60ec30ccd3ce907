"""Tests of kerasunet.core.dicom: a DICOM series reads as the same world-space volume as its NIfTI twin."""

import re

import nibabel as nib
import numpy as np
import pytest

from kerasunet.core.dicom import DicomError, SeriesTags, list_series, read_series, write_series
from kerasunet.core.nifti import volume_from_image

SHAPE = (20, 16, 6)
# a CT stored as scanners store it: rows to the patient's left (LPS), 0.8 x 0.7 mm, 2.5 mm slices
LPS_AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, -0.7, 0, 25.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])


def _oblique(angle=0.35, tilt=0.2):
    """An affine rotated about z and x: no voxel axis lies along a world axis."""
    cz, sz, cx, sx = np.cos(angle), np.sin(angle), np.cos(tilt), np.sin(tilt)
    rotation = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.7, 2.5])
    affine[:3, 3] = (12.0, -30.0, 85.0)
    return affine


def _volume(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)


def _tags(n=1, description="venous", **kw):
    return SeriesTags(f"1.2.826.0.1.3680043.8.498.{n}", "1.2.826.0.1.3680043.8.498.99", description, **kw)


def _twin(data, affine):
    return volume_from_image(nib.Nifti1Image(data.astype(np.float32), affine), "twin.nii")


@pytest.mark.parametrize("affine, names", [
    (LPS_AFFINE, None),
    (LPS_AFFINE, [f"z{9 - k}" for k in range(SHAPE[2])]),  # file names in reverse slice order
    (np.diag([0.8, 0.7, -2.5, 1.0]), [f"{k:02d}" for k in range(SHAPE[2])]),  # slices running feet-wards
    (_oblique(), [f"IM{k}" for k in (3, 0, 5, 1, 4, 2)]),  # oblique, names shuffled
])
def test_series_reads_as_its_nifti_twin_in_world_space(tmp_path, affine, names):
    data = _volume()
    write_series(tmp_path / "series", data, affine, _tags(intercept=-1024), names=names)
    image = read_series(tmp_path / "series")
    if np.linalg.det(affine[:3, :3]) > 0:  # slices stored along the normal: read in the very same voxel order
        np.testing.assert_allclose(image.affine, affine, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(image.dataobj), data)
    else:  # stored against it (the third case): read in the other slice order, the same world
        np.testing.assert_array_equal(np.asarray(image.dataobj), data[:, :, ::-1])
    volume, twin = volume_from_image(image, tmp_path / "series"), _twin(data, affine)
    np.testing.assert_array_equal(volume.data, twin.data)
    assert volume.spacing == twin.spacing
    np.testing.assert_allclose(nib.as_closest_canonical(volume.image).affine,
                               nib.as_closest_canonical(twin.image).affine, atol=1e-9)


@pytest.mark.parametrize("slope, intercept", [(1.0, -1024.0), (2.0, -1000.0)])
def test_rescale_slope_and_intercept_are_applied(tmp_path, slope, intercept):
    pydicom = pytest.importorskip("pydicom")
    data = (_volume() // 2 * 2).astype(np.int16)  # even: (value - intercept) / slope is a whole number
    files = write_series(tmp_path, data, LPS_AFFINE, _tags(intercept=intercept, slope=slope))
    stored = pydicom.dcmread(files[0])
    assert (float(stored.RescaleSlope), float(stored.RescaleIntercept)) == (slope, intercept)
    np.testing.assert_array_equal(stored.pixel_array.T, (data[:, :, 0] - intercept) / slope)  # stored != HU
    np.testing.assert_array_equal(np.asarray(read_series(tmp_path).dataobj), data)


def test_several_series_need_a_uid_and_the_error_lists_them(tmp_path):
    first, second = _volume(1), _volume(2)
    write_series(tmp_path, first, LPS_AFFINE, _tags(1, "arterial"), names=[f"a{k}" for k in range(6)])
    write_series(tmp_path, second, LPS_AFFINE, _tags(2, "portal venous"), names=[f"b{k}" for k in range(6)])
    uid1, uid2 = _tags(1).series_uid, _tags(2).series_uid
    message = (f"{tmp_path}: holds 2 image series; choose one with --series UID: {uid1} (arterial, CT, 6 slices); "
               f"{uid2} (portal venous, CT, 6 slices)")
    with pytest.raises(DicomError, match=f"^{re.escape(message)}$"):
        read_series(tmp_path)
    np.testing.assert_array_equal(np.asarray(read_series(tmp_path, uid2).dataobj), second)
    np.testing.assert_array_equal(np.asarray(read_series(tmp_path, uid1).dataobj), first)
    unknown = rf"^{re.escape(str(tmp_path))}: no series 1\.2\.3; it holds {re.escape(uid1)} "
    with pytest.raises(DicomError, match=unknown):
        read_series(tmp_path, "1.2.3")


def _gap(folder):
    write_series(folder, _volume(), LPS_AFFINE, _tags())
    (folder / "IM00003").unlink()


def _mixed_sizes(folder):
    write_series(folder, _volume(), LPS_AFFINE, _tags())
    shifted = LPS_AFFINE.copy()
    shifted[2, 3] += 6 * 2.5  # the next position, but a smaller slice
    write_series(folder, _volume(shape=(10, 16, 1)), shifted, _tags(), names=["IM00007"])


def _tilt(folder):
    # each slice 0.5 mm further along y than the one below: the stack leans like a tilted gantry
    positions = [(-40.0, -25.0 + 0.5 * k, -60.0 + 2.5 * k) for k in range(SHAPE[2])]
    write_series(folder, _volume(), LPS_AFFINE, _tags(), positions=positions)


def _duplicate(folder):
    positions = [(-40.0, -25.0, -60.0 + 2.5 * min(k, 4)) for k in range(SHAPE[2])]
    write_series(folder, _volume(), LPS_AFFINE, _tags(), positions=positions)


def _uneven(folder):
    positions = [(-40.0, -25.0, -60.0 + 2.5 * k + (0.8 if k >= 3 else 0)) for k in range(SHAPE[2])]
    write_series(folder, _volume(), LPS_AFFINE, _tags(), positions=positions)


@pytest.mark.parametrize("make, message", [
    (_gap, r"missing slices: a gap of 5 mm between IM00002 and IM00004 \(the series steps 2\.5 mm\)$"),
    (_mixed_sizes, r"mixed slice sizes 16x10 and 16x20 in one series$"),
    (_tilt, r"gantry tilt: slice positions run 11\.31 degrees off the slice normal; resample the series"),
    (_duplicate, r"two slices at one position \(IM00005 and IM00006\); is it two acquisitions in one series\?$"),
    (_uneven, r"uneven slice spacing: a step of 3\.3 mm between IM00003 and IM00004 \(the series steps 2\.5 mm\)$"),
    (lambda folder: write_series(folder, _volume(shape=(20, 16, 1)), LPS_AFFINE, _tags()),
     r"the series has one slice, not a volume$"),
    (lambda folder: folder.mkdir(), r"no DICOM image series \(non-image objects and other files are ignored\)$"),
])
def test_a_series_that_is_not_one_grid_is_one_clear_error(tmp_path, make, message):
    make(tmp_path / "s")
    with pytest.raises(DicomError, match=f"^{re.escape(str(tmp_path / 's'))}: {message}"):
        read_series(tmp_path / "s")


def _sr(path):
    """A Basic Text SR: a DICOM object without pixels, in the series' folder."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID = meta, meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "SR", generate_uid(), generate_uid()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).Modality == "SR"


def _seg(folder, files):
    """A DICOM Segmentation (highdicom) of the series, saved beside it."""
    hd = pytest.importorskip("highdicom")
    import pydicom

    sources = [pydicom.dcmread(f) for f in files]
    mask = np.zeros((len(files), *sources[0].pixel_array.shape), bool)
    mask[1:3, 2:6, 3:9] = True
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="liver", algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("10200004", "SCT", "Liver"))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="kerasunet", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0")
    seg.save_as(folder / "segmentation.dcm")


def test_non_image_objects_and_other_files_are_ignored(tmp_path):
    data = _volume()
    files = write_series(tmp_path, data, LPS_AFFINE, _tags())
    _sr(tmp_path / "report.dcm")
    _seg(tmp_path, files)
    (tmp_path / "README.txt").write_text("exported by a PACS")
    (tmp_path / "._IM00001").write_bytes(b"\x00\x05\x16\x07" + bytes(200))
    assert [(s.uid, len(s.files)) for s in list_series(tmp_path)] == [(_tags().series_uid, SHAPE[2])]
    np.testing.assert_array_equal(np.asarray(read_series(tmp_path).dataobj), data)


def test_files_without_a_preamble_or_extension_are_dicom_too(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from kerasunet.core.dicom import holds_dicom, is_dicom_file

    data = _volume()
    for path in write_series(tmp_path / "part10", data, LPS_AFFINE, _tags(intercept=-1024)):
        dataset = pydicom.dcmread(path)
        dataset.preamble = None  # as old exports (ACR-NEMA style) write them: no 128 bytes + "DICM"
        (tmp_path / "old").mkdir(exist_ok=True)
        pydicom.dcmwrite(tmp_path / "old" / path.name, dataset, enforce_file_format=False)
    assert not is_dicom_file(tmp_path / "old" / "IM00001") and holds_dicom(tmp_path / "old")
    assert not holds_dicom(tmp_path)  # the folders hold the files, not tmp_path itself
    np.testing.assert_array_equal(np.asarray(read_series(tmp_path / "old").dataobj), data)
