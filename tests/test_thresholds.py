"""Threshold tuning on hand-made cases and the thresholds JSON file."""

import json
import os

import numpy as np
import pytest

from hybridnet_tf.evaluation.metrics import per_class_metrics, threshold_metrics
from hybridnet_tf.evaluation.thresholds import load_thresholds, save_thresholds, tune_thresholds


def two_class_case():
    """Class 0 separates at (0.38, 0.42], class 1 at (0.2, 0.25].

    OF1 over both classes is best (12/13) on (0.2, 0.25]: there class 0 has
    one false positive (0.38) and class 1 is perfect.
    """
    class0_scores = [0.9, 0.7, 0.42, 0.38, 0.2, 0.1]
    class0_labels = [1, 1, 1, 0, 0, 0]
    class1_scores = [0.8, 0.3, 0.25, 0.2, 0.1, 0.05]
    class1_labels = [1, 1, 1, 0, 0, 0]
    y_true = np.array([class0_labels, class1_labels]).T
    scores = np.array([class0_scores, class1_scores]).T
    return y_true, scores


def test_known_global_and_per_class_thresholds():
    y_true, scores = two_class_case()
    tuned = tune_thresholds(y_true, scores, min_positives=1)
    # Every grid value in (0.2, 0.25] is optimal; ties go to the one nearest 0.5.
    assert tuned["global"] == pytest.approx(0.25)
    # Class 0: best on (0.38, 0.42]; ties go to the one nearest the global threshold.
    assert tuned["per_class"] == pytest.approx([0.39, 0.25])
    gain = tuned["gain"]
    assert gain["at_0.5"]["OF1"] == pytest.approx(6 / 9)  # TP 3, FN 3, FP 0
    assert gain["global"]["OF1"] == pytest.approx(12 / 13)
    assert gain["per_class"]["OF1"] == pytest.approx(1.0)
    assert gain["per_class"]["CF1"] == pytest.approx(1.0)
    json.dumps(tuned, allow_nan=False)


def test_rare_class_keeps_global_threshold_and_bounds_hold():
    y_true, scores = two_class_case()
    # Class 1 has 3 positives, below min_positives=4: it keeps the global threshold.
    tuned = tune_thresholds(y_true, scores, min_positives=4)
    assert tuned["per_class"] == pytest.approx([tuned["global"], tuned["global"]])
    # Separable on (0.92, 0.93]; under a 0.9 ceiling the best left is (0.85, 0.9]
    # (one false positive), and ties there go to the value nearest 0.5.
    y_true = np.array([[1], [1], [1], [0], [0], [0]])
    scores = np.array([[0.95], [0.94], [0.93], [0.92], [0.85], [0.1]])
    tuned = tune_thresholds(y_true, scores, min_threshold=0.1, max_threshold=0.95, min_positives=1)
    assert tuned["global"] == pytest.approx(0.93)
    tuned = tune_thresholds(y_true, scores, min_threshold=0.1, max_threshold=0.9, min_positives=1)
    assert tuned["global"] == pytest.approx(0.86)
    assert tuned["per_class"] == pytest.approx([0.86])
    # The floor: negatives above 0.3 and positives at 0.2 must not pull the threshold below 0.3.
    y_true = np.array([[1], [1], [0], [0]])
    scores = np.array([[0.2], [0.2], [0.4], [0.1]])
    tuned = tune_thresholds(y_true, scores, min_threshold=0.3, max_threshold=0.9, min_positives=1)
    assert tuned["global"] >= 0.3 and tuned["per_class"][0] >= 0.3


def test_tuning_matches_brute_force():
    rng = np.random.default_rng(0)
    y_true = (rng.random((80, 5)) < 0.35).astype(int)
    scores = np.round(np.clip(0.35 * y_true + 0.65 * rng.random((80, 5)), 0, 1), 2)
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    tuned = tune_thresholds(y_true, scores, min_positives=1)
    best_of1 = max(threshold_metrics(y_true, scores, t)["OF1"] for t in grid)
    assert tuned["gain"]["global"]["OF1"] == pytest.approx(best_of1)
    for c in range(5):
        best_f1 = max(per_class_metrics(y_true, scores, t)[c]["f1"] for t in grid)
        chosen = per_class_metrics(y_true, scores, np.asarray(tuned["per_class"]))[c]["f1"]
        assert chosen == pytest.approx(best_f1)
    assert all(0.05 <= t <= 0.95 for t in tuned["per_class"])


def test_bad_tuning_arguments():
    y_true, scores = two_class_case()
    with pytest.raises(ValueError, match="min_threshold"):
        tune_thresholds(y_true, scores, min_threshold=0.8, max_threshold=0.2)
    with pytest.raises(ValueError, match="min_positives"):
        tune_thresholds(y_true, scores, min_positives=0)


def test_json_round_trip(tmp_path):
    y_true, scores = two_class_case()
    tuned = tune_thresholds(y_true, scores, min_positives=1)
    path = tmp_path / "sub" / "thresholds.json"
    save_thresholds(path, tuned, ["cat", "dog"])
    assert os.listdir(path.parent) == ["thresholds.json"]  # no temp file left behind
    loaded = load_thresholds(path)
    assert loaded["global"] == tuned["global"]
    assert loaded["per_class"] == tuned["per_class"]
    assert loaded["names"] == ["cat", "dog"]
    assert loaded["gain"] == tuned["gain"]
    # Asking for another label order reorders the thresholds.
    assert load_thresholds(path, names=["dog", "cat"])["per_class"] == tuned["per_class"][::-1]
    with pytest.raises(ValueError, match=r"missing \['bird'\]"):
        load_thresholds(path, names=["cat", "bird"])


def test_save_checks_lengths(tmp_path):
    with pytest.raises(ValueError, match="2 per-class thresholds but 3 label names"):
        thresholds = {"global": 0.5, "per_class": [0.5, 0.4]}
        save_thresholds(tmp_path / "t.json", thresholds, ["a", "b", "c"])


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[0.5, 0.4]",
        '{"per_class": {"cat": 0.5}}',
        '{"global": 0.5, "per_class": {"cat": 1.5}}',
        '{"global": "0.5", "per_class": {"cat": 0.5}}',
        '{"global": 0.5, "per_class": [0.5]}',
        '{"global": 0.5, "per_class": {"cat": 0.5, "cat": 0.4}}',
    ],
)
def test_malformed_file_names_the_file(tmp_path, text):
    path = tmp_path / "bad_thresholds.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="bad_thresholds.json"):
        load_thresholds(path)
