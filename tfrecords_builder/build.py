"""``build_records``: validated cases -> case-level splits -> sharded TFRecords -> manifest.json.

Crash safety: the output folder holds a build-state file (``.build-state.json``, written
atomically) with the settings hash, the validated cases, the splits and the splits whose
shards are complete. Shards are written under temporary names and renamed only when their
split is complete; the manifest is written last. On a rerun after a kill, temporary files
and shards of unfinished splits are deleted and those splits are rebuilt; finished splits
are kept. A finished build with the same settings is a no-op.

Each case is read twice: once to validate it and choose its slices (so splits are drawn
over usable cases only), once to write its slices. Holding or caching every case's slices
instead would cost memory or disk the size of the dataset. A case whose files change between
the two reads so that they fail the checks is skipped with its reason, like a case that fails
validation: it leaves its split's case list and the manifest's cases for ``skipped``.

Engines: ``local`` (this module: a process pool on one machine) and ``beam``
(:mod:`tfrecords_builder.beam`: an Apache Beam pipeline). Both run the case-level steps
and the planning, serialising and manifest functions defined here (:func:`case_tasks`,
:func:`plan_build`, :func:`case_examples`, :func:`check_written`, :func:`drop_cases`,
:func:`manifest_for`), so they find, skip, split and describe a dataset the same way.

Kinds (:class:`RecordKind`, the manifest's ``kind``): ``slices`` (here) and ``volumes``
(``--volumes``, :mod:`tfrecords_builder.volumes`, local engine), which differ only in their
per-case steps and feature spec.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from kerasunet.core.atomic import write_json
from kerasunet.core.cases import (CASE_ENTRY_KEYS, LAYOUTS, case_from_entry, dataset_modality, dataset_outputs,
                                  find_dataset_cases)
from kerasunet.core.fingerprint import changed_settings, hash_settings
from kerasunet.core.nifti import VolumeError
from kerasunet.core.preprocessing import NormSettings
from kerasunet.core.records_format import (DEFAULT_CONTEXT, DEFAULT_WORKERS, ENGINES, MANIFEST_FILE, SHARD_RE,
                                           TEMP_PREFIX, context_channels)
from tfrecords_builder.features import FEATURES, example_key, slice_example
from tfrecords_builder.ingest import CaseTask, extract_slices, inspect_case
from tfrecords_builder.selection import SelectionSettings
from tfrecords_builder.writer import ShardWriter

STATE_FILE = ".build-state.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")
HOLDOUTS = ("random", "last")
# settings that do not change the output, so they are left out of the settings hash
RUN_ONLY = ("out", "workers", "overwrite", "engine", "beam_options")
VOLUME_ONLY = ("volumes", "crop_margin_mm", "spacing")


class BuildError(ValueError):
    """A build that cannot go ahead. The message names the folder or case and the problem."""


@dataclass(frozen=True)
class BuildSettings:
    """Every setting of ``kerasunet build-records``; CLI options map one-to-one onto fields.

    Attributes:
        source: the dataset folder.
        dataset: its layout, a key of ``kerasunet.core.cases.LAYOUTS`` ("lits", "fzmc", "msd",
            "nnunet", "atlas", "ircadb", "dicom"; "mri" is "fzmc"); also the records' name.
            The layout says the modality and what the labels hold.
        out: the records folder.
        phase: FZMC phase image name (``<phase>.nii[.gz]`` in each case folder).
        series: SeriesInstanceUID to read from DICOM folders that hold several series.
        seed: seed of the random split.
        val_fraction: fraction of usable cases for validation (see :func:`split_counts`).
        test_fraction: fraction of usable cases for test.
        val_cases: explicit validation cases (overrides the fractions with ``test_cases``).
        test_cases: explicit test cases.
        holdout: "random" (seeded) or "last" (the last cases in natural order are test,
            the ones before them val, as the original research did).
        context: K slices on each side as extra channels (2.5D input, C = 2K + 1); None is
            :data:`DEFAULT_CONTEXT` for slices and 0 for ``volumes``.
        liver_slices: per case, at most this many slices with foreground (liver for CT).
        non_liver_slices: per case, at most this many slices without, next to the liver.
        all_slices: keep every slice; None means the dataset default (CT no, MRI yes).
        hu_window: CT window (lo, hi) in HU, applied by the reader.
        percentiles: MRI clip percentiles (lo, hi), applied by the reader.
        shard_mb: target shard size in MB (uncompressed record bytes).
        gzip: GZIP-compress the shards.
        workers: worker processes of the local engine (:data:`DEFAULT_WORKERS`); 1 runs
            in-process.
        overwrite: rebuild even if the folder holds a build.
        engine: "local" (a process pool here) or "beam" (an Apache Beam pipeline).
        beam_options: the Beam engine's pipeline options, one string as on a command line
            (``"--runner=DataflowRunner --project=…"``); passed to Beam unchanged.
        volumes: write one example per case, the volume cropped around the liver
            (:mod:`tfrecords_builder.volumes`), instead of slices; local engine, context 0.
        crop_margin_mm: volumes: margin in mm around the liver's bounding box.
        spacing: volumes: resample to this voxel size in mm, ``(D, H, W)`` (D the slice
            axis); None keeps each case's own spacing.
    """

    source: str
    dataset: str
    out: str
    phase: str = "artery"
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.1
    val_cases: tuple[str, ...] = ()
    test_cases: tuple[str, ...] = ()
    holdout: str = "random"
    context: int | None = None
    liver_slices: int = 30
    non_liver_slices: int = 20
    all_slices: bool | None = None
    hu_window: tuple[float, float] = (-200.0, 250.0)
    percentiles: tuple[float, float] = (1.0, 99.0)
    shard_mb: float = 128.0
    gzip: bool = False
    workers: int = DEFAULT_WORKERS
    overwrite: bool = False
    engine: str = "local"
    beam_options: str = ""
    series: str | None = None
    volumes: bool = False
    crop_margin_mm: float = 20.0
    spacing: tuple[float, float, float] | None = None

    def __post_init__(self):
        # canonical types, so equal settings hash equally whether they came from the CLI or code
        for name, cast in (("hu_window", float), ("percentiles", float), ("val_cases", str), ("test_cases", str)):
            object.__setattr__(self, name, tuple(cast(v) for v in getattr(self, name)))
        object.__setattr__(self, "shard_mb", float(self.shard_mb))
        object.__setattr__(self, "crop_margin_mm", float(self.crop_margin_mm))
        if self.context is None:  # a volume holds its neighbouring slices itself
            object.__setattr__(self, "context", 0 if self.volumes else DEFAULT_CONTEXT)
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        _check(self.dataset in LAYOUTS, f"dataset in {tuple(LAYOUTS)}", "dataset", self.dataset)
        # read once: some layouts say their modality in dataset.json or the DICOM headers
        object.__setattr__(self, "_modality", dataset_modality(self.source, self.dataset, self.phase))
        object.__setattr__(self, "_outputs", dataset_outputs(self.source, self.dataset, self._modality))
        _check(self.holdout in HOLDOUTS, f"holdout in {HOLDOUTS}", "holdout", self.holdout)
        _check(self.engine in ENGINES, f"engine in {ENGINES}", "engine", self.engine)
        for name in ("val_fraction", "test_fraction"):
            _check(0 <= getattr(self, name) < 1, f"0 <= {name} < 1", name, getattr(self, name))
        _check(self.val_fraction + self.test_fraction < 1, "val_fraction + test_fraction < 1",
               "val_fraction + test_fraction", self.val_fraction + self.test_fraction)
        both = sorted(set(self.val_cases) & set(self.test_cases))
        _check(not both, "no case in both val_cases and test_cases", "cases in both", both)
        _check(self.shard_mb > 0, "shard_mb > 0", "shard_mb", self.shard_mb)
        _check(self.workers >= 1, "workers >= 1", "workers", self.workers)
        if self.volumes:
            from tfrecords_builder.volumes import check_volume_settings

            check_volume_settings(self)
        _ = (self.norm, self.selection)  # validates the window, percentiles and slice counts

    @property
    def modality(self) -> str:
        return self._modality

    @property
    def outputs(self) -> tuple[str, ...]:
        """The structures the layout's labels hold, so the records' label maps too (``Dataset.outputs``)."""
        return self._outputs

    @property
    def norm(self) -> NormSettings:
        return NormSettings(self.modality, self.hu_window, self.percentiles)

    @property
    def selection(self) -> SelectionSettings:
        all_slices = self.modality == "mri" if self.all_slices is None else self.all_slices
        return SelectionSettings(self.liver_slices, self.non_liver_slices, all_slices, self.context)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def settings_hash(self) -> str:
        # slice builds hash without the volume settings, as they did before those existed
        d = {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY + (() if self.volumes else VOLUME_ONLY)}
        d["source"] = str(Path(self.source).resolve())
        d["features"] = sorted(record_kind(self).features)
        return hash_settings(d)


def _check(ok: bool, expected: str, name: str, value) -> None:
    if not ok:
        raise ValueError(f"Expected {expected}. Received: {name}={value!r}")


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of ``n`` usable cases go to val and test.

    Each count is ``fraction * n`` rounded half up, but at least 1 when its fraction is
    above 0, so every requested split gets a case; train must keep at least one case.

    Raises:
        BuildError: too few cases for the requested splits.
    """
    counts = [max(1, int(np.floor(f * n + 0.5))) if f > 0 else 0 for f in (val_fraction, test_fraction)]
    if sum(counts) >= n:
        raise BuildError(f"Expected more usable cases than the {sum(counts)} held out for val/test "
                         f"(train needs one). Received: {n} usable cases")
    return counts[0], counts[1]


