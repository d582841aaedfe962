"""`scripts/compare_label_scores.py`: AP per label grouped by the label's training photos."""

import numpy as np


def test_ap_by_training_photos_groups_label_folds_by_training_count_and_skips_absent_labels(script_module):
    script = script_module("compare_label_scores")
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    right = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.8, 0.7, 0.5], [0.1, 0.2, 0.5]])
    wrong = 1.0 - right  # every ranking reversed
    folds = [
        # label 2 has no photo in the test fold: no AP, no pair
        {"y": y, "train_counts": np.array([0, 4, 30]), "scores": {"probe": right, "rnn": wrong}},
        {"y": y, "train_counts": np.array([2, 4, 30]), "scores": {"probe": wrong, "rnn": right}},
    ]
    rows = script.ap_by_training_photos(folds)
    by_group = {group: (pairs, aps) for group, pairs, aps in rows}
    assert set(by_group) == {(0, 0), (1, 2), (3, 5)}
    # Reversed ranking of 2 positives among 4: positives at ranks 3 and 4 -> AP (1/3 + 2/4) / 2.
    reversed_ap = (1 / 3 + 2 / 4) / 2
    assert by_group[(0, 0)] == (1, {"probe": 1.0, "rnn": reversed_ap})
    assert by_group[(1, 2)] == (1, {"probe": reversed_ap, "rnn": 1.0})
    assert by_group[(3, 5)][0] == 2
    assert np.isclose(by_group[(3, 5)][1]["probe"], (1.0 + reversed_ap) / 2)
    table = script.by_training_photos_table(rows)
    assert "| 0 | 1 | 100.0 | 41.7 | -58.3 |" in table
    assert "| 1-2 | 1 | 41.7 | 100.0 | +58.3 |" in table
