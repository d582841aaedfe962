"""HybridNet: a CNN backbone and a label head, as functional Keras models.

Heads (`head=`):

- `hybrid` (default): the decoder plus a sigmoid head on the same image
  feature, trained jointly; scores are `score_mix * sigmoid + (1 - score_mix)
  * decoder` (score_mix 1 by default: the sigmoid head ranks, the decoder
  gives the label set); with `sigmoid_fusion > 0` the decoding also weighs
  each next label by the sigmoid head's probability.
- `hybrid_rnn`: the GRU label decoder of the CNN-RNN (Wang et al.,
  CVPR 2016); scores and label set come from decoding.
- `bce`: a sigmoid per label on the image feature, trained with binary
  cross-entropy or ASL; its label set is the labels with score >= their
  threshold (`label_threshold`, then the tuned per-label thresholds).

Decoders (`decoder=`, decoder heads): `pooled` reads the pooled image
feature at every step; `attention` attends over the backbone's spatial map
at every step (`attention_decoder.AttentionLabelDecoder`).

`build_model` returns the inference model (image -> scores, decoded
labels) with the same outputs for every head; `build_training_model`
wraps the same layers for training, `training_loss` gives its loss and
`with_training_targets` its targets. Training and inference models share
weights, so training one trains the other.
"""

import keras
import numpy as np
import tensorflow as tf

from hybridnet_tf.model.attention_decoder import AttentionLabelDecoder
from hybridnet_tf.model.backbones import BACKBONES, build_backbone
from hybridnet_tf.model.decoder_ensemble import DecoderEnsemble, PerDecoderLoss, decoder_members
from hybridnet_tf.model.label_decoder import LabelDecoder
from hybridnet_tf.model.label_sequences import (
    LABEL_ORDERS,
    decoder_inputs_from_targets,
    make_label_sequence,
    random_label_sequence,
    ranked_labels,
)
from hybridnet_tf.model.losses import SIGMOID_LOSSES, OrderlessSequenceLoss, sigmoid_loss
from hybridnet_tf.model.sigmoid_head import ScoreMix, ScoresToLabels, SigmoidLabelHead

HEADS = ("hybrid_rnn", "bce", "hybrid")
DECODERS = ("pooled", "attention")
IMAGE_ENCODER = "image_encoder"
POOL = "pool"
FEATURE_DROPOUT = "feature_dropout"
# The input name of models that read backbone features (pooled [B, D], or
# the spatial map [B, h, w, C] for the attention decoder).
FEATURES = "features"
LABEL_DECODER = "label_decoder"
SIGMOID_HEAD = "sigmoid_head"
# Keys of the training model's outputs and of the targets.
SEQUENCE = "sequence"
LABELS = "labels"


