"""Test-wide settings: TensorFlow backend, quiet logs, few threads (CI has 2 cores)."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


import pytest  # noqa: E402  (after the environment settings above, which must come first)


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory):
    """A small phantom set in both real layouts, written once per session (~1 s).

    Built with ``kerasunet.synth`` at seed 0; ``ct_phantom(i, 0, CtSettings(64, (12, 24)))``
    and ``mri_phantom(i, 0, MriSettings((48, 40, 12)))`` rebuild any case in memory.

    ``root/lits/``: 6 CT cases ``volume-0`` .. ``volume-5`` with ``segmentation-N``,
    64x64 in-plane, 12-24 slices each (ragged), int16 HU (scl_inter -1024), labels 0/1/2.
      * ``volume-3.nii.gz`` / ``segmentation-3.nii.gz`` are gzipped, all others ``.nii``.
      * ``volume-2`` is stored LPS, ``volume-5`` PLI (x/y swapped, z flipped); others RAS.
      * ``volume-4`` has no tumour; every other case has at least one.

    ``root/mri/``: 6 MRI cases ``FZMC001`` .. ``FZMC006``, each ``artery.nii`` (int16 with
    a per-case scl_slope) + ``label.nii`` (tumour 0/1), canonical shape 48x40x12.
      * ``FZMC002``: defect, label has 11 slices (one fewer than the image).
      * ``FZMC004``: defect, no label file.
      * ``FZMC003`` is stored LPS, ``FZMC006`` PLI (stored shape 40x48x12).
      * ``FZMC005`` is gzipped (``artery.nii.gz``, ``label.nii.gz``) and has no tumour.
      * Healthy cases with tumours: ``FZMC001``, ``FZMC003``, ``FZMC006``.

    Returns:
        The root folder (read-only by convention: tests must not modify it).
    """
    from kerasunet.synth import synth_lits, synth_mri

    root = tmp_path_factory.mktemp("phantoms")
    synth_lits(root / "lits", 6, size=64, slices=(12, 24), seed=0, compress={3})
    synth_mri(root / "mri", 6, shape=(48, 40, 12), seed=0, compress={4})
    return root


@pytest.fixture(scope="session")
def tiny_records(tiny_phantoms, tmp_path_factory):
    """``tiny_records("lits" | "mri") -> Path``: records of ``tiny_phantoms``, built once per dataset.

    Splits: 20% validation, no test split, seed 0. Read-only by convention.
    """
    from tfrecords_builder.build import BuildSettings, build_records

    built = {}

    def build(dataset: str):
        if dataset not in built:
            out = tmp_path_factory.mktemp("records") / dataset
            build_records(BuildSettings(source=str(tiny_phantoms / dataset), dataset=dataset, out=str(out),
                                        val_fraction=0.2, test_fraction=0.0, workers=1))
            built[dataset] = out
        return built[dataset]

    return build


@pytest.fixture(scope="session")
def layout_phantoms(tmp_path_factory):
    """Tiny phantoms in every layout of ``kerasunet synth --layout``, written once per session (~2 s).

    ``root/<layout>/`` for each of ``kerasunet.synth_layouts.SYNTH_LAYOUTS``, seed 0: 4 CT cases
    (``ct_phantom(i, 0, LAYOUT_CT)``, 32x32, 4-6 slices) in lits, msd, nnunet, ircadb and dicom;
    4 MRI cases (``mri_phantom(i, 0, LAYOUT_MRI)``, 24x20x4) in fzmc and atlas. Case ``i`` is
    the same phantom in every CT layout (``dicom/case0i`` is the twin of ``lits/volume-i``).
    msd puts its last case in imagesTs/ without a label; fzmc has its usual defects (FZMC002
    short label, FZMC004 no label). Read-only by convention.
    """
    from kerasunet.synth_layouts import SYNTH_LAYOUTS, synth_layout
    from tests.helpers import LAYOUT_CT, LAYOUT_MRI

    root = tmp_path_factory.mktemp("layouts")
    for layout in SYNTH_LAYOUTS:
        synth_layout(layout, root / layout, 4, seed=0, ct=LAYOUT_CT, mri=LAYOUT_MRI)
    return root
