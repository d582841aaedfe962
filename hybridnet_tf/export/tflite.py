"""TFLite export: decoded pixels -> scores and decoded label ids, builtin ops only.

The `.tflite` model takes `image` float32 [1, S, S, 3] (pixels 0..255; the
app decodes and resizes the image itself, as `decode_and_resize` does) and
returns `scores` float32 [1, L], `label_ids` int32 [1, T] (-1 after END)
and `num_labels` int32 [1]. Only TFLite builtin ops are allowed (no Flex /
SELECT_TF_OPS: the Flex delegate ships with neither the TF wheel nor
`ai-edge-litert`). A JSON file beside the model (`model.tflite` ->
`model.json`) holds the label names, thresholds and input description.

int8 quantises the image encoder only; the label decoder stays float32.
Per-tensor int8 activations cannot hold the decoder's logits beside its
-1e4 "already emitted" mask: the calibrated scale becomes ~39 per step, every
logit rounds to the same value and argmax decodes one label again and again
(measured on a tiny test model: 22 % of label ids right with the decoder
quantised; on the trained demo model, beam search with width 3 decoded no
image's label set right). The encoder holds nearly all the compute, so
little speed is lost; the decoder's weights stay float32 too, so the file
shrinks less than 4x for a small backbone.
"""

import os
import tempfile

import numpy as np
import tensorflow as tf

from hybridnet_tf.export.artifacts import (
    EXPORT_FILE,
    EXPORT_FORMAT_VERSION,
    LABELS_FILE,
    THRESHOLDS_FILE,
    as_vocabulary,
    threshold_dict,
    tflite_sidecar_path,
    write_json_atomically,
)

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")


def _image_signature(loaded):
    """The name and input name of a loaded SavedModel's float32 image signature."""
    for key in ("predict_images", "serving_default"):
        if key not in loaded.signatures:
            continue
        signature = loaded.signatures[key]
        _, inputs = signature.structured_input_signature
        if len(inputs) == 1:
            (name, spec), = inputs.items()
            if spec.dtype == tf.float32 and spec.shape.rank == 4:
                return key, name, spec
    raise ValueError(
        "the SavedModel has no signature taking a float32 image batch [B, H, W, 3]; "
        "export one with export_saved_model (its `predict_images`) or keras' model.export"
    )


def _write_pixels_saved_model(source, out_dir, batch_size):
    """Writes the SavedModel to convert: `serving_default` image -> scores, label_ids, num_labels."""
    if isinstance(source, (str, os.PathLike)):
        loaded = tf.saved_model.load(os.fspath(source))
        key, input_name, spec = _image_signature(loaded)
        signature = loaded.signatures[key]
        module = tf.Module()
        module.loaded = loaded  # tracks the variables
        image_shape = [batch_size, *spec.shape[1:]]

        @tf.function(input_signature=[tf.TensorSpec(image_shape, tf.float32, name="image")])
        def serve(image):
            outputs = signature(**{input_name: image})
            count = outputs.get("num_labels_predicted", outputs.get("num_labels"))
            return {
                "scores": outputs["scores"],
                "label_ids": outputs["label_ids"],
                "num_labels": count,
            }

        tf.saved_model.save(module, out_dir, signatures={"serving_default": serve})
        return int(spec.shape[1])

    from hybridnet_tf.export.saved_model import export_pixels_saved_model, model_image_size

    export_pixels_saved_model(source, out_dir, batch_size=batch_size)
    return model_image_size(source)


def _quantize_image_encoder_only(converter):
    """int8 conversion that keeps every op outside the image encoder in float32.

    Uses TF's selective quantisation (`tf.lite.experimental.QuantizationDebugger`
    with `denylisted_nodes`): calibrate once, then quantise all ops except
    the denylisted ones. Ops are matched by name: the encoder is the nested
    `image_encoder` model of `build_model`.
    """
    import warnings

    from ai_edge_litert.interpreter import Interpreter

    from hybridnet_tf.model.hybridnet import IMAGE_ENCODER

    with warnings.catch_warnings():
        # The debugger builds a tf.lite.Interpreter internally, which warns it is deprecated.
        warnings.simplefilter("ignore")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=converter.representative_dataset
        )
        calibrated = Interpreter(model_content=debugger.calibrated_model)
        names = {t["index"]: t["name"] for t in calibrated.get_tensor_details()}
        ops = [
            (op["op_name"], [names[i] for i in op["outputs"] if i in names])
            for op in calibrated._get_ops_details()
        ]
        decoder_ops = [
            (kind, outputs) for kind, outputs in ops if not any(IMAGE_ENCODER in n for n in outputs)
        ]
        if len(decoder_ops) == len(ops):
            raise ValueError(
                f"no op of the model is named after {IMAGE_ENCODER!r}, so int8 would quantise "
                "nothing; export the Keras model from build_model (or its SavedModel)"
            )
        float_nodes = sorted({name for _, outputs in decoder_ops for name in outputs})
        # Ops with several outputs (the GRU's SPLIT, beam search's TOPK_V2) are
        # not matched by name: keep their op types float everywhere.
        float_op_types = sorted({kind for kind, outputs in decoder_ops if len(outputs) > 1})
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_nodes=float_nodes, denylisted_ops=float_op_types or None
        )
        return debugger.get_nondebug_quantized_model()


