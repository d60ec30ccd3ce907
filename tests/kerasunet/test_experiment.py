import dataclasses
import json
import math
from pathlib import Path

import pytest

from kerasunet import experiment as exp
from kerasunet.experiment import ExperimentSettings, Preset, plan_runs, run_experiment, what_this_shows

TINY = Preset(ct_epochs=1, ct_batch_size=4, ct_lr=1e-3, mri_epochs=2, mri_batch_size=4, mri_lr=1e-3,
              loss="bce_dice", filters=4, depth=2, repeats=2, augment=False, oversample_tumour=0.0,
              ablation_losses=("bce",))
SCRATCH, INIT, FREEZE = "mri-scratch-bce_dice-r0", "mri-init-bce_dice-r0", "mri-freeze-bce_dice-r0"


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(exp.PRESETS, "tiny", TINY)
    return "tiny"


def test_plan_has_a_b_c_per_repeat_and_the_ablation(tmp_path, tiny_preset):
    settings = ExperimentSettings(lits=tmp_path, mri=tmp_path, out=tmp_path, preset=tiny_preset)
    runs = plan_runs(settings)
    assert [r.label for r in runs if r.repeat == 0] == ["A (scratch)", "B (init)", "C (freeze)", "A (bce)"]
    assert [r.mode for r in runs if r.repeat == 0] == ["scratch", "init", "freeze", "scratch"]
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert settings.seeds == [0, 1000]
    no_ablation = ExperimentSettings(lits=tmp_path, mri=tmp_path, out=tmp_path, preset=tiny_preset,
                                     ablation=False, repeats=3)
    assert len(plan_runs(no_ablation)) == 9


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^Expected repeats >= 1. Received: repeats=0$"):
        ExperimentSettings(lits=tmp_path, mri=tmp_path, out=tmp_path, repeats=0).hyperparameters()
    with pytest.raises(ValueError, match=r"^Expected preset in \('paper', 'small'\). Received: preset='big'$"):
        ExperimentSettings(lits=tmp_path, mri=tmp_path, out=tmp_path, preset="big").hyperparameters()


def _results(a, b, c, spread, base=0.0):
    keys = [k for k, _ in exp.TABLE_METRICS]
    rows = {label: {k: (v, spread) for k in keys} for label, v in
            (("A (scratch)", a), ("B (init)", b), ("C (freeze)", c))}
    rows["all-background"] = {k: (base, 0.0) for k in keys}
    return rows


def _summary(outputs, dice):
    """An evaluate summary of models A and the baseline scoring ``outputs`` with Dice ``dice[structure]``."""
    def scored(values):
        return {"structures": {st: {k: {"mean": values[st]} for k, _ in exp.TABLE_METRICS} for st in outputs}}

    return {"outputs": list(outputs), "models": {"A (scratch)": scored(dice)},
            "baselines": {"all-background": scored({st: 0.0 for st in outputs})}}


def test_the_mri_report_covers_each_structure_the_mri_set_holds():
    runs = [r for r in plan_runs(ExperimentSettings(lits=Path("."), mri=Path("."), out=Path("."), repeats=1,
                                                    ablation=False)) if r.label == "A (scratch)"]
    atlas = exp.other_mri_results(runs, [_summary(("liver", "tumour"), {"liver": 0.9, "tumour": 0.4})])
    assert list(atlas) == ["liver"] and atlas["liver"]["A (scratch)"]["dice_per_case"] == (0.9, 0.0)
    assert exp.mri_results(runs, [_summary(("liver", "tumour"), {"liver": 0.9, "tumour": 0.4})])[
        "A (scratch)"]["dice_per_case"] == (0.4, 0.0)
    assert exp.other_mri_results(runs, [_summary(("tumour",), {"tumour": 0.4})]) == {}  # FZMC: tumour only


