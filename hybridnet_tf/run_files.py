"""The files of a run directory, loading a run back (`safe_mode=True`), and what a rerun does.

`hybridnet-tf train` writes a run directory; evaluation, prediction and
export read it through these names and loaders. A broken file is named in
the error with what to do about it.

`training_complete.json` records that training finished (Keras'
`BackupAndRestore` deletes its backup at the end of `fit`, so without it a
finished run looks like a new one): `plan_training` reads it to tell a
rerun of a finished run (nothing to do), a longer run (continue from the
last weights) and an interrupted one (resume from the backup) apart.
"""

import json
import os
import shutil
from dataclasses import dataclass

import keras
import numpy as np

from hybridnet_tf.atomic_files import write_json_atomically
from hybridnet_tf.config import load_config
from hybridnet_tf.vocabulary import LabelVocabulary

CONFIG_FILE = "config.yaml"
VOCABULARY_FILE = "vocabulary.json"
THRESHOLDS_FILE = "thresholds.json"
BEST_MODEL = "best.keras"
LAST_MODEL = "last.keras"
COMPLETE_FILE = "training_complete.json"

# What `train` writes into a run directory; `--overwrite` removes these (and
# nothing else the user may have put there, e.g. exports or notes).
TRAINING_OUTPUTS = (
    CONFIG_FILE, VOCABULARY_FILE, THRESHOLDS_FILE, BEST_MODEL, LAST_MODEL, COMPLETE_FILE,
    "history.csv", "history.json", "frozen_phase.weights.h5", "logs", "backup",
    "backup_fine_tuning", "eval",
)
# Config sections that do not change the trained model: a finished run may be
# rerun with other values of these and is still the same run.
_NOT_TRAINING = ("eval",)


class BrokenRunFileError(ValueError):
    """A file of a run directory exists but cannot be read; the message says what to do."""


def _broken(path, why, what_to_do):
    return BrokenRunFileError(f"{path} is broken ({why}); {what_to_do}")


def load_run_config(run_dir):
    """The config a run was trained with (`run_dir/config.yaml`)."""
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{config_path} not found: is {run_dir} a run directory written by "
            "`hybridnet-tf train`?"
        )
    return load_config(config_path)


def load_run_vocabulary(run_dir):
    """The run's `vocabulary.json`; a damaged file is named with what to do."""
    path = os.path.join(run_dir, VOCABULARY_FILE)
    try:
        return LabelVocabulary.load(path)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as error:
        raise _broken(
            path, str(error).replace(f"{path} ", "").strip() or type(error).__name__,
            "it holds the model's label names in column order and cannot be guessed; restore it "
            "from a copy of the run, or retrain with `hybridnet-tf train ... --overwrite`",
        ) from None


def load_run_model(run_dir, checkpoint=BEST_MODEL):
    """A run's `.keras` model file (`safe_mode=True`); a damaged file is named with what to do."""
    # Importing registers the custom layers before the model is deserialised.
    import hybridnet_tf.model.label_decoder  # noqa: F401

    model_path = os.path.join(run_dir, checkpoint)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path} not found; has training finished an epoch?")
    try:
        return keras.models.load_model(model_path, safe_mode=True)
    except Exception as error:  # noqa: BLE001  (zip, HDF5 and config errors alike)
        other = LAST_MODEL if checkpoint != LAST_MODEL else BEST_MODEL
        why = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise _broken(
            model_path, why,
            f"use the run's other checkpoint (--checkpoint {other} for export; copy it over "
            f"{checkpoint} for evaluate / predict), or retrain with `hybridnet-tf train ... --overwrite`",
        ) from None


def load_run(run_dir, checkpoint=BEST_MODEL):
    """Loads a run's config, vocabulary and model (`safe_mode=True`).

    Raises:
        FileNotFoundError: a file of the run is missing.
        BrokenRunFileError: a file exists but cannot be read (the message
            names it and says what to do).

    Returns:
        `(config, vocabulary, model)`.
    """
    config = load_run_config(run_dir)
    vocabulary = load_run_vocabulary(run_dir)
    return config, vocabulary, load_run_model(run_dir, checkpoint)


