"""The CNN-RNN label decoder: a GRU over label embeddings (Wang et al., CVPR 2016)."""

import keras
import tensorflow as tf

# Loaders import this module to register the custom layers before
# `load_model(safe_mode=True)`; importing the sigmoid head's layers here
# keeps that one import enough for every head.
from hybridnet_tf.model import folded_step, sigmoid_head  # noqa: F401
from hybridnet_tf.model.beam_search import beam_search, label_vs_end
from hybridnet_tf.model.greedy_search import greedy_search
from hybridnet_tf.model.label_sequences import LABEL_ORDERS, end_id, start_id

# A large negative logit that removes a label from the softmax; finite so
# that float16 / int8 exports do not produce NaN from inf - inf.
_MASKED_LOGIT = -1e4

# How a decoding step scores each label (see `LabelDecoder`'s `label_scores`).
LABEL_SCORES = ("against_end", "sigmoid", "softmax")


def step_label_scores(rule, logits, probs, num_labels):
    """[..., L] each label's score under `rule` (`LABEL_SCORES`) from decoding steps' logits and probs [..., L+1]."""
    if rule == "against_end":
        return label_vs_end(logits, num_labels)
    if rule == "sigmoid":
        # The label's own logit, not shared with the other labels: with
        # `image_logits` set from the probe this is the probe's logit plus
        # the decoder's correction (masked repeats go to 0).
        return tf.sigmoid(logits[..., :num_labels])
    if rule != "softmax":
        raise ValueError(f"unknown label_scores {rule!r}; choose one of {list(LABEL_SCORES)}")
    return probs[..., :num_labels]


def search_decoding(decoder, search, image_features, label_prior, **options):
    """Runs `greedy_search` or `beam_search` over a decoder's folded decoding step.

    `decoder` is a `LabelDecoder` or a `DecoderEnsemble`: anything with
    `_decoding_setup`, `_step_scores` and one decoder's `num_labels`,
    `max_length` and `min_label_score`.
    """
    state, step, context = decoder._decoding_setup(image_features, label_prior)
    return search(
        step,
        state,
        context,
        num_labels=decoder.num_labels,
        max_length=decoder.max_length,
        start_token=start_id(decoder.num_labels),
        min_label_score=decoder.min_label_score,
        masked_logit=_MASKED_LOGIT,
        step_scores=decoder._step_scores,
        **options,
    )


