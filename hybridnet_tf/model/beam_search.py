"""Beam search over label sequences, inside the graph and exportable.

The loop runs a fixed `max_length` steps and is unrolled when traced; it
uses only ops that convert to builtins-only TFLite (`argmax`, `gather`,
`floordiv`, `log_softmax`, no TensorArray and no while loop; TF-TRAPS.md),
and no multi-output op such as `top_k` (see `sorted_top_k`).

Search rules (the same as greedy decoding, which is beam width 1):

- A sequence is a list of distinct labels closed by END, at most
  `max_length - 1` labels: the last step can only emit END (training
  sequences never hold more), so every hypothesis that reaches it pays
  END's probability like those that ended earlier, and full-length and
  shorter sequences are ranked on the same terms. Its score is the sum of the log-probabilities of its
  tokens, each from the softmax over the labels not yet emitted and END
  (the decoder's no-repeat mask). There is no length normalisation: END's
  own probability is part of the score, so sets of different sizes compete
  on the model's probability of the whole sequence.
- A label can only be emitted at a step where its probability is at least
  `min_label_score` (END always can): greedy therefore stops when the most
  likely label falls below it.
- A finished sequence stays in the beam with its score and competes with
  the open ones; after `max_length` steps (all finished) the
  highest-scoring sequence wins.
- Per-label scores: a label's score is the highest step score (`step_scores`:
  its softmax probability, or e.g. `label_vs_end`) it received at any step
  of any beam that was open at that step (not yet finished, up to and
  including the step where that beam emitted END). With width 1 this is
  the greedy decoder's score.
"""

import tensorflow as tf

# Log-probability of an impossible hypothesis. Finite (no inf - inf); legal
# hypotheses never come near it because masked logits are only -1e4.
_DEAD = -1e9


def sorted_top_k(values, k):
    """`tf.math.top_k(values, k)` (sorted, ties to the lower index) from k argmax passes.

    Why not `top_k`: the project's int8 TFLite export keeps the decoder in
    float by denylisting its ops by name, and multi-output ops such as
    TOPK_V2 slip through and get quantised, which scrambles the ranking of
    beam scores. ARG_MAX / REDUCE_MAX are single-output builtins. For the
    small k of beam search the extra passes cost next to nothing.

    Args:
        values: [B, N] float.
        k: static int <= N.

    Returns:
        `(top_values [B, k], top_indices [B, k] int32)`.
    """
    top_values, top_indices = [], []
    width = values.shape[-1] or tf.shape(values)[-1]
    for _ in range(k):
        index = tf.cast(tf.math.argmax(values, axis=-1), tf.int32)
        top_values.append(tf.reduce_max(values, axis=-1))
        top_indices.append(index)
        # Taken entries drop below every untaken one (untaken ones are >= _DEAD).
        taken = tf.one_hot(index, width, on_value=True, off_value=False)
        values = tf.where(taken, 2.0 * _DEAD, values)
    return tf.stack(top_values, axis=-1), tf.stack(top_indices, axis=-1)


def label_vs_end(logits, num_labels):
    """[N, L] each label's probability against END at one step: p(c) / (p(c) + p(END)).

    That is `sigmoid(logit_c - logit_END)`: whether the decoder would rather
    go on with `c` than stop, leaving out the other labels it could emit
    there. The plain softmax probability `p(c)` also shares its mass with
    every other label present in the image, so a second or third label
    rarely scores high. On the coco128 yardstick this ranks labels across
    images better (`hybrid_rnn` trained orderless, the same models: mAP
    48.4 against 45.7 for the softmax), but at the first step END is never
    the target, so many labels score near 1 there and thresholds on these
    scores pick too many labels (docs/real_data.md). A label masked as
    emitted gets 0, and a label the decoder emits beats END, so it scores
    above 0.5.

    Args:
        logits: [N, L + 1] one step's logits (END last), masks included; or [N, T, L + 1].
        num_labels: `L`.
    """
    return tf.sigmoid(logits[..., :num_labels] - logits[..., num_labels : num_labels + 1])


def _tile_beams(tensor, beam_width):
    """[B, ...] -> [B * K, ...], each row repeated K times consecutively."""
    tiled = tf.tile(tensor[:, None], [1, beam_width] + [1] * (len(tensor.shape) - 1))
    return tf.reshape(tiled, tf.concat([[-1], tf.shape(tensor)[1:]], axis=0))