def assign_splits(case_ids: list[str], settings: BuildSettings) -> dict[str, list[str]]:
    """Splits cases (in natural order) into train/val/test; each split keeps natural order.

    Returns:
        ``{split: [case_id, ...]}`` holding only non-empty splits.
    """
    if settings.val_cases or settings.test_cases:
        for name, listed in (("val_cases", settings.val_cases), ("test_cases", settings.test_cases)):
            unknown = sorted(set(listed) - set(case_ids))
            _raise_if(unknown, f"Expected {name} to name usable cases. Received: {unknown} "
                               f"(usable: {case_ids})")
        held = set(settings.val_cases) | set(settings.test_cases)
        assignment = {c: "val" if c in settings.val_cases else "test" if c in held else "train" for c in case_ids}
    else:
        n_val, n_test = split_counts(len(case_ids), settings.val_fraction, settings.test_fraction)
        if settings.holdout == "last":
            order = np.arange(len(case_ids))[::-1]
        else:
            order = np.random.default_rng(settings.seed).permutation(len(case_ids))
        assignment = {c: "train" for c in case_ids}
        for rank, i in enumerate(order[: n_test + n_val]):
            assignment[case_ids[i]] = "test" if rank < n_test else "val"
    splits = {s: [c for c in case_ids if assignment[c] == s] for s in SPLITS}
    _raise_if(not splits["train"], f"Expected at least one train case. Received: all of {case_ids} held out")
    return {s: cases for s, cases in splits.items() if cases}


