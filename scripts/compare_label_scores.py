"""The decoder's per-label score rules compared on the same trained models (coco128 folds).

`model.label_scores` decides how a decoding step scores each label:
`softmax` (its probability p), `against_end` (p / (p + p_END)) or
`sigmoid` (sigmoid of its own logit; with `model.decoders: K`, of the mean
of the K decoders' logits). The rule
does not change training or the decoded label sets, only `scores`, so both
are all measured on the same weights: for each fold of `real_data_check.py`
(same folds, config and val split) a decoder head is trained once, then its
test fold is scored under each rule, with thresholds tuned on the val images
under that rule. Training on these folds is not bit-reproducible between
runs, which is why the rules are compared on one run's models rather than
across two yardstick runs.

    .venv/bin/python scripts/compare_label_scores.py --head hybrid_rnn --out /tmp/label_scores.md

`--by-training-photos` also fits the yardstick's probe on each fold and adds
a table of AP per label and fold, grouped by the label's photos in that
fold's training part: where the decoder's ranking gains or loses against
the probe, rare labels or frequent ones.
"""

import argparse
import functools
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RULES = ("softmax", "against_end", "sigmoid")
COLUMNS = ("mAP", "OF1", "tuned_OF1", "tuned_CF1")
# Groups of "the label's photos in the fold's training part" (inclusive bounds).
PHOTO_GROUPS = ((0, 0), (1, 2), (3, 5), (6, 10), (11, None))


def ap_by_training_photos(folds, groups=PHOTO_GROUPS):
    """Mean AP per model over (label, fold) pairs, grouped by the label's training photos.

    Args:
        folds: one dict per fold: `y` [n, L] test labels, `train_counts` [L]
            photos of each label in the fold's training part, and `scores`,
            a dict model name -> [n, L] test scores.
        groups: `(low, high)` bounds of training photos, `high` None for no bound.

    Returns:
        A list of `(group, pairs, {model: mean AP})`, one per group that has
        pairs; a pair counts where the label has a photo in the test fold (AP is
        undefined otherwise).
    """
    from sklearn.metrics import average_precision_score

    collected = {group: {} for group in groups}
    for fold in folds:
        for label in np.flatnonzero(fold["y"].sum(axis=0) > 0):
            count = fold["train_counts"][label]
            group = next(g for g in groups if g[0] <= count and (g[1] is None or count <= g[1]))
            for name, scores in fold["scores"].items():
                collected[group].setdefault(name, []).append(
                    average_precision_score(fold["y"][:, label], scores[:, label]))
    return [(group, len(next(iter(aps.values()))), {name: float(np.mean(v)) for name, v in aps.items()})
            for group, aps in collected.items() if aps]


def by_training_photos_table(rows, anchor="probe"):
    """Markdown for `ap_by_training_photos`, with each model's gap to `anchor`."""
    names = list(rows[0][2])
    others = [n for n in names if n != anchor]
    lines = ["| label's training photos | label-folds | " + " | ".join(f"{n} AP" for n in names)
             + " | " + " | ".join(f"{n} - {anchor}" for n in others) + " |",
             "|---|---:|" + "---:|" * (len(names) + len(others))]
    for (low, high), pairs, aps in rows:
        shown = f"{low}+" if high is None else (f"{low}" if low == high else f"{low}-{high}")
        lines.append(f"| {shown} | {pairs} | " + " | ".join(f"{100 * aps[n]:.1f}" for n in names) + " | "
                     + " | ".join(f"{100 * (aps[n] - aps[anchor]):+.1f}" for n in others) + " |")
    return "\n".join(lines)


