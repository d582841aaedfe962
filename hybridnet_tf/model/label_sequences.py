"""Multi-hot label vectors -> label sequences for the decoder (the one place this happens).

Token ids: `0..L-1` are labels, `L` is END and `L+1` is START, where `L` is
the number of labels. Targets are padded with `PAD_ID` (-1), which the loss
ignores.

The order in which an image's labels are read out in training is chosen by
`label_order` (see `LABEL_ORDERS`):

- `freq2rare`: most frequent training label first, the default of the
  CNN-RNN paper (Wang et al., "CNN-RNN: A Unified Framework for Multi-label
  Image Classification", CVPR 2016).
- `rare2freq`: rarest first (studied as an alternative by Wang et al. and by
  Yazici et al., CVPR 2020).
- `fixed`: vocabulary (index) order.
- `random`: a new random order every time an example is seen
  (`random_label_sequence`, seeded and in-graph; Vinyals et al., "Order
  Matters", ICLR 2016, and Yazici et al. use it as a baseline).
- `orderless`: predicted label alignment, PLA (Yazici et al., "Orderless
  Recurrent Models for Multi-label Classification", CVPR 2020): a label the
  decoder predicted correctly stays the target of the step that predicted
  it, and the labels it missed go to the remaining steps by minimum cost
  on its own probabilities (`predicted_label_alignment`).

All functions are plain TensorFlow ops, so they run inside `tf.data` and
inside a model (XLA included).
"""

import tensorflow as tf

from hybridnet_tf.model.assignment import _IMPOSSIBLE, min_cost_assignment

PAD_ID = -1

# Orderings that `LabelVocabulary.label_rank` knows; the others are built on one of them.
RANKED_ORDERS = ("freq2rare", "rare2freq", "fixed")
LABEL_ORDERS = RANKED_ORDERS + ("random", "orderless")


def end_id(num_labels):
    """Token id of END for a vocabulary of `num_labels` labels."""
    return num_labels


def start_id(num_labels):
    """Token id of START for a vocabulary of `num_labels` labels."""
    return num_labels + 1


def rank_ordering(label_order):
    """The `LabelVocabulary.label_rank` ordering a `label_order` needs.

    `random` ignores the rank (any is fine; "fixed"); `orderless` appends the
    labels the decoder missed in freq2rare order, as Yazici et al. do.

    Example:
        >>> rank_ordering("orderless")
        'freq2rare'
    """
    if label_order not in LABEL_ORDERS:
        raise ValueError(f"unknown label_order {label_order!r}; choose one of {list(LABEL_ORDERS)}")
    return {"random": "fixed", "orderless": "freq2rare"}.get(label_order, label_order)


def sequence_from_keys(keys, present, max_length):
    """The present labels in ascending `keys` order, then END, then `PAD_ID`.

    The one routine behind every ordering: an ordering is a choice of keys.

    Args:
        keys: [..., L] int or float sort keys; ties keep index order.
        present: [..., L] bool, the image's labels.
        max_length: number of steps, END included; images with more than
            `max_length - 1` labels keep the first ones in key order.

    Returns:
        [..., max_length] int32 label ids, END, then `PAD_ID`.
    """
    keys = tf.convert_to_tensor(keys)
    present = tf.convert_to_tensor(present, tf.bool)
    num_labels = tf.shape(present)[-1]
    order, _ = _first_columns(keys, present, max_length)
    count = tf.reduce_sum(tf.cast(present, tf.int32), axis=-1, keepdims=True)
    count = tf.minimum(count, max_length - 1)
    positions = tf.range(max_length)
    end = tf.fill(tf.shape(order), num_labels)
    pad = tf.fill(tf.shape(order), PAD_ID)
    return tf.where(positions < count, order, tf.where(positions == count, end, pad))


def _present(multi_hot):
    """[..., L] bool of a 0/1 multi-hot tensor of any numeric dtype."""
    return tf.cast(tf.convert_to_tensor(multi_hot), tf.float32) > 0.5


def make_label_sequence(multi_hot, label_rank, max_length):
    """Orders an image's labels by a rank into a target sequence ending in END.

    Args:
        multi_hot: [..., L] 0/1 float or int tensor.
        label_rank: [L] (or [..., L]) int tensor; labels are emitted in
            ascending rank (see `LabelVocabulary.label_rank`, e.g. freq2rare).
        max_length: number of decoding steps, END included; images with
            more than `max_length - 1` labels keep the first ones in order.

    Returns:
        [..., max_length] int32: label ids, then END, then `PAD_ID`.

    Example:
        >>> make_label_sequence([0, 1, 1], [2, 0, 1], 4).numpy()
        array([ 1,  2,  3, -1], dtype=int32)
    """
    present = _present(multi_hot)
    label_rank = tf.cast(tf.convert_to_tensor(label_rank), tf.int32)
    label_rank = tf.broadcast_to(label_rank, tf.shape(present))
    return sequence_from_keys(label_rank, present, max_length)


