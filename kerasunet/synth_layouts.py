"""Phantoms in every dataset layout kerasunet reads, so every reader is tested on the files it will meet.

The anatomy comes from ``kerasunet.synth``: CT layouts write ``ct_phantom(i)``, MRI layouts
``mri_phantom(i)``, so a case of one layout is voxel for voxel the same case in another (the
``dicom`` series of case ``i`` is the twin of ``lits/volume-i``). Layouts (``OUT`` is the
folder given)::

    lits    OUT/volume-N.nii, segmentation-N.nii                          (synth.synth_lits)
    fzmc    OUT/FZMC00K/<phase>.nii, label.nii: tumour 0/1                (synth.synth_mri)
    msd     OUT/imagesTr/liver_N.nii.gz, labelsTr/liver_N.nii.gz (0/1/2), dataset.json
            (value -> name, "cancer"), macOS ._liver_N.nii.gz resource forks beside
            each file, and the last case (from 3 cases) in imagesTs/ without a label
    nnunet  OUT/imagesTr/liver_NNN_0000.nii.gz (channel suffix), labelsTr/liver_NNN.nii.gz,
            dataset.json (nnU-Net v2: channel_names, name -> value, file_ending)
    atlas   OUT/imagesTr/imN.nii.gz, labelsTr/lbN.nii.gz: MRI, 0 bg, 1 liver, 2 tumour
    ircadb  OUT/3Dircadb1.K/PATIENT_DICOM/image_J (CT series, files without extension, the
            first file the highest slice), MASKS_DICOM/<structure>/image_J (0/255): liver,
            livertumor01.. (one per tumour), liverkyst (a cyst: not tumour), spleen
    dicom   OUT/caseNN/IM00001.. (CT series, LPS like a scanner writes it; odd cases name their
            files in reverse slice order) with label.nii.gz beside the files (0/1/2)

DICOM series are written by ``kerasunet.core.dicom.write_series`` with real position,
orientation and rescale tags (HU stored with intercept -1024, as scanners do).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

from kerasunet.core.dicom import SeriesTags, write_series
from kerasunet.synth import (
    HU_STORED_INTERCEPT,
    CtSettings,
    MriSettings,
    Phantom,
    Progress,
    Tissue,
    _check_run,
    _nifti,
    _report,
    _save,
    ct_phantom,
    mri_phantom,
    synth_lits,
    synth_mri,
)

CT_LAYOUTS = ("lits", "msd", "nnunet", "ircadb", "dicom")
MRI_LAYOUTS = ("fzmc", "atlas")
SYNTH_LAYOUTS = ("lits", "fzmc", "msd", "nnunet", "atlas", "ircadb", "dicom")
DICOM_AXCODES = ("L", "P", "S")  # rows run to the patient's left, columns to the back, as CT is stored
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # the header of a ._ resource fork
MSD_LABELS = {"0": "background", "1": "liver", "2": "cancer"}
NNUNET_LABELS = {"background": 0, "liver": 1, "tumor": 2}
CYST_RADIUS_VOXELS = 2


def layout_modality(layout: str) -> str:
    """"ct" or "mri": the phantoms a synthetic layout holds."""
    if layout not in SYNTH_LAYOUTS:
        raise ValueError(f"Expected layout in {SYNTH_LAYOUTS}. Received: layout={layout!r}")
    return "ct" if layout in CT_LAYOUTS else "mri"


def synth_layout(layout: str, out_dir: str | Path, n_cases: int, seed: int = 0, ct: CtSettings = CtSettings(),
                 mri: MriSettings = MriSettings(), compress: bool = False, progress: Progress = None) -> list[Path]:
    """Writes ``n_cases`` phantoms in ``layout`` (module docstring) under ``out_dir``.

    Args:
        layout: one of :data:`SYNTH_LAYOUTS`.
        out_dir: the dataset folder (created if missing); files of the same names are replaced.
        n_cases: number of cases, index 0 .. n_cases - 1.
        seed: the same seed gives the same phantoms in every layout.
        ct: CT phantom settings (CT layouts).
        mri: MRI phantom settings (MRI layouts).
        compress: ``.nii.gz`` in the lits and fzmc layouts (the others always write ``.nii.gz``).
        progress: called with one line per case.

    Returns:
        The image files (or DICOM series folders) written, in case order.

    Raises:
        ValueError: a setting is out of range.
    """
    layout_modality(layout)
    _check_run(n_cases, seed, False)
    out_dir = Path(out_dir)
    if layout == "lits":
        return synth_lits(out_dir, n_cases, ct.size, seed, compress, ct.slices, progress)
    if layout == "fzmc":
        return synth_mri(out_dir, n_cases, mri.shape, seed, mri.phase, compress, progress)
    writer = {"msd": _msd_case, "nnunet": _nnunet_case, "atlas": _atlas_case, "ircadb": _ircadb_case,
              "dicom": _dicom_case}[layout]
    written = []
    for i in range(n_cases):
        phantom = ct_phantom(i, seed, ct) if layout in CT_LAYOUTS else mri_phantom(i, seed, mri)
        written.append(writer(out_dir, i, n_cases, phantom, seed))
        _report(progress, f"[{layout} {i + 1}/{n_cases}] {written[-1].relative_to(out_dir)} "
                          f"{'x'.join(map(str, phantom.grid.shape))}, {phantom.n_tumours} tumour(s)")
    if layout == "msd":
        _write_msd_json(out_dir, n_cases)
    if layout == "nnunet":
        _write_json(out_dir / "dataset.json", {"channel_names": {"0": "CT"}, "labels": NNUNET_LABELS,
                                              "numTraining": n_cases, "file_ending": ".nii.gz",
                                              "name": "kerasunet phantoms"})
    return written


def _write_json(path: Path, obj) -> None:
    _save_bytes(path, (json.dumps(obj, indent=4) + "\n").encode())


def _save_bytes(path: Path, data: bytes) -> None:
    from kerasunet.core.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _nifti_pair(phantom: Phantom, image: Path, label: Path | None, label_data: np.ndarray) -> Path:
    _save(_nifti(phantom.stored, phantom, ("R", "A", "S")), image)
    if label is not None:
        _save(_nifti(label_data, phantom, ("R", "A", "S"), dtype=np.uint8), label)
    return image


def _msd_case(out: Path, i: int, n_cases: int, phantom: Phantom, seed: int) -> Path:
    test = n_cases >= 3 and i == n_cases - 1  # MSD keeps its test images apart, unlabelled
    images = out / ("imagesTs" if test else "imagesTr")
    image = _nifti_pair(phantom, images / f"liver_{i}.nii.gz", None if test else out / "labelsTr" / f"liver_{i}.nii.gz",
                        phantom.label)
    for folder in (images, *(() if test else (out / "labelsTr",))):  # what tar on macOS leaves behind
        _save_bytes(folder / f"._liver_{i}.nii.gz", APPLE_DOUBLE.ljust(4096, b"\x00"))
    return image


def _write_msd_json(out: Path, n_cases: int) -> None:
    test = {n_cases - 1} if n_cases >= 3 else set()
    _write_json(out / "dataset.json", {
        "name": "Liver", "description": "kerasunet phantoms in the Task03_Liver layout", "tensorImageSize": "3D",
        "modality": {"0": "CT"}, "labels": MSD_LABELS, "numTraining": n_cases - len(test), "numTest": len(test),
        "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
                     for i in range(n_cases) if i not in test],
        "test": [f"./imagesTs/liver_{i}.nii.gz" for i in sorted(test)]})


def _nnunet_case(out: Path, i: int, n_cases: int, phantom: Phantom, seed: int) -> Path:
    return _nifti_pair(phantom, out / "imagesTr" / f"liver_{i:03d}_0000.nii.gz",
                       out / "labelsTr" / f"liver_{i:03d}.nii.gz", phantom.label)


def atlas_label(phantom: Phantom) -> np.ndarray:
    """The ATLAS label of an MRI phantom: 1 liver (without its tumours), 2 tumour."""
    label = phantom.liver.astype(np.uint8)
    label[phantom.label > 0] = 2
    return label


def _atlas_case(out: Path, i: int, n_cases: int, phantom: Phantom, seed: int) -> Path:
    return _nifti_pair(phantom, out / "imagesTr" / f"im{i}.nii.gz", out / "labelsTr" / f"lb{i}.nii.gz",
                       atlas_label(phantom))


def _uid(*parts) -> str:
    """A deterministic DICOM UID (the 2.25 root takes a UUID as a decimal number)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(map(str, parts))).int}"


