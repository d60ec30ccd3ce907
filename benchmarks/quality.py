"""Segmentation quality on unseen phantoms: kerasunet's defaults against a plain U-Net (not a test).

One run does everything, in ``--out`` (a temporary folder by default):

1. ``kerasunet.synth`` CT phantoms at ``--size`` with a seed the tests do not use
   (``--seed``, default 1234): ``--train-cases`` for training, ``--test-cases`` held out.
2. Records of the training cases with ``build-records`` defaults except the test split
   (``test_fraction=0``: the held-out phantoms are the test set), so 20 % of them validate;
   ``--context K`` overrides the 2.5D context.
3. kerasunet ``train`` with its defaults apart from ``--filters`` and ``--image-size`` (as the
   issue's run), for as many epochs as fit the budget: a two-epoch calibration run (not
   counted) gives the CPU time of an epoch (the second) and of what a run does once.
4. The plain U-Net written below (the issue's 60-line script: 2D U-Net, BCE + Dice, Adam 1e-3,
   batch 16, BatchNorm momentum 0.9, no augmentation, every training case, the last epoch)
   trained for the CPU time kerasunet used.
5. Both segment the held-out phantoms through :func:`kerasunet.predict.predict_volume` (the
   same preprocessing and post-processing) and are scored as ``kerasunet evaluate`` scores
   them (``lits2017``): liver and tumour Dice per case, lesion recall (IoU > 0.5) and
   precision. kerasunet's row is what ``predict`` gives by default: with the lesion filter
   the run fitted on its validation cases at the end of training (its
   ``lesion_filter.json``, :mod:`kerasunet.lesion_filter`); a second row shows it without.
   25 held-out phantoms by default (the issue's run had 5, too few to separate two models), and
   a paired bootstrap interval of the per-case Dice differences (:mod:`kerasunet.compare`).
   Both are scored again with every held-out scan ``--shifts`` HU brighter or darker (±30 by
   default): the contrast phase and the scanner move real livers by tens of HU.
6. The liver-ROI cascade (:mod:`kerasunet.cascade`) within the same budget: stage 1 a kerasunet
   run for ``--stage1-share`` of it, stage 2 ``train --stage tumour --liver-model`` with its
   defaults (``--roi-size`` the phantoms' size, 10 mm margin) for the rest; scored as above,
   with its own lesion filter (as ``predict`` of a cascade) and without; ``--no-cascade``
   leaves this arm out.

The budget: ``--minutes`` of wall time on all the machine's cores, i.e. ``minutes x 60 x
cores`` seconds of this process's CPU time (``time.process_time``, every thread), so a busy
machine stretches the wall time but not the work each model gets.

Usage::

    python benchmarks/quality.py                  # 15 minutes per model (the issue's budget)
    nice -n 10 python benchmarks/quality.py --minutes 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: tfrecords_builder too
from cli.main import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # the benchmark's own lines, not TensorFlow's start-up lines

import numpy as np  # noqa: E402

BASELINE_LR, BASELINE_BATCH, BASELINE_BN_MOMENTUM = 1e-3, 16, 0.9


# --- the plain baseline (the script) -----------------------------------------------

def plain_unet(channels: int, outputs: int, filters: int, depth: int = 4):
    """A plain 2D U-Net: two 3x3 conv-BN-ReLU per level, max-pool, transposed-conv up, concat."""
    import keras
    from keras import layers

    def block(x, f):
        for _ in range(2):
            x = layers.Conv2D(f, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization(momentum=BASELINE_BN_MOMENTUM)(x)
            x = layers.ReLU()(x)
        return x

    inputs = keras.Input((None, None, channels))
    x, skips = inputs, []
    for level in range(depth):
        x = block(x, filters * 2**level)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = block(x, filters * 2**depth)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(filters * 2**level, 2, strides=2, padding="same")(x)
        x = block(layers.Concatenate()([x, skips[level]]), filters * 2**level)
    return keras.Model(inputs, layers.Conv2D(outputs, 1, activation="sigmoid")(x))


def bce_dice(y_true, y_pred):
    """Mean pixel BCE plus 1 - soft Dice over the batch, averaged over channels."""
    from keras import ops

    y_pred = ops.clip(y_pred, 1e-7, 1 - 1e-7)
    bce = -ops.mean(y_true * ops.log(y_pred) + (1 - y_true) * ops.log(1 - y_pred))
    inter = ops.sum(y_true * y_pred, axis=(0, 1, 2))
    total = ops.sum(y_true + y_pred, axis=(0, 1, 2))
    return bce + 1.0 - ops.mean((2 * inter + 1) / (total + 1))


def train_baseline(records: Path, size: int, filters: int, cpu_budget: float, seed: int):
    """Trains :func:`plain_unet` on every slice of the records (train and val), the centre slice of
    each, until the budget is spent."""
    import keras

    from kerasunet.core.labels import OUTPUTS, targets_from_labels_np
    from kerasunet.data import get_dataset, read_manifest

    manifest = read_manifest(records)
    splits = [s for s, e in manifest["splits"].items() if e["num_examples"]]
    xs, ys = [], []
    for split in splits:
        batches = get_dataset(records, split, 64, training=False, image_size=(size, size))
        for x, labels in batches.as_numpy_iterator():  # the reader gives uint8 label maps
            xs.append(x)
            ys.append(targets_from_labels_np(labels, OUTPUTS[manifest["modality"]]))
    x, y = np.concatenate(xs), np.concatenate(ys)
    centre = x.shape[-1] // 2  # the script is single-slice: 2.5D records give it their centre slice
    x = x[..., centre:centre + 1]
    keras.utils.set_random_seed(seed)
    model = plain_unet(x.shape[-1], y.shape[-1], filters)
    model.compile(keras.optimizers.Adam(BASELINE_LR), bce_dice)

    class Budget(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if time.process_time() - start >= cpu_budget:
                self.model.stop_training = True

    start, epochs = time.process_time(), 0  # Budget reads start
    while time.process_time() - start < cpu_budget:
        history = model.fit(x, y, batch_size=BASELINE_BATCH, epochs=1, shuffle=True, verbose=0,
                            callbacks=[Budget()])
        epochs += 1
        print(f"  baseline epoch {epochs}: loss {history.history['loss'][-1]:.4f}, "
              f"{time.process_time() - start:.0f}/{cpu_budget:.0f} CPU s", flush=True)
    return model, {"epochs": epochs, "slices": len(x), "cpu_s": time.process_time() - start}


# --- kerasunet -------------------------------------------------------------------------------

def train_kerasunet(records: Path, out: Path, size: int, filters: int, cpu_budget: float, name: str = "kerasunet",
                    seed: int | None = None, **cascade):
    """kerasunet ``train`` defaults (but filters and image size) for the epochs that fit ``cpu_budget``.

    ``cascade``: the stage-2 settings (``stage``, ``liver_model``, ``roi_size``) of a cascade
    run, which then has no ``image_size`` (its input is the ROI). ``seed``: ``train``'s
    ``--seed`` (None: its default).
    """
    from kerasunet.train import train
    from kerasunet.train_settings import TrainSettings

    common = dict(records=str(records), filters=filters, **(cascade or {"image_size": (size, size)}),
                  **({} if seed is None else {"seed": seed}))
    ends = []  # CPU time at the end of each calibration epoch

    def note_epoch(line):
        if " done in " in line:
            ends.append(time.process_time())

    start = time.process_time()
    train(TrainSettings(out=str(out / f"{name}-calibration"), epochs=2, **common), progress=note_epoch)
    # the second epoch alone: no start-up or tracing; what the run adds once (start-up, tracing,
    # fitting its lesion filter) is the calibration's total minus two such epochs
    per_epoch, once = ends[1] - ends[0], (time.process_time() - start) - 2 * (ends[1] - ends[0])
    epochs = max(1, int((cpu_budget - once) // per_epoch))
    print(f"  {name} calibration: {per_epoch:.0f} CPU s an epoch, {once:.0f} CPU s once -> {epochs} epochs",
          flush=True)
    start, wall = time.process_time(), time.perf_counter()
    run = train(TrainSettings(out=str(out / name), epochs=epochs, **common),
                progress=lambda line: print("  " + line, flush=True) if " done in " in line else None)
    return run, {"cpu_s": time.process_time() - start, "wall_s": time.perf_counter() - wall, "epochs": epochs}


# --- scoring ------------------------------------------------------------------------------------

def segment(model, info, cases, shift: float = 0.0):
    """``[(case_id, volume, truth, labels, probabilities)]`` for the held-out cases, without any
    lesion filter (not even the run's own). ``shift``: HU added to every voxel first (a scan
    whose tissue is brighter or darker than the training cases'; air stays below the window)."""
    from dataclasses import replace

    from kerasunet.core.cases import load_case
    from kerasunet.predict import PredictSettings, predict_volume

    out = []
    for case in cases:
        volume, truth = load_case(case, "ct")
        if shift:
            volume = replace(volume, data=volume.data + np.float32(shift))
        labels, probs = predict_volume(model, info, volume, PredictSettings(run_lesion_filter=False))
        out.append((case.case_id, volume, truth, labels, probs))
    return out


def relabelled(predictions, outputs, settings) -> list:
    """The predictions' labels made again from their probabilities with other ``PredictSettings``."""
    from kerasunet.predict import final_labels

    return [(*p[:3], final_labels(p[4], outputs, p[1].spacing, settings, p[1].data), p[4]) for p in predictions]


def scores(predictions) -> dict:
    """Liver/tumour Dice per case and lesion precision/recall, as ``kerasunet evaluate`` gives them."""
    from kerasunet.lits_scoring import score_volume, summarize_cases

    per_case = [score_volume(p[3], p[2], p[1], "ct", "lits2017") for p in predictions]
    s = summarize_cases(per_case, "ct", "lits2017")["structures"]
    t = s["tumour"]
    return {"liver_dice": s["liver"]["dice_per_case"], "tumour_dice": t["dice_per_case"],
            "lesion_recall": t["lesion_recall"], "lesion_precision": t["lesion_precision"],
            "lesion_recall_gt0": t["lesion_recall_gt0"], "lesion_precision_gt0": t["lesion_precision_gt0"],
            "true_lesions": t["truth_lesions"], "pred_lesions": t["pred_lesions"],
            "cases": {p[0]: {name: m[name]["dice"] for name in ("liver", "tumour")}
                      for p, m in zip(predictions, per_case)}}


def own_filter_effect(info, predictions) -> dict:
    """The run's own lesion filter (``lesion_filter.json``, fitted at the end of training) applied
    to the held-out predictions, as ``predict`` applies it by default."""
    from kerasunet.lesion_filter import run_lesion_filter
    from kerasunet.predict import PredictSettings

    thresholds = run_lesion_filter(info)
    after = scores(relabelled(predictions, info.mask_outputs, PredictSettings(lesion_filter=thresholds)))
    return {"thresholds": thresholds and thresholds.to_dict(), "after": after}


def shifted(arms: dict, cases, shifts) -> dict:
    """Tumour and liver Dice/case of each arm when every held-out scan is ``shift`` HU brighter
    or darker, for each of ``shifts``: how much a model leans on the training scans' absolute
    intensities. Real scans differ by tens of HU between contrast phases and scanners.

    ``arms``: name -> ``(model, info, apply its own lesion filter)``; with it, scored as
    :func:`own_filter_effect` scores the unshifted scans.
    """
    out = {}
    for name, (model, info, own_filter) in arms.items():
        for shift in shifts:
            predictions = segment(model, info, cases, shift)
            r = own_filter_effect(info, predictions)["after"] if own_filter else scores(predictions)
            out.setdefault(name, {})[f"{shift:+g}"] = {key: r[key] for key in ("liver_dice", "tumour_dice", "cases")}
    return out


def without_hole_filling(info, predictions) -> dict:
    """Scores with the liver's holes left open (``predict --no-fill-liver-holes``), no lesion filter."""
    from kerasunet.postprocess import PostprocessSettings
    from kerasunet.predict import PredictSettings

    settings = PredictSettings(postprocess=PostprocessSettings(fill_liver_holes=False))
    return scores(relabelled(predictions, info.mask_outputs, settings))


# --- the run ----------------------------------------------------------------------------------

def make_data(out: Path, args) -> tuple[Path, list]:
    """Phantoms, a training folder of links, records of it, and the held-out cases."""
    from kerasunet.core.cases import find_cases
    from kerasunet.synth import synth_lits
    from tfrecords_builder.build import BuildSettings, build_records

    synth_lits(out / "phantoms", args.train_cases + args.test_cases, size=args.size, seed=args.seed)
    folders = {"train": range(args.train_cases), "test": range(args.train_cases, args.train_cases + args.test_cases)}
    for name, indices in folders.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in indices:
            for stem in ("volume", "segmentation"):
                link = out / name / f"{stem}-{i}.nii"
                if not link.exists():
                    link.symlink_to(out / "phantoms" / f"{stem}-{i}.nii")
    records = out / "records"
    context = {} if args.context is None else {"context": args.context}  # default: build-records'
    build_records(BuildSettings(source=str(out / "train"), dataset="lits", out=str(records), test_fraction=0.0,
                                workers=1, **context))
    return records, find_cases(out / "test")[1]


def hu_shifts(text: str) -> list[float]:
    """``--shifts``: comma-separated HU (argparse names this function when one is not a number)."""
    return [float(v) for v in text.split(",") if v]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="Wall minutes per model on all cores.")
    parser.add_argument("--seed", type=int, default=1234, help="Phantom seed (not one the tests use).")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--train-cases", type=int, default=10)
    parser.add_argument("--test-cases", type=int, default=25,
                        help="Held-out phantoms (the issue's run had 5; 25 separate the models better).")
    parser.add_argument("--context", type=int, default=None,
                        help="2.5D context K of the records [build-records' default]; the baseline "
                             "always gets the centre slice.")
    parser.add_argument("--stage1-share", type=float, default=0.6,
                        help="The cascade's stage-1 share of its budget; stage 2 gets the rest.")
    parser.add_argument("--cascade", action=argparse.BooleanOptionalAction, default=True,
                        help="Also train and score the cascade arm (--no-cascade: the defaults and the "
                             "baseline only, half an hour less at the issue's budget).")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="Seed of every training run (weights, data order, augmentation), to repeat "
                             "the benchmark on the same phantoms [train's default for kerasunet, the "
                             "phantom seed for the baseline].")
    parser.add_argument("--shifts", type=hu_shifts, default=[-30.0, 30.0],
                        help="HU shifts of the held-out scans at which both models are scored again, "
                             "comma-separated ('' for none) [-30,30].")
    parser.add_argument("--out", type=Path, default=None, help="Work folder [a temporary one].")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="kerasunet-quality-"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    budget = args.minutes * 60 * cores
    print(f"work folder {out}; budget {args.minutes:g} min on {cores} cores = {budget:.0f} CPU s per model")
    records, test_cases = make_data(out, args)

    from kerasunet.core.runs import RunInfo, load_model, resolve_run

    run, k_stats = train_kerasunet(records, out, args.size, args.filters, budget, seed=args.train_seed)
    info = resolve_run(run)
    k_model = load_model(info)
    wall = time.perf_counter()
    b_seed = args.seed if args.train_seed is None else args.train_seed
    b_model, b_stats = train_baseline(records, args.size, args.filters, k_stats["cpu_s"], b_seed)
    b_wall = time.perf_counter() - wall
    b_info = RunInfo(out / "baseline.keras", {**info.config, "data": {**info.config["data"], "context": 0},
                                              "model": {**info.config["model"], "depth": 4, "input_channels": 1}})
    b_model.save(b_info.model_path)  # kept, so later scoring on more held-out phantoms can include it
    results = {"kerasunet": scores(k_pred := segment(k_model, info, test_cases)),
               "baseline": scores(segment(b_model, b_info, test_cases))}
    results["kerasunet"] |= k_stats
    results["baseline"] |= {"wall_s": b_wall, **b_stats}
    results["lesion_filter"] = own_filter_effect(info, k_pred)
    results["no_hole_filling"] = without_hole_filling(info, k_pred)
    results["shifted"] = shifted({"kerasunet": (k_model, info, True), "baseline": (b_model, b_info, False)},
                                 test_cases, args.shifts)
    if args.cascade:
        results |= cascade_arm(records, out, args, k_stats["cpu_s"], test_cases)
    report(results, args)
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    return results


