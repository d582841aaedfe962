"""Evaluating a trained model on a dataset: metrics, report files, tuned thresholds.

Library functions that take a model and a dataset; `experiment.run_evaluate`
is the config-reading caller.
"""

import os

import numpy as np

from hybridnet_tf.evaluation.metrics import evaluate_scores, threshold_metrics
from hybridnet_tf.evaluation.predictions import collect_predictions
from hybridnet_tf.evaluation.report import write_report
from hybridnet_tf.evaluation.thresholds import save_thresholds, tune_thresholds


def evaluate_model(model, dataset, names, out_dir, threshold=0.5, tuned_thresholds=None, split=None):
    """Scores `dataset` with `model`; writes metrics.json, report.md, plots and predictions.npz.

    The headline metrics use the fixed `threshold` so they compare with
    published tables; with `tuned_thresholds` ([L] per label)
    `metrics["tuned_thresholds"]` holds the same six numbers with them.

    Args:
        model: an inference model from `build_model`.
        dataset: batches of `(images, multi_hot)`.
        names: the label names, in column order.
        out_dir: folder for the files.
        threshold: the score threshold of the headline CF1 / OF1.
        tuned_thresholds: per-label thresholds, or None.
        split: the name of the evaluated split, recorded as `metrics["split"]`
            (thresholds tuned on val are in-sample on "val").

    Returns:
        The metrics dict.
    """
    y_true, scores, decoded = collect_predictions(model, dataset, progress=True)
    metrics = evaluate_scores(y_true, scores, threshold=threshold, names=names, decoded=decoded)
    if split is not None:
        metrics["split"] = split
    if tuned_thresholds is not None:
        metrics["tuned_thresholds"] = {
            k: float(v) for k, v in threshold_metrics(y_true, scores, tuned_thresholds).items()
        }
    write_report(out_dir, metrics, y_true, scores, names)
    np.savez(os.path.join(out_dir, "predictions.npz"), y_true=y_true, scores=scores, decoded=decoded)
    return metrics


def tune_and_save_thresholds(model, dataset, names, path):
    """Tunes global and per-label thresholds of `model` on `dataset` and writes them to `path`.

    Prints what they gain over 0.5.

    Returns:
        The dict of `thresholds.tune_thresholds`.
    """
    y_true, scores, _ = collect_predictions(model, dataset)
    tuned = tune_thresholds(y_true, scores)
    save_thresholds(path, tuned, names)
    gain = tuned["gain"]
    print(
        "thresholds tuned on val: global {:.2f}; OF1 {:.4f} -> {:.4f} (global) -> {:.4f} "
        "(per label); CF1 {:.4f} -> {:.4f} -> {:.4f}".format(
            tuned["global"],
            gain["at_0.5"]["OF1"], gain["global"]["OF1"], gain["per_class"]["OF1"],
            gain["at_0.5"]["CF1"], gain["global"]["CF1"], gain["per_class"]["CF1"],
        )
    )
    return tuned
