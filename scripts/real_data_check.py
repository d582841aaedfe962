"""The real-photo yardstick: k-fold cross-validation on coco128 against a linear probe.

For each fold of the 126 labelled coco128 photos (seeded k-fold, 5 by
default), every head named by `--heads` is trained with the recipe of
`--config` (the same `experiment.train_on_splits` a `hybridnet-tf train`
runs: the config's `data.val_fraction` is held back from the training folds
for checkpoint choice and threshold tuning) and scored on the held-out fold.
The anchor is a scikit-learn logistic-regression probe on the frozen pooled
features of the same backbone and weights, fitted on the same images (C by
3-fold cross-validation), its thresholds tuned on the same held-back val
images. One table, mean ± std over folds:

    mAP | CF1 / OF1 at eval.threshold | CF1 / OF1 with tuned thresholds |
    decoded-set CF1 / OF1 | exact-set accuracy of the decoded sets, of the
    scores at eval.threshold and at the tuned thresholds | wall seconds per fold

Run from the repo root (a few minutes per head on 2 CPU cores):

    .venv/bin/python scripts/real_data_check.py --config configs/coco128_lite0.yaml \
        --out docs/results/real_data_check.json

With `--out`, every finished fold is written at once (`<out>.partial.json`);
a rerun with the same arguments picks up from there, so an interrupted run
loses at most the fold it was in.

`--config-data` cross-validates the training images of the config's own
`data` section instead of coco128 (a COCO-format JSON, a folder or a CSV
source: your own photos), with the same folds, heads and anchor:

    .venv/bin/python scripts/real_data_check.py --config my_photos.yaml --config-data \
        --out /tmp/my_photos_check.json

Training on 75 photos is sensitive to its seed: one fold's mAP can move by
several points with `train.seed` alone. `--train-seeds 0,1,2` trains every
head once per seed on each fold and counts the mean over seeds as the fold's
figure; the JSON keeps each seed's numbers, and the table gains the seed
spread (the mean over folds of the std over seeds) and each head's paired gap
to the probe.

The recipe's fine-tuning phase does not repeat run to run on CPU unless
`train.deterministic` is set (docs/real_data.md): for a before/after pair of
a change that should move no number, add `--set train.deterministic=true` to
both sides.

`--set key=value` overrides config keys for every head (e.g.
`--set train.epochs=3`); `--heads bce` runs one head; a head may carry its
own overrides after colons, e.g. `--heads hybrid,hybrid:model.decoder=attention`. The JSON holds
every fold's numbers; the Markdown table is printed and written beside it.
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

COLUMNS = (
    ("mAP", "mAP"),
    ("CF1", "CF1@t"),
    ("OF1", "OF1@t"),
    ("tuned_CF1", "CF1 tuned"),
    ("tuned_OF1", "OF1 tuned"),
    ("decoded_CF1", "CF1 set"),
    ("decoded_OF1", "OF1 set"),
    ("exact_set", "exact set"),
    ("exact_at_t", "exact@t"),
    ("tuned_exact", "exact tuned"),
    ("seconds", "s/fold"),
)


def default_coco128():
    return os.environ.get("HYBRIDNET_COCO128", os.path.join(ROOT, "..", "shared", "data", "coco128"))


def load_coco128(coco128_dir):
    from hybridnet_tf.data.coco_json import load_coco_json

    annotations = os.path.join(coco128_dir, "annotations", "instances_train2017.json")
    if not os.path.isfile(annotations):
        raise SystemExit(f"coco128 not found at {coco128_dir} (set HYBRIDNET_COCO128 or --data)")
    return load_coco_json(annotations, os.path.join(coco128_dir, "train2017"))


def _shown_path(path):
    """`path` relative to the repo when it lies inside it, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def load_config_images(data):
    """Every readable training image of a config's `data` section (coco_json, folder or csv).

    The whole training list: the folds, and their val parts (`data.val_fraction`),
    are cut from it. A test split the config names or cuts is left out.
    """
    from hybridnet_tf.data.load_splits import load_split

    if data["source"] not in ("coco_json", "folder", "csv"):
        raise SystemExit(f"--config-data cross-validates file sources (coco_json, folder, csv); "
                         f"the config's data.source is {data['source']!r}")
    # Unreadable files are left out, and load_split says which.
    return load_split({**data, "val_fraction": 0.0, "test_fraction": 0.0}, "train").examples


