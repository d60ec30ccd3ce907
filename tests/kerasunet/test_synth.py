import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from kerasunet.core.cases import find_cases
from kerasunet.core.nifti import load_volume
from kerasunet.synth import (
    CtSettings,
    MriSettings,
    Tissue,
    ct_phantom,
    mri_defects,
    mri_phantom,
    storage_axcodes,
    synth_dataset,
    synth_lits,
    synth_mri,
)

TINY_CT = CtSettings(64, (12, 24))
TINY_MRI = MriSettings((48, 40, 12))
HEALTHY_MRI = ["FZMC001", "FZMC003", "FZMC005", "FZMC006"]


def _ct_files(root, i):
    suffix = ".nii.gz" if i == 3 else ".nii"
    return root / "lits" / f"volume-{i}{suffix}", root / "lits" / f"segmentation-{i}{suffix}"


def test_lits_layout_dtypes_scaling_and_labels(tiny_phantoms):
    layout, cases = find_cases(tiny_phantoms / "lits")
    assert layout == "lits" and [c.case_id for c in cases] == [f"volume-{i}" for i in range(6)]
    assert cases[3].image.name == "volume-3.nii.gz" and cases[3].label.name == "segmentation-3.nii.gz"
    depths = set()
    for case in cases:
        image, label = nib.load(str(case.image)), nib.load(str(case.label))
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert (image.dataobj.slope, image.dataobj.inter) == (1.0, -1024.0)
        assert image.shape == label.shape and sorted(image.shape)[1:] == [64, 64]
        depth = min(image.shape)
        assert 12 <= depth <= 24
        depths.add(depth)
        values = set(np.unique(np.asarray(label.dataobj)).tolist())
        assert {0, 1} <= values <= {0, 1, 2}
        spacing = load_volume(case.image).spacing
        assert spacing[0] == spacing[1] != spacing[2]
        assert 0.6 * 8 <= spacing[0] <= 0.9 * 8  # 0.6-0.9 mm at 512, scaled by 512/64
    assert len(depths) > 1  # ragged slice counts, like LiTS


def test_mri_layout_dtypes_defects_and_intensities(tiny_phantoms):
    layout, cases = find_cases(tiny_phantoms / "mri")
    by_id = {c.case_id: c for c in cases}
    assert layout == "fzmc" and list(by_id) == [f"FZMC00{i}" for i in range(1, 7)]
    assert by_id["FZMC004"].label is None
    short = by_id["FZMC002"]
    assert nib.load(str(short.label)).shape == (48, 40, 11)
    assert nib.load(str(short.image)).shape == (48, 40, 12)
    assert by_id["FZMC005"].image.name == "artery.nii.gz"
    for case_id in HEALTHY_MRI:
        image, label = nib.load(str(by_id[case_id].image)), nib.load(str(by_id[case_id].label))
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert image.dataobj.slope != 1.0 and image.shape == label.shape
        assert set(np.unique(np.asarray(label.dataobj)).tolist()) <= {0, 1}
        bright = np.percentile(np.asarray(image.dataobj), 90)  # scaled by nibabel
        assert 100 < bright < 10_000  # arbitrary MR units, hundreds to thousands
    assert mri_defects(6) == {"FZMC002": "label has one slice fewer than the image",
                              "FZMC004": "no label file"}
    assert mri_defects(3) == {}


@pytest.mark.parametrize("relpath, axcodes, shape", [
    ("lits/volume-0.nii", ("R", "A", "S"), None),
    ("lits/volume-2.nii", ("L", "P", "S"), None),
    ("lits/volume-5.nii", ("P", "L", "I"), None),
    ("mri/FZMC001/artery.nii", ("R", "A", "S"), (48, 40, 12)),
    ("mri/FZMC003/artery.nii", ("L", "P", "S"), (48, 40, 12)),
    ("mri/FZMC003/label.nii", ("L", "P", "S"), (48, 40, 12)),
    ("mri/FZMC006/artery.nii", ("P", "L", "I"), (40, 48, 12)),
])
def test_stored_orientations(tiny_phantoms, relpath, axcodes, shape):
    image = nib.load(str(tiny_phantoms / relpath))
    assert nib.aff2axcodes(image.affine) == axcodes
    assert shape is None or image.shape == shape
    assert image.header.get_qform(coded=True)[1] == 1 and image.header.get_sform(coded=True)[1] == 1


def test_storage_axcodes_rule():
    assert [storage_axcodes(i) for i in range(6)] == [("R", "A", "S")] * 2 + [("L", "P", "S")] + \
        [("R", "A", "S")] * 2 + [("P", "L", "I")]


@pytest.mark.parametrize("i", range(6))
def test_ct_case_on_disk_is_the_phantom_after_canonicalisation(tiny_phantoms, i):
    phantom = ct_phantom(i, 0, TINY_CT)
    volume_path, label_path = _ct_files(tiny_phantoms, i)
    volume, label = load_volume(volume_path), load_volume(label_path, dtype=np.uint8)
    np.testing.assert_array_equal(volume.data, phantom.image)
    np.testing.assert_array_equal(label.data, phantom.label)
    np.testing.assert_allclose(volume.spacing, phantom.grid.spacing, rtol=1e-6)
    assert phantom.image.min() >= -1024 and phantom.image.max() <= 3071


@pytest.mark.parametrize("case_id", HEALTHY_MRI)
def test_mri_case_on_disk_is_the_phantom_after_canonicalisation(tiny_phantoms, case_id):
    phantom = mri_phantom(int(case_id[-3:]) - 1, 0, TINY_MRI)
    folder = tiny_phantoms / "mri" / case_id
    suffix = ".nii.gz" if case_id == "FZMC005" else ".nii"
    image, label = load_volume(folder / f"artery{suffix}"), load_volume(folder / f"label{suffix}", np.uint8)
    np.testing.assert_allclose(image.data, phantom.image, rtol=1e-6)
    np.testing.assert_array_equal(label.data, phantom.label)
    np.testing.assert_allclose(image.spacing, phantom.grid.spacing, rtol=1e-6)


def test_reoriented_case_has_the_same_anatomy_as_a_ras_copy(tmp_path):
    # volume-2 is stored LPS; canonicalising it must give the voxels a RAS copy would hold.
    synth_lits(tmp_path, 3, size=32, slices=(6, 6))
    stored = nib.load(str(tmp_path / "volume-2.nii"))
    ras = np.asarray(stored.dataobj.get_unscaled())[::-1, ::-1, :]
    np.testing.assert_array_equal(ras, ct_phantom(2, 0, CtSettings(32, (6, 6))).stored)
    np.testing.assert_array_equal(np.asarray(nib.as_closest_canonical(stored).dataobj), ras - 1024)


@pytest.mark.parametrize("i", range(6))
def test_liver_is_on_the_patient_right_on_a_contiguous_slice_range(tiny_phantoms, i):
    label = load_volume(_ct_files(tiny_phantoms, i)[1], dtype=np.uint8).data
    liver = label >= 1
    assert np.nonzero(liver)[0].mean() > (label.shape[0] - 1) / 2 + 2  # RAS: +x is the patient's right
    slices = np.nonzero(liver.any(axis=(0, 1)))[0]
    assert np.array_equal(slices, np.arange(slices[0], slices[-1] + 1))
    assert 0 < len(slices) < label.shape[2]  # slice selection sees liver and non-liver slices


@pytest.mark.parametrize("i", range(6))
def test_ct_tumours_are_surrounded_by_liver(tiny_phantoms, i):
    label = load_volume(_ct_files(tiny_phantoms, i)[1], dtype=np.uint8).data
    grown = ndimage.binary_dilation(label == 2)
    assert np.all(label[grown] >= 1)
    assert (label == 2).any() == (i != 4)  # volume-4 is the tumour-free case