def _raise_if(condition, message: str) -> None:
    if condition:
        raise BuildError(message)


def _map_cases(fn, tasks: list[tuple], workers: int):
    """Yields ``fn(*task)`` in task order; at most ``workers + 1`` results are held at once."""
    if workers <= 1 or len(tasks) <= 1:
        yield from (fn(*task) for task in tasks)
        return
    # spawn: the parent has TensorFlow loaded, which is not fork-safe
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)),
                               mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = deque()
        for task in tasks:
            pending.append(pool.submit(fn, *task))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_build_json(path, read_text) -> dict:
    """Reads a manifest or build state with ``read_text(path)``; unreadable is a :class:`BuildError`."""
    try:
        return json.loads(read_text(path))
    except (OSError, ValueError) as exc:
        raise BuildError(f"{path}: unreadable ({exc}); use --overwrite to rebuild") from None


def _changed(old: dict, new: dict) -> str:
    return ", ".join(changed_settings(old, new, ignore=RUN_ONLY)) or "source folder"


def confirm_finished(manifest: dict, settings: BuildSettings, out, log) -> dict:
    """Returns the manifest found in ``out`` when it is this very build (and logs the no-op).

    Raises:
        BuildError: it is a build with other settings.
    """
    if manifest.get("settings_hash") != settings.settings_hash():
        raise BuildError(f"{out}: holds a finished build with different settings "
                         f"({_changed(manifest.get('settings', {}), settings.to_dict())}); "
                         f"use --overwrite to rebuild")
    log(f"{out}: already built with these settings; nothing to do (use --overwrite to rebuild)")
    return manifest


