"""HybridNet: a CNN backbone and a GRU label decoder, as functional Keras models.

`build_model` returns the inference model (image -> scores, decoded labels);
`build_training_model` wraps the same layers for teacher forcing. Both share
weights, so training one trains the other.
"""

import keras

from hybridnet_tf.data.pipeline import with_label_sequences
from hybridnet_tf.model.backbones import BACKBONES, build_backbone
from hybridnet_tf.model.label_decoder import LabelDecoder

IMAGE_ENCODER = "image_encoder"
LABEL_DECODER = "label_decoder"


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
):
    """Builds the HybridNet inference model.

    Args:
        num_labels: number of labels in the vocabulary.
        backbone: a key of `BACKBONES`.
        image_size: input size in pixels; the backbone's default when None.
        weights: backbone weights: None, "imagenet" or a weights file path.
        max_length: decoding steps, END included (so at most
            `max_length - 1` labels per image).
        embedding_dim: label embedding / joint space size.
        gru_units: GRU state size.
        dropout: dropout on the image feature and the GRU output in training.
        use_cudnn: see `LabelDecoder`.

    Returns:
        A functional `keras.Model` from `image` [B, H, W, 3] (0..255 pixels)
        to a dict: `scores` [B, L] float32, `label_ids` [B, max_length] int32
        (-1 after END) and `num_labels` [B] int32.

    Example:
        >>> model = build_model(num_labels=4, image_size=32)
        >>> sorted(model.output)
        ['label_ids', 'num_labels', 'scores']
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    image_size = image_size or BACKBONES[backbone].default_size
    backbone_model = build_backbone(backbone, image_size, weights=weights)

    image = keras.Input((image_size, image_size, 3), name="image")
    # Pretrained BatchNorm statistics stay in inference mode even when the
    # backbone is unfrozen for fine-tuning (the Keras fine-tuning guide).
    features = backbone_model(image, training=False if weights is not None else None)
    features = keras.layers.Dropout(dropout, name="feature_dropout")(features)
    image_encoder = keras.Model(image, features, name=IMAGE_ENCODER)

    decoder = LabelDecoder(
        num_labels,
        max_length,
        embedding_dim=embedding_dim,
        units=gru_units,
        dropout=dropout,
        use_cudnn=use_cudnn,
        # Probabilities and the GRU stay float32 under mixed precision.
        dtype="float32",
        name=LABEL_DECODER,
    )
    inputs = keras.Input((image_size, image_size, 3), name="image")
    decoded = decoder(image_encoder(inputs))
    outputs = {key: decoded[key] for key in ("scores", "label_ids", "num_labels")}
    return keras.Model(inputs, outputs, name="hybridnet")


def build_training_model(model):
    """Wraps an inference model's layers for teacher-forced training.

    Args:
        model: a model from `build_model` (or loaded from its `.keras` file).

    Returns:
        A functional `keras.Model` from `{"image", "decoder_inputs"}` to the
        per-step logits [B, T, L+1]; weights are shared with `model`.
    """
    image_encoder = model.get_layer(IMAGE_ENCODER)
    decoder = model.get_layer(LABEL_DECODER)
    image = keras.Input(image_encoder.input.shape[1:], name="image")
    decoder_inputs = keras.Input((decoder.max_length,), dtype="int32", name="decoder_inputs")
    logits = decoder([image_encoder(image), decoder_inputs])
    return keras.Model({"image": image, "decoder_inputs": decoder_inputs}, logits, name="hybridnet_training")


def training_loss(model):
    """The loss of `build_training_model(model)`'s output.

    A masked softmax cross-entropy over the label sequence: padding after
    END is ignored, and the mean is over the real steps.
    """
    del model  # one head for now; the argument keeps the call site head-agnostic
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)


def with_training_targets(dataset, model, label_rank, seed=None):
    """Maps `(images, multi_hot)` batches to `(inputs, targets)` for `build_training_model(model)`.

    Args:
        dataset: batches of `(images, multi_hot)`.
        model: the inference model (its decoder sets the sequence length).
        label_rank: [L] decoding order of the labels.
        seed: for orderings that draw random numbers.
    """
    del seed  # the fixed orderings draw no random numbers
    decoder = model.get_layer(LABEL_DECODER)
    return with_label_sequences(dataset, label_rank, decoder.max_length)
