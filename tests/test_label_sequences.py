"""Label sequences: each training order, PLA alignment, and the targets of every head."""

import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.hybridnet import build_model, with_training_targets
from hybridnet_tf.model.label_sequences import (
    LABEL_ORDERS,
    aligned_label_sequence,
    decoder_inputs_from_targets,
    make_label_sequence,
    random_label_sequence,
    rank_ordering,
    ranked_labels,
)
from hybridnet_tf.vocabulary import LabelVocabulary

# a..e with frequencies: b and d tie at 9, then a 5, e 3, c 1.
VOCAB = LabelVocabulary(["a", "b", "c", "d", "e"], [5, 9, 1, 9, 3])
END = 5
# An image with a, b, c, e (not d).
MULTI_HOT = [1.0, 1.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "ordering, expected",
    [
        ("freq2rare", [1, 0, 4, 2, END, -1]),  # b 9, a 5, e 3, c 1
        ("rare2freq", [2, 4, 0, 1, END, -1]),  # c 1, e 3, a 5, b 9
        ("fixed", [0, 1, 2, 4, END, -1]),
    ],
)
def test_ranked_orders_give_exact_sequences(ordering, expected):
    sequence = make_label_sequence(MULTI_HOT, VOCAB.label_rank(ordering), 6)
    assert sequence.numpy().tolist() == expected


def test_long_label_sets_are_truncated_and_empty_sets_end_at_once():
    rank = VOCAB.label_rank("freq2rare")
    assert make_label_sequence(MULTI_HOT, rank, 3).numpy().tolist() == [1, 0, END]
    assert make_label_sequence([0, 0, 0, 0, 0], rank, 3).numpy().tolist() == [END, -1, -1]
    # Integer multi-hot input works too, and batches keep their rows apart.
    batch = make_label_sequence([[0, 0, 1, 0, 0], [0, 0, 0, 1, 1]], rank, 3).numpy()
    assert batch.tolist() == [[2, END, -1], [3, 4, END]]


def test_random_order_is_a_seeded_permutation_that_varies():
    multi_hot = tf.constant([MULTI_HOT] * 8)
    first = random_label_sequence(multi_hot, 6, tf.constant([3, 0])).numpy()
    again = random_label_sequence(multi_hot, 6, tf.constant([3, 0])).numpy()
    other = random_label_sequence(multi_hot, 6, tf.constant([4, 0])).numpy()
    np.testing.assert_array_equal(first, again)
    for row in np.concatenate([first, other]):
        assert sorted(row[:4].tolist()) == [0, 1, 2, 4]
        assert row[4:].tolist() == [END, -1]
    orders = {tuple(row[:4]) for row in np.concatenate([first, other])}
    assert len(orders) > 4  # 16 draws from 24 orders


def _random_targets(seed):
    model = build_model(5, image_size=8, label_order="random", gru_units=8, embedding_dim=4)
    images = np.zeros((4, 8, 8, 3), np.float32)
    dataset = tf.data.Dataset.from_tensors((images, np.array([MULTI_HOT] * 4, np.float32)))
    targets = with_training_targets(dataset, model, VOCAB.label_rank("fixed"), seed=seed)
    return [t["sequence"].numpy() for _, t in targets.repeat(3)]


def test_random_order_is_redrawn_every_pass_and_reproducible():
    passes = _random_targets(seed=7)
    assert not np.array_equal(passes[0], passes[1])  # a new order on each pass over the data
    np.testing.assert_array_equal(np.stack(passes), np.stack(_random_targets(seed=7)))
    assert not np.array_equal(np.stack(passes), np.stack(_random_targets(seed=8)))