def test_what_this_shows_compares_the_gap_with_the_spread():
    real = what_this_shows(_results(0.7, 0.5, 0.4, spread=0.02), 3, {})
    assert "A (scratch) has the highest" in real and "looks real, not noise" in real
    noise = what_this_shows(_results(0.52, 0.5, 0.49, spread=0.05), 3, {})
    assert "cannot be told apart" in noise
    single = what_this_shows(_results(0.7, 0.5, 0.4, spread=0.0), 1, {})
    assert "single repeat" in single
    assert "did not learn" in what_this_shows(_results(0.01, 0.0, 0.0, spread=0.0, base=0.0), 2, {})


def _settings_row(report_text: str, name: str) -> list[str]:
    """The cells of one row of the report's settings table (CT first, then A, B, C)."""
    row = next(line for line in report_text.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def test_experiment_runs_end_to_end_and_resumes(tiny_phantoms, tmp_path, tiny_preset):
    settings = ExperimentSettings(lits=tiny_phantoms / "lits", mri=tiny_phantoms / "mri", out=tmp_path / "exp",
                                  preset=tiny_preset, ablation=False, repeats=1, workers=1)
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
    assert "mri_liver" not in results and "## Test metrics, MRI liver" not in text  # FZMC labels: tumour only
    # The settings printed are the ones the runs recorded.
    config = json.loads((tmp_path / "exp" / "runs" / INIT / "config.json").read_text())["train"]
    assert config["epochs"] == 2 and results["settings"][INIT] == config
    assert config["augment_intensity"] == "mild"  # the preset's, not train's default
    assert _settings_row(text, "epochs") == ["`1`", "`2`", "`2`", "`2`"]
    # The MRI records skip the phantom set's defect cases, with their reasons.
    assert any("FZMC002" in line and "FZMC004" in line for line in lines)
    # A rerun with the same settings finds every step done and reruns nothing.
    again = []
    run_experiment(settings, progress=again.append)
    assert sum("finished earlier with these settings, skipped" in line for line in again) == 4
    assert not any(line.startswith(("epoch ", "== evaluate")) or "rerunning" in line for line in again)


# --- which steps rerun: training and evaluation replaced by fakes that write what the report reads

class FakeSteps:
    """Stands in for ``train`` and ``evaluate``: records the calls and writes their files."""

    def __init__(self):
        self.trained, self.evaluated, self.found = [], [], {}

    def train(self, settings, progress=print):
        run_dir = Path(settings.out)
        self.trained.append(run_dir.name)
        self.found[run_dir.name] = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"train": settings.to_dict()}))
        (run_dir / "best.keras").write_bytes(b"model")
        epochs = range(1, settings.epochs + 1)
        history = ["epoch,loss,val_loss,dice_tumour,val_dice_tumour",
                   *(f"{e},{1 / e},{1.1 / e},0.5,0.4" for e in epochs)]
        (run_dir / "history.csv").write_text("\n".join(history))
        (run_dir / "timing.csv").write_text("\n".join(["epoch,seconds", *(f"{e},1.0" for e in epochs)]))
        return run_dir

    def evaluate(self, models, data, out_dir, settings, progress=print):
        self.evaluated.append(out_dir.name)
        metrics = {key: {"mean": 0.5} for key, _ in exp.TABLE_METRICS}
        structures = {"liver": metrics, "tumour": metrics}
        summary = {"n_cases": 1, "cases": ["case"], "overlays": [], "outputs": list(structures),
                   "models": {name: {"path": str(path), "structures": structures}
                              for name, path in models.items()},
                   "baselines": {"all-background": {"structures": structures}}}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary


@pytest.fixture
def fake_steps(monkeypatch):
    import kerasunet.evaluate
    import kerasunet.train

    fake = FakeSteps()
    monkeypatch.setattr(kerasunet.train, "train", fake.train)
    monkeypatch.setattr(kerasunet.evaluate, "evaluate", fake.evaluate)
    return fake


def _run(fake, settings, **changes):
    fake.trained, fake.evaluated, fake.found, lines = [], [], {}, []
    report = run_experiment(dataclasses.replace(settings, **changes), progress=lines.append)
    return report.read_text(), lines


