"""``kerasunet synth``: write synthetic CT and MRI phantoms, in the LiTS and FZMC layouts or any other."""

from __future__ import annotations

import re
from pathlib import Path

import click

from kerasunet.synth import MAX_SIZE, MIN_SIZE, CtSettings, MriSettings
from kerasunet.synth_layouts import SYNTH_LAYOUTS, layout_modality


class _MriShape(click.ParamType):
    """``HxWxD``, e.g. ``320x260x72``."""

    name = "HxWxD"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
        if not match:
            self.fail(f"Expected HxWxD with three positive integers, e.g. 320x260x72. "
                      f"Received: {value!r}", param, ctx)
        return tuple(int(g) for g in match.groups())


class _SliceRange(click.ParamType):
    """``MIN:MAX``, e.g. ``75:160``."""

    name = "MIN:MAX"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(value))
        if not match:
            self.fail(f"Expected MIN:MAX with two positive integers, e.g. 75:160. Received: {value!r}",
                      param, ctx)
        return tuple(int(g) for g in match.groups())


@click.command("synth")
@click.option("--out", required=True, metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder; CT goes to OUT/lits, MRI to OUT/mri (with --layout: OUT/<layout>).")
@click.option("--layout", "layouts", multiple=True, type=click.Choice(SYNTH_LAYOUTS),
              help="Write this layout to OUT/<layout> instead (repeatable); CT layouts take --ct-cases, "
                   "MRI layouts (fzmc, atlas) --mri-cases. See docs/datasets.md.")
@click.option("--ct-cases", type=click.IntRange(min=0), default=8, show_default=True,
              help="Number of CT cases (volume-N.nii).")
@click.option("--mri-cases", type=click.IntRange(min=0), default=8, show_default=True,
              help="Number of MRI cases (FZMC00K/).")
@click.option("--size", type=click.IntRange(MIN_SIZE, MAX_SIZE), default=512, show_default=True,
              help="CT in-plane size in voxels.")
@click.option("--mri-shape", type=_MriShape(), metavar="HxWxD", default="320x260x72", show_default=True,
              help="MRI shape in voxels.")
@click.option("--ct-slices", type=_SliceRange(), default="75:160", show_default=True,
              help="Range of CT slice counts per case.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the same seed gives identical files.")
@click.option("--phase", default="artery", show_default=True, help="MRI image file name (<phase>.nii).")
@click.option("--compress/--no-compress", default=False, show_default=True, help="Write .nii.gz.")
def synth(out, layouts, ct_cases, mri_cases, size, mri_shape, ct_slices, seed, phase, compress):
    """Write synthetic CT (LiTS) and MRI (FZMC) liver phantoms, or phantoms in any --layout."""
    from kerasunet.synth import mri_defects, synth_dataset

    # Check every option before writing anything, naming the option at fault.
    _check(lambda: CtSettings(size=size, slices=ct_slices), "--ct-slices")
    _check(lambda: MriSettings(shape=mri_shape), "--mri-shape")
    _check(lambda: MriSettings(phase=phase), "--phase")
    if layouts:
        counts = {layout: ct_cases if layout_modality(layout) == "ct" else mri_cases for layout in layouts}
        _synth_layouts(out, counts, seed, CtSettings(size, ct_slices), MriSettings(mri_shape, phase), compress)
        return
    try:
        written = synth_dataset(out, ct_cases, mri_cases, size=size, mri_shape=mri_shape, seed=seed,
                                phase=phase, compress=compress, ct_slices=ct_slices, progress=click.echo)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if written["lits"]:
        click.echo(f"CT phantoms:  {out / 'lits'} ({_cases(written['lits'])})")
    if written["mri"]:
        defects = "; ".join(f"{case}: {why}" for case, why in mri_defects(mri_cases).items())
        click.echo(f"MRI phantoms: {out / 'mri'} ({_cases(written['mri'])}"
                   f"{'; defects ' + defects if defects else ''})")


def _synth_layouts(out: Path, counts: dict[str, int], seed: int, ct: CtSettings, mri: MriSettings,
                   compress: bool) -> None:
    from kerasunet.synth_layouts import synth_layout

    empty = [layout for layout, n in counts.items() if n < 1]
    if empty:
        option = "--ct-cases" if layout_modality(empty[0]) == "ct" else "--mri-cases"
        raise click.BadParameter(f"Expected at least one case for --layout {empty[0]}. Received: 0", param_hint=option)
    for layout, n in counts.items():
        written = synth_layout(layout, out / layout, n, seed, ct, mri, compress, progress=click.echo)
        click.echo(f"{layout}: {out / layout} ({_cases(written)})")


def _cases(paths) -> str:
    return f"{len(paths)} case{'s' * (len(paths) != 1)}"


def _check(make_settings, option: str) -> None:
    try:
        make_settings()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