def load_run_thresholds(run_dir, vocabulary):
    """The run's tuned thresholds as a per-label array, or None when not tuned."""
    loaded = read_thresholds_file(os.path.join(run_dir, THRESHOLDS_FILE), vocabulary.names)
    if loaded is None:
        return None
    return np.asarray(loaded["per_class"], dtype=np.float32)


def read_thresholds_file(path, names):
    """`load_thresholds(path, names)`, None when the file is absent, a `BrokenRunFileError` when damaged."""
    from hybridnet_tf.evaluation.thresholds import load_thresholds

    if not os.path.isfile(path):
        return None
    try:
        return load_thresholds(path, names=names)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as error:
        raise _broken(
            path, str(error).replace(f"thresholds file {path} ", "").strip(),
            "delete it to use eval.threshold (0.5 by default) instead of tuned thresholds, "
            "or retrain to tune them again",
        ) from None


# ---------------------------------------------------------------- reruns


@dataclass
class TrainingPlan:
    """What `plan_training` decided for a run directory.

    Attributes:
        action: "new" (nothing there, or an interrupted run that
            `BackupAndRestore` resumes), "complete" (finished with this
            config: nothing to do) or "continue" (finished with fewer
            epochs: train on from the last weights).
        epochs_done: epochs of the finished run (0 for "new").
        message: one line for the user.
    """

    action: str
    epochs_done: int = 0
    message: str = ""


def read_completion(run_dir):
    """The `training_complete.json` record of a finished run, or None."""
    path = os.path.join(run_dir, COMPLETE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
        int(record["epochs"])
        dict(record["config"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as error:
        raise _broken(
            path, f"{type(error).__name__}: {error}",
            "it records that training finished; pass --overwrite to train this run dir again "
            "from scratch, or delete the file to resume as an interrupted run",
        ) from None
    return record


def mark_complete(run_dir, config, epochs):
    """Records that the run in `run_dir` finished `epochs` epochs with `config` (atomically)."""
    return write_json_atomically(
        os.path.join(run_dir, COMPLETE_FILE),
        {"epochs": int(epochs), "config": json.loads(json.dumps(config))},
    )


def _differences(old, new):
    """`section.key: old -> new` for the training keys that differ (train.epochs excepted)."""
    changed = []
    for section in sorted(set(old) | set(new)):
        if section in _NOT_TRAINING:
            continue
        old_values, new_values = old.get(section, {}), new.get(section, {})
        for key in sorted(set(old_values) | set(new_values)):
            if (section, key) == ("train", "epochs"):
                continue
            before, after = old_values.get(key), new_values.get(key)
            if before != after:
                changed.append(f"{section}.{key}: {before!r} -> {after!r}")
    return changed


def plan_training(run_dir, config):
    """Decides what `train` does with `run_dir`, reading files only (no TF work).

    Args:
        run_dir: the run directory (it need not exist).
        config: the full config about to be trained.

    Returns:
        A `TrainingPlan`.

    Raises:
        ValueError: the run dir holds a finished run with another config,
            or with more epochs than asked for (the message says to pass
            `--overwrite` or choose another run dir).
    """
    record = read_completion(run_dir)
    if record is None:
        return TrainingPlan("new")
    done, wanted = int(record["epochs"]), int(config["train"]["epochs"])
    changed = _differences(record["config"], json.loads(json.dumps(config)))
    if changed:
        raise ValueError(
            f"{run_dir} holds a finished run trained with another config ({'; '.join(changed[:5])}"
            f"{'; ...' if len(changed) > 5 else ''}); pass --overwrite to replace it, or choose "
            "another --run-dir"
        )
    if wanted < done:
        raise ValueError(
            f"{run_dir} holds a finished run of {done} epochs, more than train.epochs={wanted}; "
            "pass --overwrite to train it again with fewer, or choose another --run-dir"
        )
    if wanted == done:
        return TrainingPlan(
            "complete", done,
            f"{run_dir} is complete: {done} of {done} epochs trained; nothing to do "
            "(raise train.epochs to train on, or pass --overwrite to start over)",
        )
    return TrainingPlan(
        "continue", done,
        f"{run_dir} finished {done} epochs; continuing from its last weights to epoch {wanted}",
    )


def clear_training_outputs(run_dir):
    """Removes what `train` wrote into `run_dir` (for `--overwrite`); other files stay.

    Returns:
        The names removed.
    """
    removed = []
    for name in TRAINING_OUTPUTS:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed
