"""KerasHub presets as backbones: ViT, SigLIP's vision tower, DINOv2 and other image backbones.

`build_hub_backbone(preset, image_size, weights)` loads a KerasHub preset
(a built-in name, "hf://...", "kaggle://..." or a local preset directory)
and wraps it as the project's backbones are: a `keras.Model` named
"backbone" from 0..255 pixels to its last spatial map [B, h, w, C].

- Preprocessing: the preset's own image converter (scale and offset, e.g.
  ImageNet mean / std for ViT, [-1, 1] for SigLIP) is the first layer, with
  resizing off: images arrive at the model's size.
- Vision-language presets (SigLIP, CLIP) contribute their vision tower
  only (`vision_encoder`); a tower that ends in a pooling head (SigLIP's
  attention pooling) is cut before it, at its last token sequence.
- Transformer tokens [B, T, C] become the patch grid [B, H/p, W/p, C]: the
  tokens in front of the patches (the class token, DINOv2's registers) are
  dropped and the rest reshaped. Backbones that already
  return a feature map (ResNet, EfficientNet, ... in KerasHub) keep it.

KerasHub is an optional extra (`pip install -e ".[hub]"`): it pulls
tensorflow-text, tokenizers, sentencepiece, kagglehub and huggingface_hub,
which the rest of the project does not need.
"""

import functools

import keras

INSTALL_HINT = 'pip install -e ".[hub]"  (or: pip install "keras-hub>=0.32")'
# `model.weights` of the hub backbone: the preset's pretrained weights.
PRESET_WEIGHTS = "preset"


def import_keras_hub():
    """Imports KerasHub, or says how to install it."""
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(
            f"model.backbone 'hub' needs KerasHub, which is not installed ({error}); install it "
            f"with: {INSTALL_HINT}"
        ) from None
    return keras_hub


def _check_preset(preset):
    if not preset or not isinstance(preset, str):
        raise ValueError(
            "model.backbone 'hub' needs model.hub_preset: a KerasHub preset name (e.g. "
            "'vit_base_patch16_224_imagenet'), 'hf://...', 'kaggle://...' or a local preset directory"
        )


def _load_image_converter(preset, **kwargs):
    keras_hub = import_keras_hub()
    try:
        return keras_hub.layers.ImageConverter.from_preset(preset, **kwargs)
    except (FileNotFoundError, ValueError, KeyError) as error:
        if "image_converter" not in str(error):
            # An unknown name or a missing folder: KerasHub's message lists what a preset can be.
            raise ValueError(f"cannot load hub preset {preset!r}: {str(error).splitlines()[0]}") from None
        raise ValueError(
            f"hub preset {preset!r} has no image converter (image_converter.json), so its input "
            f"normalisation is unknown; save one with `converter.save_to_preset(dir)`"
        ) from None


@functools.lru_cache(maxsize=16)
def preset_image_size(preset):
    """The image size (height = width) a preset's image converter resizes to: its default size.

    Reads the converter's config only (no weights). A converter that does
    not resize leaves the size to the backbone's own `image_shape`.
    """
    _check_preset(preset)
    size = _load_image_converter(preset).image_size
    if size is None:
        encoder = _vision_encoder(_load_backbone(preset, load_weights=False))
        size = encoder.image_shape[:2]
    if size[0] != size[1]:
        raise ValueError(f"hub preset {preset!r} takes {size[0]}x{size[1]} images; only square inputs are supported")
    return int(size[0])


def _load_backbone(preset, load_weights, image_size=None):
    """`Backbone.from_preset`, at `image_size` when the preset allows it (DINOv2 interpolates)."""
    keras_hub = import_keras_hub()
    if image_size is not None:
        try:
            return keras_hub.models.Backbone.from_preset(
                preset, load_weights=load_weights, image_shape=(image_size, image_size, 3)
            )
        except (TypeError, ValueError):
            # A tower nested in a vision-language backbone takes no `image_shape`, and
            # fixed position embeddings (ViT) do not fit another size: load the preset
            # as saved and check its size below.
            pass
    return keras_hub.models.Backbone.from_preset(preset, load_weights=load_weights)


def _vision_encoder(backbone):
    """The image tower of a backbone: SigLIP / CLIP keep theirs in `vision_encoder`."""
    return getattr(backbone, "vision_encoder", None) or backbone


