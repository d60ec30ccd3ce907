"""``build-records --engine beam``: the local build's steps as one Apache Beam pipeline.

The pipeline runs unchanged on the DirectRunner, Dataflow, Flink or Spark (``--beam-options``
is handed to Beam as given; see docs/scaling.md). Each step is the local engine's own
function from :mod:`tfrecords_builder.build` and :mod:`tfrecords_builder.ingest`, so a fix
reaches both engines:

1. find cases (:func:`case_tasks`, here, before the pipeline);
2. validate and choose slices (:func:`inspect_case`), one case per element;
3. set unusable cases aside and draw the splits (:func:`plan_build` over all cases in natural
   order: the split is the local engine's, whatever order the workers finish in);
4. extract and serialise (:func:`extract_case`, :func:`case_examples`); a case whose files
   changed since step 2 is skipped with :func:`changed_case`'s reason;
5. shard: a split's examples are ordered by a hash of their key (as TensorFlow Datasets does)
   and cut into contiguous runs by the local writer's size rule (:func:`shard_counts`), so
   shards have the local engine's sizes and TFDS names and each is written by one worker;
6. write the manifest (:func:`manifest_for`), here, after the pipeline.

The examples of each split are the local engine's; shard boundaries and example order
differ, and the manifest's ``engine`` says ``"beam"``.

Safe when killed: output goes through Beam's ``FileSystems`` (local paths, ``gs://``,
``s3://``, ``hdfs://``) into ``OUT/.tmp-beam-<id>/``, which never holds a manifest. Only when
the pipeline has finished are the shards renamed into ``OUT``, and the manifest is written
last under a temporary name and renamed (atomic on a local disk). A killed build therefore
leaves no folder with a manifest; the next build removes what it left and starts again.

Inputs are read by the case finders and NIfTI readers from local paths, so the source folder
must be visible at the same path to the launching machine and every worker (a shared or
mounted file system); the case paths are made absolute before they are sent.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import uuid
from pathlib import Path

from kerasunet.core.records_format import MANIFEST_FILE, SHARD_RE, TEMP_PREFIX, file_sha256, shard_name
from tfrecords_builder.build import (SPLITS, STATE_FILE, BuildError, BuildSettings, case_examples, case_task,
                                     case_tasks, changed_case, check_unfinished, check_written, confirm_finished,
                                     drop_cases, manifest_for, plan_build, read_build_json)
from tfrecords_builder.ingest import extract_case, inspect_case

BEAM_EXTRA = "pip install 'kerasunet[beam]'"
TEMP_DIR_PREFIX = f"{TEMP_PREFIX}beam-"
FACTS_FILE = "facts.json"  # what the pipeline tells the driver: plan, skipped cases, shards


def _import_beam():
    try:
        import apache_beam
    except ImportError:
        raise BuildError(f"--engine beam needs Apache Beam, which is not installed: {BEAM_EXTRA}") from None
    return apache_beam


# --- file system: everything through Beam's FileSystems, so gs://, s3:// and hdfs:// work ---

def _fs():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _join(folder: str, *names: str) -> str:
    return _fs().join(folder, *names)


def _read_text(path: str) -> str:
    from apache_beam.io.filesystem import CompressionTypes

    with _fs().open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read().decode()


def _write_text(path: str, text: str) -> None:
    from apache_beam.io.filesystem import CompressionTypes

    with _fs().create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(text.encode())


def _publish_json(out: str, name: str, obj) -> None:
    """Writes ``out/name`` under a temporary name, then renames it (atomic on a local disk)."""
    tmp = _join(out, f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    _write_text(tmp, json.dumps(obj, indent=2) + "\n")
    _fs().rename([tmp], [_join(out, name)])


def _is_local(path: str) -> bool:
    return _fs().get_scheme(path) is None


def _delete_folder(path: str) -> None:
    if _is_local(path):  # Beam's local delete removes the files but keeps the folders
        shutil.rmtree(path, ignore_errors=True)
    else:
        _fs().delete([path.rstrip("/") + "/"])  # object stores and HDFS: everything under it


def _clear(out: str, keep: set[str] = frozenset()) -> None:
    """Deletes what unfinished builds left in ``out``: temporary files and folders, shards not
    in ``keep``, and the local engine's build state."""
    files, folders = set(), set()
    for path in (m.path for m in _fs().match([_join(out, "**")])[0].metadata_list):
        top, _, rest = path[len(out):].lstrip("/").partition("/")
        if rest and top.startswith(TEMP_PREFIX):
            folders.add(_join(out, top))
        elif not rest and (top.startswith(TEMP_PREFIX) or top == STATE_FILE
                           or (SHARD_RE.match(top) and top not in keep)):
            files.add(path)
    if _is_local(out) and os.path.isdir(out):  # empty temporary folders hold no file to list
        folders |= {e.path for e in os.scandir(out) if e.is_dir() and e.name.startswith(TEMP_PREFIX)}
    if files:
        _fs().delete(sorted(files))
    for folder in sorted(folders):
        _delete_folder(folder)


