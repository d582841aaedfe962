"""Multi-hot label vectors -> label sequences for the decoder (the one place this happens).

Token ids: `0..L-1` are labels, `L` is END and `L+1` is START, where `L` is
the number of labels. Targets are padded with `PAD_ID` (-1), which the loss
ignores.
"""

import tensorflow as tf

PAD_ID = -1


def end_id(num_labels):
    """Token id of END for a vocabulary of `num_labels` labels."""
    return num_labels


def start_id(num_labels):
    """Token id of START for a vocabulary of `num_labels` labels."""
    return num_labels + 1


def make_label_sequence(multi_hot, label_rank, max_length):
    """Orders an image's labels into a target sequence ending in END.

    Args:
        multi_hot: [..., L] 0/1 float or int tensor.
        label_rank: [L] int tensor; labels are emitted in ascending rank
            (see `LabelVocabulary.label_rank`, e.g. frequent-to-rare).
        max_length: number of decoding steps, END included; images with
            more than `max_length - 1` labels keep the first ones in order.

    Returns:
        [..., max_length] int32: label ids, then END, then `PAD_ID`.

    Example:
        >>> make_label_sequence([0, 1, 1], [2, 0, 1], 4).numpy()
        array([ 1,  2,  3, -1], dtype=int32)
    """
    multi_hot = tf.convert_to_tensor(multi_hot)
    label_rank = tf.cast(tf.convert_to_tensor(label_rank), tf.int32)
    num_labels = tf.shape(multi_hot)[-1]
    present = multi_hot > 0.5
    # Absent labels get keys after every present one, so a stable sort puts
    # the present labels first, in rank order.
    keys = tf.where(present, label_rank, label_rank + num_labels)
    order = tf.argsort(keys, axis=-1, stable=True, direction="ASCENDING")
    # Pad so there are always max_length columns, even with a tiny vocabulary.
    pad_shape = tf.concat([tf.shape(order)[:-1], [max_length]], axis=0)
    order = tf.concat([order, tf.zeros(pad_shape, tf.int32)], axis=-1)[..., :max_length]
    count = tf.reduce_sum(tf.cast(present, tf.int32), axis=-1, keepdims=True)
    count = tf.minimum(count, max_length - 1)
    positions = tf.range(max_length)
    end = tf.fill(tf.shape(order), num_labels)
    pad = tf.fill(tf.shape(order), PAD_ID)
    return tf.where(positions < count, order, tf.where(positions == count, end, pad))


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