def fold_indices(num_images, folds, seed):
    from sklearn.model_selection import KFold

    return list(KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.arange(num_images)))


def fold_parts(images, config, folds, seed):
    """`(train, val, test)` parts of each fold: seeded k-fold, then the config's
    `data.val_fraction` held back from the training folds (val None at 0)."""
    from hybridnet_tf.data.splits import split_train_val

    for train_rows, test_rows in fold_indices(len(images), folds, seed):
        train_part, val_part = images.subset(train_rows), None
        if config["data"]["val_fraction"] > 0:
            train_part, val_part = split_train_val(
                train_part, config["data"]["val_fraction"], seed=config["data"]["split_seed"]
            )
        yield train_part, val_part, images.subset(test_rows)


def score_set(y_true, scores, decoded, threshold, tuned):
    """The yardstick's numbers for one model on one fold."""
    from hybridnet_tf.evaluation.metrics import mean_average_precision, set_metrics, threshold_metrics

    mean_ap, _ = mean_average_precision(y_true, scores)
    at_threshold = threshold_metrics(y_true, scores, threshold)
    # Whole sets right also for the score thresholds: the per-label tuned ones aim at F1, and a
    # fixed 0.5 is the rule that gets whole sets right when labels are independent given the
    # photo (the joint mode is then each label's own mode), so it is the decoder's fairer rival.
    row = {"mAP": mean_ap, "CF1": at_threshold["CF1"], "OF1": at_threshold["OF1"],
           "exact_at_t": at_threshold["exact"]}
    if tuned is not None:
        tuned_metrics = threshold_metrics(y_true, scores, tuned)
        row.update(tuned_CF1=tuned_metrics["CF1"], tuned_OF1=tuned_metrics["OF1"],
                   tuned_exact=tuned_metrics["exact"])
    if decoded is not None:
        decoded_metrics = set_metrics(y_true, decoded)
        row.update(
            decoded_CF1=decoded_metrics["CF1"],
            decoded_OF1=decoded_metrics["OF1"],
            exact_set=decoded_metrics["exact"],
        )
    return {key: float(value) for key, value in row.items()}


def backbone_features(config, images):
    """Pooled features of the config's backbone (frozen, its weights) for every image, and their labels."""
    from hybridnet_tf.experiment import as_dataset, build_model_from_config
    from hybridnet_tf.training.feature_cache import extract_features

    model = build_model_from_config(config, len(images.vocabulary))
    cached = extract_features(model, as_dataset(images, config, False, batch_size=32), progress=False)
    return cached.pooled(), cached.labels


def rows_of(index_of, part):
    """The rows of `backbone_features` that hold `part`'s images (`index_of`: path -> row)."""
    return np.array([index_of[path] for path in part.paths])


def run_probe(config, features, labels, index_of, train_part, val_part, test_part, seed):
    """The anchor: `linear_probe.fit_linear_probe` (one-vs-rest logistic regression on
    standardised frozen features, one C for all labels by 3-fold CV mAP)."""
    from hybridnet_tf.evaluation.thresholds import tune_thresholds
    from hybridnet_tf.training.linear_probe import fit_linear_probe

    start = time.perf_counter()
    rows = functools.partial(rows_of, index_of)
    probe = fit_linear_probe(features[rows(train_part)], labels[rows(train_part)], seed=seed)
    predict, c = probe.scores, probe.c
    tuned = None
    if val_part is not None:
        tuned = np.asarray(tune_thresholds(labels[rows(val_part)], predict(features[rows(val_part)]))["per_class"])
    test_rows = rows(test_part)
    row = score_set(labels[test_rows], predict(features[test_rows]), None, config["eval"]["threshold"], tuned)
    row["seconds"] = time.perf_counter() - start
    row["C"] = c
    return row


def run_head(config, splits, test_part, run_dir):
    from hybridnet_tf.evaluation.predictions import collect_predictions
    from hybridnet_tf.experiment import as_dataset, train_on_splits
    from hybridnet_tf.run_files import load_run, load_run_thresholds

    start = time.perf_counter()
    train_on_splits(config, run_dir, splits, verbose=0)
    _, vocabulary, model = load_run(run_dir)
    dataset = as_dataset(test_part, config, False, batch_size=config["eval"]["batch_size"])
    y_true, scores, decoded = collect_predictions(model, dataset)
    row = score_set(y_true, scores, decoded, config["eval"]["threshold"], load_run_thresholds(run_dir, vocabulary))
    row["seconds"] = time.perf_counter() - start
    return row


