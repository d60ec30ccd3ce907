"""kerasunet.core.runs: the 3D keys of the run folder contract and the model check that reads them."""

import re

import pytest

from kerasunet.core.runs import RunError, RunInfo, check_model


def info(**model):
    return RunInfo(model_path="run/best.keras",
                   config={"model": {"input_channels": 1, "depth": 2, "outputs": ["tumour"], **model},
                           "data": {"modality": "mri", "context": 0, "norm": {"modality": "mri"}}})


def test_runs_without_the_3d_keys_are_2d():
    run = info()
    assert (run.dims, run.patch_size, run.spacing) == (2, None, None)


def test_3d_keys_are_read_as_tuples():
    run = info(dims=3, patch_size=[48, 128, 128], spacing=[3, 1.2, 1.2])
    assert (run.dims, run.patch_size, run.spacing) == (3, (48, 128, 128), (3.0, 1.2, 1.2))


def test_a_model_of_the_wrong_dims_is_refused():
    from kerasunet.model import build_unet

    model = build_unet((None, None, 1), 1, filters=2, depth=1)
    check_model(model, info())
    message = "run/best.keras: model takes 2D inputs (None, None, None, 1) but its config has dims=3"
    with pytest.raises(RunError, match=f"^{re.escape(message)}$"):
        check_model(model, info(dims=3, patch_size=[8, 16, 16], spacing=[1, 1, 1]))
