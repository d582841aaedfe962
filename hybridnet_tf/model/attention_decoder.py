"""The label decoder with spatial attention (Show, Attend and Tell; Xu et al., ICML 2015).

At every step the GRU state looks over the backbone's feature map and
reads a context vector from the regions it attends to, instead of one
pooled feature for every step: the decoder can look at the bicycle when
it emits "bicycle" and at the person when it emits "person". Region
attention is what lifts CNN-RNN models on COCO in the literature (RDAR,
RARL, orderless-rnn's Show-Attend-Tell decoder).
"""

import keras
import tensorflow as tf

from hybridnet_tf.model import folded_step
from hybridnet_tf.model.label_decoder import LabelDecoder
from hybridnet_tf.model.label_sequences import start_id


@keras.saving.register_keras_serializable(package="hybridnet_tf")
class AttentionLabelDecoder(LabelDecoder):
    """A `LabelDecoder` whose steps attend over a spatial feature map.

    Input: the backbone's map [B, h, w, C] instead of a pooled feature. Its
    mean over the h·w positions initialises the GRU state. At step t, with
    the state s before the step and the projected map K = W_k V (computed
    once per image), additive attention gives

        e = w · tanh(K + W_q s),  alpha = softmax(e) over positions,
        c = sum(alpha · V)  (times sigmoid(W_g s) with `attention_gate`),

    and the projection of c takes the place of the pooled decoder's image
    step: it is fed with the previous label's embedding and joined with the
    GRU output to score the labels. The calls, decoding rules and outputs
    are those of `LabelDecoder`; teacher forcing runs the same unrolled
    steps (the attention depends on the state, so the fused GRU layer
    cannot run the whole sequence at once). `attention_maps` gives the
    per-step weights of a decoded sequence.

    Args:
        attention_units: size of the additive attention's hidden layer.
        attention_gate: scale the context by a gate of the state (Xu et al.'s
            beta), letting a step rely less on the image.
        (The other arguments are `LabelDecoder`'s.)

    Example:
        >>> decoder = AttentionLabelDecoder(num_labels=5, max_length=4)
        >>> decoder(keras.ops.ones((2, 3, 3, 16)))["label_ids"].shape
        TensorShape([2, 4])
    """

    def __init__(self, num_labels, max_length, attention_units=128, attention_gate=False, **kwargs):
        super().__init__(num_labels, max_length, **kwargs)
        self.attention_units = attention_units
        self.attention_gate = attention_gate
        policy = self.dtype_policy
        self.attention_keys = keras.layers.Dense(attention_units, name="attention_keys", dtype=policy)
        self.attention_query = keras.layers.Dense(
            attention_units, use_bias=False, name="attention_query", dtype=policy
        )
        # Zero scores at the start: uniform attention, whose read is the pooled
        # feature, so the decoder starts as the pooled decoder and learns where
        # to look from there (random scores start it on an arbitrary mix).
        self.attention_score = keras.layers.Dense(
            1, kernel_initializer="zeros", name="attention_score", dtype=policy
        )
        self.context_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        self.gate = (
            keras.layers.Dense(1, activation="sigmoid", name="attention_gate", dtype=policy)
            if attention_gate
            else None
        )

    def build(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            map_shape = input_shape[0]
        else:
            map_shape = input_shape
        channels = map_shape[-1]
        super().build((None, channels))
        self.attention_keys.build((None, None, channels))
        self.attention_query.build((None, self.units))
        self.attention_score.build((None, None, self.attention_units))
        if self.gate is not None:
            self.gate.build((None, self.units))

    def _pooled(self, feature_map):
        return tf.reduce_mean(tf.cast(feature_map, self.compute_dtype), axis=[1, 2])

    def _view_of_image(self, feature_map):
        """GRU state from the mean of the map; the context holds the map's positions and keys."""
        feature_map = tf.cast(feature_map, self.compute_dtype)
        shape = tf.shape(feature_map)
        channels = feature_map.shape[-1]
        values = tf.reshape(feature_map, tf.stack([shape[0], shape[1] * shape[2], channels]))
        state = self.initial_state(tf.reduce_mean(values, axis=1))
        return state, (values, self.attention_keys(values))

    def _attend(self, state, context, training=None):
        """The projected context [N, E] of one step and its attention weights [N, P]."""
        values, keys = context
        hidden = tf.tanh(keys + self.attention_query(state)[:, None, :])
        energies = self.attention_score(hidden)[..., 0]
        weights = tf.nn.softmax(energies, axis=-1)
        read = tf.matmul(weights[:, None, :], values)[:, 0, :]
        if self.gate is not None:
            read = read * self.gate(state)
        if training:
            read = self.context_dropout(read, training=training)
        return self.image_to_step(read), weights

    def _attention_step(self, token, state, context, training=None):
        step_context, weights = self._attend(state, context, training)
        step_input = tf.concat([self.label_embedding(token), step_context], axis=-1)
        output, state = self.gru.cell(step_input, state, training=training)
        if training:
            output = self.output_dropout(output, training=training)
        return self._scores_logits(output, step_context), state, weights

    def _folded_weights(self):
        """`LabelDecoder`'s, plus the attention's (the context's two terms in one matmul)."""
        weights = super()._folded_weights()
        dtype = self.compute_dtype
        weights["step_kernel"] = tf.cast(self.image_to_step.kernel, dtype)
        weights["step_bias"] = tf.cast(self.image_to_step.bias, dtype)
        weights["terms_kernel"] = tf.concat(
            [weights["context_kernel"], weights["context_joint_kernel"]], axis=1
        )
        weights["terms_bias"] = tf.concat([weights["input_bias"], weights["joint_bias"]], axis=0)
        weights["query_kernel"] = tf.cast(self.attention_query.kernel, dtype)
        # The score layer's bias adds the same to every position, which the
        # softmax over positions ignores.
        weights["score_vector"] = tf.cast(self.attention_score.kernel[:, 0], dtype)
        return weights

    def _folded_context(self, weights, view):
        """(the map's positions projected by `image_to_step`'s kernel [B, P, E], the keys).

        A step's context `image_to_step(read)` is linear in the read, a
        weighted sum of the positions, so projecting the positions once per
        image gives the same context from a sum over E = 64 channels instead
        of C (1280 for Lite0), and no matmul per step.
        """
        values, keys = view
        return tf.tensordot(values, weights["step_kernel"], axes=1), keys

    def _folded_read(self, weights, state, view_terms):
        """`_attend`'s read, projected by `image_to_step`, as its GRU and joint terms."""
        projected, keys = view_terms
        hidden = tf.tanh(keys + tf.matmul(state, weights["query_kernel"])[:, None, :])
        # Products and sums, not matvec / batched matmul: at batch 1 these
        # small contractions run in a third to a half of the time.
        attention = tf.nn.softmax(tf.reduce_sum(hidden * weights["score_vector"], axis=-1), axis=-1)
        step_context = tf.reduce_sum(projected * attention[:, :, None], axis=1)
        if self.gate is not None:
            # The gate is a scalar per image: it commutes with the projection.
            step_context = step_context * self.gate(state)
        step_context = step_context + weights["step_bias"]
        terms = tf.matmul(step_context, weights["terms_kernel"]) + weights["terms_bias"]
        return terms[:, : 3 * self.units], terms[:, 3 * self.units :]

    def _read_step(self, token, state, context, training=None):
        logits, state, _ = self._attention_step(token, state, context, training)
        return logits, state

    def call(self, inputs, training=None, self_fed=False, label_prior=None, attention_for=None):
        """`LabelDecoder.call`; with `attention_for=label_ids`, `attention_maps(inputs, label_ids)`."""
        if attention_for is not None:
            return self.attention_maps(inputs, attention_for)
        return super().call(inputs, training=training, self_fed=self_fed, label_prior=label_prior)

    def compute_output_spec(self, inputs, training=None, self_fed=False, label_prior=None, attention_for=None):
        if attention_for is not None:
            return keras.KerasTensor(
                (inputs.shape[0], self.max_length, inputs.shape[1], inputs.shape[2]), dtype=self.compute_dtype
            )
        return super().compute_output_spec(inputs, training=training, self_fed=self_fed)

    def _teacher_forced_steps(self, feature_map, decoder_inputs, training=None):
        state, context = self._image_context(feature_map)
        context, label_logits = self._split_context(context)
        all_logits, all_weights = [], []
        for step in range(decoder_inputs.shape[1]):  # static length: unrolled
            logits, state, weights = self._attention_step(
                decoder_inputs[:, step], state, context, training
            )
            all_logits.append(logits if label_logits is None else logits + label_logits)
            all_weights.append(weights)
        return tf.stack(all_logits, axis=1), tf.stack(all_weights, axis=1)

    def teacher_forcing_logits(self, feature_map, decoder_inputs, training=None):
        """Logits [B, T, L+1] of each next token given the true previous ones."""
        if decoder_inputs.shape[1] is None:
            raise ValueError("the attention decoder needs a static number of teacher-forcing steps")
        logits, _ = self._teacher_forced_steps(feature_map, decoder_inputs, training)
        return logits

    def attention_maps(self, feature_map, label_ids):
        """Attention weights [B, max_length, h, w] of the steps that emitted `label_ids`.

        Replays the decoded sequence (START, then each label) through the
        same steps as decoding, so step t's map is the one the decoder
        looked at when it emitted `label_ids[:, t]` (greedy or beam: the
        steps are deterministic given the tokens). Steps after END hold
        the weights of an END input and mean nothing.
        """
        label_ids = tf.cast(label_ids, tf.int32)
        end = self.num_labels
        tokens = tf.where(label_ids < 0, end, label_ids)
        start = tf.fill([tf.shape(tokens)[0], 1], start_id(self.num_labels))
        decoder_inputs = tf.concat([start, tokens[:, :-1]], axis=1)
        _, weights = self._teacher_forced_steps(feature_map, decoder_inputs)
        shape = tf.shape(feature_map)
        return tf.reshape(weights, tf.stack([shape[0], self.max_length, shape[1], shape[2]]))

    def get_config(self):
        config = super().get_config()
        config.update({"attention_units": self.attention_units, "attention_gate": self.attention_gate})
        return config
