"""The paper's PLA rule and the in-graph assignment behind it, against brute force."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.assignment import min_cost_assignment
from hybridnet_tf.model.label_sequences import predicted_label_alignment, ranked_labels


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6])
def test_min_cost_assignment_equals_brute_force(size):
    rng = np.random.default_rng(size)
    cost = rng.exponential(1.0, (40, size, size)).astype(np.float32)
    columns = min_cost_assignment(cost).numpy()
    for matrix, chosen in zip(cost, columns):
        assert sorted(chosen.tolist()) == list(range(size))  # a permutation
        best = min(sum(matrix[i, p[i]] for i in range(size)) for p in itertools.permutations(range(size)))
        assert sum(matrix[i, chosen[i]] for i in range(size)) == pytest.approx(best, rel=1e-5)


def test_min_cost_assignment_runs_under_xla():
    cost = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32)
    compiled = tf.function(min_cost_assignment, jit_compile=True)
    np.testing.assert_array_equal(compiled(cost), min_cost_assignment(cost))


def _brute_force_pla(true_labels, rank, log_probs):
    """The paper's rule in plain Python: keep correct predictions, place the rest at least cost."""
    steps, end = log_probs.shape[0], log_probs.shape[1] - 1
    predicted = log_probs.argmax(-1).tolist()
    before_end = predicted[: predicted.index(end)] if end in predicted else predicted
    count = min(len(true_labels), steps - 1)
    kept = {t: label for t, label in enumerate(before_end) if t < count and label in true_labels}
    missing = sorted((label for label in true_labels if label not in kept.values()), key=lambda l: rank[l])
    free = [t for t in range(count) if t not in kept]
    missing = missing[: len(free)]
    best, best_cost = None, np.inf
    for order in itertools.permutations(missing):
        cost = -sum(log_probs[t, label] for t, label in zip(free, order))
        if cost < best_cost - 1e-9:
            best, best_cost = dict(zip(free, order)), cost
    targets = [kept.get(t, (best or {}).get(t)) for t in range(count)] + [end]
    targets += [-1] * (steps - len(targets))
    return targets, best_cost if free else 0.0


def _cost(targets, log_probs, kept_steps):
    return -sum(log_probs[t, label] for t, label in enumerate(targets) if t not in kept_steps and 0 <= label < log_probs.shape[1] - 1)


def test_paper_pla_matches_a_brute_force_assignment():
    rng = np.random.default_rng(0)
    num_labels, steps, batch = 6, 5, 300
    multi_hot = (rng.random((batch, num_labels)) < 0.45).astype(np.float32)
    rank = rng.permutation(num_labels)
    logits = rng.normal(0, 2.0, (batch, steps, num_labels + 1)).astype(np.float32)
    # Like the decoder's self-fed run: labels emitted before a step are masked there.
    for row in range(batch):
        emitted = []
        for t in range(steps):
            logits[row, t, emitted] = -1e4
            token = int(logits[row, t].argmax())
            if token == num_labels:
                break
            emitted.append(token)
    targets = predicted_label_alignment(ranked_labels(multi_hot, rank), logits).numpy()
    log_probs = tf.nn.log_softmax(logits).numpy().astype(np.float64)
    kinds = set()
    for row in range(batch):
        true_labels = np.flatnonzero(multi_hot[row]).tolist()
        expected, best_cost = _brute_force_pla(true_labels, rank, log_probs[row])
        predicted = log_probs[row].argmax(-1)
        kept_steps = {t for t, label in enumerate(expected) if 0 <= label < num_labels and predicted[t] == label
                      and label in true_labels and num_labels not in predicted[:t]}
        got = targets[row].tolist()
        # Same kept steps, END and padding; the placed labels cost the brute-force minimum (ties may differ).
        assert [got[t] for t in sorted(kept_steps)] == [expected[t] for t in sorted(kept_steps)]
        assert [t == num_labels or t == -1 for t in got] == [t == num_labels or t == -1 for t in expected]
        assert sorted(got) == sorted(expected)
        assert _cost(got, log_probs[row], kept_steps) == pytest.approx(best_cost, abs=1e-4)
        for t, label in enumerate(got):  # never a label the no-repeat mask removed at its step
            if 0 <= label < num_labels:
                assert logits[row, t, label] > -1e3
        kinds.add((len(kept_steps) > 0, len(true_labels) >= steps))
    assert kinds >= {(True, False), (False, False), (True, True)}  # the cases occur in the data


def test_paper_pla_hand_worked():
    # True {0, 1, 3}; the decoder predicts 3 (right), 2 (wrong), 0 (right) at steps 0..2.
    logits = np.full((1, 5, 6), -3.0, np.float32)
    logits[0, 0, 3] = 5.0
    logits[0, 1, 2] = 5.0
    logits[0, 1, 1] = 1.0  # label 1 is the likelier missed label at step 1
    logits[0, 2, 0] = 5.0
    logits[0, 3, 5] = 5.0
    targets = predicted_label_alignment(ranked_labels([[1, 1, 0, 1, 0]], [0, 1, 2, 3, 4]), logits)
    # 3 stays at step 0, 0 stays at step 2, the missed 1 takes the free step 1, END at 3.
    assert targets.numpy().tolist() == [[3, 1, 0, 5, -1]]


def test_paper_pla_on_nan_logits_gives_each_true_label_once_in_the_graph():
    # A diverged step has NaN logits; the loss is then NaN and StopOnNonFiniteLoss names the
    # step. The alignment must not crash the graph first (an argmin over NaN costs did).
    rng = np.random.default_rng(0)
    ranked = np.where(rng.uniform(size=(8, 14)) < 0.3, rng.integers(0, 14, (8, 14)), -1).astype(np.int32)
    targets = tf.function(predicted_label_alignment)(ranked, tf.fill([8, 6, 15], np.nan)).numpy()
    for row, image_ranked in zip(targets, ranked):
        count = min(int((image_ranked >= 0).sum()), 5)
        assert sorted(row[:count]) == sorted(np.argsort(np.where(image_ranked >= 0, image_ranked, 99))[:count])
        assert row[count] == 14  # END
        assert (row[count + 1:] == -1).all()