def check_unfinished(state: dict, settings: BuildSettings, out) -> None:
    """Raises a :class:`BuildError` when the build state found in ``out`` has other settings."""
    if state.get("settings_hash") != settings.settings_hash():
        raise BuildError(f"{out}: holds an unfinished build with different settings "
                         f"({_changed(state.get('settings', {}), settings.to_dict())}); "
                         f"use --overwrite to start over")


def _finished_build(out: Path, settings: BuildSettings, log) -> dict | None:
    """The existing manifest when the folder holds this very build; None to (re)build."""
    path = out / MANIFEST_FILE
    if not path.exists():
        return None
    if settings.overwrite:
        path.unlink()
        return None
    manifest = confirm_finished(read_build_json(path, Path.read_text), settings, out, log)
    (out / STATE_FILE).unlink(missing_ok=True)
    return manifest


def _load_state(out: Path, settings: BuildSettings, log) -> dict:
    """The build state to resume from (a fresh one if none); removes stray and partial shards.

    ``out`` is not created here: the first write (the state file after validating the cases)
    creates it, so a source that fails validation leaves no empty output folder behind.
    """
    path, state = out / STATE_FILE, None
    if path.exists() and not settings.overwrite:
        state = read_build_json(path, Path.read_text)
        check_unfinished(state, settings, out)
    state = state or {"settings_hash": settings.settings_hash(), "completed": {}}
    state["settings"] = settings.to_dict()
    for split, entry in list(state["completed"].items()):
        if not all((out / s["file"]).exists() for s in entry["shards"]):
            del state["completed"][split]
    keep = {s["file"] for entry in state["completed"].values() for s in entry["shards"]}
    for p in out.iterdir() if out.is_dir() else ():
        if p.is_dir() and p.name.startswith(TEMP_PREFIX):  # left by a killed Beam build
            shutil.rmtree(p)
        elif p.is_file() and (p.name.startswith(TEMP_PREFIX) or (SHARD_RE.match(p.name) and p.name not in keep)):
            p.unlink()
    if state["completed"]:
        log(f"{out}: resuming; splits already written: {', '.join(state['completed'])}")
    return state


def case_tasks(settings: BuildSettings) -> list[CaseTask]:
    """Finds the cases of ``settings.source``: one task per case, in natural order.

    File paths are made absolute, so a worker with another working directory (a Beam
    worker) reads the same files.

    Raises:
        BuildError: the folder is missing or holds no case.
    """
    try:
        found = find_dataset_cases(settings.source, settings.dataset, settings.phase, settings.series)
    except VolumeError as exc:
        raise BuildError(str(exc)) from None
    return [CaseTask(replace(f, image=Path(f.image).resolve(), label=f.label and Path(f.label).resolve()),
                     settings.norm, settings.selection, settings.outputs) for f in found]


def case_task(settings: BuildSettings, case_id: str, info: dict) -> CaseTask:
    """The task that extracts a validated case (``info`` as :func:`inspect_case` returned it)."""
    files = case_from_entry(case_id, info)
    return CaseTask(files, settings.norm, settings.selection, settings.outputs)


def plan_build(settings: BuildSettings, infos: list[dict]) -> dict:
    """Sets unusable cases aside with their reasons and draws the case-level splits.

    Args:
        settings: the build settings.
        infos: :func:`inspect_case` of every case, in natural case order.

    Returns:
        ``{"cases": {case_id: info}, "skipped": [{"case_id", "reason"}], "splits":
        {split: [case_id, ...]}}``, cases in natural order, splits from :func:`assign_splits`.

    Raises:
        BuildError: no usable case, or too few for the requested splits.
    """
    cases = {info["case_id"]: info for info in infos if "skip" not in info}
    skipped = [{"case_id": info["case_id"], "reason": info["skip"]} for info in infos if "skip" in info]
    if not cases:
        reasons = "; ".join(f"{s['case_id']}: {s['reason']}" for s in skipped)
        raise BuildError(f"{settings.source}: no usable case left ({len(skipped)} skipped: {reasons})")
    return {"cases": cases, "skipped": skipped, "splits": assign_splits(list(cases), settings)}


