"""Multi-label metrics: mAP, CP/CR/CF1, OP/OR/OF1, top-k and per-class numbers.

Pure NumPy, so metrics can be computed on saved scores without TensorFlow.
All functions take `y_true` [N, C] 0/1 and `scores` [N, C] in [0, 1].

Conventions (those of the CNN-RNN and ML-GCN papers, with scikit-learn's
`zero_division=0` where they leave a 0/0 undefined):

- A label is predicted when `score >= threshold`.
- AP is the non-interpolated average precision of scikit-learn's
  `average_precision_score`: tied scores form one threshold.
- CP / CR are per-class precision / recall averaged over *all* classes
  (macro); 0/0 counts as 0, as `precision_recall_fscore_support(average=
  "macro", zero_division=0)` does. A class without positives therefore
  pulls CR down: that is what the published numbers do too.
- CF1 = 2 * CP * CR / (CP + CR), the harmonic mean of the averages, not the
  mean of per-class F1 scores.
- OP / OR are overall (micro) precision / recall over all (image, label)
  pairs; OF1 = 2 * OP * OR / (OP + OR).
- exact is the share of images whose predicted label set is exactly the
  true one (subset accuracy, scikit-learn's `accuracy_score` on 0/1
  matrices); an image without labels is right when nothing is predicted.
  It is the measure that needs the labels' joint distribution, where a
  decoder can beat a per-label head (docs/decoder.md).
"""

import math

import numpy as np

SET_METRIC_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1", "exact")


def _check_labels_and_scores(y_true, scores):
    """Validates and converts `y_true` / `scores` to float64 arrays of one shape."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.ndim != 2 or scores.ndim != 2:
        raise ValueError(
            f"y_true and scores must be 2-D [num_images, num_classes]; got shapes "
            f"{y_true.shape} and {scores.shape}"
        )
    if y_true.shape != scores.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but scores has shape {scores.shape}")
    y_true = _check_binary(y_true, "y_true")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError(
            f"scores must be probabilities in [0, 1], got range "
            f"[{scores.min():.3g}, {scores.max():.3g}]; did you pass logits? apply a sigmoid first"
        )
    return y_true, scores


def _check_binary(matrix, name):
    """Returns `matrix` as a float64 0/1 array; raises if it holds anything else."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_images, num_classes]; got shape {matrix.shape}")
    if not np.all((matrix == 0) | (matrix == 1)):
        raise ValueError(f"{name} must hold only 0 and 1 (multi-hot labels)")
    return matrix.astype(np.float64)


def _check_threshold(threshold, num_classes):
    """Returns `threshold` as a scalar or a [C] array; raises on bad shapes or values."""
    threshold = np.asarray(threshold, dtype=np.float64)
    if threshold.ndim == 1 and threshold.shape[0] != num_classes:
        raise ValueError(
            f"a per-class threshold needs {num_classes} values (one per class), "
            f"got {threshold.shape[0]}"
        )
    if threshold.ndim > 1:
        raise ValueError(f"threshold must be a scalar or a [C] array, got shape {threshold.shape}")
    if not np.all(np.isfinite(threshold)):
        raise ValueError("threshold contains NaN or infinite values")
    return threshold


def _safe_divide(numerator, denominator):
    """Element-wise numerator / denominator with 0/0 (and x/0) -> 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _harmonic_mean(precision, recall):
    """2PR / (P + R), 0 when both are 0 (element-wise)."""
    return _safe_divide(2.0 * precision * recall, precision + recall)


def precision_recall_curve(labels, scores):
    """Precision and recall of one class at each distinct score threshold.

    The points of scikit-learn's `precision_recall_curve` (with
    `drop_intermediate=False`), in order of decreasing threshold, without the
    final (recall 0, precision 1) point scikit-learn appends.

    Args:
        labels: [N] 0/1 ground truth of one class.
        scores: [N] scores of that class.

    Returns:
        `(precision, recall, thresholds)`, three arrays of the same length,
        thresholds decreasing and recall non-decreasing. Recall is NaN when
        the class has no positives.
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels has {labels.size} values but scores has {scores.size}")
    # Stable sort so equal scores keep a fixed order; the order inside a tie
    # does not matter because only the last index of each tie group is used.
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    true_positives = np.cumsum(labels)
    false_positives = np.arange(1, labels.size + 1) - true_positives
    # A threshold sits at the last index of each run of equal scores.
    last_of_group = np.r_[np.diff(scores) != 0, True] if scores.size else np.zeros(0, bool)
    true_positives = true_positives[last_of_group]
    false_positives = false_positives[last_of_group]
    precision = true_positives / (true_positives + false_positives)
    num_positives = labels.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = true_positives / num_positives if num_positives else np.nan * precision
    return precision, recall, scores[last_of_group]