def test_mri_tumours_lie_in_the_generated_liver_and_enhance():
    with_tumours = 0
    for i in range(6):
        phantom = mri_phantom(i, 0, TINY_MRI)
        tumour = phantom.label == 1
        assert not np.any(tumour & ~phantom.liver)
        if tumour.any():
            with_tumours += 1
            liver_only = phantom.liver & ~tumour
            assert phantom.image[tumour].mean() > 1.15 * phantom.image[liver_only].mean()
    assert with_tumours == 5  # all but FZMC005


def test_tumours_are_low_contrast_and_sizable(tiny_phantoms):
    differences = []
    for i in range(6):
        hu = load_volume(_ct_files(tiny_phantoms, i)[0]).data
        label = load_volume(_ct_files(tiny_phantoms, i)[1], dtype=np.uint8).data
        components, n = ndimage.label(label == 2)
        for k in range(1, n + 1):
            tumour = components == k
            differences.append(hu[tumour].mean() - hu[label == 1].mean())
            largest_slice = tumour.sum(axis=(0, 1)).max()
            assert largest_slice >= 12, f"volume-{i}: tumour of {largest_slice} px on its largest slice"
    assert len(differences) >= 5
    assert max(abs(d) for d in differences) < 50
    assert np.median(np.abs(differences)) > 8


def test_a_threshold_does_not_separate_liver(tiny_phantoms):
    in_range, not_liver = 0, 0
    for i in range(6):
        hu = load_volume(_ct_files(tiny_phantoms, i)[0]).data
        label = load_volume(_ct_files(tiny_phantoms, i)[1], dtype=np.uint8).data
        lo, hi = np.percentile(hu[label == 1], [10, 90])
        window = (hu >= lo) & (hu <= hi)
        in_range += window.sum()
        not_liver += (window & (label == 0)).sum()
    assert not_liver / in_range > 0.4  # spleen, kidneys and muscle share the liver's HU


@pytest.mark.parametrize("i", [0, 1])
def test_spleen_and_kidneys_overlap_the_liver_hu(i):
    phantom = ct_phantom(i, 0, TINY_CT)
    hu, tissue = phantom.image, phantom.tissue
    assert np.array_equal(tissue == Tissue.LIVER, phantom.liver)
    liver = hu[phantom.label == 1].mean()
    for organ in (Tissue.SPLEEN, Tissue.KIDNEY):
        assert (tissue == organ).sum() > 20
        assert abs(hu[tissue == organ].mean() - liver) < 60
    assert hu[tissue == Tissue.FAT].mean() < liver - 100  # fat is not in the liver's range


def _file_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    def run(name, seed):
        synth_dataset(tmp_path / name, 2, 4, size=32, mri_shape=(16, 16, 4), seed=seed,
                      compress={1}, ct_slices=(6, 8))
        return _file_bytes(tmp_path / name)

    first, again, other = run("a", 7), run("b", 7), run("c", 8)
    assert "lits/volume-1.nii.gz" in first and "mri/FZMC002/artery.nii.gz" in first
    assert first == again
    gz_header = first["lits/volume-1.nii.gz"][:10]
    assert gz_header[4:8] == bytes(4) and not gz_header[3] & 0x08  # no mtime, no file name
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if "volume" in name or "artery" in name)


def test_a_case_does_not_depend_on_the_number_of_cases(tmp_path):
    synth_lits(tmp_path / "one", 1, size=32, slices=(6, 8))
    synth_lits(tmp_path / "three", 3, size=32, slices=(6, 8))
    assert (tmp_path / "one/volume-0.nii").read_bytes() == (tmp_path / "three/volume-0.nii").read_bytes()


@pytest.mark.parametrize("size", [32, 33, 64])
def test_ct_shape_and_spacing_follow_size(size):
    phantom = ct_phantom(0, 0, CtSettings(size, (5, 5)))
    assert phantom.stored.shape == phantom.label.shape == (size, size, 5)
    field_of_view = size * phantom.grid.spacing[0]
    assert 0.6 * 512 <= field_of_view <= 0.9 * 512 + 1e-3  # anatomy keeps its physical size
    assert phantom.stored.dtype == np.int16 and phantom.label.dtype == np.uint8


