"""The files around an exported model, and loading any model artefact for prediction.

`load_predictor(path)` accepts a run directory, a `.keras` file, a
SavedModel folder from `export_saved_model` or a `.tflite` file from
`export_tflite`, and returns a `Predictor`: a callable from a decoded
float32 image batch [B, S, S, 3] (0..255) to numpy `scores` [B, L] and
`label_ids` [B, T] (-1 = none), with the `vocabulary`, `image_size`,
`resize` policy and `thresholds` the images and scores need.
"""

import json
import os
import shutil
import tempfile

import numpy as np

from hybridnet_tf.atomic_files import default_permissions, write_json_atomically
from hybridnet_tf.data.pipeline import eval_resize_policy
from hybridnet_tf.vocabulary import LabelVocabulary

LABELS_FILE = "labels.json"
THRESHOLDS_FILE = "thresholds.json"
EXPORT_FILE = "export.json"
EXPORT_FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 0.5


# ---------------------------------------------------------------- writing


def replace_atomically(out_path, write, overwrite=False):
    """Calls `write(temp_dir)` to fill a temporary sibling folder, then renames it to `out_path`.

    A crash leaves `out_path` as it was: complete or absent, never half written.
    """
    out_path = os.path.abspath(os.fspath(out_path))
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(
            f"{out_path} already exists; choose another output path or pass overwrite=True "
            "(--overwrite)"
        )
    parent = os.path.dirname(out_path)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(out_path)
    temp_dir = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    old = None
    try:
        write(temp_dir)
        default_permissions(temp_dir)
        if os.path.exists(out_path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
            os.rmdir(old)
            os.rename(out_path, old)
        os.rename(temp_dir, out_path)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        if old is not None and not os.path.exists(out_path):
            os.rename(old, out_path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_path


def as_vocabulary(vocabulary):
    """A `LabelVocabulary` from a vocabulary or a list of names."""
    if isinstance(vocabulary, LabelVocabulary):
        return vocabulary
    return LabelVocabulary(list(vocabulary))


def threshold_dict(thresholds, num_labels):
    """Normalises None / a float / a per-label array / a dict to `{"global", "per_class"}`."""
    if thresholds is None:
        thresholds = DEFAULT_THRESHOLD
    if isinstance(thresholds, dict):
        result = {
            "global": float(thresholds["global"]),
            "per_class": [float(t) for t in thresholds["per_class"]],
        }
    elif np.ndim(thresholds) == 0:
        result = {"global": float(thresholds), "per_class": [float(thresholds)] * num_labels}
    else:
        per_class = [float(t) for t in np.asarray(thresholds).ravel()]
        result = {"global": float(np.median(per_class)), "per_class": per_class}
    if len(result["per_class"]) != num_labels:
        raise ValueError(f"{len(result['per_class'])} per-label thresholds for {num_labels} labels")
    return result


def write_labels(path, vocabulary):
    """Writes the label vocabulary JSON (`{"names": [...], "frequencies": [...]}`)."""
    as_vocabulary(vocabulary).save(path)
    return path


def write_thresholds(path, thresholds, names):
    """Writes `thresholds.json` in the format of `save_thresholds` / `load_thresholds`."""
    from hybridnet_tf.evaluation.thresholds import save_thresholds

    save_thresholds(path, threshold_dict(thresholds, len(names)), names)
    default_permissions(path)
    return path


def write_export_metadata(directory, **fields):
    """Writes `export.json`: what a client needs besides the model (image size, resize...)."""
    content = {"version": EXPORT_FORMAT_VERSION, **fields}
    return write_json_atomically(os.path.join(directory, EXPORT_FILE), content)


def tflite_sidecar_path(tflite_path):
    """`model.tflite` -> `model.json`, the labels / thresholds / input description beside it."""
    return os.path.splitext(os.fspath(tflite_path))[0] + ".json"


# ---------------------------------------------------------------- loading


class Predictor:
    """A loaded model artefact: decoded image batch -> numpy scores and label ids.

    Attributes:
        kind: "keras", "saved_model" or "tflite".
        path: what was loaded.
        vocabulary: the `LabelVocabulary` of the scores' columns.
        image_size: the input height and width in pixels.
        resize: the resize policy images must be prepared with.
        thresholds: `{"global": float, "per_class": [L floats]}`: tuned on
            val when the run had `thresholds.json`, else the config's
            `eval.threshold` (0.5 by default).
    """

    kind = None

    def __init__(self, path, vocabulary, image_size, resize, thresholds):
        self.path = os.fspath(path)
        self.vocabulary = vocabulary
        self.image_size = int(image_size)
        self.resize = resize
        self.thresholds = threshold_dict(thresholds, len(vocabulary))

    def __call__(self, images, training=False):
        """Predicts a batch.

        Args:
            images: float32 [B, S, S, 3] pixels 0..255 (numpy or tensor).
            training: must be False; accepted so a predictor can stand in for
                a Keras model (`predict_files` calls `model(x, training=False)`).

        Returns:
            dict of numpy arrays: `scores` [B, L] float32, `label_ids` [B, T] int32.
        """
        if training:
            raise ValueError("a predictor only runs inference")
        images = np.asarray(images, dtype=np.float32)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"expected images [B, {', '.join(map(str, expected))}], got {images.shape}")
        scores, label_ids = self._predict(images)
        return {"scores": np.asarray(scores, np.float32), "label_ids": np.asarray(label_ids, np.int32)}

    def _predict(self, images):
        raise NotImplementedError

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.path!r}, {len(self.vocabulary)} labels, "
            f"{self.image_size}x{self.image_size}, resize={self.resize!r})"
        )


