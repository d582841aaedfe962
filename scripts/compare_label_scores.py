"""The decoder's per-label score rules compared on the same trained models (coco128 folds).

`model.label_scores` decides how a decoding step scores each label:
`softmax` (its probability p) or `against_end` (p / (p + p_END)). The rule
does not change training or the decoded label sets, only `scores`, so both
are measured on the same weights: for each fold of `real_data_check.py`
(same folds, config and val split) a decoder head is trained once, then its
test fold is scored under each rule, with thresholds tuned on the val images
under that rule. Training on these folds is not bit-reproducible between
runs, which is why the rules are compared on one run's models rather than
across two yardstick runs.

    .venv/bin/python scripts/compare_label_scores.py --head hybrid_rnn --out /tmp/label_scores.md
"""

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RULES = ("softmax", "against_end")
COLUMNS = ("mAP", "OF1", "tuned_OF1", "tuned_CF1")


def scored_under(model, rule, dataset):
    """`collect_predictions` with the decoder's `label_scores` set to `rule` (a fresh trace)."""
    from hybridnet_tf.evaluation.predictions import collect_predictions
    from hybridnet_tf.model.hybridnet import LABEL_DECODER

    model.get_layer(LABEL_DECODER).label_scores = rule
    # A new function object per rule: the cached trace would keep the old rule.
    import tensorflow as tf

    predict = tf.function(lambda images: model(images, training=False))
    y_true, scores = [], []
    for images, labels in dataset:
        y_true.append(labels.numpy())
        scores.append(predict(images)["scores"].numpy())
    return np.concatenate(y_true), np.concatenate(scores)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "coco128_lite0.yaml"))
    parser.add_argument("--head", default="hybrid_rnn")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="Markdown file for the table")
    args = parser.parse_args(argv)

    import real_data_check as yardstick

    from hybridnet_tf.config import load_config
    from hybridnet_tf.data.load_splits import files_splits
    from hybridnet_tf.data.splits import split_train_val
    from hybridnet_tf.evaluation.metrics import mean_average_precision, threshold_metrics
    from hybridnet_tf.evaluation.thresholds import tune_thresholds
    from hybridnet_tf.experiment import as_dataset, train_on_splits
    from hybridnet_tf.run_files import load_run

    config = load_config(args.config, args.set + [f"model.head={args.head}"])
    images = yardstick.load_coco128(yardstick.default_coco128())
    results = {rule: [] for rule in RULES}
    batch = config["eval"]["batch_size"]
    for fold, (train_rows, test_rows) in enumerate(yardstick.fold_indices(len(images), args.folds, args.seed)):
        train_part, val_part = split_train_val(
            images.subset(train_rows), config["data"]["val_fraction"], seed=config["data"]["split_seed"]
        )
        test_part = images.subset(test_rows)
        with tempfile.TemporaryDirectory(prefix="label_scores_") as run_dir:
            train_on_splits(config, run_dir, files_splits(train_part, val_part), verbose=0)
            _, _, model = load_run(run_dir)
        val_data = as_dataset(val_part, config, False, batch_size=batch)
        test_data = as_dataset(test_part, config, False, batch_size=batch)
        for rule in RULES:
            y_val, s_val = scored_under(model, rule, val_data)
            y_test, s_test = scored_under(model, rule, test_data)
            tuned = np.asarray(tune_thresholds(y_val, s_val)["per_class"])
            at_tuned = threshold_metrics(y_test, s_test, tuned)
            results[rule].append({
                "mAP": mean_average_precision(y_test, s_test)[0],
                "OF1": threshold_metrics(y_test, s_test, config["eval"]["threshold"])["OF1"],
                "tuned_OF1": at_tuned["OF1"],
                "tuned_CF1": at_tuned["CF1"],
                "share_of_ones": float(np.mean(s_test >= 0.999)),
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
        + f"; {args.folds} folds, the same trained model per fold for both rules.\n"
    )
    print("\n" + table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
