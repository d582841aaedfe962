"""The sigmoid label head and the small layers that give every head one output format.

- `SigmoidLabelHead`: one logit per label from the image feature (the `bce`
  head, and the auxiliary head of `hybrid`).
- `ScoresToLabels`: turns per-label scores into `label_ids` / `num_labels`
  (labels with score >= threshold, in descending score order), so the `bce`
  head answers like the decoder heads.
- `ScoreMix`: `w * sigmoid + (1 - w) * decoder` scores of the `hybrid` head.
"""

import keras
import tensorflow as tf

from hybridnet_tf.model.beam_search import sorted_top_k
from hybridnet_tf.model.losses import SIGMOID_LOSSES


@keras.saving.register_keras_serializable(package="hybridnet_tf")
class SigmoidLabelHead(keras.layers.Layer):
    """Per-label logits `[B, L]` from image features: a dense layer in float32.

    The layer also records how it is trained (`loss` and the ASL
    parameters, `loss_weight`), so that training code can rebuild the loss
    from the model alone (`hybridnet.training_loss`); they do not change
    what the layer computes.

    Args:
        num_labels: `L`.
        loss: "bce" (binary cross-entropy) or "asl" (asymmetric loss).
        asl_gamma_neg: ASL focusing exponent of negatives.
        asl_gamma_pos: ASL focusing exponent of positives.
        asl_clip: ASL probability margin of negatives.
        loss_weight: multiplier of this head's loss (the `hybrid` head's
            auxiliary weight; 1 for `bce`).

    Example:
        >>> head = SigmoidLabelHead(5)
        >>> head(keras.ops.ones((2, 16))).shape
        TensorShape([2, 5])
    """

    def __init__(
        self,
        num_labels,
        loss="bce",
        asl_gamma_neg=4.0,
        asl_gamma_pos=0.0,
        asl_clip=0.05,
        loss_weight=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if loss not in SIGMOID_LOSSES:
            raise ValueError(f"unknown sigmoid loss {loss!r}; choose one of {list(SIGMOID_LOSSES)}")
        self.num_labels = num_labels
        self.loss = loss
        self.asl_gamma_neg = asl_gamma_neg
        self.asl_gamma_pos = asl_gamma_pos
        self.asl_clip = asl_clip
        self.loss_weight = loss_weight
        self.dense = keras.layers.Dense(num_labels, name="logits", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, features):
        return self.dense(features)

    def compute_output_spec(self, features):
        return keras.KerasTensor((features.shape[0], self.num_labels), dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_labels": self.num_labels,
                "loss": self.loss,
                "asl_gamma_neg": self.asl_gamma_neg,
                "asl_gamma_pos": self.asl_gamma_pos,
                "asl_clip": self.asl_clip,
                "loss_weight": self.loss_weight,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="hybridnet_tf")
class ScoresToLabels(keras.layers.Layer):
    """Per-label scores -> `label_ids` [B, max_length] and `num_labels` [B].

    `label_ids` are the labels whose score is >= their threshold, highest
    score first (ties: lower label id first), -1 after them; at most
    `max_length` labels are listed (and counted in `num_labels`). The
    thresholds are a non-trainable per-label weight, so thresholds tuned
    after training (`thresholds.json`) are saved with the model and its
    exports (`hybridnet.set_label_thresholds`). Uses
    `beam_search.sorted_top_k` (argmax passes): builtins-only TFLite, and no
    multi-output op for int8 export to quantise.

    Args:
        max_length: columns of `label_ids`.
        threshold: the initial score every label needs to be listed.
    """

    def __init__(self, max_length, threshold=0.5, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length
        self.threshold = threshold

    def build(self, input_shape):
        self.thresholds = self.add_weight(
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.threshold),
            trainable=False,
            name="thresholds",
        )

    def call(self, scores):
        num_labels = scores.shape[-1]
        k = min(self.max_length, num_labels)
        values, indices = sorted_top_k(scores, k)
        keep = values >= tf.gather(tf.cast(self.thresholds, values.dtype), indices)
        label_ids = tf.where(keep, indices, -1)
        if k < self.max_length:
            label_ids = tf.pad(label_ids, [[0, 0], [0, self.max_length - k]], constant_values=-1)
        return {
            "label_ids": label_ids,
            "num_labels": tf.reduce_sum(tf.cast(keep, tf.int32), axis=-1),
        }

    def compute_output_spec(self, scores):
        batch = scores.shape[0]
        return {
            "label_ids": keras.KerasTensor((batch, self.max_length), dtype="int32"),
            "num_labels": keras.KerasTensor((batch,), dtype="int32"),
        }

    def get_config(self):
        config = super().get_config()
        config.update({"max_length": self.max_length, "threshold": self.threshold})
        return config


@keras.saving.register_keras_serializable(package="hybridnet_tf")
class ScoreMix(keras.layers.Layer):
    """`sigmoid_weight * sigmoid_scores + (1 - sigmoid_weight) * decoder_scores`.

    Called with `[sigmoid_scores, decoder_scores]`, both [B, L] in [0, 1].
    """

    def __init__(self, sigmoid_weight=0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= sigmoid_weight <= 1.0:
            raise ValueError(f"score_mix must be in [0, 1], got {sigmoid_weight}")
        self.sigmoid_weight = sigmoid_weight

    def call(self, inputs):
        sigmoid_scores, decoder_scores = inputs
        weight = self.sigmoid_weight
        return weight * tf.cast(sigmoid_scores, tf.float32) + (1.0 - weight) * tf.cast(
            decoder_scores, tf.float32
        )

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs[0].shape, dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update({"sigmoid_weight": self.sigmoid_weight})
        return config