class KerasPredictor(Predictor):
    """A Keras inference model (run directory or `.keras` file)."""

    kind = "keras"

    def __init__(self, model, path, vocabulary, image_size, resize, thresholds):
        import tensorflow as tf

        from hybridnet_tf.export.fold_batch_norm import fold_batch_norm

        super().__init__(path, vocabulary, image_size, resize, thresholds)
        self.model = model
        # The same answers with BatchNorm folded into the convolutions: ~0.8x the time.
        inference_model, _ = fold_batch_norm(model)
        self._call = tf.function(lambda x: inference_model(x, training=False), reduce_retracing=True)

    def _predict(self, images):
        outputs = self._call(images)
        return outputs["scores"].numpy(), outputs["label_ids"].numpy()


class SavedModelPredictor(Predictor):
    """A SavedModel from `export_saved_model`, through its `predict_images` signature."""

    kind = "saved_model"

    def __init__(self, loaded, path, vocabulary, image_size, resize, thresholds):
        from hybridnet_tf.export.saved_model import PREDICT_IMAGES

        super().__init__(path, vocabulary, image_size, resize, thresholds)
        # Keep the loaded object alive while its signatures are used (TF-TRAPS.md).
        self.loaded = loaded
        self.signature = loaded.signatures[PREDICT_IMAGES]

    def _predict(self, images):
        outputs = self.signature(image=images)
        return outputs["scores"].numpy(), outputs["label_ids"].numpy()


class TFLitePredictor(Predictor):
    """A `.tflite` file from `export_tflite`, run with the LiteRT interpreter.

    Models exported with a fixed batch size of 1 are run one image at a time.
    """

    kind = "tflite"

    def __init__(self, path, vocabulary, image_size, resize, thresholds, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        super().__init__(path, vocabulary, image_size, resize, thresholds)
        self.interpreter = Interpreter(model_path=self.path, num_threads=num_threads)
        runner = self.interpreter.get_signature_runner()
        inputs = runner.get_input_details()
        outputs = runner.get_output_details()
        (input_details,) = inputs.values()
        self._input = input_details["index"]
        self._outputs = {name: outputs[name]["index"] for name in ("scores", "label_ids")}
        signature_batch = input_details["shape_signature"][0]
        self.batch_size = None if signature_batch < 0 else int(signature_batch)
        self._allocated_batch = None

    def _run(self, images):
        batch = images.shape[0]
        if batch != self._allocated_batch:
            if self.batch_size is None:
                self.interpreter.resize_tensor_input(self._input, list(images.shape))
            self.interpreter.allocate_tensors()
            self._allocated_batch = batch
        self.interpreter.set_tensor(self._input, images)
        self.interpreter.invoke()
        return tuple(self.interpreter.get_tensor(self._outputs[k]) for k in ("scores", "label_ids"))

    def _predict(self, images):
        if self.batch_size is None:
            return self._run(images)
        if self.batch_size != 1:
            raise ValueError(f"unsupported fixed TFLite batch size {self.batch_size}")
        parts = [self._run(images[i : i + 1]) for i in range(images.shape[0])]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def op_names(self):
        """The names of the operators in the model (e.g. to check for Flex ops)."""
        return sorted({op["op_name"] for op in self.interpreter._get_ops_details()})


def _read_json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: the {what} is written beside the model by `hybridnet-tf export`"
        )
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _thresholds_file(path, names):
    """`{"global", "per_class"}` from a thresholds file, or None when it is absent.

    A damaged file raises a `BrokenRunFileError` naming it and what to do.
    """
    from hybridnet_tf.run_files import read_thresholds_file

    loaded = read_thresholds_file(path, names)
    if loaded is None:
        return None
    return {"global": loaded["global"], "per_class": loaded["per_class"]}