def cascade_arm(records: Path, out: Path, args, budget: float, test_cases) -> dict:
    """Both stages of the cascade within one ``budget``: stage 1 ``args.stage1_share`` of it."""
    from kerasunet.core.runs import resolve_run
    from kerasunet.predict import load_predictor

    liver, liver_stats = train_kerasunet(records, out, args.size, args.filters, budget * args.stage1_share,
                                         "cascade-liver", seed=args.train_seed)
    stage2, stats = train_kerasunet(records, out, args.size, args.filters, budget - liver_stats["cpu_s"],
                                    "cascade-tumour", seed=args.train_seed, stage="tumour", liver_model=str(liver),
                                    roi_size=(args.size, args.size))
    model, info = load_predictor(resolve_run(stage2))
    predictions = segment(model, info, test_cases)
    both = {key: liver_stats[key] + stats[key] for key in ("cpu_s", "wall_s", "epochs")}
    return {"cascade": scores(predictions) | both, "cascade_lesion_filter": own_filter_effect(info, predictions)}


def report(results: dict, args) -> None:
    trained = "" if args.train_seed is None else f", training seed {args.train_seed}"
    print(f"\nheld-out phantoms: {args.test_cases} cases, seed {args.seed}, {args.size}x{args.size}; "
          f"budget {args.minutes:g} min per model{trained}")
    print("lesion recall and precision: lits2017 (detected at IoU > 0.5) / the '> 0' variant (any overlap)")
    print(f"{'model':<27}{'liver Dice/case':>16}{'tumour Dice/case':>17}{'lesion recall':>15}"
          f"{'lesion precision':>17}{'lesions':>8}{'epochs':>7}{'CPU s':>7}{'wall s':>7}")
    rows = [("kerasunet defaults", {**results["kerasunet"], **results["lesion_filter"]["after"]}),
            ("plain U-Net baseline", results["baseline"]),
            ("kerasunet, no lesion filter", results["kerasunet"])]
    if "cascade" in results:
        rows += [("cascade (same budget)", {**results["cascade"], **results["cascade_lesion_filter"]["after"]}),
                 ("cascade, no lesion filter", results["cascade"])]
    for name, r in rows:
        print(f"{name:<27}{r['liver_dice']:>16.3f}{r['tumour_dice']:>17.3f}"
              f"{r['lesion_recall']:>8.2f} / {r['lesion_recall_gt0']:.2f}"
              f"{r['lesion_precision']:>10.2f} / {r['lesion_precision_gt0']:.2f}"
              f"{r['pred_lesions']:>8}{r['epochs']:>7}{r['cpu_s']:>7.0f}{r['wall_s']:>7.0f}")
    print(f"true lesions: {results['kerasunet']['true_lesions']}")
    print(f"kerasunet liver Dice/case without hole filling: {results['no_hole_filling']['liver_dice']:.3f}")
    filters = {name: results[key]["thresholds"] for name, key in
               (("kerasunet", "lesion_filter"), ("cascade", "cascade_lesion_filter")) if key in results}
    print("lesion filters (each run's lesion_filter.json): "
          + ", ".join(f"{name} {thresholds}" for name, thresholds in filters.items()))
    if "cascade" in results:
        print(f"cascade: stage 1 {args.stage1_share:.0%} of the budget, stage 2 the rest")
    for name, by_shift in results.get("shifted", {}).items():
        print(f"{name} with the scans shifted: " + ", ".join(
            f"{shift} HU liver {r['liver_dice']:.3f} tumour {r['tumour_dice']:.3f}" for shift, r in by_shift.items()))
    for line in paired_lines(results):
        print(line)
    base = results["baseline"]["tumour_dice"]
    for name, key in (("kerasunet defaults", "lesion_filter"), ("cascade", "cascade_lesion_filter")):
        if key not in results:
            continue
        ratio = results[key]["after"]["tumour_dice"] / base if base > 0 else math.inf
        print(f"tumour Dice ratio {name} / baseline: {ratio:.2f}")


def paired_lines(results: dict) -> list[str]:
    """Paired bootstrap intervals of the per-case Dice differences (:mod:`kerasunet.compare`):
    the defaults against the baseline, and the cascade against the defaults."""
    from kerasunet.compare import compare_pair

    arms = {"kerasunet": results["lesion_filter"]["after"]["cases"], "baseline": results["baseline"]["cases"]}
    if "cascade_lesion_filter" in results:
        arms["cascade"] = results["cascade_lesion_filter"]["after"]["cases"]
    lines = []
    for first, second in (("kerasunet", "baseline"), ("cascade", "kerasunet")):
        if first not in arms:
            continue
        for structure in ("liver", "tumour"):
            per_case = [{case: d[structure] for case, d in arms[name].items()} for name in (first, second)]
            if len(per_case[0]) >= 2:
                pair = compare_pair(first, per_case[0], second, per_case[1])
                lines.append(f"{structure} Dice/case, " + pair.describe())
    return lines


if __name__ == "__main__":
    main()