def test_pla_alignment_hand_worked():
    # Labels a=0 b=1 c=2 d=3 e=4; freq2rare ranks a 2, b 0, c 4, d 1, e 3.
    rank = VOCAB.label_rank("freq2rare")
    assert rank.tolist() == [2, 0, 4, 1, 3]
    truth = ranked_labels([MULTI_HOT], rank)  # a, b, c, e
    assert truth.numpy().tolist() == [[2, 0, 4, -1, 3]]
    # The decoder predicted e, d (wrong), a, END, then c after END (ignored).
    predicted = [[4, 3, 0, END, 2, 1]]
    # Predicted true labels in its order (e, a), then the missed b, c by rank.
    aligned = aligned_label_sequence(truth, predicted, 6).numpy().tolist()
    assert aligned == [[4, 0, 1, 2, END, -1]]
    # Nothing predicted correctly: plain freq2rare order.
    none = aligned_label_sequence(truth, [[3, END, END, END, END, END]], 6).numpy().tolist()
    assert none == [[1, 0, 4, 2, END, -1]]
    # Truncation keeps the predicted labels first.
    short = aligned_label_sequence(truth, [[2, 4, END]], 3).numpy().tolist()
    assert short == [[2, 4, END]]


def test_pla_never_targets_a_label_the_no_repeat_mask_removed():
    rng = np.random.default_rng(0)
    num_labels, steps = 6, 5
    for _ in range(200):
        multi_hot = (rng.random(num_labels) < 0.5).astype(np.float32)
        tokens = list(rng.permutation(num_labels + 1)[:steps])  # distinct, may hold END
        aligned = aligned_label_sequence(
            ranked_labels([multi_hot], np.arange(num_labels)), [tokens], steps
        ).numpy()[0]
        before_end = tokens[: tokens.index(num_labels)] if num_labels in tokens else tokens
        for step, target in enumerate(aligned):
            assert target not in before_end[:step], (tokens, aligned)
        true_labels = sorted(np.flatnonzero(multi_hot).tolist())
        kept = [t for t in aligned if 0 <= t < num_labels]
        assert kept == ([t for t in before_end if t in true_labels] + [
            t for t in true_labels if t not in before_end
        ])[: steps - 1]


def test_rank_ordering_and_decoder_inputs():
    assert [rank_ordering(o) for o in LABEL_ORDERS] == [
        "freq2rare", "rare2freq", "fixed", "fixed", "freq2rare"
    ]
    with pytest.raises(ValueError, match="unknown label_order"):
        rank_ordering("alphabetical")
    inputs = decoder_inputs_from_targets([[1, 0, END, -1]], 5).numpy().tolist()
    assert inputs == [[6, 1, 0, END]]  # START=6, shifted targets, padding -> END


@pytest.mark.parametrize(
    "head, order, inputs, targets",
    [
        ("hybrid_rnn", "freq2rare", {"image", "decoder_inputs"}, {"sequence": (2, 4)}),
        ("hybrid_rnn", "orderless", {"image"}, {"sequence": (2, 5)}),
        ("bce", "freq2rare", {"image"}, {"labels": (2, 5)}),
        ("hybrid", "random", {"image", "decoder_inputs"}, {"sequence": (2, 4), "labels": (2, 5)}),
    ],
)
def test_training_targets_of_each_head(head, order, inputs, targets):
    model = build_model(5, image_size=8, head=head, label_order=order, max_length=4,
                        gru_units=8, embedding_dim=4)
    dataset = tf.data.Dataset.from_tensors(
        (np.zeros((2, 8, 8, 3), np.float32), np.array([MULTI_HOT, [0, 0, 0, 1, 0]], np.float32))
    )
    rank = VOCAB.label_rank(rank_ordering(order))
    x, y = next(iter(with_training_targets(dataset, model, rank, seed=0)))
    assert set(x) == inputs
    assert {k: tuple(v.shape) for k, v in y.items()} == targets
    if "labels" in y:
        assert y["labels"].numpy().tolist() == [MULTI_HOT, [0, 0, 0, 1, 0]]
    if head == "hybrid_rnn" and order == "freq2rare":
        assert y["sequence"].numpy().tolist() == [[1, 0, 4, END], [3, END, -1, -1]]
    if order == "orderless":  # ranked_labels: freq2rare rank of each present label
        assert y["sequence"].numpy().tolist() == [[2, 0, 4, -1, 3], [-1, -1, -1, 1, -1]]
    with pytest.raises(ValueError, match="label_rank has 3 labels"):
        with_training_targets(dataset, model, [0, 1, 2])
