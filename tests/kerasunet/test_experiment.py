import json
import math

import pytest

from kerasunet import experiment as exp
from kerasunet.experiment import ExperimentSettings, Preset, Run, plan_runs, run_experiment, what_this_shows

TINY = Preset(ct_epochs=1, ct_batch_size=4, ct_lr=1e-3, mri_epochs=2, mri_batch_size=4, mri_lr=1e-3,
              loss="bce_dice", filters=4, depth=2, repeats=2, augment=False, oversample_tumour=0.0,
              ablation_losses=("bce",))


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(exp.PRESETS, "tiny", TINY)
    return "tiny"


def test_plan_has_a_b_c_per_repeat_and_the_ablation(tmp_path, tiny_preset):
    settings = ExperimentSettings(lits=tmp_path, mri=tmp_path, out=tmp_path, config=tiny_preset)
    runs = plan_runs(settings)
    assert [r.label for r in runs if r.repeat == 0] == ["A (scratch)", "B (init)", "C (freeze)", "A (bce)"]
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert settings.seeds == [0, 1000]
    no_ablation = ExperimentSettings(lits=tmp_path, mri=tmp_path, out=tmp_path, config=tiny_preset,
                                     ablation=False, repeats=3)
    assert len(plan_runs(no_ablation)) == 9


def test_bad_repeats_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"Expected repeats >= 1. Received: repeats=0"):
        ExperimentSettings(lits=tmp_path, mri=tmp_path, out=tmp_path, repeats=0).preset()


def _results(a, b, c, spread, base=0.0):
    keys = [k for k, _ in exp.TABLE_METRICS]
    rows = {label: {k: (v, spread) for k in keys} for label, v in
            (("A (scratch)", a), ("B (init)", b), ("C (freeze)", c))}
    rows["all-background"] = {k: (base, 0.0) for k in keys}
    return rows


def test_what_this_shows_compares_the_gap_with_the_spread():
    real = what_this_shows(_results(0.7, 0.5, 0.4, spread=0.02), 3, {})
    assert "A (scratch) has the highest" in real and "looks real, not noise" in real
    noise = what_this_shows(_results(0.52, 0.5, 0.49, spread=0.05), 3, {})
    assert "cannot be told apart" in noise
    single = what_this_shows(_results(0.7, 0.5, 0.4, spread=0.0), 1, {})
    assert "single repeat" in single
    assert "did not learn" in what_this_shows(_results(0.01, 0.0, 0.0, spread=0.0, base=0.0), 2, {})


def test_experiment_runs_end_to_end_and_resumes(tiny_phantoms, tmp_path, tiny_preset):
    settings = ExperimentSettings(lits=tiny_phantoms / "lits", mri=tiny_phantoms / "mri", out=tmp_path / "exp",
                                  config=tiny_preset, ablation=False, workers=1)
    lines = []
    report = run_experiment(settings, progress=lines.append)
    text = report.read_text()
    for heading in ("## Settings", "## What this shows", "## Learning curves", "## Seconds per epoch",
                    "## Test metrics, MRI tumour", "## CT model", "## Overlays"):
        assert heading in text
    assert (tmp_path / "exp" / "figures" / "learning_curves.png").stat().st_size > 0
    assert "](eval/mri-r0/overlays/" in text
    for line in text.splitlines():
        if line.startswith("![overlay](eval/mri-r0/"):
            assert (tmp_path / "exp" / line[len("![overlay]("):-1]).exists()
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert set(results["mri"]) == {"A (scratch)", "B (init)", "C (freeze)", "all-background"}
    assert all(math.isfinite(v) for v in results["mri"]["all-background"]["dice_per_case"])
    # The MRI records skip the phantom set's defect cases, with their reasons.
    assert any("FZMC002" in line and "FZMC004" in line for line in lines)
    # A rerun finds every step done and retrains nothing.
    again = []
    run_experiment(settings, progress=again.append)
    assert sum("finished earlier, skipped" in line for line in again) == 7
    assert not any(line.startswith("epoch ") for line in again)