def _converter(saved_model_dir, quantize, representative_images):
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    builtins = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantize == "int8":
        if representative_images is None or len(representative_images) == 0:
            raise ValueError(
                "quantize='int8' needs representative_images: ~100 training images "
                "[N, S, S, 3] float32 0..255"
            )
        images = np.asarray(representative_images, dtype=np.float32)

        def representative_dataset():
            for image in images:
                yield [image[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        # Integer kernels in the encoder; the decoder stays float builtins.
        builtins = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    elif quantize != "none":
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {list(QUANTIZATIONS)}")
    converter.target_spec.supported_ops = builtins
    return converter


def _sidecar_from_saved_model(path):
    """Labels, thresholds and resize policy of a SavedModel folder from `export_saved_model`."""
    import json

    from hybridnet_tf.evaluation.thresholds import load_thresholds
    from hybridnet_tf.vocabulary import LabelVocabulary

    labels_path = os.path.join(path, LABELS_FILE)
    vocabulary = LabelVocabulary.load(labels_path) if os.path.isfile(labels_path) else None
    thresholds = None
    if vocabulary is not None and os.path.isfile(os.path.join(path, THRESHOLDS_FILE)):
        thresholds = load_thresholds(os.path.join(path, THRESHOLDS_FILE), vocabulary.names)
    resize = "squash"
    if os.path.isfile(os.path.join(path, EXPORT_FILE)):
        with open(os.path.join(path, EXPORT_FILE), encoding="utf-8") as file:
            resize = json.load(file).get("resize", resize)
    return vocabulary, thresholds, resize


def export_tflite(
    saved_model_or_model,
    out_path,
    quantize="none",
    representative_images=None,
    vocabulary=None,
    thresholds=None,
    resize=None,
    batch_size=1,
    overwrite=False,
):
    """Converts a HybridNet to a builtins-only `.tflite` file with its label JSON beside it.

    Args:
        saved_model_or_model: an inference `keras.Model` from `build_model`,
            or a SavedModel folder with a float32 image signature (the
            `predict_images` of `export_saved_model`, or `serving_default`).
        out_path: the `.tflite` file to write; `<name>.json` is written beside.
        quantize: "none" (float32), "float16" (float16 weights), "dynamic"
            (int8 weights, float activations) or "int8" (int8 weights and
            activations in the image encoder, calibrated on
            `representative_images`; the label decoder, input and outputs
            stay float32; see the module docstring).
        representative_images: for "int8": float32 [N, S, S, 3] 0..255 images
            from the training data (~100).
        vocabulary: a `LabelVocabulary` or label names (default: the
            SavedModel's `labels.json`; required for a Keras model).
        thresholds: None, a float or `{"global", "per_class"}` (default: the
            SavedModel's `thresholds.json`, else 0.5).
        resize: the resize policy apps must reproduce (default: the
            SavedModel's, else "squash").
        batch_size: the fixed batch size of the model's input (1), or None
            for a dynamic batch (the interpreter is then resized per batch).
        overwrite: replace existing files.

    Returns:
        `out_path`.

    Example:
        >>> export_tflite(model, "hybridnet_int8.tflite", quantize="int8",
        ...               representative_images=train_images[:100], vocabulary=vocabulary)
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {list(QUANTIZATIONS)}")
    out_path = os.path.abspath(os.fspath(out_path))
    if not out_path.endswith(".tflite"):
        raise ValueError(f"the TFLite file name must end in .tflite, got {out_path}")
    sidecar = tflite_sidecar_path(out_path)
    if not overwrite and (os.path.exists(out_path) or os.path.exists(sidecar)):
        raise FileExistsError(
            f"{out_path} or {sidecar} already exists; choose another path or pass "
            "overwrite=True (--overwrite)"
        )
    if isinstance(saved_model_or_model, (str, os.PathLike)):
        saved_vocabulary, saved_thresholds, saved_resize = _sidecar_from_saved_model(
            os.fspath(saved_model_or_model)
        )
        vocabulary = vocabulary if vocabulary is not None else saved_vocabulary
        thresholds = thresholds if thresholds is not None else saved_thresholds
        resize = resize or saved_resize
    if vocabulary is None:
        raise ValueError("pass vocabulary= (a LabelVocabulary or label names) to export a Keras model")
    vocabulary = as_vocabulary(vocabulary)
    resize = resize or "squash"

    directory = os.path.dirname(out_path)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tflite-") as temp_dir:
        saved_model_dir = os.path.join(temp_dir, "saved_model")
        image_size = _write_pixels_saved_model(saved_model_or_model, saved_model_dir, batch_size)
        converter = _converter(saved_model_dir, quantize, representative_images)
        if quantize == "int8":
            flatbuffer = _quantize_image_encoder_only(converter)
        else:
            flatbuffer = converter.convert()
        temp_file = os.path.join(temp_dir, "model.tflite")
        with open(temp_file, "wb") as file:
            file.write(flatbuffer)
        os.replace(temp_file, out_path)

    thresholds = threshold_dict(thresholds, len(vocabulary))
    write_json_atomically(
        sidecar,
        {
            "version": EXPORT_FORMAT_VERSION,
            "format": "tflite",
            "model": os.path.basename(out_path),
            "quantize": quantize,
            "labels": vocabulary.names,
            "thresholds": {
                "global": thresholds["global"],
                "per_class": dict(zip(vocabulary.names, thresholds["per_class"])),
            },
            "image_size": image_size,
            "resize": resize,
            "input": {
                "name": "image",
                "dtype": "float32",
                "shape": [batch_size if batch_size else -1, image_size, image_size, 3],
                "pixels": "RGB 0..255, decoded and resized (no normalisation)",
            },
            "outputs": {
                "scores": "float32 [B, L]",
                "label_ids": "int32 [B, T], index into labels, -1 after END",
                "num_labels": "int32 [B]",
            },
        },
    )
    return out_path