def _ingest(settings: BuildSettings, workers: int, progress) -> dict:
    """Validates every case, chooses slices (or crops) and draws the splits."""
    tasks = [(task,) for task in case_tasks(settings)]
    infos, slices = [], 0
    for done, info in enumerate(_map_cases(record_kind(settings).inspect, tasks, workers), 1):
        infos.append(info)
        slices += len(info.get("slices", ()))
        progress("validate", done, len(tasks), slices)
    return plan_build(settings, infos)


def changed_case(case_id: str, data: dict) -> dict:
    """The ``skipped`` entry of a case whose files failed the checks when it was extracted."""
    return {"case_id": case_id, "reason": f"{data['skip']} (the files changed during the build)"}


def case_examples(case_id: str, info: dict, data: dict):
    """Serialises the slices :func:`extract_case` cut out of a case.

    Yields:
        ``(key, serialised example)`` in slice order; the key is ``<case_id>/<slice_index>``.
    """
    for j, index in enumerate(info["slices"]):
        yield example_key(case_id, index), slice_example(
            case_id, index, data["images"][j], data["labels"][j], info["spacing"], info["norm_stats"],
            data["has_tumour"][j])


class RecordKind(NamedTuple):
    """What one kind of records does per case; finding, validating, splitting, writing,
    resuming and describing a build are shared.

    Attributes:
        name: the manifest's ``kind``.
        features: the feature spec of its examples (``tfrecords_builder.features``).
        inspect: worker step 1, ``inspect(task) -> info``: JSON-ready facts, or
            ``{"case_id", "skip": reason}``; ``info["slices"]`` are the source slices used.
        extract: worker step 2, ``extract(task, info) -> data``, or ``{"case_id", "skip"}``.
        examples: ``examples(case_id, info, data)`` yields ``(key, serialised example)``.
        case_keys: the keys of ``info`` the manifest keeps per case (with ``CASE_ENTRY_KEYS``).
    """

    name: str
    features: dict
    inspect: Callable
    extract: Callable
    examples: Callable
    case_keys: tuple


SLICES = RecordKind("slices", FEATURES, inspect_case, extract_slices, case_examples,
                    ("shape", "spacing", "norm_stats", "slices"))


def record_kind(settings: BuildSettings) -> RecordKind:
    """Slices, or volumes (:func:`tfrecords_builder.volumes.volume_kind`) for ``settings.volumes``."""
    if settings.volumes:
        from tfrecords_builder.volumes import volume_kind

        return volume_kind(settings)
    return SLICES


def check_written(settings: BuildSettings, split: str, written: int, skipped: list[dict]) -> None:
    """Raises a :class:`BuildError` when ``split`` got no example (its cases were all skipped)."""
    reasons = "; ".join(f"{s['case_id']}: {s['reason']}" for s in skipped)
    _raise_if(written == 0, f"{settings.out}: split {split!r} has zero examples"
                            + (f" (skipped {reasons})" if skipped else ""))


def _write_split(settings: BuildSettings, state: dict, split: str, workers: int, progress) -> tuple[dict, list]:
    """Writes one split's shards.

    A case whose files changed since they were validated, so that they now fail the checks,
    is left out with its reason. Nothing of it is in the shards: a case is read whole before
    any of its slices is written.

    Returns:
        ``(manifest entry, skipped)``, ``skipped`` as ``[{"case_id", "reason"}]``.

    Raises:
        BuildError: the split is left without examples.
    """
    kind = record_kind(settings)
    case_ids = state["splits"][split]
    infos = [state["cases"][c] for c in case_ids]
    tasks = [(case_task(settings, c, info), info) for c, info in zip(case_ids, infos)]
    writer = ShardWriter(settings.out, settings.dataset, split, int(settings.shard_mb * 1e6), settings.gzip)
    written, kept, skipped = 0, [], []
    try:
        for done, (case_id, info, data) in enumerate(
                zip(case_ids, infos, _map_cases(kind.extract, tasks, workers)), 1):
            if "skip" in data:
                skipped.append(changed_case(case_id, data))
            else:
                for _, example in kind.examples(case_id, info, data):
                    writer.write(example)
                    written += 1
                kept.append(case_id)
            progress(f"write {split}", done, len(case_ids), written)
        check_written(settings, split, written, skipped)
        shards = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return {"cases": kept, "num_examples": written, "shards": shards}, skipped


