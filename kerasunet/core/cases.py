"""What a case is: its files, how each dataset layout lists them, and the one loader with its checks.

Build, evaluate and predict read cases through this module, so a volume one of them accepts
is accepted by the others:

* image checks (:func:`load_image`; predict uses them alone, as its inputs have no label):
  the file (or DICOM series folder, ``kerasunet.core.dicom``) is readable, 3D, and every
  voxel is finite;
* label checks (:func:`load_case`, used by ``build-records`` and ``evaluate``): the image
  and label exist and are readable, have one shape, the label is finite, integer within
  :data:`LABEL_ROUNDING_TOLERANCE`, and holds only its dataset's values.

Labels are read by structure (``kerasunet.core.labels``): each case carries a ``label_map``
from its dataset's label values (or, for 3D-IRCADb, its mask folders) to structures, and each
layout says which structures its labels hold (:attr:`Dataset.outputs`: LiTS, MSD Task03,
ATLAS and 3D-IRCADb liver and tumour; FZMC tumour; MSD / nnU-Net the structures their
dataset.json names). The loader turns the labels into the project's values for the structures
asked for (``labels.label_values``: liver 1 / tumour 2, or tumour 1 for tumour-only outputs;
a structure not asked for reads as background). A failed check raises :class:`CaseError`,
whose message is the one-line reason a batch records for that case before it goes on with
the others.

Layouts: :data:`LAYOUTS` maps a layout name to its finder, modality, detection test and mask
naming; ``mri`` is an alias of ``fzmc``. :func:`open_dataset` lists a folder's cases in a
named layout, or in the first layout of :data:`DETECTION_ORDER` whose test matches; when none
does, one line says what was looked for. Each layout lists label-only cases too, so a build
skips them with a reason ("image missing"); predict ignores them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from kerasunet.core.dicom import DicomError, holds_dicom, list_series, read_series
from kerasunet.core.labels import OUTPUTS, STRUCTURES, as_outputs, label_values, structure_of
from kerasunet.core.nifti import NIFTI_SUFFIXES, Volume, VolumeError, load_volume, volume_from_image

# stored labels may be floats a little off an integer (resampling, float storage)
LABEL_ROUNDING_TOLERANCE = 1e-3
MISSING_LABEL = "label missing"
MISSING_IMAGE = "image missing"
DATASET_JSON = "dataset.json"
ATLAS_LABEL_MAP = ((1, "liver"), (2, "tumour"))  # ATLAS 2023: 0 background, 1 liver, 2 tumour
# the structures the labels of the fixed layouts hold (MSD / nnU-Net: their dataset.json; DICOM: the modality's)
LITS_OUTPUTS = ATLAS_OUTPUTS = IRCADB_OUTPUTS = ("liver", "tumour")
FZMC_OUTPUTS = ("tumour",)
DICOM_MODALITIES = {"CT": "ct", "MR": "mri"}
# the keys of a case in a records manifest (build state), written by case_entry, read by case_from_entry
CASE_ENTRY_KEYS = ("image", "label", "label_map", "series")

LabelMap = tuple[tuple[int | str, str | None], ...]


def project_label_map(outputs) -> LabelMap:
    """The label map of files that hold the project's values for ``outputs`` (LiTS, FZMC, DICOM + label.nii)."""
    return tuple((v, s) for s, v in label_values(as_outputs(outputs)).items())


class CaseError(VolumeError):
    """A case (or input volume) that cannot be used; ``str(exc)`` is the one-line reason.

    Unreadable files give a reason that starts with the file's path; the content checks give
    a reason alone (``"image contains NaN/Inf"``), reported next to the case or file.
    """


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    Attributes:
        case_id: unique within its dataset.
        image: a NIfTI file, or a folder holding a DICOM series.
        label: a NIfTI label map, a folder of mask series (3D-IRCADb ``MASKS_DICOM``), or
            None when the case has no label.
        label_map: ``((value or mask folder, structure or None), ...)``: what the label holds.
            None: the project's values of the layout's outputs (:func:`project_label_map`).
        series: the SeriesInstanceUID to read when the image folder holds several series.
    """

    case_id: str
    image: Path
    label: Path | None
    label_map: LabelMap | None = None
    series: str | None = None


def case_entry(files: CaseFiles) -> dict:
    """The JSON-ready record of a case's files (``CASE_ENTRY_KEYS``), for manifests."""
    label_map = None if files.label_map is None else [list(pair) for pair in files.label_map]
    return {"image": str(Path(files.image).resolve()),
            "label": None if files.label is None else str(Path(files.label).resolve()),
            "label_map": label_map, "series": files.series}


