"""K label decoders trained side by side and decoded as one (`model.decoders: K`).

On 75 training photos a decoder fits its training label sets within its
first epoch, and what it has learnt then depends on its random start
(docs/real_data.md: a training seed alone moves a coco128 fold's set OF1
by 2.5 points). Decoding several decoders jointly averages that away: each
joint step's logits are the mean of the members' logits. Their softmax is
the normalised product of the members' distributions (a product of
experts: the mean of the members' log-softmax differs from the mean logit
only by one constant per step, which softmax, argmax and the beam's
log-softmax ignore), so the search picks one label set that all members
find likely, and a label's own joint logit, the mean of the members', is
there for `label_scores: sigmoid`.

Training: every member runs its own teacher-forced or self-fed pass, so
each gets its own PLA targets from its own predictions; the loss is the
mean of the members' losses (`PerDecoderLoss`), so with Adam each member
trains as it would alone and the sequence loss keeps one decoder's scale
beside a `hybrid` head's sigmoid loss.
"""

import keras
import tensorflow as tf

# The module, not the class: label_decoder imports this module at its end,
# possibly while attention_decoder is still being imported.
from hybridnet_tf.model import attention_decoder
from hybridnet_tf.model.beam_search import beam_search
from hybridnet_tf.model.greedy_search import greedy_search
from hybridnet_tf.model.label_decoder import LabelDecoder, search_decoding, step_label_scores

# The member options a caller may read from the ensemble as from one decoder.
_SHARED = ("num_labels", "max_length", "label_order", "pla_rule", "beam_width", "min_label_score",
           "prior_weight", "image_logits", "embedding_dim", "units")