def beam_search(
    step,
    initial_state,
    context,
    num_labels,
    max_length,
    beam_width,
    start_token,
    min_label_score=0.0,
    masked_logit=-1e4,
    step_scores=None,
):
    """Decodes label sequences with beam search.

    Args:
        step: `step(tokens [N], state [N, U], context [N, C]) -> (logits [N, L+1], state)`,
            one decoder step for N = B * beam_width hypotheses.
        initial_state: [B, U] decoder state before the first step.
        context: per-image input to every step: a [B, ...] tensor (e.g. the
            image feature) or a nest of them (tiled per beam alike).
        num_labels: `L`; token `L` is END.
        max_length: decoding steps, END included.
        beam_width: hypotheses kept per image (`K`).
        start_token: token id fed at the first step.
        min_label_score: labels below this probability are not emitted.
        masked_logit: value added to the logits of emitted labels.
        step_scores: `step_scores(logits [N, L+1], probs [N, L+1]) -> [N, L]`,
            a step's label scores; None: the softmax probabilities.

    Returns:
        dict `scores` [B, L] float32, `label_ids` [B, max_length] int32 (the
        best sequence, -1 after END) and `num_labels` [B] int32.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    width = beam_width
    vocab = num_labels + 1  # labels and END
    batch = tf.shape(initial_state)[0]
    dtype = initial_state.dtype
    state = _tile_beams(initial_state, width)
    context = tf.nest.map_structure(lambda tensor: _tile_beams(tensor, width), context)
    tokens = tf.fill([batch * width], start_token)
    # Only beam 0 is alive at the start; the others are dead and finished.
    first = tf.constant([0.0] + [_DEAD] * (width - 1), dtype)
    log_prob = tf.tile(first[None, :], [batch, 1])  # [B, K]
    finished = tf.tile(tf.constant([[0.0] + [1.0] * (width - 1)], dtype), [batch, 1])
    emitted = tf.zeros([batch * width, num_labels], dtype)
    scores = tf.zeros([batch, num_labels], dtype)
    # Row offsets that turn a beam index into a row of the [B * K] tensors.
    row_offset = tf.range(batch)[:, None] * width
    end_column = tf.one_hot(num_labels, vocab, on_value=True, off_value=False)
    no_end_mask = tf.zeros([batch * width, 1], dtype)
    history = None
    for index in range(max_length):  # static length: unrolled into the graph
        logits, state = step(tokens, state, context)
        logits = logits + masked_logit * tf.concat([emitted, no_end_mask], axis=-1)
        probs = tf.nn.softmax(logits, axis=-1)
        open_rows = 1.0 - tf.reshape(finished, [-1])
        step_label_scores = probs[:, :num_labels] if step_scores is None else step_scores(logits, probs)
        beam_scores = tf.reshape(step_label_scores * open_rows[:, None], [-1, width, num_labels])
        scores = tf.maximum(scores, tf.reduce_max(beam_scores, axis=1))

        allowed = tf.concat([emitted < 0.5, tf.ones([batch * width, 1], tf.bool)], axis=-1)
        if index == max_length - 1:
            allowed = tf.logical_and(allowed, end_column[None, :])
        if min_label_score > 0:
            allowed = tf.logical_and(
                allowed,
                tf.concat([probs[:, :num_labels] >= min_label_score, tf.ones_like(no_end_mask, tf.bool)], -1),
            )
        flat_log_prob = tf.reshape(log_prob, [-1, 1])
        candidates = flat_log_prob + tf.nn.log_softmax(logits, axis=-1)
        candidates = tf.where(allowed, candidates, _DEAD)
        # A finished hypothesis has one continuation, END, at its own score.
        carried = tf.where(end_column[None, :], flat_log_prob, _DEAD)
        is_finished = tf.reshape(finished, [-1, 1]) > 0.5
        candidates = tf.where(is_finished, carried, candidates)

        log_prob, best = sorted_top_k(tf.reshape(candidates, [-1, width * vocab]), width)
        parent = tf.math.floordiv(best, vocab)
        token = tf.math.floormod(best, vocab)
        rows = tf.reshape(parent + row_offset, [-1])
        state = tf.gather(state, rows)
        emitted = tf.gather(emitted, rows)
        parent_finished = tf.reshape(tf.gather(tf.reshape(finished, [-1]), rows), [-1, width])
        dead = log_prob < 0.5 * _DEAD
        is_label = tf.logical_and(parent_finished < 0.5, token < num_labels)
        is_label = tf.logical_and(is_label, tf.logical_not(dead))
        column = tf.where(is_label, token, -1)[:, :, None]
        if history is None:
            history = column
        else:
            history = tf.reshape(tf.gather(tf.reshape(history, [-1, index]), rows), [-1, width, index])
            history = tf.concat([history, column], axis=-1)
        flat_is_label = tf.cast(tf.reshape(is_label, [-1, 1]), dtype)
        emitted += tf.one_hot(tf.reshape(token, [-1]), num_labels, dtype=dtype) * flat_is_label
        done = tf.logical_or(tf.logical_or(parent_finished > 0.5, dead), token >= num_labels)
        finished = tf.cast(done, dtype)
        tokens = tf.reshape(token, [-1])
    label_ids = history[:, 0, :]
    return {
        "scores": tf.cast(scores, tf.float32),
        "label_ids": label_ids,
        "num_labels": tf.reduce_sum(tf.cast(label_ids >= 0, tf.int32), axis=-1),
    }