def case_from_entry(case_id: str, entry: dict) -> CaseFiles:
    """The ``CaseFiles`` of a manifest record written by :func:`case_entry` (older ones lack the map)."""
    label_map = entry.get("label_map")
    return CaseFiles(case_id, Path(entry["image"]), Path(entry["label"]) if entry.get("label") else None,
                     None if label_map is None else tuple(tuple(pair) for pair in label_map), entry.get("series"))


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _sorted(cases: list[CaseFiles]) -> list[CaseFiles]:
    return sorted(cases, key=lambda c: _natural_key(c.case_id))


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    return None


def _visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` without hidden ones: macOS ``._name`` resource forks, ``.DS_Store``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _nifti_stems(folder: Path, pattern: str) -> dict[str, Path]:
    """``{match group 1: path}`` of the NIfTI files in ``folder`` whose stem fully matches ``pattern``."""
    found = {}
    for path in _visible(folder):
        match = re.fullmatch(rf"{pattern}\.nii(\.gz)?", path.name)
        if match and path.is_file():
            found[match.group(1)] = path
    return found


# --------------------------------------------------------------------------- finders


def find_lits_cases(root: Path, phase: str = "artery", series: str | None = None) -> list[CaseFiles]:
    """LiTS: ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]``, in numeric order."""
    images, labels = _nifti_stems(root, r"volume-(\d+)"), _nifti_stems(root, r"segmentation-(\d+)")
    return _sorted([CaseFiles(f"volume-{n}", images.get(n, root / f"volume-{n}.nii"), labels.get(n),
                              project_label_map(LITS_OUTPUTS)) for n in images.keys() | labels.keys()])


def find_fzmc_cases(root: Path, phase: str = "artery", series: str | None = None) -> list[CaseFiles]:
    """FZMC MRI: one folder per case holding ``<phase>.nii[.gz]`` and ``label.nii[.gz]`` (tumour 0/1).

    Folders without the phase image are not cases and are ignored.
    """
    cases = []
    for folder in _visible(root):
        image = _find_nifti(folder, phase) if folder.is_dir() else None
        if image is not None:
            label = _find_nifti(folder, "label")
            cases.append(CaseFiles(folder.name, image, label, project_label_map(FZMC_OUTPUTS)))
    return _sorted(cases)


def _paired_cases(root: Path, image_re: str, label_re: str, image_name: Callable[[str], str],
                  label_map: LabelMap) -> list[CaseFiles]:
    """Cases of ``imagesTr``/``labelsTr`` (label-only ones included) and unlabelled ``imagesTs``."""
    cases = []
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        images, labels = _nifti_stems(root / images_dir, image_re), _nifti_stems(root / labels_dir, label_re)
        for case in images.keys() | labels.keys():
            image = images.get(case, root / images_dir / image_name(case))
            cases.append(CaseFiles(case, image, labels.get(case), label_map))
    return _sorted(cases)


def read_dataset_json(root: Path) -> dict:
    """The dataset.json of an MSD / nnU-Net dataset, checked: modality, label map, file ending.

    Both label forms are read: MSD and nnU-Net v1 map value -> name (``{"1": "liver"}``),
    nnU-Net v2 maps name -> value (``{"liver": 1}``, regions as lists of values). Names are
    read as structures by ``labels.structure_of``; a value in a tumour region is tumour.

    Returns:
        ``{"modality": "ct" | "mri", "label_map": LabelMap, "outputs": the structures the labels
        hold (``("liver", "tumour")``, ``("tumour",)``, ``("liver",)``), "ending": ".nii.gz" |
        ".nii", "channel_suffix": bool (v2 always; v1 when the images end in _0000)}``.

    Raises:
        VolumeError: the file is missing or does not parse, has not one image channel, an
            ending other than NIfTI, or no liver or tumour label.
    """
    path = root / DATASET_JSON
    try:
        meta = json.loads(path.read_text())
        channels = meta.get("channel_names", meta.get("modality"))
        raw_labels = meta["labels"]
    except FileNotFoundError:
        raise VolumeError(f"{path}: file not found (the dataset's modality and labels are read from it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VolumeError(f"{path}: not valid JSON ({exc})") from None
    except (KeyError, AttributeError, TypeError):
        raise VolumeError(f"{path}: no \"labels\" map") from None
    if not isinstance(channels, dict) or len(channels) != 1:
        raise VolumeError(f"{path}: Expected one image channel (kerasunet models take one image). "
                          f"Received: {'channel_names' if 'channel_names' in meta else 'modality'}={channels!r}")
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_SUFFIXES:
        raise VolumeError(f"{path}: Expected file_ending .nii.gz or .nii. Received: file_ending={ending!r}")
    modality = "ct" if str(next(iter(channels.values()))).strip().upper() == "CT" else "mri"
    label_map = _labels_by_structure(path, raw_labels)
    held = {s for _, s in label_map if s}
    if not held:
        names = ", ".join(map(str, raw_labels.values() if _value_first(raw_labels) else raw_labels))
        raise VolumeError(f"{path}: no liver or tumour label (labels: {names}); kerasunet reads labels named "
                          "liver, and tumour, tumor, lesion or cancer")
    v2 = "channel_names" in meta
    images = [p.name for p in _visible(root / "imagesTr")]
    suffixed = v2 or (bool(images) and all(re.search(r"_\d{4}\.nii(\.gz)?$", n) for n in images))
    return {"modality": modality, "label_map": label_map, "outputs": tuple(s for s in STRUCTURES if s in held),
            "ending": ending, "channel_suffix": suffixed}


def _value_first(raw_labels: dict) -> bool:
    return all(str(k).strip().isdigit() for k in raw_labels)


def _labels_by_structure(path: Path, raw_labels) -> LabelMap:
    if not isinstance(raw_labels, dict):
        raise VolumeError(f"{path}: \"labels\" is not a map")
    pairs = raw_labels.items() if not _value_first(raw_labels) else ((n, k) for k, n in raw_labels.items())
    structure_of_value: dict[int, str | None] = {}
    try:
        for name, values in pairs:
            structure = structure_of(name)
            for value in values if isinstance(values, list) else [values]:
                value = int(value)
                if value != 0 and (structure == "tumour" or structure_of_value.get(value) is None):
                    structure_of_value[value] = structure
    except (TypeError, ValueError):
        raise VolumeError(f"{path}: label values must be integers (or lists of them)") from None
    return tuple(sorted(structure_of_value.items()))


def _find_decathlon(root: Path, phase: str = "artery", series: str | None = None) -> list[CaseFiles]:
    """MSD / nnU-Net (v1, v2): ``imagesTr/CASE[_0000].nii.gz`` + ``labelsTr/CASE.nii.gz`` + dataset.json."""
    if not _has_images(root) and not (root / "labelsTr").is_dir():
        return []
    meta = read_dataset_json(root)  # both NIfTI endings are read; file_ending names the one written
    if meta["channel_suffix"]:
        return _paired_cases(root, r"(.+)_0000", r"(.+)", lambda c: f"{c}_0000{meta['ending']}", meta["label_map"])
    return _paired_cases(root, r"(.+)", r"(.+)", lambda c: f"{c}{meta['ending']}", meta["label_map"])


def find_atlas_cases(root: Path, phase: str = "artery", series: str | None = None) -> list[CaseFiles]:
    """ATLAS 2023: ``imagesTr/imN.nii.gz`` with ``labelsTr/lbN.nii.gz`` (0 bg, 1 liver, 2 tumour)."""
    found = _paired_cases(root, r"im(\d+)", r"lb(\d+)", lambda n: f"im{n}.nii.gz", ATLAS_LABEL_MAP)
    return [CaseFiles(f"im{c.case_id}", c.image, c.label, c.label_map) for c in found]


def ircadb_structure(name: str) -> str | None:
    """The structure of a 3D-IRCADb mask folder: ``liver``; ``livertumor*``/``tumor*`` tumour; else None.

    Cysts (``liverkyst``, ``livercyst``) are not tumour; other organs and vessels are ignored.
    """
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key == "liver":
        return "liver"
    if key.startswith(("livertumor", "livertumour", "tumor", "tumour")):
        return "tumour"
    return None


def find_ircadb_cases(root: Path, phase: str = "artery", series: str | None = None) -> list[CaseFiles]:
    """3D-IRCADb: ``PATIENT/PATIENT_DICOM/`` (one series) with ``PATIENT/MASKS_DICOM/<structure>/`` series.

    ``root`` is the folder of patient folders, or one patient folder.
    """
    patients = [root] if (root / "PATIENT_DICOM").is_dir() else [
        p for p in _visible(root) if (p / "PATIENT_DICOM").is_dir()]
    cases = []
    for patient in patients:
        masks = patient / "MASKS_DICOM"
        label_map = tuple((m.name, ircadb_structure(m.name)) for m in _visible(masks)
                          if m.is_dir() and ircadb_structure(m.name))
        cases.append(CaseFiles(patient.name, patient / "PATIENT_DICOM", masks if masks.is_dir() else None,
                               label_map, series))
    return _sorted(cases)


def find_dicom_cases(root: Path, phase: str = "artery", series: str | None = None) -> list[CaseFiles]:
    """DICOM: every folder (``root`` or below) directly holding DICOM files is one case.

    The case id is the folder's path below ``root`` with ``_`` for ``/`` (``root``'s own name
    when ``root`` holds the series); an optional ``label.nii[.gz]`` beside the files holds the
    project's label values of the series' modality.
    """
    cases = []
    for folder, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        folder = Path(folder)
        if holds_dicom(folder):
            case_id = root.name if folder == root else "_".join(folder.relative_to(root).parts)
            cases.append(CaseFiles(case_id, folder, _find_nifti(folder, "label"), None, series))
    return _sorted(cases)


# --------------------------------------------------------------------------- layouts


def _dicom_modality(root: Path, cases: list[CaseFiles]) -> str:
    """ct or mri, from the DICOM Modality of the first image series found in the cases' folders."""
    for case in cases:
        for series in list_series(case.image):
            if series.modality not in DICOM_MODALITIES:
                raise VolumeError(f"{case.image}: Expected a CT or MR series. Received: Modality={series.modality!r}")
            return DICOM_MODALITIES[series.modality]
    raise VolumeError(f"{root}: no DICOM image series (non-image objects and other files are ignored)")


def _dataset_json_outputs(root: Path) -> tuple[str, ...]:
    return read_dataset_json(root)["outputs"]


def _has_images(root: Path) -> bool:
    return (root / "imagesTr").is_dir()


@dataclass(frozen=True)
class Layout:
    """A dataset layout.

    Attributes:
        find: ``(root, phase, series) -> [CaseFiles]`` in natural order.
        modality: "ct", "mri", or ``(root, cases) -> modality`` when the dataset says.
        detect: a cheap test that ``root`` is in this layout (used without ``--layout``).
        expected: what a folder of this layout holds (``{phase}`` is filled in), for errors.
        mask_name: where predict writes a case's mask, relative to the output folder.
        outputs: the structures the labels hold, ``root -> outputs`` when the dataset says
            (dataset.json), or None for the modality's default (``labels.OUTPUTS``).
    """

    find: Callable[[Path, str, str | None], list[CaseFiles]]
    modality: str | Callable[[Path, list[CaseFiles]], str]
    detect: Callable[[Path, str], bool]
    expected: str
    mask_name: Callable[[CaseFiles], str]
    outputs: tuple[str, ...] | Callable[[Path], tuple[str, ...]] | None = None


def _lits_mask(case: CaseFiles) -> str:
    return re.sub(r"^volume-", "segmentation-", case.image.name)


def _case_mask(case: CaseFiles) -> str:
    return f"{case.case_id}.nii.gz"


FZMC = Layout(find_fzmc_cases, "mri",
              lambda root, phase: any(_find_nifti(d, phase) for d in _visible(root) if d.is_dir()),
              "case folders holding {phase}.nii[.gz]", lambda c: f"{c.case_id}/prediction.nii.gz", FZMC_OUTPUTS)
LAYOUTS = {
    "lits": Layout(find_lits_cases, "ct", lambda root, phase: bool(_nifti_stems(root, r"volume-(\d+)")),
                   "volume-N.nii[.gz] files", _lits_mask, LITS_OUTPUTS),
    "fzmc": FZMC,
    "mri": FZMC,  # the name of the FZMC layout before there were others
    "msd": Layout(_find_decathlon, lambda root, cases: read_dataset_json(root)["modality"],
                  lambda root, phase: _has_images(root) and (root / DATASET_JSON).exists(),
                  "imagesTr/ and labelsTr/ with dataset.json", _case_mask, _dataset_json_outputs),
    "nnunet": Layout(_find_decathlon, lambda root, cases: read_dataset_json(root)["modality"],
                     lambda root, phase: _has_images(root) and "channel_names" in _text(root / DATASET_JSON),
                     "imagesTr/CASE_0000.nii.gz, labelsTr/ and a dataset.json with channel_names", _case_mask,
                     _dataset_json_outputs),
    "atlas": Layout(find_atlas_cases, "mri", lambda root, phase: bool(_nifti_stems(root / "imagesTr", r"im(\d+)")),
                    "imagesTr/imN.nii.gz with labelsTr/lbN.nii.gz",
                    lambda c: f"lb{c.case_id[2:]}.nii.gz", ATLAS_OUTPUTS),
    "ircadb": Layout(find_ircadb_cases, "ct", lambda root, phase: bool(find_ircadb_cases(root)),
                     "patient folders holding PATIENT_DICOM/ (and MASKS_DICOM/)", _case_mask, IRCADB_OUTPUTS),
    "dicom": Layout(find_dicom_cases, _dicom_modality, lambda root, phase: bool(find_dicom_cases(root)),
                    "folders of DICOM files, one series each", _case_mask),
}
# detection tries the most specific layouts first (ATLAS and nnU-Net v2 folders also fit "msd")
DETECTION_ORDER = ("atlas", "nnunet", "msd", "lits", "fzmc", "ircadb", "dicom")
LAYOUT_NAMES = tuple(name for name in LAYOUTS if name != "mri")


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class Dataset:
    """The cases of one folder in one layout.

    Attributes:
        root: the folder.
        layout: the layout's name (a key of :data:`LAYOUTS`).
        modality: "ct" or "mri".
        cases: in natural case order.
        outputs: the structures the labels hold, in ``labels.STRUCTURES`` order (records,
            models and scores follow them; ``labels.label_values`` gives their values).
    """

    root: Path
    layout: str
    modality: str
    cases: list[CaseFiles]
    outputs: tuple[str, ...] = ()


def _folder(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise VolumeError(f"{root}: not a folder")
    return root


def detect_layout(root: str | Path, phase: str = "artery") -> str:
    """The first layout of :data:`DETECTION_ORDER` whose test matches ``root``.

    Raises:
        VolumeError: ``root`` is not a folder, or no layout matches (the message lists what
            was looked for).
    """
    root = _folder(root)
    for name in DETECTION_ORDER:
        if LAYOUTS[name].detect(root, phase):
            return name
    looked_for = "; ".join(f"{name}: {LAYOUTS[name].expected.format(phase=phase)}" for name in DETECTION_ORDER)
    raise VolumeError(f"{root}: no cases found (looked for {looked_for})")


def open_dataset(root: str | Path, layout: str | None = None, phase: str = "artery",
                 series: str | None = None) -> Dataset:
    """Lists the cases of ``root`` in ``layout`` (detected when None) and finds their modality.

    Args:
        root: the dataset folder.
        layout: a key of :data:`LAYOUTS`, or None to detect it.
        phase: FZMC image file stem.
        series: SeriesInstanceUID to read in DICOM folders holding several series.

    Raises:
        VolumeError: ``root`` is missing, holds no case of the layout (or of any layout), or
            its dataset.json / DICOM header cannot say its modality.
    """
    root = _folder(root)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"Expected layout in {LAYOUT_NAMES}. Received: layout={layout!r}")
    name = layout or detect_layout(root, phase)
    spec = LAYOUTS[name]
    cases = spec.find(root, phase, series)
    if not cases:
        raise VolumeError(f"{root}: no {name} cases found (expected {spec.expected.format(phase=phase)})")
    modality = spec.modality if isinstance(spec.modality, str) else spec.modality(root, cases)
    outputs = layout_outputs(spec, root, modality)
    # label files that hold the project's values say so, so manifests record what every label holds
    cases = [c if c.label_map is not None else replace(c, label_map=project_label_map(outputs)) for c in cases]
    return Dataset(root, "fzmc" if name == "mri" else name, modality, cases, outputs)


def layout_outputs(spec: Layout, root: Path, modality: str) -> tuple[str, ...]:
    """The structures the labels of ``root`` in layout ``spec`` hold (:attr:`Layout.outputs`)."""
    if spec.outputs is None:
        return OUTPUTS[modality]
    return spec.outputs if isinstance(spec.outputs, tuple) else spec.outputs(root)


def find_dataset_cases(source: str | Path, dataset: str, phase: str = "artery",
                       series: str | None = None) -> list[CaseFiles]:
    """Lists the cases of a folder in the layout ``dataset`` (a key of :data:`LAYOUTS`).

    Raises:
        VolumeError: the folder is missing or holds no case.
    """
    return open_dataset(source, dataset, phase, series).cases


def find_cases(root: str | Path, phase: str = "artery", layout: str | None = None,
               series: str | None = None) -> tuple[str, list[CaseFiles]]:
    """Lists the cases of ``root`` in ``layout``, detected when None.

    Returns:
        ``(layout name, cases)``; :func:`open_dataset` also gives the cases' modality.

    Raises:
        VolumeError: ``root`` is missing or holds no case of any layout.
    """
    dataset = open_dataset(root, layout, phase, series)
    return dataset.layout, dataset.cases


def dataset_modality(root: str | Path, layout: str, phase: str = "artery") -> str:
    """The modality of the dataset in ``root`` (read from dataset.json or DICOM for some layouts)."""
    spec = LAYOUTS[layout]
    return spec.modality if isinstance(spec.modality, str) else open_dataset(root, layout, phase).modality


def dataset_outputs(root: str | Path, layout: str, modality: str) -> tuple[str, ...]:
    """The structures the labels of the dataset in ``root`` hold (``modality`` from :func:`dataset_modality`)."""
    return layout_outputs(LAYOUTS[layout], Path(root), modality)


def mask_path(layout: str, case: CaseFiles) -> str:
    """Where predict writes ``case``'s mask, relative to its output folder."""
    return LAYOUTS[layout].mask_name(case)


# --------------------------------------------------------------------------- loading


def _read(path: Path, series: str | None = None) -> Volume:
    try:
        if path.is_dir():
            return volume_from_image(read_series(path, series), path)
        return load_volume(path)
    except DicomError as exc:
        raise CaseError(str(exc)) from None
    except VolumeError as exc:
        raise CaseError(str(exc)) from None


def load_image(path: str | Path, series: str | None = None) -> Volume:
    """Loads an image volume (a NIfTI file or a DICOM series folder) in canonical order and checks it.

    Raises:
        CaseError: the file is missing, unreadable, truncated or not 3D, the DICOM folder is
            not one regular series (the reason starts with its path), or it holds NaN/Inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise CaseError(f"{path}: file not found")
    image = _read(path, series)
    if not np.isfinite(image.data).all():
        raise CaseError("image contains NaN/Inf")
    return image


def check_label(label: np.ndarray, outputs, label_map: LabelMap | None = None) -> np.ndarray:
    """Checks a label array's values and returns it in the project's values for ``outputs`` (uint8).

    Args:
        label: the label map as stored.
        outputs: the structures kept, valued by ``labels.label_values``; a modality name
            ("ct", "mri") stands for its default structures.
        label_map: ``((value, structure or None), ...)`` of the dataset; None: the project's
            values of ``outputs``.

    Raises:
        CaseError: NaN/Inf, values further than :data:`LABEL_ROUNDING_TOLERANCE` from an
            integer, or values outside the dataset's set.
    """
    values = label_values(as_outputs(outputs))
    label_map = project_label_map(tuple(values)) if label_map is None else label_map
    if not np.isfinite(label).all():
        raise CaseError("label contains NaN/Inf")
    rounded = np.rint(label)
    if np.abs(label - rounded).max(initial=0.0) > LABEL_ROUNDING_TOLERANCE:
        raise CaseError("label has non-integer values")
    allowed = sorted({0, *(int(v) for v, _ in label_map)})
    present = np.unique(rounded).astype(int)
    bad = sorted(set(present.tolist()) - set(allowed))
    if bad:
        raise CaseError(f"label values {bad} outside the expected set {allowed}")
    lut = np.zeros(max(allowed) + 1, np.uint8)
    for value, structure in label_map:
        lut[int(value)] = values.get(structure, 0)
    return lut[rounded.astype(np.int64)]


def _mask_folders_label(files: CaseFiles, image: Volume, outputs) -> np.ndarray:
    """The label of a folder of mask series (3D-IRCADb ``MASKS_DICOM``), in the project's values."""
    values = label_values(as_outputs(outputs))
    label_map = files.label_map or ()
    if "liver" in values and not any(s == "liver" for _, s in label_map):
        raise CaseError(f"{files.label}: no liver mask folder")
    out = np.zeros(image.data.shape, np.uint8)
    # liver first, so a tumour drawn inside it keeps the tumour value
    for name, structure in sorted(label_map, key=lambda pair: pair[1] == "tumour"):
        if structure not in values:
            continue
        mask = _read(Path(files.label) / str(name))
        if mask.data.shape != image.data.shape:
            raise CaseError(f"mask {name} shape {mask.data.shape} differs from image shape {image.data.shape}")
        out[mask.data > 0] = values[structure]
    return out


def load_case(files: CaseFiles, outputs) -> tuple[Volume, np.ndarray]:
    """Loads one labelled case in canonical order and runs every image and label check.

    Args:
        files: the case's image and label paths and what its labels hold.
        outputs: the structures kept (:attr:`Dataset.outputs`), valued by
            ``labels.label_values``; a modality name stands for its default structures.

    Returns:
        ``(image Volume, label uint8 array)`` of equal shape, the label in the project's values.

    Raises:
        CaseError: the case cannot be used; the message is the reason (module docstring).
    """
    if not Path(files.image).exists():
        raise CaseError(MISSING_IMAGE)
    if files.label is None:
        raise CaseError(MISSING_LABEL)
    image = load_image(files.image, files.series)
    if Path(files.label).is_dir():
        return image, _mask_folders_label(files, image, outputs)
    label = _read(Path(files.label))
    if image.data.shape != label.data.shape:
        raise CaseError(f"image shape {image.data.shape} differs from label shape {label.data.shape}")
    return image, check_label(label.data, outputs, files.label_map)


def load_label(files: CaseFiles, outputs) -> tuple[np.ndarray, tuple[float, ...]]:
    """One case's label in the project's values and its voxel size, without reading the image
    where the label is a file of its own (a folder of mask series needs the image's grid).

    Raises:
        CaseError: as :func:`load_case`.
    """
    if files.label is None:
        raise CaseError(MISSING_LABEL)
    if Path(files.label).is_dir():
        image, label = load_case(files, outputs)
        return label, tuple(image.spacing)
    label = _read(Path(files.label))
    return check_label(label.data, outputs, files.label_map), tuple(label.spacing)
