"""Decision thresholds tuned on validation data, and their JSON file.

`tune_thresholds` picks one global threshold that maximises OF1 and one
threshold per class that maximises that class's F1, both on a grid. Tune on
validation data and report test numbers with the tuned thresholds: tuning
on the test set inflates them.
"""

import json
import math
import os

import numpy as np

from hybridnet_tf.atomic_files import write_json_atomically
from hybridnet_tf.evaluation.metrics import _check_labels_and_scores, threshold_metrics

THRESHOLDS_FILE_VERSION = 1


def _threshold_grid(min_threshold, max_threshold, step):
    """Thresholds min, min + step, ..., max (inclusive), rounded so 0.3 is 0.3."""
    if not 0.0 <= min_threshold <= max_threshold <= 1.0:
        raise ValueError(
            f"need 0 <= min_threshold <= max_threshold <= 1, got "
            f"min_threshold={min_threshold}, max_threshold={max_threshold}"
        )
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    grid = np.round(np.arange(min_threshold, max_threshold + step / 2, step), 10)
    return np.clip(grid, min_threshold, max_threshold)


def _counts_on_grid(y_true, scores, grid):
    """True positives and predicted positives of each class at each threshold.

    Returns two [T, C] arrays. Sorting once and using `searchsorted` avoids
    thresholding the whole [N, C] matrix once per grid value.
    """
    num_images, num_classes = scores.shape
    sorted_scores = np.sort(scores, axis=0)
    # Negatives get -inf so they sit below every threshold.
    sorted_positive_scores = np.sort(np.where(y_true == 1, scores, -np.inf), axis=0)
    predicted = np.empty((grid.size, num_classes))
    true_positives = np.empty((grid.size, num_classes))
    for c in range(num_classes):
        # N - (number of scores < t) = number of scores >= t, the `>=` rule of metrics.py.
        predicted[:, c] = num_images - np.searchsorted(sorted_scores[:, c], grid, side="left")
        true_positives[:, c] = num_images - np.searchsorted(
            sorted_positive_scores[:, c], grid, side="left"
        )
    return true_positives, predicted


def _best_threshold(values, grid, preferred):
    """The grid value with the highest `values`; ties go to the one nearest `preferred`.

    Preferring the untuned value means a threshold only moves when that
    actually improves the score (a flat curve keeps the default).
    """
    best = values.max()
    candidates = grid[values >= best - 1e-12]
    # argmin returns the first (lowest) candidate among equally near ones.
    return float(candidates[np.argmin(np.abs(candidates - preferred))])


def tune_thresholds(
    y_true,
    scores,
    min_threshold=0.05,
    max_threshold=0.95,
    min_positives=5,
    step=0.01,
):
    """Chooses a global and per-class decision thresholds on validation data.

    The global threshold maximises OF1 over the grid `min_threshold,
    min_threshold + step, ..., max_threshold`. Each class's threshold
    maximises that class's F1 on the same grid. A class with fewer than
    `min_positives` positive images keeps the global threshold: with a
    handful of examples the best F1 threshold is noise (often the single
    highest positive score). All thresholds therefore lie in
    [min_threshold, max_threshold]. Ties go to the threshold nearest 0.5
    (global) or nearest the global threshold (per class).

    Per-class thresholds maximise per-class F1, which usually (not always)
    raises CF1 and OF1; `gain` reports what they actually do.

    Args:
        y_true: [N, C] 0/1 validation ground truth.
        scores: [N, C] validation scores in [0, 1].
        min_threshold: lowest threshold considered (the floor).
        max_threshold: highest threshold considered (the ceiling).
        min_positives: classes with fewer positives keep the global threshold.
        step: grid spacing.

    Returns:
        dict {"global": float, "per_class": list of C floats, "gain": {
        "at_0.5": {"OF1", "CF1"}, "global": {"OF1", "CF1"}, "per_class":
        {"OF1", "CF1"}}}, gain measured on the same data.

    Example:
        >>> tuned = tune_thresholds(y_val, val_scores)
        >>> metrics = evaluate_scores(y_test, test_scores, threshold=tuned["per_class"])
    """
    y_true, scores = _check_labels_and_scores(y_true, scores)
    if int(min_positives) != min_positives or min_positives < 1:
        raise ValueError(f"min_positives must be a positive integer, got {min_positives!r}")
    grid = _threshold_grid(min_threshold, max_threshold, step)
    true_positives, predicted = _counts_on_grid(y_true, scores, grid)
    actual = y_true.sum(axis=0)

    # OF1 = 2 TP / (predicted + actual), summed over classes; 0 when TP = 0.
    overall_denominator = predicted.sum(axis=1) + actual.sum()
    overall_f1 = np.zeros(grid.size)
    np.divide(2 * true_positives.sum(axis=1), overall_denominator, out=overall_f1,
              where=overall_denominator > 0)
    global_threshold = _best_threshold(overall_f1, grid, preferred=0.5)

    class_denominator = predicted + actual[None, :]
    class_f1 = np.zeros_like(class_denominator)
    np.divide(2 * true_positives, class_denominator, out=class_f1, where=class_denominator > 0)
    per_class = []
    for c in range(scores.shape[1]):
        if actual[c] < min_positives:
            per_class.append(global_threshold)
        else:
            per_class.append(_best_threshold(class_f1[:, c], grid, preferred=global_threshold))

    def f1_pair(threshold):
        metrics = threshold_metrics(y_true, scores, threshold)
        return {"OF1": metrics["OF1"], "CF1": metrics["CF1"]}

    return {
        "global": global_threshold,
        "per_class": per_class,
        "gain": {
            "at_0.5": f1_pair(0.5),
            "global": f1_pair(global_threshold),
            "per_class": f1_pair(np.asarray(per_class)),
        },
    }


def _is_threshold(value):
    """True for a finite number in [0, 1] (bools excluded)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.0 <= value <= 1.0
    )


def save_thresholds(path, thresholds, names):
    """Writes thresholds as JSON, atomically (a crash never leaves half a file).

    Args:
        path: the JSON file to write; parent folders are created.
        thresholds: dict with "global" (float) and "per_class" (C floats),
            e.g. the result of `tune_thresholds`; its "gain" is kept if present.
        names: the C label names, in the order of "per_class".

    Returns:
        `path`.
    """
    names = [str(name) for name in names]
    if len(set(names)) != len(names):
        raise ValueError("label names must be unique to save per-class thresholds")
    global_threshold = thresholds.get("global") if isinstance(thresholds, dict) else None
    per_class = thresholds.get("per_class") if isinstance(thresholds, dict) else None
    if global_threshold is None or per_class is None:
        raise ValueError(
            'thresholds must be a dict with "global" and "per_class" (see tune_thresholds)'
        )
    per_class = [float(t) for t in per_class]
    if len(per_class) != len(names):
        raise ValueError(f"{len(per_class)} per-class thresholds but {len(names)} label names")
    if not all(_is_threshold(t) for t in [float(global_threshold)] + per_class):
        raise ValueError("thresholds must be finite numbers in [0, 1]")
    content = {
        "version": THRESHOLDS_FILE_VERSION,
        "global": float(global_threshold),
        # A name -> threshold mapping, so the file can be read and edited by hand.
        "per_class": dict(zip(names, per_class)),
    }
    if "gain" in thresholds:
        content["gain"] = thresholds["gain"]
    return write_json_atomically(os.fspath(path), content, indent=2)


def _no_duplicate_keys(pairs):
    """json object hook: a repeated label name would silently drop a threshold."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"repeated keys {repeated}")
    return dict(pairs)


def load_thresholds(path, names=None):
    """Reads thresholds written by `save_thresholds`, checking their content.

    Args:
        path: the JSON file.
        names: optional label names the thresholds are for (e.g. the model's
            vocabulary); "per_class" is then returned in this order, and a
            ValueError says which names are missing or extra.

    Returns:
        dict {"global": float, "per_class": list of floats, "names": list of
        str, and "gain" when the file has it}.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file, object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"thresholds file {path} is not valid JSON: {error}") from error

    def fail(problem):
        return ValueError(
            f"thresholds file {path} is malformed: {problem}; expected "
            '{"version": 1, "global": 0.5, "per_class": {"label": 0.5, ...}} '
            "as written by save_thresholds"
        )

    if not isinstance(content, dict):
        raise fail(f"top level is a {type(content).__name__}, not an object")
    if content.get("version", THRESHOLDS_FILE_VERSION) != THRESHOLDS_FILE_VERSION:
        raise fail(f"unsupported version {content.get('version')!r}")
    if "global" not in content or "per_class" not in content:
        raise fail('missing "global" or "per_class"')
    if not _is_threshold(content["global"]):
        raise fail(f'"global" is {content["global"]!r}, not a number in [0, 1]')
    per_class = content["per_class"]
    if not isinstance(per_class, dict):
        raise fail('"per_class" is not an object mapping label names to thresholds')
    bad = sorted(name for name, value in per_class.items() if not _is_threshold(value))
    if bad:
        raise fail(f"thresholds of {bad} are not numbers in [0, 1]")
    file_names = list(per_class)
    if names is not None:
        names = [str(name) for name in names]
        missing = sorted(set(names) - set(file_names))
        extra = sorted(set(file_names) - set(names))
        if missing or extra:
            raise ValueError(
                f"thresholds file {path} does not match the label names: "
                f"missing {missing}, extra {extra}"
            )
        file_names = names
    loaded = {
        "global": float(content["global"]),
        "per_class": [float(per_class[name]) for name in file_names],
        "names": file_names,
    }
    if "gain" in content:
        loaded["gain"] = content["gain"]
    return loaded