def build_model(
    num_labels,
    backbone="small_cnn",
    image_size=None,
    weights=None,
    max_length=6,
    embedding_dim=64,
    gru_units=256,
    dropout=0.2,
    use_cudnn=False,
    head="hybrid",
    label_order="orderless",
    beam_width=1,
    min_label_score=0.0,
    score_mix=1.0,
    aux_loss_weight=1.0,
    sigmoid_loss="bce",
    asl_gamma_neg=4.0,
    asl_gamma_pos=0.0,
    asl_clip=0.05,
    freeze_batch_norm=None,
    decoder="pooled",
    attention_units=128,
    attention_gate=False,
    label_threshold=0.5,
    pla_rule="paper",
    label_scores="softmax",
    hub_preset=None,
    sigmoid_fusion=0.0,
    image_logits=True,
    decoders=1,
):
    """Builds the HybridNet inference model.

    Args:
        num_labels: number of labels in the vocabulary.
        backbone: a key of `BACKBONES` ("hub": a KerasHub preset, `hub_preset`).
        image_size: input size in pixels; the backbone's default when None.
        weights: backbone weights: None, "imagenet" or a weights file path
            ("preset" or None for `hub`).
        max_length: decoding steps, END included (so at most
            `max_length - 1` labels per image); for `bce`, the columns of
            `label_ids`.
        embedding_dim: label embedding / joint space size.
        gru_units: GRU state size.
        dropout: dropout on the image feature and the GRU output in training.
        use_cudnn: see `LabelDecoder`.
        head: "hybrid" (default), "hybrid_rnn" or "bce" (see the module docstring).
        label_order: training order of the label sequences, one of
            `label_sequences.LABEL_ORDERS` (decoder heads). Default
            "orderless" (PLA, Yazici et al.): on the coco128 yardstick it
            gave `hybrid` decoded-set OF1 32.4 against 29.7 for "freq2rare"
            on one CPU, 30.4 against 30.0 on another (docs/real_data.md).
        beam_width: decoding beam width; 1 is greedy (decoder heads).
        min_label_score: decoding emits no label whose probability at that
            step is below this (decoder heads; 0 = off).
        score_mix: `hybrid` head: weight of the sigmoid scores in `scores`
            (1.0, the default: scores are the sigmoid head's, the label set
            the decoder's; on real photos the decoder's scores rank worse).
        aux_loss_weight: `hybrid` head: weight of the sigmoid loss beside
            the sequence loss.
        sigmoid_fusion: `hybrid` head: when decoding, each step's label
            logits get `sigmoid_fusion * log(sigmoid score)` added (the
            decoder's `prior_weight`): the label set is decoded from the
            product of the decoder's next-label probabilities and the
            sigmoid head's per-label ones. 0 (default) decodes with the
            decoder alone. The factor is at most 1, so it only ever favours
            END: it prunes a decoder that emits too much and empties the
            sets of one that emits too little (docs/decoder.md).
        sigmoid_loss: "bce" or "asl", the loss of the sigmoid head
            (`bce` and `hybrid` heads).
        asl_gamma_neg, asl_gamma_pos, asl_clip: ASL parameters (see
            `losses.AsymmetricLoss`).
        freeze_batch_norm: set the backbone's BatchNormalization layers
            non-trainable, so they stay in inference mode with their
            pretrained statistics in every training phase. None (default):
            True when `weights` is given, False for a backbone trained from
            scratch (which needs its BatchNorm to learn).
        decoder: "pooled" or "attention" (decoder heads; see the module docstring).
        attention_units, attention_gate: see `AttentionLabelDecoder`.
        pla_rule: `label_order="orderless"`: "paper" or "sorted" (see
            `losses.OrderlessSequenceLoss`).
        label_scores: decoder heads: each label's per-step score, "softmax"
            (`p`, default), "against_end" (`p / (p + p_END)`) or "sigmoid"
            (`sigmoid(logit)`); see `LabelDecoder`.
        image_logits: decoder heads: add a linear map of the pooled image
            feature to every step's label logits (`LabelDecoder`'s
            `image_logits`); the cached-feature recipe sets it from the
            linear probe.
        decoders: decoder heads: how many decoders of this configuration
            train side by side and decode jointly (`decoder_ensemble.DecoderEnsemble`);
            1 (default) is one `LabelDecoder`.
        label_threshold: `bce` head: the score a label needs to be in the
            label set (`eval.threshold`; per-label tuned thresholds replace it
            after training, `set_label_thresholds`).
        hub_preset: for backbone "hub": a KerasHub preset name, "hf://...",
            "kaggle://..." or a local preset directory (`hub_backbones.py`).

    Returns:
        A functional `keras.Model` from `image` [B, H, W, 3] (0..255 pixels)
        to a dict: `scores` [B, L] float32, `label_ids` [B, max_length] int32
        (-1 after the last label) and `num_labels` [B] int32.

    Example:
        >>> model = build_model(num_labels=4, image_size=32)
        >>> sorted(model.output)
        ['label_ids', 'num_labels', 'scores']
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {list(HEADS)}")
    if label_order not in LABEL_ORDERS:
        raise ValueError(f"unknown label_order {label_order!r}; choose one of {list(LABEL_ORDERS)}")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {list(DECODERS)}")
    if decoders < 1:
        raise ValueError(f"decoders must be >= 1, got {decoders}")
    if sigmoid_loss not in SIGMOID_LOSSES:
        raise ValueError(f"unknown sigmoid_loss {sigmoid_loss!r}; choose one of {list(SIGMOID_LOSSES)}")
    backbone_model = build_backbone(backbone, image_size, weights=weights, hub_preset=hub_preset)
    image_size = backbone_model.input.shape[1]  # the backbone's default (a hub preset's own) when None
    if freeze_batch_norm is None:
        freeze_batch_norm = weights is not None
    if freeze_batch_norm:
        freeze_batch_norm_layers(backbone_model)

    image = keras.Input((image_size, image_size, 3), name="image")
    # A non-trainable BatchNormalization runs in inference mode in Keras 3;
    # `training=False` here alone would be overridden by fit (TF-TRAPS.md).
    feature_map = backbone_model(image, training=False if weights is not None else None)
    features = keras.layers.GlobalAveragePooling2D(name=POOL)(feature_map)
    features = keras.layers.Dropout(dropout, name=FEATURE_DROPOUT)(features)
    attends = decoder == "attention" and head in ("hybrid_rnn", "hybrid")
    # The attention decoder reads the map; everything else the pooled feature.
    encoded = [features, feature_map] if attends else features
    image_encoder = keras.Model(image, encoded, name=IMAGE_ENCODER)

    head_layers = {}
    if head in ("hybrid_rnn", "hybrid"):
        decoder_class, extra = LabelDecoder, {}
        if attends:
            decoder_class = AttentionLabelDecoder
            extra = {"attention_units": attention_units, "attention_gate": attention_gate}
        decoder_config = dict(
            num_labels=num_labels,
            max_length=max_length,
            embedding_dim=embedding_dim,
            units=gru_units,
            dropout=dropout,
            use_cudnn=use_cudnn,
            beam_width=beam_width,
            min_label_score=min_label_score,
            label_order=label_order,
            pla_rule=pla_rule,
            label_scores=label_scores,
            prior_weight=sigmoid_fusion if head == "hybrid" else 0.0,
            image_logits=image_logits,
            # Probabilities and the GRU stay float32 under mixed precision.
            dtype="float32",
            **extra,
        )
        if decoders == 1:
            head_layers[LABEL_DECODER] = decoder_class(**decoder_config, name=LABEL_DECODER)
        else:
            head_layers[LABEL_DECODER] = DecoderEnsemble(
                decoders, decoder_config, attention=attends, dtype="float32", name=LABEL_DECODER
            )
    if head in ("bce", "hybrid"):
        head_layers[SIGMOID_HEAD] = SigmoidLabelHead(
            num_labels,
            loss=sigmoid_loss,
            asl_gamma_neg=asl_gamma_neg,
            asl_gamma_pos=asl_gamma_pos,
            asl_clip=asl_clip,
            loss_weight=aux_loss_weight if head == "hybrid" else 1.0,
            dtype="float32",
            name=SIGMOID_HEAD,
        )
        head_layers["sigmoid"] = keras.layers.Activation("sigmoid", dtype="float32", name="sigmoid")
    if head == "bce":
        head_layers["labels_above_half"] = ScoresToLabels(
            max_length, threshold=label_threshold, dtype="float32", name="labels_above_half"
        )
    if head == "hybrid":
        head_layers["score_mix"] = ScoreMix(score_mix, dtype="float32", name="score_mix")

    inputs = keras.Input((image_size, image_size, 3), name="image")
    return keras.Model(inputs, _head_outputs(image_encoder(inputs), head_layers), name="hybridnet")


def _split_encoded(encoded):
    """(pooled features, what the decoder reads) from an image encoder's output."""
    if isinstance(encoded, (list, tuple)):
        return encoded[0], encoded[1]
    return encoded, encoded