def _features_model(encoder):
    """A model from the encoder's images to its last token sequence [B, T, C] or map [B, h, w, C]."""
    output = encoder.output
    if isinstance(output, dict):
        if "sequence_output" not in output:
            raise ValueError(
                f"KerasHub backbone {type(encoder).__name__} returns {sorted(output)}; expected a "
                "feature map, a token sequence or a 'sequence_output'"
            )
        output = output["sequence_output"]
    if len(output.shape) in (3, 4):
        if output is encoder.output:
            return encoder
        return keras.Model(encoder.input, output, name=f"{encoder.name}_tokens")
    # A pooled output (SigLIP's attention-pooling head): the last layer with tokens.
    for layer in reversed(encoder.layers):
        try:
            tokens = layer.output
        except (AttributeError, ValueError):  # a layer called more than once
            continue
        if not isinstance(tokens, (list, tuple, dict)) and len(tokens.shape) == 3:
            return keras.Model(encoder.input, tokens, name=f"{encoder.name}_tokens")
    raise ValueError(
        f"KerasHub backbone {type(encoder).__name__} has no spatial output (a feature map or token "
        f"sequence); its output shape is {output.shape}"
    )


def build_hub_backbone(preset, image_size=None, weights=PRESET_WEIGHTS):
    """Builds a KerasHub preset as a model from 0..255 pixels to its last spatial map.

    Args:
        preset: a KerasHub preset name, "hf://...", "kaggle://..." or a local
            preset directory (e.g. written by `Backbone.save_to_preset` and
            `ImageConverter.save_to_preset`).
        image_size: input height and width; None: the preset's own
            (`preset_image_size`). ViT's position embeddings fix its size;
            DINOv2 interpolates them to any multiple of its patch size.
        weights: "preset" (the preset's pretrained weights) or None (its
            architecture, randomly initialised).

    Returns:
        A `keras.Model` named "backbone" with output [B, h, w, C]; for a
        transformer h = w = image_size // patch_size and C its hidden size.

    Example:
        >>> build_hub_backbone("/tmp/tiny_vit", 32).output.shape
        (None, 4, 4, 48)
    """
    _check_preset(preset)
    if weights not in (PRESET_WEIGHTS, None):
        raise ValueError(
            f"the hub backbone's weights come from model.hub_preset: use model.weights "
            f"'{PRESET_WEIGHTS}' (its pretrained weights) or null (random init), got {weights!r}"
        )
    # The preset's scale / offset on 0..255 pixels; no resize (images come at image_size).
    # Loaded first: the cheapest check that the preset exists.
    converter = _load_image_converter(preset, image_size=None, name="preprocessing")
    image_size = image_size or preset_image_size(preset)
    backbone = _load_backbone(preset, load_weights=weights == PRESET_WEIGHTS, image_size=image_size)
    encoder = _vision_encoder(backbone)
    preset_size = tuple(encoder.image_shape[:2])
    if preset_size != (image_size, image_size):
        raise ValueError(
            f"hub preset {preset!r} is built for {preset_size[0]}x{preset_size[1]} images and cannot "
            f"be loaded at {image_size}x{image_size}: set model.image_size to {preset_size[0]} (or null)"
        )
    features = _features_model(encoder)

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = converter(inputs)
    # KerasHub backbones take a tensor (ViT) or a dict {"images": ...} (DINOv2, SigLIP).
    x = features({"images": x} if isinstance(features.input, dict) else x)
    if len(x.shape) == 3:
        x = _tokens_to_grid(x, encoder, image_size)
    return keras.Model(inputs, x, name="backbone")


def _tokens_to_grid(tokens, encoder, image_size):
    """[B, T, C] tokens -> [B, H/p, W/p, C]: the patch tokens on their grid, prefix tokens dropped."""
    patch = getattr(encoder, "patch_size", None)
    if patch is None:
        raise ValueError(f"KerasHub backbone {type(encoder).__name__} has no patch_size to lay its tokens on a grid")
    patch = patch if isinstance(patch, int) else patch[0]
    grid = image_size // patch
    if tokens.shape[1] is not None and tokens.shape[1] < grid * grid:
        raise ValueError(
            f"{type(encoder).__name__} returns {tokens.shape[1]} tokens, fewer than its "
            f"{grid}x{grid} patches at {image_size} px"
        )
    # The patches are the last grid*grid tokens: class and register tokens come first
    # (ViT, DeiT, CLIP, DINOv2). Sliced from the end because the static token count
    # is not always right: SigLIP's embedding declares one token more than it makes
    # (keras-hub 0.32 `SigLIPVisionEmbedding.compute_output_shape` adds a class token).
    x = tokens[:, -grid * grid :, :]
    return keras.layers.Reshape((grid, grid, int(tokens.shape[-1])), name="patch_grid")(x)
