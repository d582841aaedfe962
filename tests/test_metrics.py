"""Metrics checked against scikit-learn and hand-worked examples."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, precision_recall_fscore_support
from sklearn.metrics import precision_recall_curve as sklearn_pr_curve

from hybridnet_tf.evaluation.metrics import (
    SET_METRIC_KEYS,
    average_precision_per_class,
    evaluate_scores,
    mean_average_precision,
    per_class_metrics,
    precision_recall_curve,
    set_metrics,
    threshold_metrics,
    top_k_predictions,
)


def random_case(seed, num_images=60, num_classes=7, decimals=None):
    """Seeded labels (every class has a positive) and noisy, label-correlated scores."""
    rng = np.random.default_rng(seed)
    y_true = (rng.random((num_images, num_classes)) < 0.3).astype(int)
    y_true[0] = 1  # every class has at least one positive
    scores = np.clip(0.3 * y_true + 0.7 * rng.random((num_images, num_classes)), 0, 1)
    if decimals is not None:
        scores = np.round(scores, decimals)  # many tied scores
    return y_true, scores


def sklearn_set_metrics(y_true, y_pred):
    """The set metrics the way the brief defines them, from scikit-learn (exact: subset accuracy)."""
    cp, cr, _, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    op, orec, of1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="micro", zero_division=0
    )
    cf1 = 2 * cp * cr / (cp + cr) if cp + cr else 0.0
    exact = accuracy_score(y_true, y_pred)
    return {"CP": cp, "CR": cr, "CF1": cf1, "OP": op, "OR": orec, "OF1": of1, "exact": exact}


def assert_metrics_close(actual, expected):
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, None), (2, 1), (3, 2)])
def test_average_precision_matches_sklearn(seed, decimals):
    y_true, scores = random_case(seed, decimals=decimals)
    ap = average_precision_per_class(y_true, scores)
    expected = average_precision_score(y_true, scores, average=None)
    np.testing.assert_allclose(ap, expected, rtol=0, atol=1e-12)
    mean_ap, counted = mean_average_precision(y_true, scores)
    assert mean_ap == pytest.approx(expected.mean(), abs=1e-12)
    assert counted == y_true.shape[1]


def test_average_precision_groups_tied_scores():
    # Tied 0.8 (one positive, one negative) is one threshold: P=1/2 at R=1/2,
    # then P=2/3 at R=1. Ranking the positive first would give 0.8333.
    y_true = np.array([[1], [0], [1], [0]])
    scores = np.array([[0.8], [0.8], [0.5], [0.1]])
    ap = average_precision_per_class(y_true, scores)
    assert ap[0] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert ap[0] == pytest.approx(average_precision_score(y_true[:, 0], scores[:, 0]))


def test_all_scores_equal_gives_prevalence():
    y_true, _ = random_case(4)
    scores = np.full(y_true.shape, 0.5)
    ap = average_precision_per_class(y_true, scores)
    np.testing.assert_allclose(ap, y_true.mean(axis=0))
    np.testing.assert_allclose(ap, average_precision_score(y_true, scores, average=None))


def test_class_without_positives_is_left_out_of_map():
    y_true, scores = random_case(5)
    y_true[:, 2] = 0
    ap = average_precision_per_class(y_true, scores)
    assert np.isnan(ap[2])
    kept = [c for c in range(y_true.shape[1]) if c != 2]
    expected = average_precision_score(y_true[:, kept], scores[:, kept], average=None)
    np.testing.assert_allclose(ap[kept], expected, atol=1e-12)
    mean_ap, counted = mean_average_precision(y_true, scores)
    assert counted == y_true.shape[1] - 1
    assert mean_ap == pytest.approx(expected.mean())
    # The class still counts (as recall 0) in CR, as scikit-learn's macro average does.
    expected = sklearn_set_metrics(y_true, scores >= 0.5)
    assert_metrics_close(threshold_metrics(y_true, scores), expected)


def test_no_positives_at_all():
    y_true = np.zeros((3, 2))
    mean_ap, counted = mean_average_precision(y_true, np.full((3, 2), 0.7))
    assert np.isnan(mean_ap) and counted == 0
    result = evaluate_scores(y_true, np.full((3, 2), 0.7))
    assert result["mAP"] is None
    json.dumps(result, allow_nan=False)


def test_perfect_predictor():
    y_true, _ = random_case(6)
    scores = np.where(y_true == 1, 0.9, 0.1)
    assert mean_average_precision(y_true, scores) == (1.0, y_true.shape[1])
    assert threshold_metrics(y_true, scores) == dict.fromkeys(SET_METRIC_KEYS, 1.0)


@pytest.mark.parametrize("seed,decimals", [(7, None), (8, 1)])
def test_threshold_metrics_match_sklearn(seed, decimals):
    y_true, scores = random_case(seed, decimals=decimals)
    y_true[3] = 0  # an image with no labels
    for threshold in (0.3, 0.5, 0.8):
        expected = sklearn_set_metrics(y_true, (scores >= threshold).astype(int))
        assert_metrics_close(threshold_metrics(y_true, scores, threshold), expected)


def test_exact_counts_whole_sets_and_matches_sklearn():
    y_true = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    y_pred = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1], [1, 0, 0], [1, 0, 0]])
    # Images 1 and 2 right (2 has no labels and gets none); 3 adds one, 4 misses one, 5 adds one.
    assert set_metrics(y_true, y_pred)["exact"] == 0.4
    assert set_metrics(y_true, y_pred)["exact"] == accuracy_score(y_true, y_pred)
    # Random cases, where most sets are wrong: still sklearn's subset accuracy.
    y_true, scores = random_case(11, num_classes=3)
    predicted = (scores >= 0.45).astype(int)
    assert 0 < accuracy_score(y_true, predicted) < 1
    assert set_metrics(y_true, predicted)["exact"] == pytest.approx(accuracy_score(y_true, predicted))


def test_class_never_predicted_has_precision_zero():
    y_true, scores = random_case(9)
    scores[:, 1] = 0.2  # class 1 is never predicted at 0.5
    metrics = threshold_metrics(y_true, scores)
    assert_metrics_close(metrics, sklearn_set_metrics(y_true, scores >= 0.5))
    assert per_class_metrics(y_true, scores)[1]["precision"] == 0.0


def test_per_class_thresholds():
    y_true, scores = random_case(10)
    thresholds = np.linspace(0.2, 0.8, y_true.shape[1])
    y_pred = (scores >= thresholds).astype(int)
    expected = sklearn_set_metrics(y_true, y_pred)
    assert_metrics_close(threshold_metrics(y_true, scores, thresholds), expected)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, average=None, zero_division=0
    )
    per_class = per_class_metrics(y_true, scores, thresholds)
    np.testing.assert_allclose([e["precision"] for e in per_class], precision)
    np.testing.assert_allclose([e["recall"] for e in per_class], recall)
    np.testing.assert_allclose([e["f1"] for e in per_class], f1)
    assert [e["support"] for e in per_class] == support.tolist()
    with pytest.raises(ValueError, match="one per class"):
        threshold_metrics(y_true, scores, [0.5, 0.5])


def test_cf1_is_harmonic_mean_of_cp_and_cr_not_mean_f1():
    # Class 0: P=1, R=1/2 (F1 2/3). Class 1: P=1/2, R=1 (F1 2/3).
    # CP = CR = 3/4 so CF1 = 3/4, while the mean per-class F1 is 2/3.
    y_true = np.array([[1, 1], [1, 0], [0, 0]])
    y_pred = np.array([[1, 1], [0, 0], [0, 1]])
    metrics = set_metrics(y_true, y_pred)
    assert metrics["CP"] == pytest.approx(0.75)
    assert metrics["CR"] == pytest.approx(0.75)
    assert metrics["CF1"] == pytest.approx(0.75)
    _, _, mean_f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0
    )
    assert mean_f1 == pytest.approx(2 / 3)
    # Micro: TP 2, FP 1, FN 1.
    assert (metrics["OP"], metrics["OR"], metrics["OF1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))


def test_top_k_hand_worked():
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.6],  # top 3 = 0, 1, 2
            [0.6, 0.6, 0.6, 0.6],  # ties: lower index first -> 0, 1, 2
            [0.1, 0.95, 0.4, 0.55],  # top 3 = 1, 3, 2; 2 is below 0.5
            [0.2, 0.3, 0.1, 0.0],  # nothing reaches 0.5
        ]
    )
    expected = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(top_k_predictions(scores, k=3), expected)
    # Per-class thresholds: class 2 at 0.35 lets image 2 keep it.
    expected[2, 2] = 1
    np.testing.assert_array_equal(top_k_predictions(scores, 3, [0.5, 0.5, 0.35, 0.5]), expected)
    top1 = top_k_predictions(scores, k=1, threshold=0.0)
    np.testing.assert_array_equal(top1.sum(axis=1), [1, 1, 1, 1])
    assert top_k_predictions(scores, k=10, threshold=0.0).sum() == 16


def test_precision_recall_curve_matches_sklearn():
    y_true, scores = random_case(11, decimals=1)
    precision, recall, thresholds = precision_recall_curve(y_true[:, 0], scores[:, 0])
    expected_p, expected_r, expected_t = sklearn_pr_curve(y_true[:, 0], scores[:, 0])
    # scikit-learn orders by increasing threshold and appends (R=0, P=1).
    np.testing.assert_allclose(precision, expected_p[:-1][::-1])
    np.testing.assert_allclose(recall, expected_r[:-1][::-1])
    np.testing.assert_allclose(thresholds, expected_t[::-1])


def test_evaluate_scores_is_json_ready():
    y_true, scores = random_case(12, num_classes=4)
    y_true[:, 3] = 0
    decoded = (scores > 0.6).astype(int)
    names = ["cat", "dog", "car", "kite"]
    result = evaluate_scores(y_true, scores, 0.5, names, decoded=decoded)
    text = json.dumps(result, allow_nan=False)
    assert set(result) == {
        "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "exact", "top3", "per_class",
        "num_images", "num_classes_counted", "threshold", "decoded_set",
    }
    assert json.loads(text)["per_class"][3] == {
        "name": "kite", "ap": None, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0,
    }
    assert result["num_images"] == 60 and result["num_classes_counted"] == 3
    assert result["mAP"] == pytest.approx(average_precision_score(y_true[:, :3], scores[:, :3]))
    assert_metrics_close(result["decoded_set"], sklearn_set_metrics(y_true, decoded))
    top3 = top_k_predictions(scores, 3, 0.5)
    assert_metrics_close(result["top3"], sklearn_set_metrics(y_true, top3))
    assert "decoded_set" not in evaluate_scores(y_true, scores)


@pytest.mark.parametrize(
    "y_true,scores,message",
    [
        ([[1, 0]], [[0.2, 1.7]], "logits"),
        ([[1, 0]], [[0.2, 0.3, 0.1]], "shape"),
        ([[2, 0]], [[0.2, 0.3]], "only 0 and 1"),
        ([1, 0], [0.2, 0.3], "2-D"),
    ],
)
def test_bad_inputs_raise(y_true, scores, message):
    with pytest.raises(ValueError, match=message):
        evaluate_scores(y_true, scores)