def test_changed_epochs_rerun_exactly_the_steps_that_depend_on_them(tiny_phantoms, tmp_path, tiny_preset,
                                                                     fake_steps):
    out = tmp_path / "exp"
    settings = ExperimentSettings(lits=tiny_phantoms / "lits", mri=tiny_phantoms / "mri", out=out,
                                  preset=tiny_preset, ablation=False, repeats=1, workers=1)
    _run(fake_steps, settings)
    assert fake_steps.trained == ["ct", SCRATCH, INIT, FREEZE]
    assert fake_steps.evaluated == ["ct", "mri-r0"]
    for name in ("ct", SCRATCH, INIT, FREEZE):
        (out / "runs" / name / "stale.txt").write_text("from the earlier run")

    _run(fake_steps, settings)  # unchanged: nothing reruns
    assert fake_steps.trained == [] and fake_steps.evaluated == []

    text, lines = _run(fake_steps, settings, epochs_mri=3)
    assert fake_steps.trained == [SCRATCH, INIT, FREEZE] and fake_steps.evaluated == ["mri-r0"]
    assert all(fake_steps.found[name] == [] for name in fake_steps.trained)  # each started in an empty folder
    assert f"train:{INIT}: settings changed (epochs: 2 -> 3); rerunning it" in lines
    assert not any("rebuilding" in line for line in lines)  # the records stay
    for name in (SCRATCH, INIT, FREEZE):
        assert json.loads((out / "runs" / name / "config.json").read_text())["train"]["epochs"] == 3
        assert not (out / "runs" / name / "stale.txt").exists()
    assert (out / "runs" / "ct" / "stale.txt").exists()
    assert _settings_row(text, "epochs") == ["`1`", "`3`", "`3`", "`3`"]
    results = json.loads((out / "results.json").read_text())
    assert [results["settings"][name]["epochs"] for name in ("ct", SCRATCH, INIT, FREEZE)] == [1, 3, 3, 3]

    text, lines = _run(fake_steps, settings, epochs_mri=3, epochs_ct=2)
    assert fake_steps.trained == ["ct", INIT, FREEZE]  # the scratch run does not use the CT model
    assert fake_steps.evaluated == ["ct", "mri-r0"]
    assert f"train:{FREEZE}: settings changed (CT model retrained); rerunning it" in lines
    assert _settings_row(text, "epochs") == ["`2`", "`3`", "`3`", "`3`"]


def test_report_settings_come_from_the_runs_config(tiny_phantoms, tmp_path, tiny_preset, fake_steps):
    out = tmp_path / "exp"
    settings = ExperimentSettings(lits=tiny_phantoms / "lits", mri=tiny_phantoms / "mri", out=out,
                                  preset=tiny_preset, ablation=False, repeats=1, workers=1)
    _run(fake_steps, settings)
    config_path = out / "runs" / SCRATCH / "config.json"
    config = json.loads(config_path.read_text())
    config["train"]["lr"] = 0.25
    config_path.write_text(json.dumps(config))
    text, _ = _run(fake_steps, settings)
    assert fake_steps.trained == []
    assert _settings_row(text, "lr") == ["`0.001`", "`0.25`", "`0.001`", "`0.001`"]
    assert json.loads((out / "results.json").read_text())["settings"][SCRATCH]["lr"] == 0.25


def test_an_interrupted_step_continues_in_its_folder(tiny_phantoms, tmp_path, tiny_preset, fake_steps):
    out = tmp_path / "exp"
    settings = ExperimentSettings(lits=tiny_phantoms / "lits", mri=tiny_phantoms / "mri", out=out,
                                  preset=tiny_preset, ablation=False, repeats=1, workers=1)
    _run(fake_steps, settings)
    state = json.loads((out / "state.json").read_text())
    state["steps"][f"train:{INIT}"]["done"] = False  # as if killed while training
    (out / "state.json").write_text(json.dumps(state))
    (out / "runs" / INIT / "checkpoints").mkdir()
    _run(fake_steps, settings)
    assert fake_steps.trained == [INIT] and fake_steps.evaluated == []
    assert "checkpoints" in fake_steps.found[INIT]  # resumed in place, not cleared