def random_label_sequence(multi_hot, max_length, seed):
    """The image's labels in a random order (a fresh one per call with a fresh seed).

    Args:
        multi_hot: [..., L] 0/1 tensor.
        max_length: steps, END included.
        seed: [2] int32/int64 tensor for `tf.random.stateless_uniform`; the
            same seed gives the same orders (see `with_training_targets`,
            which draws one seed per batch from a seeded `tf.data` stream).

    Returns:
        [..., max_length] int32, as `make_label_sequence`.
    """
    present = _present(multi_hot)
    keys = tf.random.stateless_uniform(tf.shape(present), seed=seed)
    return sequence_from_keys(keys, present, max_length)


def ranked_labels(multi_hot, label_rank):
    """Each present label's rank, -1 for absent labels: the PLA training target.

    Holds both the label set and the order in which missed labels are
    appended, in one [..., L] int32 tensor (a Keras loss gets one `y_true`).
    """
    present = _present(multi_hot)
    label_rank = tf.cast(tf.convert_to_tensor(label_rank), tf.int32)
    return tf.where(present, tf.broadcast_to(label_rank, tf.shape(present)), -1)


def aligned_label_sequence(ranked, predicted_tokens, max_length):
    """The project's first PLA rule ("sorted"; `predicted_label_alignment` is the paper's).

    The target sequence is re-ordered to agree with what the decoder
    predicted: first the true labels the decoder predicted (before its first
    END), in the order it predicted them; then the true labels it missed, in
    ascending rank (freq2rare in training); then END and padding.

    Because a correctly predicted label moves to a position no later than
    the step that predicted it, and missed labels were never predicted, no
    target is ever a label the decoder's no-repeat mask has removed.

    Args:
        ranked: [B, L] int, `ranked_labels` (rank of a present label, -1 if absent).
        predicted_tokens: [B, T] int, the decoder's tokens (labels `< L`,
            END `== L`); tokens after the first END are ignored.
        max_length: length of the returned sequence.

    Returns:
        [B, max_length] int32 targets.

    Example (labels a=0, b=1, c=2, d=3; true {a, b, d}, predicted b, c, a, END):
        >>> aligned_label_sequence([[0, 1, -1, 2]], [[1, 2, 0, 4]], 5).numpy()
        array([[ 1,  0,  3,  4, -1]], dtype=int32)
    """
    ranked = tf.cast(tf.convert_to_tensor(ranked), tf.int32)
    predicted_tokens = tf.cast(tf.convert_to_tensor(predicted_tokens), tf.int32)
    num_labels = tf.shape(ranked)[-1]
    steps = tf.shape(predicted_tokens)[-1]
    present = ranked >= 0
    is_end = predicted_tokens >= num_labels
    before_end = tf.equal(tf.cumsum(tf.cast(is_end, tf.int32), axis=-1), 0)
    # hits[b, t, l] = 1 when step t (before END) predicted label l.
    hits = tf.one_hot(predicted_tokens, num_labels, dtype=tf.int32) * tf.cast(
        before_end, tf.int32
    )[..., None]
    was_predicted = tf.reduce_max(hits, axis=-2) > 0
    first_step = tf.cast(tf.math.argmax(hits, axis=-2), tf.int32)
    keys = tf.where(was_predicted, first_step, steps + ranked)
    return sequence_from_keys(keys, present, max_length)


def _first_columns(keys, present, count):
    """Indices [..., count] of the present entries in ascending `keys`, padded with 0; and their validity.

    Absent entries sort after every present one, a stable sort keeps ties in
    index order, and the padding gives `count` columns even when there are
    fewer entries.
    """
    absent_key = tf.reduce_max(keys, axis=-1, keepdims=True) + tf.ones([], keys.dtype)
    order = tf.argsort(tf.where(present, keys, absent_key), axis=-1, stable=True)
    pad = tf.zeros(tf.concat([tf.shape(order)[:-1], [count]], axis=0), tf.int32)
    order = tf.concat([order, pad], axis=-1)[..., :count]
    valid = tf.range(count) < tf.reduce_sum(tf.cast(present, tf.int32), axis=-1, keepdims=True)
    return order, valid