def mean_over_seeds(rows):
    """One fold's row for a head trained with several seeds: each figure's mean, the seeds' rows kept."""
    merged = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    if len(rows) > 1:
        merged["per_seed"] = rows
    return merged


def seed_spread(results, names, keys=("mAP", "decoded_OF1")):
    """`{name: {key: mean over folds of the std over seeds}}` for heads trained with several seeds."""
    spread = {}
    for name in names:
        per_fold = [fold[name]["per_seed"] for fold in results if "per_seed" in fold.get(name, {})]
        if per_fold:
            spread[name] = {key: float(np.mean([np.std([r[key] for r in rows]) for rows in per_fold]))
                            for key in keys}
    return spread


def gaps_to_probe(results, names):
    """Each head's paired per-fold gap to the probe: mAP against the probe's mAP, and its decoded
    sets' OF1 against the probe's OF1 with tuned thresholds. `{name: {key: (mean, folds ahead)}}`."""
    pairs = (("mAP", "mAP"), ("decoded_OF1", "tuned_OF1"))
    gaps = {}
    for name in names:
        folds = [fold for fold in results if name in fold]
        gaps[name] = {}
        for key, probe_key in pairs:
            if folds and key in folds[0][name] and probe_key in folds[0]["probe"]:
                diffs = [fold[name][key] - fold["probe"][probe_key] for fold in folds]
                gaps[name][key] = (float(np.mean(diffs)), int(sum(d > 0 for d in diffs)))
    return gaps


def gap_lines(gaps, num_folds, spread):
    """Markdown lines: the paired gaps to the probe (`gaps_to_probe`), and the seed spread where there is one."""
    lines = ["", "| model | mAP - probe mAP (folds ahead) | set OF1 - probe OF1 tuned (folds ahead) "
             "| seed spread: mAP / set OF1 |", "|---|---:|---:|---:|"]
    for name, gap in gaps.items():
        cells = [f"{100 * gap[key][0]:+.1f} ({gap[key][1]} of {num_folds})" if key in gap else "–"
                 for key in ("mAP", "decoded_OF1")]
        seeds = spread.get(name)
        cells.append(f"{100 * seeds['mAP']:.1f} / {100 * seeds['decoded_OF1']:.1f}" if seeds else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def summarise(results, names):
    """`{name: {column: (mean, std)}}` over folds."""
    summary = {}
    for name in names:
        rows = [fold[name] for fold in results if name in fold]
        summary[name] = {
            key: (float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows])))
            for key, _ in COLUMNS
            if rows and all(key in r for r in rows)
        }
    return summary


