"""The files of a run directory, and loading a run back (`safe_mode=True`).

`hybridnet-tf train` writes a run directory; evaluation, prediction and
export read it through these names and loaders.
"""

import os

import keras
import numpy as np

from hybridnet_tf.config import load_config
from hybridnet_tf.vocabulary import LabelVocabulary

CONFIG_FILE = "config.yaml"
VOCABULARY_FILE = "vocabulary.json"
THRESHOLDS_FILE = "thresholds.json"
BEST_MODEL = "best.keras"
LAST_MODEL = "last.keras"


def load_run(run_dir, checkpoint=BEST_MODEL):
    """Loads a run's config, vocabulary and model (`safe_mode=True`).

    Returns:
        `(config, vocabulary, model)`.
    """
    # Importing registers the custom layers before the model is deserialised.
    import hybridnet_tf.model.label_decoder  # noqa: F401

    config_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{config_path} not found: is {run_dir} a run directory written by "
            "`hybridnet-tf train`?"
        )
    config = load_config(config_path)
    vocabulary = LabelVocabulary.load(os.path.join(run_dir, VOCABULARY_FILE))
    model_path = os.path.join(run_dir, checkpoint)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path} not found; has training finished an epoch?")
    model = keras.models.load_model(model_path, safe_mode=True)
    return config, vocabulary, model


def load_run_thresholds(run_dir, vocabulary):
    """The run's tuned thresholds as a per-label array, or None when not tuned."""
    from hybridnet_tf.evaluation.thresholds import load_thresholds

    path = os.path.join(run_dir, THRESHOLDS_FILE)
    if not os.path.isfile(path):
        return None
    loaded = load_thresholds(path, names=vocabulary.names)
    return np.asarray(loaded["per_class"], dtype=np.float32)