def _lps(phantom: Phantom, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` (canonical RAS order) and its affine, stored in DICOM's usual LPS voxel order."""
    image = _nifti(data, phantom, DICOM_AXCODES, dtype=data.dtype)
    return np.asarray(image.dataobj), image.affine


def _hu(phantom: Phantom) -> np.ndarray:
    return np.rint(phantom.image).astype(np.int16)


def _dicom_case(out: Path, i: int, n_cases: int, phantom: Phantom, seed: int) -> Path:
    folder = out / f"case{i:02d}"
    data, affine = _lps(phantom, _hu(phantom))
    names = [f"IM{k + 1:05d}" for k in range(data.shape[2])]
    tags = SeriesTags(_uid("dicom", seed, i), _uid("dicom-study", seed, i), f"phantom CT {i}",
                      intercept=HU_STORED_INTERCEPT)
    write_series(folder, data, affine, tags, names=names[::-1] if i % 2 else names)
    _save(_nifti(phantom.label, phantom, ("R", "A", "S"), dtype=np.uint8), folder / "label.nii.gz")
    return folder


def ircadb_masks(phantom: Phantom) -> dict[str, np.ndarray]:
    """The 3D-IRCADb mask folders of a CT phantom (canonical order, bool): liver, tumours, a cyst, spleen."""
    masks = {"liver": phantom.liver}
    tumour = phantom.label == 2
    if tumour.any():
        from scipy import ndimage

        parts, n = ndimage.label(tumour)
        for k in range(1, n + 1):
            masks[f"livertumor{k:02d}"] = parts == k
    masks["liverkyst"] = _cyst(phantom)
    masks["spleen"] = phantom.tissue == Tissue.SPLEEN
    return masks


def _cyst(phantom: Phantom) -> np.ndarray:
    """A small blob of liver, as deep inside the tumour-free liver as can be: labelled, but not tumour."""
    from scipy import ndimage

    liver = phantom.label == 1
    cyst = np.zeros(liver.shape, bool)
    if liver.any():
        centre = np.unravel_index(np.argmax(ndimage.distance_transform_edt(liver)), liver.shape)
        cyst[tuple(slice(max(c - CYST_RADIUS_VOXELS, 0), c + CYST_RADIUS_VOXELS + 1) for c in centre[:2])
             + (centre[2],)] = True
    return cyst & liver


def _ircadb_case(out: Path, i: int, n_cases: int, phantom: Phantom, seed: int) -> Path:
    patient = out / f"3Dircadb1.{i + 1}"
    data, affine = _lps(phantom, _hu(phantom))
    # IRCADb names its files image_0 .. without extension; here image_0 is the highest slice
    names = [f"image_{k}" for k in range(data.shape[2])][::-1]
    write_series(patient / "PATIENT_DICOM", data, affine,
                 SeriesTags(_uid("ircadb", seed, i), _uid("ircadb-study", seed, i), "PATIENT_DICOM",
                            intercept=HU_STORED_INTERCEPT), names=names)
    for m, (name, mask) in enumerate(ircadb_masks(phantom).items()):
        mask_data, _ = _lps(phantom, (mask * 255).astype(np.uint8))
        write_series(patient / "MASKS_DICOM" / name, mask_data, affine,
                     SeriesTags(_uid("ircadb", seed, i, name), _uid("ircadb-study", seed, i), name), names=names)
    return patient / "PATIENT_DICOM"