def _head_outputs(encoded, layers):
    """Wires the head layers of `build_model` on the encoder's output: the inference outputs dict."""
    features, decoder_input = _split_encoded(encoded)
    outputs = {}
    sigmoid_scores = None
    if SIGMOID_HEAD in layers:
        sigmoid_scores = layers["sigmoid"](layers[SIGMOID_HEAD](features))
    if LABEL_DECODER in layers:
        # The decoder decides whether the prior counts (its prior_weight; None for hybrid_rnn).
        decoded = layers[LABEL_DECODER](decoder_input, label_prior=sigmoid_scores)
        outputs = {key: decoded[key] for key in ("scores", "label_ids", "num_labels")}
    if sigmoid_scores is not None:
        if "labels_above_half" in layers:
            outputs = {"scores": sigmoid_scores, **layers["labels_above_half"](sigmoid_scores)}
        else:
            outputs["scores"] = layers["score_mix"]([sigmoid_scores, outputs["scores"]])
    return {key: outputs[key] for key in ("scores", "label_ids", "num_labels")}


def freeze_batch_norm_layers(model):
    """Sets `trainable = False` on every BatchNormalization inside `model` (nested models too).

    Keras 3 runs a non-trainable BatchNormalization in inference mode, so
    its moving statistics stay those of pretraining whatever `fit` passes
    as `training`.

    Returns:
        How many layers were frozen.
    """
    count = 0
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count