def average_precision_per_class(y_true, scores):
    """Non-interpolated average precision of each class.

    Equal to scikit-learn's `average_precision_score(..., average=None)`:
    AP = sum_k (R_k - R_{k-1}) * P_k over the distinct score thresholds, so
    tied scores enter together at one threshold. Vectorised over classes.

    Args:
        y_true: [N, C] 0/1 ground truth.
        scores: [N, C] scores in [0, 1].

    Returns:
        [C] float array; NaN for classes with no positives (where
        scikit-learn warns and returns 0).
    """
    y_true, scores = _check_labels_and_scores(y_true, scores)
    num_images, num_classes = y_true.shape
    if num_images == 0:
        return np.full(num_classes, np.nan)
    order = np.argsort(-scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    sorted_labels = np.take_along_axis(y_true, order, axis=0)
    true_positives = np.cumsum(sorted_labels, axis=0)
    ranks = np.arange(1, num_images + 1, dtype=np.float64)[:, None]
    precision = true_positives / ranks
    # Each positive contributes (1 / num_positives) * precision at the end of
    # its tie group: this equals sklearn's sum of recall steps times precision.
    is_last_of_group = np.ones_like(sorted_scores, dtype=bool)
    is_last_of_group[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    group_end = np.where(is_last_of_group, np.arange(num_images)[:, None], num_images)
    group_end = np.minimum.accumulate(group_end[::-1], axis=0)[::-1]
    precision_at_group_end = np.take_along_axis(precision, group_end, axis=0)
    num_positives = y_true.sum(axis=0)
    summed = (sorted_labels * precision_at_group_end).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_positives > 0, summed / num_positives, np.nan)


def mean_average_precision(y_true, scores):
    """Mean of the per-class APs over the classes with at least one positive.

    Classes without positives have no defined AP and are left out of the
    mean (they would otherwise count as 0 in some tools and NaN in others).

    Args:
        y_true: [N, C] 0/1 ground truth.
        scores: [N, C] scores in [0, 1].

    Returns:
        `(mAP, num_classes_counted)`: mAP is a float in [0, 1] (NaN when no
        class has a positive), num_classes_counted an int.
    """
    ap = average_precision_per_class(y_true, scores)
    counted = ~np.isnan(ap)
    num_counted = int(counted.sum())
    if num_counted == 0:
        return float("nan"), 0
    return float(ap[counted].mean()), num_counted


def _per_class_counts(y_true, y_pred):
    """Per-class true positives, predicted positives and actual positives."""
    true_positives = (y_true * y_pred).sum(axis=0)
    return true_positives, y_pred.sum(axis=0), y_true.sum(axis=0)


def set_metrics(y_true, y_pred):
    """CP, CR, CF1, OP, OR, OF1 and exact (subset accuracy) of a 0/1 prediction matrix.

    Used for thresholded scores, top-k predictions and label sets read out
    by the decoder. Images without labels count like any other (they only
    add false positives when something is predicted for them).

    Args:
        y_true: [N, C] 0/1 ground truth.
        y_pred: [N, C] 0/1 predictions.

    Returns:
        dict with float keys "CP", "CR", "CF1", "OP", "OR", "OF1", "exact",
        each in [0, 1]; 0/0 counts as 0 (see the module docstring).
    """
    y_true = _check_binary(y_true, "y_true")
    y_pred = _check_binary(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}")
    true_positives, predicted, actual = _per_class_counts(y_true, y_pred)
    num_classes = max(y_true.shape[1], 1)
    class_precision = float(_safe_divide(true_positives, predicted).sum() / num_classes)
    class_recall = float(_safe_divide(true_positives, actual).sum() / num_classes)
    overall_precision = float(_safe_divide(true_positives.sum(), predicted.sum()))
    overall_recall = float(_safe_divide(true_positives.sum(), actual.sum()))
    return {
        "CP": class_precision,
        "CR": class_recall,
        "CF1": float(_harmonic_mean(class_precision, class_recall)),
        "OP": overall_precision,
        "OR": overall_recall,
        "OF1": float(_harmonic_mean(overall_precision, overall_recall)),
        "exact": float(np.mean(np.all(y_true == y_pred, axis=1))) if len(y_true) else 0.0,
    }


def threshold_metrics(y_true, scores, threshold=0.5):
    """`set_metrics` of the labels with `score >= threshold`.

    Args:
        y_true: [N, C] 0/1 ground truth.
        scores: [N, C] scores in [0, 1].
        threshold: a scalar, or a [C] array of per-class thresholds.

    Returns:
        dict with float keys "CP", "CR", "CF1", "OP", "OR", "OF1", "exact".
    """
    y_true, scores = _check_labels_and_scores(y_true, scores)
    threshold = _check_threshold(threshold, scores.shape[1])
    return set_metrics(y_true, (scores >= threshold).astype(np.float64))


def top_k_predictions(scores, k=3, threshold=0.5):
    """Each image's `k` highest-scoring labels, kept only where `score >= threshold`.

    Args:
        scores: [N, C] scores in [0, 1].
        k: number of labels per image; values above C mean "all labels".
        threshold: a scalar, or a [C] array of per-class thresholds.

    Returns:
        [N, C] int 0/1 matrix. Equal scores are ranked by lower class index
        first, so the result does not depend on sort implementation details.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [num_images, num_classes]; got shape {scores.shape}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    num_images, num_classes = scores.shape
    threshold = _check_threshold(threshold, num_classes)
    k = min(int(k), num_classes)
    # A stable sort of -scores keeps equal scores in index order.
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    selected = np.zeros(scores.shape, dtype=bool)
    selected[np.arange(num_images)[:, None], top] = True
    return (selected & (scores >= threshold)).astype(np.int64)


def _json_float(value):
    """A plain float, or None for NaN (JSON has no NaN)."""
    value = float(value)
    return None if math.isnan(value) else value


def per_class_metrics(y_true, scores, threshold=0.5, names=None):
    """AP, precision, recall, F1 and support of each class.

    Args:
        y_true: [N, C] 0/1 ground truth.
        scores: [N, C] scores in [0, 1].
        threshold: a scalar, or a [C] array of per-class thresholds, for
            precision / recall / F1.
        names: C label names; defaults to "class_0", "class_1", ...

    Returns:
        list of C dicts {"name", "ap", "precision", "recall", "f1",
        "support"} in class order. "ap" is None for a class without
        positives; "support" is its number of positive images; precision /
        recall / F1 use 0 for 0/0. All values are plain Python types.
    """
    y_true, scores = _check_labels_and_scores(y_true, scores)
    num_classes = y_true.shape[1]
    names = _check_names(names, num_classes)
    threshold = _check_threshold(threshold, num_classes)
    ap = average_precision_per_class(y_true, scores)
    y_pred = (scores >= threshold).astype(np.float64)
    true_positives, predicted, actual = _per_class_counts(y_true, y_pred)
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, actual)
    f1 = _harmonic_mean(precision, recall)
    return [
        {
            "name": names[i],
            "ap": _json_float(ap[i]),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(actual[i]),
        }
        for i in range(num_classes)
    ]


def _check_names(names, num_classes):
    """Returns `names` as a list of C strings, or default names when None."""
    if names is None:
        return [f"class_{i}" for i in range(num_classes)]
    names = [str(name) for name in names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} label names for {num_classes} classes")
    return names


def evaluate_scores(y_true, scores, threshold=0.5, names=None, decoded=None):
    """Every evaluation number in one JSON-ready dict.

    Args:
        y_true: [N, C] 0/1 ground truth.
        scores: [N, C] scores in [0, 1].
        threshold: a scalar, or a [C] array of per-class thresholds.
        names: C label names for the per-class list.
        decoded: optional [N, C] 0/1 label sets read out by the decoder.

    Returns:
        dict with keys "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "exact" (floats
        in [0, 1]; "mAP" is None when no class has a positive), "top3" (the
        set metrics of each image's top-3 labels above the threshold),
        "per_class" (see `per_class_metrics`), "num_images",
        "num_classes_counted" (classes in the mAP), "threshold" (float or
        list) and, when `decoded` is given, "decoded_set" (the set
        metrics of the decoded labels). Only plain Python types, so
        `json.dumps` works.

    Example:
        >>> m = evaluate_scores([[1, 0], [0, 1]], [[0.9, 0.2], [0.4, 0.7]])
        >>> m["mAP"], m["OF1"]
        (1.0, 1.0)
    """
    y_true, scores = _check_labels_and_scores(y_true, scores)
    threshold = _check_threshold(threshold, scores.shape[1])
    mean_ap, num_counted = mean_average_precision(y_true, scores)
    result = {"mAP": _json_float(mean_ap)}
    result.update(threshold_metrics(y_true, scores, threshold))
    result["top3"] = set_metrics(y_true, top_k_predictions(scores, k=3, threshold=threshold))
    result["per_class"] = per_class_metrics(y_true, scores, threshold, names)
    result["num_images"] = int(y_true.shape[0])
    result["num_classes_counted"] = num_counted
    result["threshold"] = threshold.tolist()
    if decoded is not None:
        decoded = _check_binary(decoded, "decoded")
        if decoded.shape != y_true.shape:
            raise ValueError(
                f"decoded has shape {decoded.shape} but y_true has shape {y_true.shape}"
            )
        result["decoded_set"] = set_metrics(y_true, decoded)
    return result