def run_thresholds(run_dir, config, vocabulary):
    """A run's thresholds: its tuned `thresholds.json`, else the config's `eval.threshold`."""
    tuned = _thresholds_file(os.path.join(run_dir, THRESHOLDS_FILE), vocabulary.names)
    if tuned is not None:
        return tuned
    threshold = config["eval"]["threshold"] if config else DEFAULT_THRESHOLD
    return threshold_dict(threshold, len(vocabulary))


def _load_keras_file(path):
    """A `.keras` file with `vocabulary.json` (and optionally `config.yaml`) beside it."""
    from hybridnet_tf.config import load_config
    from hybridnet_tf.experiment import image_size_of
    from hybridnet_tf.run_files import CONFIG_FILE, VOCABULARY_FILE, load_run_model, load_run_vocabulary
    from hybridnet_tf.export.saved_model import model_image_size

    directory = os.path.dirname(os.path.abspath(path))
    vocabulary_path = os.path.join(directory, VOCABULARY_FILE)
    if not os.path.isfile(vocabulary_path):
        raise FileNotFoundError(
            f"{vocabulary_path} not found: a .keras model needs the vocabulary.json of its "
            "run beside it (or pass the run directory)"
        )
    vocabulary = load_run_vocabulary(directory)
    model = load_run_model(directory, os.path.basename(path))
    config_path = os.path.join(directory, CONFIG_FILE)
    config = load_config(config_path) if os.path.isfile(config_path) else None
    image_size = image_size_of(config) if config else model_image_size(model)
    resize = eval_resize_policy(config["data"]["resize"]) if config else "squash"
    thresholds = run_thresholds(directory, config, vocabulary)
    return KerasPredictor(model, path, vocabulary, image_size, resize, thresholds)


def _load_run(run_dir, checkpoint):
    from hybridnet_tf.run_files import load_run
    from hybridnet_tf.experiment import image_size_of

    config, vocabulary, model = load_run(run_dir, checkpoint=checkpoint)
    thresholds = run_thresholds(run_dir, config, vocabulary)
    return KerasPredictor(
        model, run_dir, vocabulary, image_size_of(config), eval_resize_policy(config["data"]["resize"]), thresholds
    )


def _load_saved_model(path):
    import tensorflow as tf

    metadata = _read_json(os.path.join(path, EXPORT_FILE), "export.json")
    vocabulary = LabelVocabulary.load(os.path.join(path, LABELS_FILE))
    thresholds = _thresholds_file(os.path.join(path, THRESHOLDS_FILE), vocabulary.names)
    loaded = tf.saved_model.load(path)
    return SavedModelPredictor(
        loaded, path, vocabulary, metadata["image_size"], metadata["resize"], thresholds
    )


def _load_tflite(path, num_threads):
    sidecar = tflite_sidecar_path(path)
    metadata = _read_json(sidecar, "label/threshold file")
    vocabulary = LabelVocabulary(metadata["labels"])
    thresholds = metadata.get("thresholds")
    if thresholds is not None:
        per_class = thresholds["per_class"]
        thresholds = {
            "global": thresholds["global"],
            "per_class": [per_class[name] for name in vocabulary.names],
        }
    return TFLitePredictor(
        path, vocabulary, metadata["image_size"], metadata["resize"], thresholds, num_threads
    )


def load_predictor(path, checkpoint="best.keras", num_threads=None):
    """Loads a run directory, `.keras` file, SavedModel folder or `.tflite` file.

    Args:
        path: a run directory (its `checkpoint` is loaded), a `.keras` file
            with `vocabulary.json` beside it, a SavedModel folder written by
            `export_saved_model`, or a `.tflite` file written by `export_tflite`
            with its `.json` beside it.
        checkpoint: the model file of a run directory.
        num_threads: TFLite interpreter threads (None: LiteRT's default).

    Returns:
        A `Predictor`.

    Example:
        >>> predictor = load_predictor("runs/demo/export/hybridnet_int8.tflite")
        >>> predictor(images)["scores"].shape
        (2, 20)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        from hybridnet_tf.run_files import CONFIG_FILE

        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            return _load_run(path, checkpoint)
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return _load_saved_model(path)
        raise ValueError(
            f"{path} is neither a run directory (no config.yaml) nor a SavedModel (no saved_model.pb)"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path} not found")
    if path.endswith(".keras"):
        return _load_keras_file(path)
    if path.endswith(".tflite"):
        return _load_tflite(path, num_threads)
    raise ValueError(
        f"cannot load {path}: pass a run directory, a .keras file, a SavedModel folder or a .tflite file"
    )