def scored_under(run_dir, rule, datasets):
    """`collect_predictions` of the run's best model, its decoder's `label_scores` set to `rule`.

    The model is loaded anew for each rule: the rule is read when the
    inference function is traced, and `collect_predictions` keeps one trace
    per model.
    """
    from hybridnet_tf.evaluation.predictions import collect_predictions
    from hybridnet_tf.model.hybridnet import LABEL_DECODER
    from hybridnet_tf.run_files import load_run

    _, _, model = load_run(run_dir)
    model.get_layer(LABEL_DECODER).label_scores = rule
    return [collect_predictions(model, dataset)[:2] for dataset in datasets]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "coco128_lite0.yaml"))
    parser.add_argument("--head", default="hybrid_rnn")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="Markdown file for the table")
    parser.add_argument("--by-training-photos", action="store_true",
                        help="also fit the probe per fold and group AP per label by its training photos")
    args = parser.parse_args(argv)

    import real_data_check as yardstick

    from hybridnet_tf.config import load_config
    from hybridnet_tf.data.load_splits import files_splits
    from hybridnet_tf.evaluation.thresholds import tune_thresholds
    from hybridnet_tf.experiment import as_dataset, train_on_splits

    config = load_config(args.config, args.set + [f"model.head={args.head}"])
    images = yardstick.load_coco128(yardstick.default_coco128())
    results = {rule: [] for rule in RULES}
    batch = config["eval"]["batch_size"]
    per_label_folds = []
    if args.by_training_photos:
        from hybridnet_tf.training.linear_probe import fit_linear_probe

        features, labels = yardstick.backbone_features(config, images)
        rows = functools.partial(yardstick.rows_of, {path: i for i, path in enumerate(images.paths)})
    for fold, (train_part, val_part, test_part) in enumerate(
        yardstick.fold_parts(images, config, args.folds, args.seed)
    ):
        if val_part is None:
            raise SystemExit("thresholds are tuned on val: the config needs data.val_fraction > 0")
        datasets = [as_dataset(part, config, False, batch_size=batch) for part in (val_part, test_part)]
        with tempfile.TemporaryDirectory(prefix="label_scores_") as run_dir:
            train_on_splits(config, run_dir, files_splits(train_part, val_part), verbose=0)
            scored = {rule: scored_under(run_dir, rule, datasets) for rule in RULES}
        for rule in RULES:
            (y_val, s_val), (y_test, s_test) = scored[rule]
            tuned = np.asarray(tune_thresholds(y_val, s_val)["per_class"])
            row = yardstick.score_set(y_test, s_test, None, config["eval"]["threshold"], tuned)
            row["share_of_ones"] = float(np.mean(s_test >= 0.999))
            results[rule].append(row)
        if args.by_training_photos:
            train_rows, test_rows = rows(train_part), rows(test_part)
            probe = fit_linear_probe(features[train_rows], labels[train_rows],
                                     seed=config["train"]["seed"], progress=False)  # the yardstick's probe seed
            y_test = scored[RULES[0]][1][0]
            if not np.array_equal(y_test, labels[test_rows]):
                raise SystemExit("the test fold's labels differ between the model's dataset and the probe's")
            per_label_folds.append({
                "y": y_test, "train_counts": labels[train_rows].sum(axis=0),
                "scores": {"probe": probe.scores(features[test_rows]),
                           **{rule: scored[rule][1][1] for rule in RULES}},
            })
        print(f"fold {fold + 1}: " + "  ".join(
            f"{rule} mAP {results[rule][-1]['mAP']:.3f} tuned OF1 {results[rule][-1]['tuned_OF1']:.3f}"
            for rule in RULES), flush=True)

    lines = [
        "| score rule | mAP | OF1@0.5 | OF1 tuned | CF1 tuned | scores >= 0.999 | mAP per fold |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for rule in RULES:
        rows = results[rule]
        cells = [f"{100 * np.mean([r[k] for r in rows]):.1f} ± {100 * np.std([r[k] for r in rows]):.1f}" for k in COLUMNS]
        cells.append(f"{100 * np.mean([r['share_of_ones'] for r in rows]):.1f} %")
        cells.append(", ".join(f"{100 * r['mAP']:.1f}" for r in rows))
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + (
        f"\n\n{args.head}, {os.path.relpath(args.config, ROOT)}"
        + (f" with {' '.join(args.set)}" if args.set else "")
        + f"; {args.folds} folds, the same trained model per fold for every rule.\n"
    )
    if per_label_folds:
        table += ("\nAP per label and fold (labels with a photo in the test fold), grouped by the "
                  "label's photos in the fold's training part:\n\n"
                  + by_training_photos_table(ap_by_training_photos(per_label_folds)) + "\n")
    print("\n" + table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
