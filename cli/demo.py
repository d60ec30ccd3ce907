"""``make demo``: phantoms → the CT→MRI transfer experiment (small preset) → export, timed.

Run as ``python -m cli.demo [OUT_DIR]`` (default ``demo_output/``). Rerunning continues an
interrupted demo. Exits non-zero when the results do not show real segmentation: CT liver
Dice per case below 0.90 on held-out phantoms, or MRI tumour Dice not clearly above the
all-background baseline.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click

LIVER_DICE_TARGET = 0.90
TUMOUR_MARGIN = 0.10  # "clearly above" the all-background baseline
CT_CASES, MRI_CASES, CT_SIZE, CT_SLICES, MRI_SHAPE = 32, 16, 64, (24, 40), (64, 56, 24)


def best_mri_run(out: Path) -> tuple[str, Path, float]:
    """The MRI run with the highest test tumour Dice per case over all repeats."""
    best = ("", Path(), -math.inf)
    for summary_path in sorted((out / "eval").glob("mri-r*/summary.json")):
        summary = json.loads(summary_path.read_text())
        for label, entry in summary["models"].items():
            dice = entry["structures"]["tumour"]["dice_per_case"]
            if dice is not None and dice > best[2]:
                best = (label, Path(entry["path"]), dice)
    return best


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_output"))
def main(out: Path):
    """Synthesise phantoms, run `experiment transfer --preset small`, export the best MRI model."""
    from cli.main import quiet_tensorflow

    quiet_tensorflow()  # the demo's own lines first, as in every kerasunet command
    from kerasunet.experiment import ExperimentSettings, run_experiment
    from kerasunet.export import export_model
    from kerasunet.synth import synth_dataset

    started = time.perf_counter()
    click.echo(f"== phantoms → {out / 'phantoms'} ==")
    synth_dataset(out / "phantoms", ct_cases=CT_CASES, mri_cases=MRI_CASES, size=CT_SIZE,
                  mri_shape=MRI_SHAPE, ct_slices=CT_SLICES, seed=0, progress=click.echo)
    settings = ExperimentSettings(lits=out / "phantoms" / "lits", mri=out / "phantoms" / "mri",
                                  out=out / "experiment", preset="small")
    report = run_experiment(settings, progress=click.echo)
    label, run_dir, dice = best_mri_run(settings.out)
    export = export_model(run_dir, Path("saved_models") / "demo-mri-tumour", overwrite=False)
    minutes = (time.perf_counter() - started) / 60
    results = json.loads((settings.out / "results.json").read_text())
    liver = results["ct"]["liver"]["dice_per_case"]
    base = results["mri"][results["baseline"]]["dice_per_case"][0]
    checks = [(f"CT liver Dice per case {liver:.3f} >= {LIVER_DICE_TARGET}", liver >= LIVER_DICE_TARGET),
              (f"best MRI tumour Dice per case {dice:.3f} ({label}) > all-background {base:.3f} + "
               f"{TUMOUR_MARGIN}", dice > base + TUMOUR_MARGIN)]
    click.echo("")
    for text, ok in checks:
        click.echo(f"{'PASS' if ok else 'FAIL'}: {text}")
    click.echo(f"report: {report.resolve()}")
    click.echo(f"export: {export.resolve()} (from {run_dir})")
    click.echo(f"demo wall time: {minutes:.1f} min")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
