"""Evaluating a trained model on a dataset: metrics, report files, tuned thresholds.

Library functions that take a model and a dataset; `experiment.run_evaluate`
is the config-reading caller.
"""

import os

import numpy as np

from hybridnet_tf.evaluation.metrics import evaluate_scores, threshold_metrics
from hybridnet_tf.evaluation.predictions import collect_named_predictions, collect_predictions
from hybridnet_tf.evaluation.report import write_report
from hybridnet_tf.evaluation.report_html import write_report_html
from hybridnet_tf.evaluation.thresholds import save_thresholds, tune_thresholds


class UnscoredImagesError(ValueError):
    """Evaluation under `strict=True` could not score every image; the message names them."""


def unscored_images(expected, scored, unreadable=()):
    """The images of a split that evaluation did not score, with why.

    Args:
        expected: the split's image names (paths), before any was left out.
        scored: the names of the images that were scored (None: unknown).
        unreadable: `(path, reason)` left out before the pipeline
            (`image_check`), each given with its reason.

    Returns:
        `{"count": n, "images": [{"path", "reason"}, ...]}` in split order.
    """
    reasons = dict(unreadable)
    if scored is None:
        missing = [path for path in expected if path in reasons]
    else:
        done = set(scored)
        missing = [path for path in expected if path not in done]
    images = [
        {"path": path, "reason": reasons.get(path, "TensorFlow could not decode it")} for path in missing
    ]
    return {"count": len(images), "images": images}


def in_sample_notes(split, tuned_thresholds):
    """What is in-sample about numbers evaluated on `split`: `{what: why}` (empty for test)."""
    if split == "train":
        return {"all": "the model was trained on these images"}
    if split == "val":
        notes = {"model_selection": "best.keras is the epoch with the best train.monitor on val"}
        if tuned_thresholds:
            notes["tuned_thresholds"] = "the thresholds were tuned on val"
        return notes
    return {}


def evaluate_model(model, dataset, names, out_dir, threshold=0.5, tuned_thresholds=None, split=None,
                   expected=None, unreadable=(), strict=False):
    """Scores `dataset` with `model`; writes metrics.json, report.md, report.html, plots and predictions.npz.

    The headline metrics use the fixed `threshold` so they compare with
    published tables; with `tuned_thresholds` ([L] per label)
    `metrics["tuned_thresholds"]` holds the same six numbers with them.
    `metrics["unscored"]` counts and names the images of the split that
    could not be scored, and `metrics["in_sample"]` says which numbers are
    in-sample on this split (on val: the checkpoint choice and tuned
    thresholds); the report says both.

    Args:
        model: an inference model from `build_model`.
        dataset: batches of `(images, multi_hot)`, or `(images, multi_hot,
            names)` (`make_dataset(with_names=True)`) to find the images
            the pipeline skipped.
        names: the label names, in column order.
        out_dir: folder for the files.
        threshold: the score threshold of the headline CF1 / OF1.
        tuned_thresholds: per-label thresholds, or None.
        split: the name of the evaluated split, recorded as `metrics["split"]`.
        expected: every image name of the split (file paths), to find the
            unscored ones; an int: only their number is known (TFDS); None:
            only `unreadable` is counted.
        unreadable: `(path, reason)` of the split's files left out before the pipeline.
        strict: raise `UnscoredImagesError` (before writing anything) when an
            image could not be scored.

    Returns:
        The metrics dict.
    """
    y_true, scores, decoded, scored = collect_named_predictions(model, dataset, progress=True)
    if isinstance(expected, int):
        # Only a count is known (TFDS examples have no file names).
        unscored = {"count": max(expected - len(y_true), 0), "images": []}
        expected = [None] * expected
    else:
        if expected is None:
            expected = [path for path, _ in unreadable]
        unscored = unscored_images(expected, scored, unreadable)
    if strict and unscored["count"]:
        shown = "; ".join(f"{item['path']} ({item['reason']})" for item in unscored["images"][:5])
        raise UnscoredImagesError(
            f"{unscored['count']} of {len(expected) or len(y_true) + unscored['count']} images of the "
            f"{split or 'evaluation'} split could not be scored (--strict): {shown}"
            f"{' ...' if unscored['count'] > 5 else ''}; fix or remove these files, or evaluate "
            "without --strict to score the rest"
        )
    metrics = evaluate_scores(y_true, scores, threshold=threshold, names=names, decoded=decoded)
    if split is not None:
        metrics["split"] = split
        metrics["in_sample"] = in_sample_notes(split, tuned_thresholds is not None)
    metrics["unscored"] = unscored
    if tuned_thresholds is not None:
        metrics["tuned_thresholds"] = {
            k: float(v) for k, v in threshold_metrics(y_true, scores, tuned_thresholds).items()
        }
    paths = write_report(out_dir, metrics, y_true, scores, names)
    # report.html: the same tables and plots as one page, with a gallery of heat maps.
    write_report_html(out_dir, metrics, paths, model, dataset, y_true, scores, decoded, names)
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