def predicted_label_alignment(ranked, logits):
    """PLA targets by the rule of Yazici et al. (CVPR 2020), in the graph.

    `logits` are the masked logits of a decoder run fed with its own argmax
    tokens (`LabelDecoder(..., self_fed=True)`), so the argmax at step t is
    the decoder's prediction there. With `n` the image's label count
    (at most T - 1; with more, the predicted ones and then the best ranked
    are kept), the targets of steps 0..n-1 are:

    - the predicted label, at a step t < n that predicted a true label
      before the decoder's first END (it stays where it was predicted);
    - at the other steps, the true labels not kept that way, assigned by
      the minimum total cost -log p_t(label) (the paper's Hungarian step;
      exact, by `assignment.min_cost_assignment`, no gradient through it);

    then END at step n and `PAD_ID` after. No target is a label the
    decoder's no-repeat mask removed at its step: masked labels are those
    it emitted earlier, which are either kept at their own step or not true.

    Args:
        ranked: [B, L] int, `ranked_labels` (rank of a true label, -1 if
            absent): which labels the image has, and (rank) which to keep
            when it has more than T - 1.
        logits: [B, T, L+1] logits (T static).

    Returns:
        [B, T] int32 targets.
    """
    ranked = tf.cast(tf.convert_to_tensor(ranked), tf.int32)
    logits = tf.convert_to_tensor(logits)
    steps = logits.shape[1]
    slots = steps - 1  # label-capable steps
    num_labels = tf.shape(ranked)[-1]
    present = ranked >= 0
    predicted = tf.cast(tf.math.argmax(logits, axis=-1), tf.int32)
    count = tf.minimum(tf.reduce_sum(tf.cast(present, tf.int32), axis=-1), slots)  # n
    positions = tf.range(steps)
    is_end = predicted >= num_labels
    before_end = tf.equal(tf.cumsum(tf.cast(is_end, tf.int32), axis=-1), 0)
    predicted_present = tf.gather(tf.pad(present, [[0, 0], [0, 1]]), predicted, batch_dims=1)
    kept = before_end & predicted_present & (positions[None, :] < count[:, None])
    kept_labels = tf.reduce_max(
        tf.one_hot(predicted, num_labels, dtype=tf.int32) * tf.cast(kept, tf.int32)[..., None], axis=1
    ) > 0
    # The free steps (ascending) and the labels still to place (best rank first).
    free = tf.logical_not(kept) & (positions[None, :] < count[:, None])
    free_steps, free_valid = _first_columns(tf.broadcast_to(positions, tf.shape(free)), free, slots)
    missing = present & tf.logical_not(kept_labels)
    missing_labels, _ = _first_columns(ranked, missing, slots)
    # As many labels to place as free steps: the first `free` ones by rank.
    label_valid = free_valid
    log_probs = tf.stop_gradient(tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1))
    at_free_steps = tf.gather(log_probs, free_steps, batch_dims=1)  # [B, m, L+1]
    cost = -tf.gather(at_free_steps, missing_labels, axis=2, batch_dims=1)  # [B, m, m]
    # NaN logits (a diverged step, which StopOnNonFiniteLoss then reports) would make the
    # assignment's argmin pick indices out of range and crash the graph instead.
    cost = tf.where(tf.math.is_nan(cost), _IMPOSSIBLE / 10, cost)
    # Padding rows and columns pair with each other at no cost, never with real ones.
    real = tf.logical_and(free_valid[:, :, None], label_valid[:, None, :])
    both_pad = tf.logical_and(~free_valid[:, :, None], ~label_valid[:, None, :])
    cost = tf.where(real, tf.minimum(cost, _IMPOSSIBLE / 10), tf.where(both_pad, 0.0, _IMPOSSIBLE))
    column = min_cost_assignment(cost)
    placed = tf.gather(missing_labels, column, batch_dims=1)  # label of each free step
    at_step = tf.one_hot(free_steps, steps, dtype=tf.int32) * tf.cast(free_valid, tf.int32)[..., None]
    free_target = tf.reduce_sum(at_step * placed[..., None], axis=1)
    is_free = tf.reduce_sum(at_step, axis=1) > 0
    targets = tf.where(kept, predicted, tf.where(is_free, free_target, PAD_ID))
    targets = tf.where(positions[None, :] == count[:, None], num_labels, targets)
    return targets


def decoder_inputs_from_targets(targets, num_labels):
    """Teacher forcing inputs: START, then the targets shifted right by one.

    Padding positions are filled with END (their outputs are ignored by the
    loss, and embedding lookups need a valid id).
    """
    targets = tf.convert_to_tensor(targets, tf.int32)
    start_shape = tf.concat([tf.shape(targets)[:-1], [1]], axis=0)
    start = tf.fill(start_shape, start_id(num_labels))
    shifted = tf.concat([start, targets[..., :-1]], axis=-1)
    return tf.where(shifted == PAD_ID, end_id(num_labels), shifted)