def drop_cases(state: dict, split: str, skipped: list[dict]) -> None:
    """Moves cases skipped while writing ``split`` from its case list and the cases to ``skipped``."""
    gone = {s["case_id"] for s in skipped}
    state["splits"][split] = [c for c in state["splits"][split] if c not in gone]
    for case_id in gone:
        del state["cases"][case_id]
    state["skipped"] = state["skipped"] + skipped


def _class_stats(state: dict, outputs) -> dict:
    stats = {}
    for split, case_ids in state["splits"].items():
        infos = [state["cases"][c] for c in case_ids]

        def total(key):
            return sum(i[key] for i in infos)

        voxels = max(total("voxels"), 1)
        fg = {"liver": total("foreground_voxels") / voxels, "tumour": total("tumour_voxels") / voxels}
        stats[split] = {"num_slices": sum(len(i["slices"]) for i in infos),
                        "tumour_slices": total("tumour_slices"),
                        "foreground_fraction": {name: fg[name] for name in outputs}}
    return stats


def manifest_for(settings: BuildSettings, state: dict) -> dict:
    """The manifest of a finished build.

    Args:
        settings: the build settings.
        state: ``cases``, ``skipped`` and ``splits`` (:func:`plan_build`, less the cases
            :func:`drop_cases` moved), and ``completed``: each split's manifest entry
            (``cases``, ``num_examples``, ``shards``).
    """
    split_of = {c: s for s, cases in state["splits"].items() for c in cases}
    kind = record_kind(settings)
    keep = (*CASE_ENTRY_KEYS, *kind.case_keys)
    return {
        "version": MANIFEST_VERSION,
        "kind": kind.name,
        "name": settings.dataset,
        "modality": settings.modality,
        "context": settings.context,
        "channels": context_channels(settings.context),
        "outputs": list(settings.outputs),
        "compression": "GZIP" if settings.gzip else None,
        "norm": settings.norm.to_dict(),
        "engine": settings.engine,
        "settings": settings.to_dict(),
        "settings_hash": settings.settings_hash(),
        "splits": {s: state["completed"][s] for s in SPLITS if s in state["splits"]},
        "cases": {c: {"split": split_of[c], **{k: info[k] for k in keep}} for c, info in state["cases"].items()},
        "skipped": state["skipped"],
        "class_stats": _class_stats(state, settings.outputs),
    }


def build_records(settings: BuildSettings, progress=None, log=None) -> dict:
    """Builds (or resumes, or confirms) the records folder ``settings.out``.

    ``settings.engine == "beam"`` hands the build to :func:`tfrecords_builder.beam.build_records_beam`.

    Args:
        settings: the build settings.
        progress: optional ``callable(stage, cases_done, cases_total, slices)``.
        log: optional ``callable(message)`` for one-line notices (no-op, resume).

    Returns:
        The manifest (also written to ``out/manifest.json``).

    Raises:
        BuildError: no usable case, too few cases for the splits, or the folder holds a
            different build and ``overwrite`` is off.
    """
    progress = progress or (lambda *a: None)
    log = log or (lambda message: None)
    if settings.engine == "beam":
        from tfrecords_builder.beam import build_records_beam

        return build_records_beam(settings, progress, log)
    out, workers = Path(settings.out), settings.workers
    manifest = _finished_build(out, settings, log)
    if manifest is not None:
        return manifest
    state = _load_state(out, settings, log)
    if "cases" not in state:
        state.update(_ingest(settings, workers, progress))
        write_json(out / STATE_FILE, state)
    for split in state["splits"]:
        if split not in state["completed"]:
            entry, skipped = _write_split(settings, state, split, workers, progress)
            drop_cases(state, split, skipped)
            state["completed"][split] = entry
            write_json(out / STATE_FILE, state)
    manifest = manifest_for(settings, state)
    write_json(out / MANIFEST_FILE, manifest)
    (out / STATE_FILE).unlink(missing_ok=True)
    return manifest