def _prepare(out: str, settings: BuildSettings, log) -> dict | None:
    """The finished manifest when ``out`` holds this very build; else clears ``out`` for a build."""
    fs, manifest_path = _fs(), _join(out, MANIFEST_FILE)
    if fs.exists(manifest_path):
        if settings.overwrite:
            fs.delete([manifest_path])
        else:
            manifest = confirm_finished(read_build_json(manifest_path, _read_text), settings, out, log)
            _clear(out, keep={s["file"] for e in manifest["splits"].values() for s in e["shards"]})
            return manifest
    state_path = _join(out, STATE_FILE)
    if fs.exists(state_path) and not settings.overwrite:
        check_unfinished(read_build_json(state_path, _read_text), settings, out)
        log(f"{out}: discarding the local engine's unfinished build (same settings)")
    _clear(out)
    return None


# --- pipeline steps: module-level functions, pickled by reference for the workers ---------

def _inspect(item):
    index, task = item
    return index, inspect_case(task)


def _plan(indexed_infos, settings: BuildSettings) -> dict:
    infos = [info for _, info in sorted(indexed_infos, key=lambda pair: pair[0])]
    try:
        return plan_build(settings, infos)
    except BuildError as exc:  # reported by the driver after the pipeline, as one line
        return {"error": str(exc), "infos": len(infos)}


def _case_jobs(plan: dict):
    for split, case_ids in plan.get("splits", {}).items():
        for case_id in case_ids:
            yield split, case_id, plan["cases"][case_id]


def _extract(job, settings: BuildSettings):
    from apache_beam import pvalue

    split, case_id, info = job
    data = extract_case(case_task(settings, case_id, info), info["slices"], info["shape"])
    if "skip" in data:
        yield pvalue.TaggedOutput("skipped", {"split": split, **changed_case(case_id, data)})
        return
    for key, example in case_examples(case_id, info, data):
        yield split, (_order(key), example)


def _order(key: str) -> tuple[bytes, str]:
    """Where an example goes in its split: by a hash of its key, which spreads every case over
    the shards, then by the key itself."""
    return hashlib.sha256(key.encode()).digest()[:8], key


def _size(element):
    from tfrecords_builder.writer import record_size

    split, (order, example) = element
    return split, (order, record_size(example))


def _boundaries(grouped, shard_bytes: int):
    """``(split, [first order key of each shard])`` by the local writer's size rule."""
    from tfrecords_builder.writer import shard_counts

    split, sized = grouped
    sized = sorted(sized, key=lambda pair: pair[0])
    counts = shard_counts((size for _, size in sized), shard_bytes)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return split, [sized[i][0] for i in starts]


def _assign(element, bounds: dict):
    split, (order, example) = element
    index = bisect.bisect_right(bounds[split], order) - 1
    return (split, index), (order, example)


def _write_shard(grouped, settings: BuildSettings, temp_dir: str, bounds: dict) -> dict:
    """Writes one shard into ``temp_dir`` under its final name; returns its manifest entry."""
    from apache_beam.io.filesystem import CompressionTypes

    from tfrecords_builder.writer import write_records

    (split, index), items = grouped
    examples = [example for _, example in sorted(items, key=lambda pair: pair[0])]
    name = shard_name(settings.dataset, split, index, len(bounds[split]))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name  # TensorFlow writes the records, Beam's FileSystems moves them
        count = write_records(local, examples, settings.gzip)
        digest = file_sha256(local)
        with open(local, "rb") as src, _fs().create(
                _join(temp_dir, name), compression_type=CompressionTypes.UNCOMPRESSED) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return {"split": split, "index": index, "file": name, "num_examples": count, "sha256": digest}


def _facts(_, plan: dict, skipped: list, shards: list) -> dict:
    return {"plan": plan, "skipped": skipped, "shards": shards}


def _write_facts(facts: dict, path: str) -> None:
    _write_text(path, json.dumps(facts))