def _all_layers(model):
    for layer in getattr(model, "layers", ()):
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def feature_dim(model):
    """The size of the pooled image feature the heads of `model` read."""
    return int(model.get_layer(IMAGE_ENCODER).get_layer(POOL).output.shape[-1])


def model_decoder(model):
    """"attention" when `model`'s decoder attends over the spatial map, else "pooled"."""
    decoder = layer_or_none(model, LABEL_DECODER)
    attends = decoder is not None and isinstance(decoder_members(decoder)[0], AttentionLabelDecoder)
    return "attention" if attends else "pooled"


def head_input_shape(model):
    """Shape (no batch) of the backbone output the heads need: [D], or [h, w, C] with attention.

    What a feature cache keeps per image: with the attention decoder the
    whole map (the pooled feature is its mean), else the pooled feature.
    """
    encoder = model.get_layer(IMAGE_ENCODER)
    if model_decoder(model) == "attention":
        return tuple(int(d) for d in encoder.get_layer("backbone").output.shape[1:])
    return (feature_dim(model),)


def _encode_head_input(model, head_input):
    """The encoder's output (after the backbone) computed from `head_input_shape` features."""
    encoder = model.get_layer(IMAGE_ENCODER)
    dropout = encoder.get_layer(FEATURE_DROPOUT)
    if model_decoder(model) == "attention":
        return [dropout(encoder.get_layer(POOL)(head_input)), head_input]
    return dropout(head_input)


def build_head_model(model):
    """The heads of `model` as a model from backbone features (`head_input_shape`) to its outputs.

    Shares `model`'s weights (the same layer objects). Used to score cached
    backbone features while the backbone is frozen.
    """
    features = keras.Input(head_input_shape(model), name=FEATURES)
    outputs = _head_outputs(_encode_head_input(model, features), _head_layers(model))
    return keras.Model(features, outputs, name="hybridnet_heads")


def _head_layers(model):
    names = (LABEL_DECODER, SIGMOID_HEAD, "sigmoid", "labels_above_half", "score_mix")
    return {name: model.get_layer(name) for name in names if layer_or_none(model, name) is not None}