@keras.saving.register_keras_serializable(package="hybridnet_tf")
class LabelDecoder(keras.layers.Layer):
    """Reads an image's labels out as a sequence.

    The image feature initialises the GRU state and is fed to every step
    beside the embedding of the previous label. Each GRU output, joined with
    the image feature, is projected into the label embedding space and scored
    against the embeddings of all labels and END (the joint image-label
    embedding of the CNN-RNN paper; input and output embeddings are tied).

    Three ways to call it:

    - `decoder([image_features, decoder_inputs])`: teacher forcing; returns
      logits `[B, T, L + 1]`.
    - `decoder(image_features, self_fed=True)`: runs `max_length` steps
      feeding back its own greedy predictions (no repeats) and returns the
      masked logits `[B, max_length, L + 1]`; the argmax of step `t` is the
      token fed to step `t + 1`. Used to train with predicted label
      alignment (`label_order="orderless"`, see `label_sequences`).
    - `decoder(image_features)`: decodes inside the graph, greedily when
      `beam_width == 1`, else with `beam_search.beam_search`. With
      `label_prior=p` ([B, L] probabilities, e.g. the `hybrid` head's
      sigmoid scores) and `prior_weight > 0`, every decoding step adds
      `prior_weight * log(p)` to the label logits (see `prior_weight`). The loop over
      `max_length` steps is unrolled when traced, with no TensorArray, so it
      exports to SavedModel and to builtins-only TFLite. Each step is
      `folded_step.folded_step`: the GRU cell's and the scoring's function
      with the weight-only and per-image terms computed once per call.
      It returns a dict: `scores` [B, L] (each label's highest score, see
      `label_scores`, over the decoding steps up to and including the END step, and over
      the open beams), `label_ids` [B, max_length] (decoded labels in order,
      -1 after END) and `num_labels` [B].

    Args:
        num_labels: size of the label vocabulary `L`.
        max_length: decoding steps, END included.
        embedding_dim: size of the label embeddings and the joint space.
        units: GRU units.
        dropout: dropout on the GRU output in training.
        use_cudnn: passed to `keras.layers.GRU`; False by default because a
            cuDNN GRU turns XLA off for the whole model and puts a
            `CudnnRNNV3` op into GPU exports (see TF-TRAPS.md).
        beam_width: hypotheses kept when decoding; 1 is greedy.
        min_label_score: a label is only emitted at a step where its
            probability is at least this; 0 turns the rule off.
        label_order: the training order of the target sequences (one of
            `label_sequences.LABEL_ORDERS`); kept here so that training code
            can rebuild the targets from the model alone. Decoding ignores it.
            Default "orderless", as `build_model`'s.
        pla_rule: with `label_order="orderless"`, the alignment rule of the
            loss: "paper" (Yazici et al.) or "sorted" (see
            `losses.OrderlessSequenceLoss`). Decoding ignores it.
        label_scores: how a step scores each label: "softmax", its softmax
            probability `p` (default), or "against_end", its probability
            against END, `p / (p + p_END)` (`beam_search.label_vs_end`), or
            "sigmoid", the sigmoid of its own logit (with `image_logits`
            set from a probe: the probe's logit plus the decoder's
            correction, not shared with the other labels). A label's score
            is the highest over the steps. On the coco128
            yardstick (docs/real_data.md) against_end ranked better (mAP)
            for a PLA-trained decoder, worse for a freq2rare one, and its
            first-step scores saturate near 1 (END is never the first
            target), so thresholds on it pick too many labels.
        prior_weight: weight of `log(label_prior)` in the label logits of
            every decoding step when a `label_prior` is passed (a product of
            experts: the decoder's next-label softmax times the per-label
            probabilities, raised to this power; END is left alone, so labels
            the prior finds unlikely lose to END). 0 turns it off. Training
            (teacher forcing, self-fed runs) never sees the prior.
        image_logits: add a linear map of the pooled image feature,
            `image_to_labels` [D -> L], to every step's label logits (END
            gets 0), in training and decoding alike. The joint-space score
            reads the image through a 64-128 wide ReLU bottleneck; this path
            reads it the way a linear probe does, and training code can set
            it from one (`linear_probe.set_decoder_image_logits`), so that
            the decoder learns corrections to the probe's ranking given the
            labels emitted so far. Starts at zero: without a probe the
            decoder starts as it would without the path. False here, so that
            models saved before the option (their config lacks the key) load
            as they were; `build_model` and the config turn it on.

    Example:
        >>> decoder = LabelDecoder(num_labels=5, max_length=4)
        >>> out = decoder(keras.ops.ones((2, 16)))
        >>> out["scores"].shape
        TensorShape([2, 5])
    """

    def __init__(
        self,
        num_labels,
        max_length,
        embedding_dim=64,
        units=256,
        dropout=0.0,
        use_cudnn=False,
        beam_width=1,
        min_label_score=0.0,
        label_order="orderless",
        pla_rule="paper",
        prior_weight=0.0,
        label_scores="softmax",
        image_logits=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0 (0 is off), got {prior_weight}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a label and END), got {max_length}")
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1 (1 is greedy), got {beam_width}")
        if not 0.0 <= min_label_score < 1.0:
            raise ValueError(f"min_label_score must be in [0, 1), got {min_label_score}")
        if label_order not in LABEL_ORDERS:
            raise ValueError(
                f"unknown label_order {label_order!r}; choose one of {list(LABEL_ORDERS)}"
            )
        self.num_labels = num_labels
        self.max_length = max_length
        self.embedding_dim = embedding_dim
        self.units = units
        self.dropout = dropout
        self.use_cudnn = use_cudnn
        self.beam_width = beam_width
        self.min_label_score = min_label_score
        self.label_order = label_order
        if pla_rule not in ("paper", "sorted"):
            raise ValueError(f"unknown pla_rule {pla_rule!r}; choose 'paper' or 'sorted'")
        self.pla_rule = pla_rule
        if label_scores not in LABEL_SCORES:
            raise ValueError(f"unknown label_scores {label_scores!r}; choose one of {list(LABEL_SCORES)}")
        self.label_scores = label_scores
        self.prior_weight = prior_weight
        self.image_logits = bool(image_logits)
        # A linear read of the pooled feature added to every step's label
        # logits; zeros at the start, so the decoder starts as without it.
        self.image_to_labels = (
            keras.layers.Dense(
                num_labels, kernel_initializer="zeros", name="image_to_labels", dtype=self.dtype_policy
            )
            if self.image_logits
            else None
        )
        # L labels + END + START; START is never scored.
        self.label_embedding = keras.layers.Embedding(
            num_labels + 2, embedding_dim, name="label_embedding", dtype=self.dtype_policy
        )
        self.initial_state = keras.layers.Dense(
            units, activation="tanh", name="initial_state", dtype=self.dtype_policy
        )
        self.image_to_step = keras.layers.Dense(
            embedding_dim, name="image_to_step", dtype=self.dtype_policy
        )
        self.gru = keras.layers.GRU(
            units,
            return_sequences=True,
            use_cudnn=use_cudnn,
            name="gru",
            dtype=self.dtype_policy,
        )
        self.output_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.to_joint_space = keras.layers.Dense(
            embedding_dim, activation="relu", name="to_joint_space", dtype=self.dtype_policy
        )

    def build(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            feature_shape = input_shape[0]
        else:
            feature_shape = input_shape
        feature_dim = feature_shape[-1]
        self.label_embedding.build((None,))
        self.initial_state.build((None, feature_dim))
        self.image_to_step.build((None, feature_dim))
        self.gru.build((None, None, 2 * self.embedding_dim))
        self.to_joint_space.build((None, self.units + self.embedding_dim))
        if self.image_to_labels is not None:
            self.image_to_labels.build((None, feature_dim))
        self.output_bias = self.add_weight(
            shape=(self.num_labels + 1,), initializer="zeros", name="output_bias"
        )

    def _scores_logits(self, gru_output, image_step):
        joint = self.to_joint_space(tf.concat([gru_output, image_step], axis=-1))
        candidates = self.label_embedding.embeddings[: self.num_labels + 1]
        return tf.matmul(joint, tf.cast(candidates, joint.dtype), transpose_b=True) + tf.cast(
            self.output_bias, joint.dtype
        )

    def call(self, inputs, training=None, self_fed=False, label_prior=None):
        if isinstance(inputs, (list, tuple)):
            image_features, decoder_inputs = inputs
            return self.teacher_forcing_logits(image_features, decoder_inputs, training)
        if self_fed:
            return self.self_fed_logits(inputs, training)
        if self.beam_width == 1:
            return self.greedy_decode(inputs, label_prior)
        return self.beam_decode(inputs, label_prior)

    def _log_prior(self, label_prior):
        """[B, L+1] term added to every decoding step's logits (END: 0), or None when off."""
        if label_prior is None or self.prior_weight == 0:
            return None
        # The floor keeps log finite; 1e-6 is far below any label worth emitting.
        log_prior = self.prior_weight * tf.math.log(tf.maximum(tf.cast(label_prior, tf.float32), 1e-6))
        return tf.concat([log_prior, tf.zeros_like(log_prior[:, :1])], axis=-1)

    def _decoding_setup(self, image_features, label_prior):
        """(GRU state before the first step, the step function, its context) for decoding.

        The step is `folded_step.folded_step`: the same function as `_step`
        (plus the prior's term), with what does not change between steps
        computed here once. The context is a nest of [B, ...] tensors, so
        beam search tiles it per beam: the view's per-image terms
        (`_folded_context`) and the logit bias [B, L+1] (output bias,
        `image_logits` term, prior).
        """
        weights = self._folded_weights()
        state, view = self._view_of_image(image_features)
        logit_bias = weights["output_bias"] + tf.zeros_like(state[:, :1])
        if self.image_to_labels is not None:
            logit_bias += self._label_logits_of_image(self._pooled(image_features))
        log_prior = self._log_prior(label_prior)
        if log_prior is not None:
            logit_bias += tf.cast(log_prior, logit_bias.dtype)

        def step(token, state, context):
            view_terms, logit_bias = context
            gates, joint = self._folded_read(weights, state, view_terms)
            return folded_step.folded_step(weights, token, state, gates, joint, logit_bias)

        return state, step, (self._folded_context(weights, view), logit_bias)

    def _folded_weights(self):
        """The weight-only terms of the folded step (`folded_step.step_weights`), once per call."""
        return folded_step.step_weights(self)

    def _folded_context(self, weights, view):
        """The per-image part of the folded step's context: here the context's GRU and joint terms."""
        return folded_step.context_terms(weights, view)

    def _folded_read(self, weights, state, view_terms):
        """(GRU input term, joint term) of the context at one step; the pooled view's are fixed."""
        return view_terms

    def _image_context(self, image_features):
        """(GRU state before the first step, the context every step reads).

        The context is `_view_of_image`'s, paired with the `image_logits`
        term [B, L+1] when that is on; beam search tiles the nest per beam.
        """
        state, context = self._view_of_image(image_features)
        if self.image_to_labels is None:
            return state, context
        return state, (context, self._label_logits_of_image(self._pooled(image_features)))

    def _view_of_image(self, image_features):
        """The decoder's view of the image: (GRU state before the first step, per-step context).

        The pooled decoder feeds the same projected image feature [B, E] to
        every step; subclasses (the attention decoder) return other contexts,
        any nest of [B, ...] tensors.
        """
        return self.initial_state(image_features), self.image_to_step(image_features)

    def _pooled(self, image_features):
        """The pooled image feature [B, D] (the attention decoder pools its map)."""
        return image_features

    def _label_logits_of_image(self, pooled):
        """[B, L+1]: `image_to_labels` of the pooled feature, and 0 for END."""
        logits = self.image_to_labels(pooled)
        return tf.concat([logits, tf.zeros_like(logits[:, :1])], axis=-1)

    def _split_context(self, context):
        """(the view's context, the `image_logits` term or None) of an `_image_context` context."""
        if self.image_to_labels is None:
            return context, None
        return context

    def _step(self, token, state, context, training=None):
        """One decoder step: logits [N, L+1] of the next token and the new state."""
        context, label_logits = self._split_context(context)
        logits, state = self._read_step(token, state, context, training)
        if label_logits is not None:
            logits = logits + label_logits
        return logits, state

    def _read_step(self, token, state, context, training=None):
        """`_step` before the `image_logits` term, on the view's own context."""
        step_input = tf.concat([self.label_embedding(token), context], axis=-1)
        output, state = self.gru.cell(step_input, state, training=training)
        if training:
            output = self.output_dropout(output, training=training)
        return self._scores_logits(output, context), state

    def teacher_forcing_logits(self, image_features, decoder_inputs, training=None):
        """Logits [B, T, L+1] of each next token given the true previous ones."""
        image_step = self.image_to_step(image_features)
        steps = tf.shape(decoder_inputs)[1]
        image_steps = tf.tile(image_step[:, None, :], tf.stack([1, steps, 1]))
        embedded = self.label_embedding(decoder_inputs)
        gru_inputs = tf.concat([embedded, image_steps], axis=-1)
        outputs = self.gru(
            gru_inputs, initial_state=self.initial_state(image_features), training=training
        )
        outputs = self.output_dropout(outputs, training=training)
        logits = self._scores_logits(outputs, image_steps)
        if self.image_to_labels is not None:
            logits = logits + self._label_logits_of_image(image_features)[:, None, :]
        return logits

    def _start_decoding(self, image_features):
        """The state before a self-fed run's first step: GRU state, step context, START tokens, masks."""
        state, context = self._image_context(image_features)
        batch = tf.shape(state)[0]
        token = tf.fill([batch], start_id(self.num_labels))
        finished = tf.zeros([batch], tf.bool)
        emitted = tf.zeros([batch, self.num_labels], state.dtype)
        no_end_mask = tf.zeros([batch, 1], state.dtype)
        return state, context, token, finished, emitted, no_end_mask

    def _emit(self, token, emitted, finished):
        """Records the chosen tokens: which are new labels, the emitted set, who has ended."""
        is_label = tf.logical_and(tf.logical_not(finished), token < self.num_labels)
        emitted += tf.one_hot(token, self.num_labels, dtype=emitted.dtype) * tf.cast(
            is_label, emitted.dtype
        )[:, None]
        finished = tf.logical_or(finished, token >= end_id(self.num_labels))
        return is_label, emitted, finished

    def greedy_decode(self, image_features, label_prior=None):
        """Greedy decoding without repeats (`greedy_search`); see the class docstring for outputs."""
        return search_decoding(self, greedy_search, image_features, label_prior)

    def beam_decode(self, image_features, label_prior=None):
        """Beam search of width `beam_width`; see `beam_search` for the rules."""
        return search_decoding(self, beam_search, image_features, label_prior, beam_width=self.beam_width)

    def _step_scores(self, logits, probs):
        """[..., L] the label scores (`label_scores`) of decoding steps' logits and probs [..., L+1]."""
        return step_label_scores(self.label_scores, logits, probs, self.num_labels)

    def self_fed_logits(self, image_features, training=None):
        """Masked logits [B, max_length, L+1] of a run fed with its own argmax tokens.

        The same steps and no-repeat mask as `greedy_decode` (labels after
        the first END are not masked), with dropout in training. The argmax
        of each step's logits is the next input, so a loss can read the
        decoder's predictions back from these logits (`OrderlessSequenceLoss`).
        The last step is not forced to END here: its target is always END,
        so the loss teaches it.
        """
        state, context, token, finished, emitted, no_end_mask = self._start_decoding(image_features)
        all_logits = []
        for _ in range(self.max_length):
            logits, state = self._step(token, state, context, training)
            logits = logits + _MASKED_LOGIT * tf.concat([emitted, no_end_mask], axis=-1)
            all_logits.append(logits)
            token = tf.cast(tf.math.argmax(logits, axis=-1), tf.int32)
            _, emitted, finished = self._emit(token, emitted, finished)
        return tf.stack(all_logits, axis=1)

    def compute_output_spec(self, inputs, training=None, self_fed=False, label_prior=None):
        if isinstance(inputs, (list, tuple)):
            features, decoder_inputs = inputs
            return keras.KerasTensor(
                (features.shape[0], decoder_inputs.shape[1], self.num_labels + 1),
                dtype=self.compute_dtype,
            )
        if self_fed:
            return keras.KerasTensor(
                (inputs.shape[0], self.max_length, self.num_labels + 1), dtype=self.compute_dtype
            )
        batch = inputs.shape[0]
        return {
            "scores": keras.KerasTensor((batch, self.num_labels), dtype="float32"),
            "label_ids": keras.KerasTensor((batch, self.max_length), dtype="int32"),
            "num_labels": keras.KerasTensor((batch,), dtype="int32"),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_labels": self.num_labels,
                "max_length": self.max_length,
                "embedding_dim": self.embedding_dim,
                "units": self.units,
                "dropout": self.dropout,
                "use_cudnn": self.use_cudnn,
                "beam_width": self.beam_width,
                "min_label_score": self.min_label_score,
                "label_order": self.label_order,
                "pla_rule": self.pla_rule,
                "prior_weight": self.prior_weight,
                "label_scores": self.label_scores,
                "image_logits": self.image_logits,
            }
        )
        return config


# Registers the attention decoder and the decoder ensemble too, so this one
# import is enough for loaders (at the end: those modules use LabelDecoder).
from hybridnet_tf.model import attention_decoder, decoder_ensemble  # noqa: E402,F401