def markdown_table(summary, folds, note):
    header = "| model | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|---" + "|---:" * len(COLUMNS) + "|"]
    for name, stats in summary.items():
        cells = []
        for key, _ in COLUMNS:
            if key not in stats:
                cells.append("–")
            elif key == "seconds":
                cells.append(f"{stats[key][0]:.0f}")
            else:
                cells.append(f"{100 * stats[key][0]:.1f} ± {100 * stats[key][1]:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{folds}-fold mean ± std over folds. {note}\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "coco128_lite0.yaml"))
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--heads", default="bce,hybrid_rnn,hybrid")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the k-fold partition of the photos")
    parser.add_argument("--train-seeds", default=None,
                        help="comma-separated train.seed values; each head trains once per seed on every "
                             "fold and the fold counts the mean (default: the config's train.seed)")
    parser.add_argument("--data", default=default_coco128(), help="the coco128 folder")
    parser.add_argument("--config-data", action="store_true",
                        help="cross-validate the training images of --config's data section (coco_json, "
                             "folder or csv) instead of coco128")
    parser.add_argument("--out", help="JSON file for every fold's numbers (a .md table is written beside it)")
    args = parser.parse_args(argv)

    from hybridnet_tf.config import load_config
    from hybridnet_tf.data.load_splits import files_splits
    base = load_config(args.config, args.set)
    heads = [h for h in args.heads.split(",") if h]
    train_seeds = [int(v) for v in args.train_seeds.split(",") if v.strip()] if args.train_seeds else None
    if args.config_data:
        images = load_config_images(base["data"])
        source = f"{base['data']['source']} data of {_shown_path(args.config)}"
    else:
        images, source = load_coco128(args.data), "coco128"
    if len(images) < 2 * args.folds:
        raise SystemExit(f"{source}: {len(images)} labelled images are too few for {args.folds} folds")
    print(f"{source}: {len(images)} labelled images, {len(images.vocabulary)} labels; {args.folds} folds")
    start = time.perf_counter()
    features, labels = backbone_features(base, images)
    index_of = {path: i for i, path in enumerate(images.paths)}
    print(f"probe features {features.shape} in {time.perf_counter() - start:.0f} s")

    results = []
    partial = os.path.splitext(args.out)[0] + ".partial.json" if args.out else None
    run_key = {"argv": [args.config, args.set, heads, args.folds, args.seed] + ([train_seeds] if train_seeds else []),
               "data": "config" if args.config_data else os.path.abspath(args.data)}
    if partial and os.path.isfile(partial):
        with open(partial, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("run") == run_key:
            results = saved["folds"]
            print(f"resuming after {len(results)} finished fold(s) in {partial}")
    resumed = len(results)
    for fold, (train_part, val_part, test_part) in enumerate(fold_parts(images, base, args.folds, args.seed)):
        if fold < resumed:
            continue
        splits = files_splits(train_part, val_part)
        # The anchor is fitted with the seeds the heads train with (once per seed with several):
        # a head's own probe (train.probe_init) draws its C search folds from train.seed, and
        # --seed only draws the folds.
        probe_rows = [
            run_probe(base, features, labels, index_of, splits.train, splits.val, test_part, probe_seed)
            for probe_seed in train_seeds or [base["train"]["seed"]]
        ]
        fold_result = {"probe": mean_over_seeds(probe_rows)}
        chosen = ", ".join(f"{row['C']:g}" for row in probe_rows)
        print(f"fold {fold + 1}: probe mAP {fold_result['probe']['mAP']:.3f} (C={chosen})")
        for head in heads:
            name, *overrides = head.split(":")
            rows = []
            for train_seed in train_seeds or [None]:
                seed_override = [] if train_seed is None else [f"train.seed={train_seed}"]
                config = load_config(args.config, args.set + [f"model.head={name}"] + overrides + seed_override)
                with tempfile.TemporaryDirectory(prefix=f"yardstick_{name}_") as run_dir:
                    rows.append(run_head(config, splits, test_part, run_dir))
                if train_seed is not None:
                    print(f"fold {fold + 1}: {head}, train.seed {train_seed}: mAP {rows[-1]['mAP']:.3f}  "
                          f"set OF1 {rows[-1]['decoded_OF1']:.3f}", flush=True)
            fold_result[head] = mean_over_seeds(rows)
            row = fold_result[head]
            print(
                f"fold {fold + 1}: {head} mAP {row['mAP']:.3f}  OF1@t {row['OF1']:.3f}  "
                f"set OF1 {row['decoded_OF1']:.3f}  ({row['seconds']:.0f} s)",
                flush=True,
            )
        results.append(fold_result)
        if partial:
            os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
            with open(partial + ".tmp", "w", encoding="utf-8") as f:
                json.dump({"run": run_key, "folds": results}, f, indent=1)
            os.replace(partial + ".tmp", partial)

    total = time.perf_counter() - start
    summary = summarise(results, ["probe"] + heads)
    note = (
        f"{len(images)} photos ({source}). Config {_shown_path(args.config)}"
        + (f" with {' '.join(args.set)}" if args.set else "")
        + (f"; each head trained with train.seed {', '.join(map(str, train_seeds))}, the fold's figure "
           "the mean over seeds" if train_seeds else "")
        + f"; threshold t = {base['eval']['threshold']}; "
        # A resumed run's clock saw only the folds it ran; say so rather than pass it off as the total.
        + (f"wall time {total / 60:.1f} min for the {len(results) - resumed} fold(s) run now, resumed after "
           f"{resumed} finished fold(s) of {os.path.basename(partial)}." if resumed
           else f"total wall time {total / 60:.1f} min.")
    )
    spread, gaps = seed_spread(results, heads), gaps_to_probe(results, heads)
    table = markdown_table(summary, args.folds, note) + "\n".join(gap_lines(gaps, len(results), spread)) + "\n"
    print("\n" + table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"config": base, "folds": results, "summary": summary, "seed_spread": spread,
                       "gaps_to_probe": gaps, "seconds": total,
                       "resumed_after_folds": resumed}, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