def with_attention_output(model):
    """`model` (attention decoder) with one more output, `attention` [B, max_length, h, w].

    Step t's map is where the decoder looked when it emitted `label_ids[:, t]`
    (see `AttentionLabelDecoder.attention_maps`). Shares `model`'s weights;
    the serving exports leave this output out unless asked.
    """
    if model_decoder(model) != "attention":
        raise ValueError(
            f"model {model.name!r} has no attention decoder (model.decoder: attention); "
            "its maps can come from Grad-CAM instead"
        )
    image = keras.Input(model.input.shape[1:], name="image")
    encoded = model.get_layer(IMAGE_ENCODER)(image)
    outputs = _head_outputs(encoded, _head_layers(model))
    feature_map = encoded[1]
    outputs["attention"] = model.get_layer(LABEL_DECODER)(feature_map, attention_for=outputs["label_ids"])
    return keras.Model(image, outputs, name="hybridnet_with_attention")


def set_label_thresholds(model, thresholds):
    """Sets the per-label thresholds of a `bce` model's label set; False for other heads.

    Args:
        model: a model from `build_model`.
        thresholds: a float or [L] per-label thresholds (e.g. tuned on val).
    """
    layer = layer_or_none(model, "labels_above_half")
    if layer is None:
        return False
    values = np.broadcast_to(np.asarray(thresholds, np.float32), layer.thresholds.shape)
    layer.thresholds.assign(values)
    return True


def layer_or_none(model, name):
    """`model.get_layer(name)`, or None when `model` has no such layer."""
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def model_head(model):
    """The head of a model from `build_model` (or its `.keras` file): "hybrid_rnn", "bce" or "hybrid"."""
    has_decoder = layer_or_none(model, LABEL_DECODER) is not None
    has_sigmoid = layer_or_none(model, SIGMOID_HEAD) is not None
    if has_decoder and has_sigmoid:
        return "hybrid"
    if has_decoder:
        return "hybrid_rnn"
    if has_sigmoid:
        return "bce"
    raise ValueError(
        f"model {model.name!r} has neither a {LABEL_DECODER!r} nor a {SIGMOID_HEAD!r} layer; "
        "is it a model from build_model?"
    )


def build_training_model(model, from_features=False):
    """Wraps an inference model's layers for training.

    Args:
        model: a model from `build_model` (or loaded from its `.keras` file).
        from_features: take backbone features (`head_input_shape`) as input `features`
            instead of images as `image` (training the heads on cached
            features while the backbone is frozen; the feature dropout still applies).

    Returns:
        A functional `keras.Model` sharing `model`'s weights, from a dict
        with `image` (and `decoder_inputs` [B, T] for teacher forcing) to a
        dict with `sequence` (decoder heads: per-step logits [B, T, L+1]) and
        `labels` (sigmoid heads: per-label logits [B, L]). With
        `label_order="orderless"` the decoder feeds back its own predictions
        instead of teacher forcing, so there is no `decoder_inputs`.
    """
    head = model_head(model)
    image_encoder = model.get_layer(IMAGE_ENCODER)
    if from_features:
        image = keras.Input(head_input_shape(model), name=FEATURES)
        encoded = _encode_head_input(model, image)
        inputs = {FEATURES: image}
    else:
        image = keras.Input(image_encoder.input.shape[1:], name="image")
        encoded = image_encoder(image)
        inputs = {"image": image}
    features, decoder_input = _split_encoded(encoded)
    outputs = {}
    if head in ("hybrid_rnn", "hybrid"):
        decoder = model.get_layer(LABEL_DECODER)
        if decoder.label_order == "orderless":
            outputs[SEQUENCE] = decoder(decoder_input, self_fed=True)
        else:
            decoder_inputs = keras.Input((decoder.max_length,), dtype="int32", name="decoder_inputs")
            inputs["decoder_inputs"] = decoder_inputs
            outputs[SEQUENCE] = decoder([decoder_input, decoder_inputs])
    if head in ("bce", "hybrid"):
        outputs[LABELS] = model.get_layer(SIGMOID_HEAD)(features)
    return keras.Model(inputs, outputs, name="hybridnet_training")


