"""Training losses of the heads: label sequences (fixed or aligned order) and sigmoid labels.

- Sequence heads with a fixed order (freq2rare, rare2freq, fixed, random)
  use Keras' `SparseCategoricalCrossentropy(from_logits=True,
  ignore_class=-1)`: a softmax cross-entropy per step, padding after END
  ignored, mean over the real steps.
- `OrderlessSequenceLoss`: the same cross-entropy against targets aligned
  to the decoder's own predictions (PLA, Yazici et al., CVPR 2020).
- `AsymmetricLoss` (ASL, Ridnik et al., "Asymmetric Loss For Multi-Label
  Classification", ICCV 2021) for sigmoid heads; with both gammas 0 and no
  clip it is binary cross-entropy, which is how the `bce` loss is made.
"""

import keras
import tensorflow as tf

from hybridnet_tf.model.label_sequences import PAD_ID, aligned_label_sequence, predicted_label_alignment

SIGMOID_LOSSES = ("bce", "asl")


@keras.saving.register_keras_serializable(package="hybridnet_tf")
class OrderlessSequenceLoss(keras.losses.Loss):
    """Cross-entropy against predicted-label-aligned targets (PLA).

    `y_pred` are the masked logits of a decoder run that fed back its own
    argmax tokens (`LabelDecoder(..., self_fed=True)`), so the argmax of
    each step *is* the decoder's prediction at that step. The loss reads
    those predictions back, builds the targets and returns the per-step
    softmax cross-entropy with padding ignored. All of it is in the graph,
    so `fit`, `jit_compile` and callbacks work as usual.

    Args:
        rule: "paper" (default): `label_sequences.predicted_label_alignment`,
            Yazici et al.'s rule (a correct prediction stays at its step, the
            missed labels go to the other steps by minimum cost). "sorted":
            `label_sequences.aligned_label_sequence`, the project's first
            rule (correct predictions moved to the front in predicted order,
            missed ones after them by rank), kept to compare against.

    Args (of `call`):
        y_true: [B, L] `label_sequences.ranked_labels` (rank or -1).
        y_pred: [B, T, L+1] logits.
    """

    def __init__(self, rule="paper", name="orderless_sequence_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if rule not in ("paper", "sorted"):
            raise ValueError(f"unknown PLA rule {rule!r}; choose 'paper' or 'sorted'")
        self.rule = rule

    def call(self, y_true, y_pred):
        ranked = tf.cast(tf.round(y_true), tf.int32)
        if self.rule == "paper":
            targets = predicted_label_alignment(ranked, y_pred)
        else:
            predicted = tf.cast(tf.math.argmax(y_pred, axis=-1), tf.int32)
            targets = aligned_label_sequence(ranked, predicted, y_pred.shape[1] or tf.shape(y_pred)[1])
        return keras.losses.sparse_categorical_crossentropy(
            targets, y_pred, from_logits=True, ignore_class=PAD_ID
        )

    def get_config(self):
        return {**super().get_config(), "rule": self.rule}


@keras.saving.register_keras_serializable(package="hybridnet_tf")
class AsymmetricLoss(keras.losses.Loss):
    """Asymmetric loss (ASL; Ridnik et al., ICCV 2021) on per-label logits.

    With `p = sigmoid(logit)` and the shifted probability of negatives
    `p_m = max(p - clip, 0)`, each label costs

        positive: -(1 - p) ** gamma_pos * log(p)
        negative: -p_m ** gamma_neg * log(1 - p_m)

    The loss of an image is the sum over its labels, as in the ASL paper,
    times `weight`; Keras then averages over the batch. Summed, a sigmoid
    head's loss has the scale of the decoder's sequence loss (a softmax
    cross-entropy per step) whatever the number of labels, so `hybrid`
    trains both heads with `aux_loss_weight` 1 (a mean would shrink the
    sigmoid loss by 1/L: 1/80 on COCO). With `gamma_neg = gamma_pos = clip
    = 0` it is `L` times `keras.losses.BinaryCrossentropy(from_logits=True)`.
    The focusing weights are differentiated through, as in the paper's
    gradient analysis.

    Args:
        gamma_neg: focusing exponent of negatives (the paper's default 4).
        gamma_pos: focusing exponent of positives (the paper's default 0).
        clip: probability margin `m` of negatives (the paper's 0.05); easy
            negatives with `p <= clip` cost nothing.
        weight: multiplier of the loss (e.g. an auxiliary head's weight).
        from_logits: `y_pred` are logits (True) or probabilities.

    Example:
        >>> loss = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)
        >>> float(loss([[1.0, 0.0]], [[2.0, -1.0]])) > 0
        True
    """

    def __init__(
        self,
        gamma_neg=4.0,
        gamma_pos=0.0,
        clip=0.05,
        weight=1.0,
        from_logits=True,
        name="asymmetric_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError(f"ASL gammas must be >= 0, got gamma_neg={gamma_neg}, gamma_pos={gamma_pos}")
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"ASL clip must be in [0, 1), got {clip}")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = float(clip)
        self.weight = float(weight)
        self.from_logits = from_logits

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, y_pred.dtype)
        if self.from_logits:
            prob = tf.sigmoid(y_pred)
            log_prob = tf.math.log_sigmoid(y_pred)
            log_one_minus = tf.math.log_sigmoid(-y_pred)
        else:
            eps = keras.config.epsilon()
            prob = tf.clip_by_value(y_pred, eps, 1.0 - eps)
            log_prob = tf.math.log(prob)
            log_one_minus = tf.math.log(1.0 - prob)
        if self.clip > 0:
            shifted = tf.maximum(prob - self.clip, 0.0)
            # log(1 - p_m) with 1 - p_m = min(1 - p + clip, 1) >= clip: no log(0).
            log_one_minus = tf.math.log(tf.minimum(1.0 - prob + self.clip, 1.0))
        else:
            shifted = prob
        positive = log_prob
        negative = log_one_minus
        # Python branches: with gamma 0 the factor is 1 (and pow's gradient at 0 would be NaN).
        if self.gamma_pos > 0:
            positive = positive * _safe_pow(1.0 - prob, self.gamma_pos)
        if self.gamma_neg > 0:
            negative = negative * _safe_pow(shifted, self.gamma_neg)
        per_label = -(y_true * positive + (1.0 - y_true) * negative)
        return self.weight * tf.reduce_sum(per_label, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "gamma_neg": self.gamma_neg,
                "gamma_pos": self.gamma_pos,
                "clip": self.clip,
                "weight": self.weight,
                "from_logits": self.from_logits,
            }
        )
        return config


def _safe_pow(base, exponent):
    """base ** exponent with a finite gradient at base 0 for exponents below 1."""
    return tf.pow(tf.maximum(base, 1e-12), exponent)


def sigmoid_loss(kind="bce", gamma_neg=4.0, gamma_pos=0.0, clip=0.05, weight=1.0):
    """The loss of a sigmoid head by name: "bce" or "asl" (with its parameters).

    "bce" is `AsymmetricLoss(0, 0, clip=0)`, i.e. binary cross-entropy
    summed over labels, so both options share one code path and `weight`.
    """
    if kind == "bce":
        return AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0, weight=weight, name="bce")
    if kind == "asl":
        return AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, weight=weight)
    raise ValueError(f"unknown sigmoid loss {kind!r}; choose one of {list(SIGMOID_LOSSES)}")
