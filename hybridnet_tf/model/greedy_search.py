"""Greedy decoding of label sequences, inside the graph and exportable (beam width 1).

The same rules and interface as `beam_search.beam_search`, for one
hypothesis per image: no repeats, `min_label_score`, END forced at the
last step, and a label's score is its highest step score over the steps up
to and including the END step. The loop is unrolled when traced, with only
builtins-only TFLite ops (`argmax` with an int32 output, `one_hot`, `where`;
TF-TRAPS.md). Its bookkeeping is kept to a few ops per step, because at
batch 1 a step's cost is its op count (docs/performance.md): one additive
mask of the emitted labels, and the scores taken once after the loop.
"""

import tensorflow as tf


def greedy_search(
    step,
    initial_state,
    context,
    num_labels,
    max_length,
    start_token,
    min_label_score=0.0,
    masked_logit=-1e4,
    step_scores=None,
):
    """Decodes each image's label sequence greedily.

    Args:
        step: `step(tokens [B], state [B, U], context) -> (logits [B, L+1], state)`.
        initial_state: [B, U] decoder state before the first step.
        context: per-image input to every step (any nest).
        num_labels: `L`; token `L` is END.
        max_length: decoding steps, END included.
        start_token: token id fed at the first step.
        min_label_score: labels below this probability are not emitted.
        masked_logit: value added to the logits of emitted labels.
        step_scores: `step_scores(logits [B, T, L+1], probs [B, T, L+1]) -> [B, T, L]`,
            the steps' label scores; None: the softmax probabilities.

    Returns:
        dict `scores` [B, L] float32, `label_ids` [B, max_length] int32 (-1
        after END) and `num_labels` [B] int32.
    """
    state = initial_state
    batch = tf.shape(state)[0]
    token = tf.fill([batch], start_token)
    # masked_logit at the labels already emitted, 0 elsewhere and at END.
    blocked = tf.zeros([batch, num_labels + 1], state.dtype)
    # Open: the sequence emitted a label at every step before (a finished one
    # emits -1 from its END on).
    is_open = tf.ones([batch], tf.bool)
    label_ids, all_logits, all_probs = [], [], []
    for index in range(max_length):  # static length: unrolled into the graph
        logits, state = step(token, state, context)
        logits = logits + blocked
        probs = tf.nn.softmax(logits, axis=-1)
        all_logits.append(logits)
        all_probs.append(probs)
        if min_label_score > 0:
            # Labels below the minimum cannot be chosen, so greedy stops
            # (emits END) when the most likely label falls below it.
            too_low = tf.cast(probs[:, :num_labels] < min_label_score, logits.dtype)
            logits = logits + masked_logit * tf.pad(too_low, [[0, 0], [0, 1]])
        if index == max_length - 1:
            # Training sequences hold at most `max_length - 1` labels, so the
            # last step is always END; forcing it keeps decoding within what
            # was trained.
            logits = logits + tf.constant([masked_logit] * num_labels + [0.0], logits.dtype)
        # tf.math.argmax, not keras.ops.argmax: the latter adds a BitwiseAnd op
        # that breaks builtins-only TFLite conversion (TF-TRAPS.md).
        token = tf.math.argmax(logits, axis=-1, output_type=tf.int32)
        emitted = tf.where(tf.logical_and(is_open, token < num_labels), token, -1)
        # one_hot of -1 is all zeros: only a newly emitted label is blocked.
        blocked += tf.one_hot(
            emitted, num_labels + 1, on_value=masked_logit, off_value=0.0, dtype=blocked.dtype
        )
        is_open = emitted >= 0
        label_ids.append(emitted)
    label_ids = tf.stack(label_ids, axis=1)
    logits, probs = tf.stack(all_logits, axis=1), tf.stack(all_probs, axis=1)
    scores = probs[..., :num_labels] if step_scores is None else step_scores(logits, probs)
    # Steps after END do not count; the END step itself does.
    was_open = tf.pad(tf.cast(label_ids[:, :-1] >= 0, scores.dtype), [[0, 0], [1, 0]], constant_values=1.0)
    return {
        "scores": tf.cast(tf.reduce_max(scores * was_open[:, :, None], axis=1), tf.float32),
        "label_ids": label_ids,
        "num_labels": tf.reduce_sum(tf.cast(label_ids >= 0, tf.int32), axis=-1),
    }
