"""Tests of kerasunet.dims_comparison: the --dims arms, their settings, and the comparison's verdict."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.experiment import experiment
from kerasunet.dims_comparison import POOLED, ArmResults, comparisons, plan_arms, what_this_shows
from kerasunet.experiment import MAIN_LABELS, PRESETS, ExperimentSettings, arm_build_options, arm_train_fields
from kerasunet.train_settings import TrainSettings
from tfrecords_builder.build import BuildSettings


def settings(tmp_path, dims, **kw) -> ExperimentSettings:
    return ExperimentSettings(lits=tmp_path / "lits", mri=tmp_path / "mri", out=tmp_path / "exp", dims=dims, **kw)


def test_each_arm_is_one_experiment_with_its_records_and_network(tmp_path):
    arms = plan_arms(settings(tmp_path, ("2", "2.5", "3"), repeats=3, seed=7))
    assert [arm.name for arm, _ in arms] == ["2D", "2.5D", "3D"]
    assert [s.out for _, s in arms] == [tmp_path / "exp" / "arms" / d for d in ("2d", "2.5d", "3d")]
    assert {(s.dims, s.seed, s.repeats, s.lits) for _, s in arms} == {((), 7, 3, tmp_path / "lits")}
    options = [arm_build_options(arm) for arm, _ in arms]
    assert options == [{"context": 0}, {"context": 2}, {"volumes": True}]
    fields = [arm_train_fields(arm, PRESETS["small"]) for arm, _ in arms]
    assert fields == [{}, {}, {"dims": 3, "patch_size": PRESETS["small"].patch_size}]
    # the options are the records builder's and the trainer's own settings
    built = [BuildSettings(source=str(tmp_path), dataset="lits", out=str(tmp_path / "r"), **o) for o in options]
    assert [(b.context, b.volumes) for b in built] == [(0, False), (2, False), (0, True)]
    assert TrainSettings(records="r", out="o", **fields[2]).patch_size == PRESETS["small"].patch_size


@pytest.mark.parametrize("dims", [("4",), ("2", "2"), ("",)])
def test_bad_dims_are_refused(tmp_path, dims):
    with pytest.raises(ValueError, match=r"^Expected --dims values from 2, 2\.5, 3, each once"):
        plan_arms(settings(tmp_path, dims))


def test_cli_refuses_bad_dims_in_one_line(tmp_path):
    (tmp_path / "lits").mkdir()
    (tmp_path / "mri").mkdir()
    result = CliRunner().invoke(experiment, ["transfer", "--lits", str(tmp_path / "lits"), "--mri",
                                             str(tmp_path / "mri"), "--out", str(tmp_path / "exp"), "--dims", "2,4"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.strip().splitlines() == ["Error: Expected --dims values from 2, 2.5, 3, each once "
                                                  "(e.g. 2,2.5,3). Received: dims=2,4"]
    assert not (tmp_path / "exp").exists()


def arm(name: str, shift: float, noise: float, seed: int) -> ArmResults:
    rng = np.random.default_rng(seed)
    base = np.linspace(0.3, 0.7, 8)
    dice = {label: {(f"case{c}", r): float(base[c] + shift + rng.normal(0, noise)) for c in range(8) for r in range(3)}
            for label in MAIN_LABELS}
    metrics = {label: {"dice_per_case": (0.5 + shift, 0.01), "assd": (3.0, 0.1), "lesion_recall": (0.8, 0.0)}
               for label in MAIN_LABELS}
    return ArmResults(name, Path(name), dice, metrics, {label: (1.0, 0.1) for label in MAIN_LABELS}, 0.5, 0.2)


def test_a_consistent_gain_of_3d_is_called_better():
    results = [arm("2D", 0.0, 0.01, 0), arm("2.5D", 0.02, 0.01, 1), arm("3D", 0.15, 0.01, 2)]
    compared = comparisons(results)
    pooled = {(c.first, c.second): c for c in compared[POOLED]}
    assert set(pooled) == {("2D", "2.5D"), ("2D", "3D"), ("2.5D", "3D")}
    assert pooled[("2D", "3D")].pairs == 3 * 8 * 3 and pooled[("2D", "3D")].high < 0
    text = what_this_shows(results, compared, repeats=3)
    assert "3D minus 2D tumour Dice per case is +0.150" in text and ": 3D is better." in text
    assert "A differ, B differ, C differ" in text


def test_arms_that_only_differ_by_noise_cannot_be_told_apart():
    results = [arm("2D", 0.0, 0.05, 0), arm("3D", 0.0, 0.05, 1)]
    text = what_this_shows(results, comparisons(results), repeats=3)
    assert "cannot be told apart" in text and "3D is better" not in text and "3D is worse" not in text
    assert "no clear difference" in text


def test_without_both_2d_and_3d_there_is_no_answer():
    results = [arm("2D", 0.0, 0.01, 0), arm("2.5D", 0.1, 0.01, 1)]
    assert "cannot answer 3D against 2D" in what_this_shows(results, comparisons(results), repeats=3)
