"""The label decoder's step for decoding, with what does not change between steps computed once.

A decoding step of `LabelDecoder` runs the GRU cell on `[embedding(token),
context]` and scores `relu([output, context] @ W_joint + b) @ E^T + b_out`,
plus the `image_logits` term. Written with the Keras layers, every step
re-reads every variable and concatenates and projects the same context
again. At batch 1 those small ops, not the arithmetic, are the decoder's
cost (docs/performance.md, "The decoder's step folded for decoding").
Here the same function is split by what it depends on:

- the weights alone (once per call): every token's input term
  `embeddings @ W_x[:E]` [L+2, 3U] (so a step gathers one row instead of
  an embedding lookup, a concat and a matmul), the transposed candidates;
- the image alone (once per image): the logit bias (output bias +
  `image_logits` term + the decoding prior) and, for the pooled decoder,
  the context's share of the GRU input and of the joint projection (the
  attention decoder computes those per step from its read, and projects the
  map's positions once per image instead, `AttentionLabelDecoder._folded_context`);
- the step: the recurrent matmul, the gates, the joint ReLU and the scores.

This is Keras' `GRUCell` (`reset_after=True`, the sigmoid / tanh
defaults, implementation 2) term for term, with the input matmul split by
rows; tests check it against the Keras step. Training does not use it: the
teacher-forced and self-fed runs keep the Keras layers and their gradients.
"""

import tensorflow as tf


def step_weights(decoder):
    """The weight-only terms of `decoder`'s step, cast to its compute dtype (call once per call).

    Args:
        decoder: a built `LabelDecoder`.

    Returns:
        A dict of tensors, the `weights` argument of `context_terms` and `folded_step`.
    """
    cell = decoder.gru.cell
    if not (cell.reset_after and cell.use_bias):
        raise ValueError("the folded decoding step needs a GRU with reset_after=True and a bias")
    dtype = decoder.compute_dtype
    embedding_dim, units = decoder.embedding_dim, decoder.units
    kernel = tf.cast(cell.kernel, dtype)
    input_bias, recurrent_bias = tf.unstack(tf.cast(cell.bias, dtype))
    joint_kernel = tf.cast(decoder.to_joint_space.kernel, dtype)
    embeddings = tf.cast(decoder.label_embedding.embeddings, dtype)
    return {
        "token_gates": tf.matmul(embeddings, kernel[:embedding_dim]),
        "context_kernel": kernel[embedding_dim:],
        "input_bias": input_bias,
        "recurrent_kernel": tf.cast(cell.recurrent_kernel, dtype),
        "recurrent_bias": recurrent_bias,
        "output_joint_kernel": joint_kernel[:units],
        "context_joint_kernel": joint_kernel[units:],
        "joint_bias": tf.cast(decoder.to_joint_space.bias, dtype),
        "candidates": tf.transpose(embeddings[: decoder.num_labels + 1]),
        "output_bias": tf.cast(decoder.output_bias, dtype),
    }


def context_terms(weights, step_context):
    """(the context's share of the GRU input [N, 3U], of the joint projection [N, E]).

    `step_context` [N, E] is what a step of the decoder reads beside the
    token's embedding (`image_to_step` of the image or of the attention read).
    """
    gates = tf.matmul(step_context, weights["context_kernel"]) + weights["input_bias"]
    joint = tf.matmul(step_context, weights["context_joint_kernel"]) + weights["joint_bias"]
    return gates, joint


def folded_step(weights, token, state, context_gates, context_joint, logit_bias):
    """One decoding step: (logits [N, L+1] of the next token, the new GRU state [N, U]).

    Args:
        weights: `step_weights(decoder)`.
        token: [N] int32, the previous token.
        state: [N, U] the GRU state.
        context_gates, context_joint: `context_terms` of this step's context.
        logit_bias: [N, L+1] or [L+1], added to the logits (the output bias
            and any per-image term).
    """
    gates_x = tf.gather(weights["token_gates"], token) + context_gates
    gates_h = tf.matmul(state, weights["recurrent_kernel"]) + weights["recurrent_bias"]
    # Gate order z, r, h (Keras'); z and r share one sigmoid.
    x_zr, x_h = tf.split(gates_x, [-1, state.shape[-1]], axis=-1)
    h_zr, h_h = tf.split(gates_h, [-1, state.shape[-1]], axis=-1)
    update, reset = tf.split(tf.sigmoid(x_zr + h_zr), 2, axis=-1)
    candidate = tf.tanh(x_h + reset * h_h)
    # z * h + (1 - z) * candidate, in one op fewer.
    state = candidate + update * (state - candidate)
    joint = tf.nn.relu(tf.matmul(state, weights["output_joint_kernel"]) + context_joint)
    return tf.matmul(joint, weights["candidates"]) + logit_bias, state