@keras.saving.register_keras_serializable(package="hybridnet_tf")
class DecoderEnsemble(keras.layers.Layer):
    """`num_decoders` label decoders of one configuration, called like one `LabelDecoder`.

    - `ensemble([features, decoder_inputs])` and `ensemble(features, self_fed=True)`
      return each member's logits stacked on axis 1: [B, K, T, L+1]
      (`PerDecoderLoss` trains on them).
    - `ensemble(features)` decodes the members jointly, greedily or with
      beam search (`beam_width`), into the same dict as `LabelDecoder`:
      each step's logits are the mean of the members' logits, whose softmax
      is the renormalised mean of their log-softmax. With one member this is
      that decoder's decoding.
    - `ensemble(feature_map, attention_for=label_ids)` (attention members):
      the mean of the members' attention maps.

    Args:
        num_decoders: K >= 1.
        decoder_config: keyword arguments of every member (`LabelDecoder`'s,
            or `AttentionLabelDecoder`'s with `attention`). Members differ in
            their random initial weights and dropout masks only.
        attention: members are `AttentionLabelDecoder`s.
        label_scores: "softmax" (the joint step's probability),
            "against_end" (`p / (p + p_END)` of it) or "sigmoid" (sigmoid of
            the joint logit, the mean of the members' logits: with
            `image_logits` set from one probe, the probe's logit plus the
            members' mean correction).

    Example:
        >>> ensemble = DecoderEnsemble(3, {"num_labels": 5, "max_length": 4})
        >>> ensemble(keras.ops.ones((2, 16)))["label_ids"].shape
        TensorShape([2, 4])
    """

    def __init__(self, num_decoders, decoder_config, attention=False, label_scores=None, **kwargs):
        super().__init__(**kwargs)
        if num_decoders < 1:
            raise ValueError(f"num_decoders must be >= 1, got {num_decoders}")
        decoder_config = dict(decoder_config)
        label_scores = label_scores or decoder_config.get("label_scores", "softmax")
        decoder_config["label_scores"] = label_scores
        for key in ("name", "trainable"):
            decoder_config.pop(key, None)
        decoder_config.setdefault("dtype", self.dtype_policy)
        self.num_decoders = num_decoders
        self.attention = bool(attention)
        self.label_scores = label_scores
        member_class = attention_decoder.AttentionLabelDecoder if self.attention else LabelDecoder
        self.members = [member_class(**decoder_config, name=f"decoder_{k}") for k in range(num_decoders)]

    def __getattr__(self, name):
        # One decoder's options, read by training code (label_order, max_length, ...).
        if name in _SHARED:
            return getattr(self.members[0], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def build(self, input_shape):
        for member in self.members:
            member.build(input_shape)

    def call(self, inputs, training=None, self_fed=False, label_prior=None, attention_for=None):
        if attention_for is not None:
            maps = [member.attention_maps(inputs, attention_for) for member in self.members]
            return tf.add_n(maps) / len(maps)
        if isinstance(inputs, (list, tuple)) or self_fed:
            outputs = [member(inputs, training=training, self_fed=self_fed) for member in self.members]
            return tf.stack(outputs, axis=1)
        search, options = greedy_search, {}
        if self.beam_width > 1:
            search, options = beam_search, {"beam_width": self.beam_width}
        return search_decoding(self, search, inputs, label_prior, **options)

    def _decoding_setup(self, image_features, label_prior):
        """(joint state, joint step, joint context): the members' folded steps side by side.

        The state is the members' states concatenated on the last axis and
        the context a tuple of theirs, so greedy and beam search (which
        tiles the context per beam) see one decoder.
        """
        setups = [member._decoding_setup(image_features, label_prior) for member in self.members]
        units = [member.units for member in self.members]

        def step(token, state, context):
            logits, states = [], []
            for (_, member_step, _), member_state, member_context in zip(
                setups, tf.split(state, units, axis=-1), context
            ):
                member_logits, new_state = member_step(token, member_state, member_context)
                logits.append(member_logits)
                states.append(new_state)
            # The mean logit, not the mean log-softmax: the two differ by one
            # constant per step, which the searches ignore, and this one keeps
            # each label's own logit (label_scores: sigmoid) at no extra ops.
            return tf.add_n(logits) / len(logits), tf.concat(states, axis=-1)

        state = tf.concat([setup[0] for setup in setups], axis=-1)
        return state, step, tuple(setup[2] for setup in setups)

    def _step_scores(self, logits, probs):
        """[..., L] label scores (`label_scores`) of the joint steps' logits and probs [..., L+1]."""
        return step_label_scores(self.label_scores, logits, probs, self.num_labels)

    def compute_output_spec(self, inputs, training=None, self_fed=False, label_prior=None, attention_for=None):
        # Only the attention decoder takes `attention_for`.
        options = {} if attention_for is None else {"attention_for": attention_for}
        spec = self.members[0].compute_output_spec(inputs, training=training, self_fed=self_fed, **options)
        if attention_for is None and (isinstance(inputs, (list, tuple)) or self_fed):
            return keras.KerasTensor((spec.shape[0], self.num_decoders, *spec.shape[1:]), dtype=spec.dtype)
        return spec

    def get_config(self):
        config = super().get_config()
        member_config = {
            key: value for key, value in self.members[0].get_config().items() if key not in ("name", "trainable")
        }
        config.update({
            "num_decoders": self.num_decoders,
            "decoder_config": member_config,
            "attention": self.attention,
            "label_scores": self.label_scores,
        })
        return config


def decoder_members(decoder):
    """The `LabelDecoder`s of a model's decoder layer: an ensemble's members, or `[decoder]`."""
    if isinstance(decoder, DecoderEnsemble):
        return list(decoder.members)
    return [decoder]


@keras.saving.register_keras_serializable(package="hybridnet_tf")
class PerDecoderLoss(keras.losses.Loss):
    """The mean over K decoders of a sequence loss, on `DecoderEnsemble`'s [B, K, T, L+1] logits.

    Each member's loss is `loss(y_true, logits of member k)`, reduced as that
    loss reduces one decoder's logits (the mean over the real steps); the
    result is their mean.

    Args:
        loss: the one-decoder loss (`OrderlessSequenceLoss` or
            `SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)`).
        num_decoders: K.
    """

    def __init__(self, loss, num_decoders, name="per_decoder_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.loss = loss
        self.num_decoders = num_decoders

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Whole member losses, not per-step values: each member's reduction
        # (its mask of real steps) stays its own.
        member_losses = [self.loss(y_true, y_pred[:, k], sample_weight) for k in range(self.num_decoders)]
        return tf.add_n(member_losses) / self.num_decoders

    def call(self, y_true, y_pred):
        raise NotImplementedError("PerDecoderLoss reduces each member's loss in __call__")

    def get_config(self):
        return {
            **super().get_config(),
            "loss": keras.saving.serialize_keras_object(self.loss),
            "num_decoders": self.num_decoders,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)