def test_progress_reports_each_case(tmp_path):
    lines = []
    synth_mri(tmp_path, 4, shape=(16, 16, 4), progress=lines.append)
    assert len(lines) == 4
    assert lines[0].startswith("[mri 1/4] FZMC001/artery.nii 16x16x4")
    assert lines[2].startswith("[mri 3/4] FZMC003/artery.nii 16x16x4 LPS")
    assert re.search(r"\(no label file\)$", lines[3])


def test_rewriting_replaces_stale_files(tmp_path):
    synth_lits(tmp_path / "lits", 2, size=32, slices=(6, 6), compress=True)
    synth_lits(tmp_path / "lits", 2, size=32, slices=(6, 6), compress=False)
    assert sorted(p.name for p in (tmp_path / "lits").iterdir()) == [
        "segmentation-0.nii", "segmentation-1.nii", "volume-0.nii", "volume-1.nii"]
    stale = tmp_path / "mri" / "FZMC004" / "label.nii.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left over")
    synth_mri(tmp_path / "mri", 4, shape=(16, 16, 4))
    assert sorted(p.name for p in stale.parent.iterdir()) == ["artery.nii"]


def test_synth_dataset_layout_and_phase(tmp_path):
    written = synth_dataset(tmp_path, 0, 1, mri_shape=(16, 16, 4), phase="portal")
    assert written == {"lits": [], "mri": [tmp_path / "mri" / "FZMC001" / "portal.nii"]}
    assert (tmp_path / "mri" / "FZMC001" / "label.nii").exists() and not (tmp_path / "lits").exists()


@pytest.mark.parametrize("call, message", [
    (lambda d: synth_lits(d, 1, size=0), r"Expected 32 <= size <= 2048\. Received: size=0"),
    (lambda d: synth_lits(d, 1, size=31), r"Received: size=31"),
    (lambda d: synth_lits(d, 1, size=64.0), r"Received: size=64\.0"),
    (lambda d: synth_lits(d, 1, size=32, slices=(3, 5)),
     r"4 <= min <= max <= 2048\. Received: slices=\(3, 5\)"),
    (lambda d: synth_lits(d, 1, size=32, slices=(10, 5)), r"Received: slices=\(10, 5\)"),
    (lambda d: synth_lits(d, 0, size=32), r"Expected n_cases >= 1\. Received: n_cases=0"),
    (lambda d: synth_lits(d, 1, size=32, seed=-1), r"Expected seed >= 0\. Received: seed=-1"),
    (lambda d: synth_lits(d, 2, size=32, compress={2}),
     r"case indices in \[0, 2\)\. Received: compress=\{2\}"),
    (lambda d: synth_mri(d, 1, shape=(48, 40)), r"Expected shape=\(H, W, D\).*Received: shape=\(48, 40\)"),
    (lambda d: synth_mri(d, 1, shape=(8, 40, 12)), r"Received: shape=\(8, 40, 12\)"),
    (lambda d: synth_mri(d, 1, shape=(16, 16, 4), phase="a/b"), r"Expected phase .* Received: phase='a/b'"),
    (lambda d: synth_mri(d, 1, shape=(16, 16, 4), phase="label"), r"other than 'label'"),
    (lambda d: synth_dataset(d, 0, 0), r"at least one case\. Received: ct_cases=0, mri_cases=0"),
    (lambda d: synth_dataset(d, 1, 1, size=32, mri_shape=(1, 1, 1)), r"Received: shape=\(1, 1, 1\)"),
    (lambda d: synth_dataset(d, 3, 1, size=32, mri_shape=(16, 16, 4), compress={2}), r"Received: compress"),
])
def test_bad_settings_raise_clear_errors_and_write_nothing(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path / "out")
    assert not (tmp_path / "out").exists()