def _pipeline(p, settings: BuildSettings, tasks: list, temp_dir: str) -> None:
    """Adds the build's steps to the pipeline ``p``; its one output is ``temp_dir/facts.json``."""
    import apache_beam as beam
    from apache_beam.pvalue import AsDict, AsList, AsSingleton

    infos = (p | "Cases" >> beam.Create(list(enumerate(tasks)))
               | "SpreadCases" >> beam.Reshuffle()
               | "Validate" >> beam.Map(_inspect))
    plan = (infos | "AllCases" >> beam.combiners.ToList()
                  | "Plan" >> beam.Map(_plan, settings))
    extracted = (plan | "CaseJobs" >> beam.FlatMap(_case_jobs)
                      | "SpreadJobs" >> beam.Reshuffle()
                      | "Extract" >> beam.FlatMap(_extract, settings).with_outputs("skipped", main="examples"))
    examples = extracted.examples
    bounds = (examples | "Sizes" >> beam.Map(_size)
                       | "SizesBySplit" >> beam.GroupByKey()
                       | "Boundaries" >> beam.Map(_boundaries, int(settings.shard_mb * 1e6)))
    shards = (examples | "AssignShard" >> beam.Map(_assign, AsDict(bounds))
                       | "ByShard" >> beam.GroupByKey()
                       | "WriteShards" >> beam.Map(_write_shard, settings, temp_dir, AsDict(bounds)))
    _ = (p | "Driver" >> beam.Create([None])
           | "Facts" >> beam.Map(_facts, AsSingleton(plan), AsList(extracted.skipped), AsList(shards))
           | "WriteFacts" >> beam.Map(_write_facts, _join(temp_dir, FACTS_FILE)))


# --- driver ----------------------------------------------------------------------------------

def _options(settings: BuildSettings):
    from apache_beam.options.pipeline_options import PipelineOptions

    try:
        return PipelineOptions(shlex.split(settings.beam_options))
    except ValueError as exc:
        raise BuildError(f"Expected --beam-options as command-line flags. "
                         f"Received: beam_options={settings.beam_options!r} ({exc})") from None


def _new_pipeline(settings: BuildSettings, options):
    beam = _import_beam()
    try:
        return beam.Pipeline(options=options)
    except ValueError as exc:  # an unknown runner, for one
        raise BuildError(f"--beam-options {settings.beam_options!r}: {exc}") from None


def _finish(settings: BuildSettings, facts: dict, progress) -> dict:
    """The local engine's end state (see :func:`manifest_for`) from the pipeline's facts.

    Raises:
        BuildError: no usable case, too few for the splits, or a split left without examples.
    """
    plan = facts["plan"]
    if "error" in plan:
        raise BuildError(plan["error"])
    state = {**plan, "completed": {}}
    for split in (s for s in SPLITS if s in plan["splits"]):
        position = {case_id: i for i, case_id in enumerate(plan["splits"][split])}
        skipped = sorted((s for s in facts["skipped"] if s["split"] == split), key=lambda s: position[s["case_id"]])
        skipped = [{"case_id": s["case_id"], "reason": s["reason"]} for s in skipped]
        shards = sorted((s for s in facts["shards"] if s["split"] == split), key=lambda s: s["index"])
        written = sum(s["num_examples"] for s in shards)
        check_written(settings, split, written, skipped)
        progress(f"write {split}", len(position), len(position), written)
        drop_cases(state, split, skipped)
        state["completed"][split] = {"cases": state["splits"][split], "num_examples": written,
                                     "shards": [{k: s[k] for k in ("file", "num_examples", "sha256")} for s in shards]}
    return state


def build_records_beam(settings: BuildSettings, progress, log) -> dict:
    """Builds the records folder ``settings.out`` with an Apache Beam pipeline.

    Args:
        settings: the build settings; ``beam_options`` go to Beam unchanged.
        progress: ``callable(stage, cases_done, cases_total, slices)``, called per stage
            once the pipeline has finished.
        log: ``callable(message)`` for one-line notices.

    Returns:
        The manifest (also written to ``out/manifest.json``).

    Raises:
        BuildError: Apache Beam is not installed, the options are unusable, no usable case,
            too few cases for the splits, a split without examples, or the folder holds a
            different build and ``overwrite`` is off.
    """
    _import_beam()
    options = _options(settings)
    pipeline = _new_pipeline(settings, options)
    _fs().set_options(options)
    out = os.path.abspath(settings.out) if _is_local(settings.out) else settings.out
    manifest = _prepare(out, settings, log)
    if manifest is not None:
        return manifest
    tasks = case_tasks(settings)
    temp_dir = _join(out, f"{TEMP_DIR_PREFIX}{uuid.uuid4().hex[:12]}")
    log(f"beam: {len(tasks)} cases; writing under {temp_dir}")
    with pipeline as p:  # runs the pipeline and waits for it
        _pipeline(p, settings, tasks, temp_dir)
    facts = json.loads(_read_text(_join(temp_dir, FACTS_FILE)))
    if "cases" in facts["plan"]:
        infos = facts["plan"]["cases"].values()
        progress("validate", len(tasks), len(tasks), sum(len(info["slices"]) for info in infos))
    state = _finish(settings, facts, progress)
    names = [s["file"] for entry in state["completed"].values() for s in entry["shards"]]
    _fs().rename([_join(temp_dir, name) for name in names], [_join(out, name) for name in names])
    manifest = manifest_for(settings, state)
    _publish_json(out, MANIFEST_FILE, manifest)
    _delete_folder(temp_dir)
    return manifest
