"""The yardstick's fold arithmetic: the mean over training seeds, their spread, the paired gaps to the probe."""

import numpy as np
import pytest


def test_a_fold_counts_the_mean_over_seeds_and_keeps_each_seed(yardstick):
    rows = [{"mAP": 0.40, "decoded_OF1": 0.30}, {"mAP": 0.50, "decoded_OF1": 0.20}]
    merged = yardstick.mean_over_seeds(rows)
    assert merged["mAP"] == pytest.approx(0.45)
    assert merged["decoded_OF1"] == pytest.approx(0.25)
    assert merged["per_seed"] == rows
    # One seed: the row itself, nothing to keep beside it.
    assert yardstick.mean_over_seeds(rows[:1]) == rows[0]


def test_seed_spread_is_the_mean_over_folds_of_the_std_over_seeds(yardstick):
    fold = lambda maps: {"rnn": yardstick.mean_over_seeds(  # noqa: E731
        [{"mAP": m, "decoded_OF1": 0.3} for m in maps])}
    results = [fold([0.4, 0.6]), fold([0.5, 0.5])]
    spread = yardstick.seed_spread(results, ["rnn"])
    assert spread["rnn"]["mAP"] == pytest.approx(np.mean([0.1, 0.0]))
    assert spread["rnn"]["decoded_OF1"] == pytest.approx(0.0)
    # A head trained with one seed has no spread to report.
    assert yardstick.seed_spread([{"rnn": {"mAP": 0.5, "decoded_OF1": 0.3}}], ["rnn"]) == {}


def test_gaps_to_probe_pair_each_fold_with_its_own_probe(yardstick):
    results = [
        {"probe": {"mAP": 0.50, "tuned_OF1": 0.30}, "rnn": {"mAP": 0.45, "decoded_OF1": 0.35}},
        {"probe": {"mAP": 0.40, "tuned_OF1": 0.20}, "rnn": {"mAP": 0.42, "decoded_OF1": 0.18}},
    ]
    gaps = yardstick.gaps_to_probe(results, ["rnn"])["rnn"]
    assert gaps["mAP"][0] == pytest.approx((-0.05 + 0.02) / 2)
    assert gaps["mAP"][1] == 1
    assert gaps["decoded_OF1"][0] == pytest.approx((0.05 - 0.02) / 2)
    assert gaps["decoded_OF1"][1] == 1
    lines = yardstick.gap_lines(yardstick.gaps_to_probe(results, ["rnn"]), len(results), {})
    assert "| rnn | -1.5 (1 of 2) | +1.5 (1 of 2) | – |" in lines


def test_score_set_counts_whole_sets_for_each_set_rule(yardstick):
    y_true = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0]])
    scores = np.array([[0.9, 0.3, 0.1], [0.8, 0.4, 0.2], [0.1, 0.2, 0.6], [0.2, 0.7, 0.6]])
    decoded = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0]])
    row = yardstick.score_set(y_true, scores, decoded, 0.5, [0.5, 0.35, 0.65])
    # 0.5: photos 1 and 3 right (photo 2 misses label 1, photo 4 adds label 2).
    assert row["exact_at_t"] == 0.5
    # Tuned: label 1 from 0.35 (photo 2 right) and label 2 from 0.65 (photo 3 missed, photo 4 right).
    assert row["tuned_exact"] == 0.75
    assert row["exact_set"] == 0.75
    assert "tuned_exact" not in yardstick.score_set(y_true, scores, decoded, 0.5, None)