def training_loss(model):
    """The loss of `build_training_model(model)`'s outputs: a dict keyed like them.

    - `sequence`: a masked softmax cross-entropy over the label sequence
      (padding after END ignored, mean over the real steps); against
      PLA-aligned targets for `label_order="orderless"`; with several
      decoders (`decoders`), the mean of each one's loss (`PerDecoderLoss`).
    - `labels`: BCE or ASL of the sigmoid head, times its `loss_weight`
      (`aux_loss_weight` of the `hybrid` head).
    Keras adds the two.
    """
    head = model_head(model)
    losses = {}
    if head in ("hybrid_rnn", "hybrid"):
        decoder = model.get_layer(LABEL_DECODER)
        if decoder.label_order == "orderless":
            losses[SEQUENCE] = OrderlessSequenceLoss(decoder.pla_rule)
        else:
            losses[SEQUENCE] = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=-1
            )
        if isinstance(decoder, DecoderEnsemble):
            # Each member's loss on its own logits, averaged.
            losses[SEQUENCE] = PerDecoderLoss(losses[SEQUENCE], decoder.num_decoders)
    if head in ("bce", "hybrid"):
        layer = model.get_layer(SIGMOID_HEAD)
        losses[LABELS] = sigmoid_loss(
            layer.loss,
            gamma_neg=layer.asl_gamma_neg,
            gamma_pos=layer.asl_gamma_pos,
            clip=layer.asl_clip,
            weight=layer.loss_weight,
        )
    return losses


def with_training_targets(dataset, model, label_rank, seed=None, input_key="image"):
    """Maps `(images, multi_hot)` batches to `(inputs, targets)` for `build_training_model(model)`.

    The targets are dicts keyed like the training model's outputs:
    `sequence` [B, T] (label ids, END, -1 padding, in the decoder's
    `label_order`; for `orderless`, [B, L] `ranked_labels`, aligned inside
    the loss) and `labels` [B, L] multi-hot.

    `random` draws a new order for every batch, also on every pass over the
    data: one seed per batch comes from `tf.data.Dataset.random(seed,
    rerandomize_each_iteration=True)` and feeds `tf.random.stateless_uniform`,
    so a seed gives the same orders run after run.

    Args:
        dataset: batches of `(images, multi_hot)`.
        model: the inference model (its head and decoder set the targets).
        label_rank: [L] rank of each label in the decoding order
            (`LabelVocabulary.label_rank(rank_ordering(label_order))`); for
            `orderless` the order of the labels the decoder missed.
        seed: seed of the `random` order (None: from TF's global seed).
        input_key: the training model's input name for the first element:
            "image", or `FEATURES` for `build_training_model(from_features=True)`.
    """
    head = model_head(model)
    label_rank = tf.constant(label_rank, tf.int32)
    num_labels = int(label_rank.shape[0])
    model_labels = model.output["scores"].shape[-1]
    if model_labels != num_labels:
        raise ValueError(f"label_rank has {num_labels} labels but the model has {model_labels}")
    decoder = layer_or_none(model, LABEL_DECODER)
    label_order = decoder.label_order if decoder is not None else None
    uses_sigmoid = head in ("bce", "hybrid")

    def to_targets(images, multi_hot, batch_seed=None):
        inputs, targets = {input_key: images}, {}
        if label_order == "orderless":
            targets[SEQUENCE] = ranked_labels(multi_hot, label_rank)
        elif label_order is not None:
            if label_order == "random":
                sequence = random_label_sequence(
                    multi_hot, decoder.max_length, tf.stack([batch_seed, tf.zeros_like(batch_seed)])
                )
            else:
                sequence = make_label_sequence(multi_hot, label_rank, decoder.max_length)
            inputs["decoder_inputs"] = decoder_inputs_from_targets(sequence, num_labels)
            targets[SEQUENCE] = sequence
        if uses_sigmoid:
            targets[LABELS] = tf.cast(multi_hot, tf.float32)
        return inputs, targets

    if label_order == "random":
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip(dataset, seeds)
        return dataset.map(
            lambda batch, batch_seed: to_targets(*batch, batch_seed),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return dataset.map(to_targets, num_parallel_calls=tf.data.AUTOTUNE)
