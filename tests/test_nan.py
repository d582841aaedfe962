"""A NaN loss stops training with a clear error, keeps the good checkpoints, and a rerun resumes."""

import csv
import json
import os

import keras
import numpy as np
import tensorflow as tf

from tiny_demo import JOINT_FIT_ONLY, tiny_demo_train

from hybridnet_tf import experiment
from hybridnet_tf.cli import main

EPOCHS = 3
STEPS = 4  # 32 demo images in batches of 8


def poison_batch(dataset, index):
    """An endless stream of `dataset`'s batches in which batch `index` (0-based) has NaN images."""

    def poison(position, batch):
        images, labels = batch
        images = tf.where(position == index, tf.fill(tf.shape(images), np.nan), images)
        return images, labels

    return dataset.repeat().enumerate().map(poison)


def epochs_logged(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def all_finite(path):
    return all(np.isfinite(w).all() for w in keras.models.load_model(path).get_weights())


def test_nan_loss_stops_with_the_step_named_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    run_dir = str(tmp_path / "run")
    # The joint fit's NaN stop and resume; the warm start's is in tests/test_warm_start.py.
    command = tiny_demo_train(run_dir, tmp_path / "demo", *JOINT_FIT_ONLY, f"train.epochs={EPOCHS}",
                              "train.warmup_epochs=0", train=32, batch_size=8)
    real_as_dataset = experiment.as_dataset

    def with_nan_in_second_epoch(split, config, training, **kwargs):
        dataset = real_as_dataset(split, config, training, **kwargs)
        # Batch 6 of the stream is batch 2 of epoch 2.
        return poison_batch(dataset, STEPS + 1) if training else dataset

    monkeypatch.setattr(experiment, "as_dataset", with_nan_in_second_epoch)
    code = main(command)
    err = capsys.readouterr().err
    assert code != 0
    assert f"epoch 2 of {EPOCHS}, batch 2 of {STEPS}" in err, err
    # Nothing was saved from the diverged weights: epoch 1's files are intact.
    assert epochs_logged(run_dir) == [0]
    assert all_finite(os.path.join(run_dir, "best.keras"))
    assert all_finite(os.path.join(run_dir, "last.keras"))
    assert os.listdir(os.path.join(run_dir, "backup"))  # kept for resuming

    # With the data fixed, the same command resumes at epoch 2 and finishes.
    monkeypatch.setattr(experiment, "as_dataset", real_as_dataset)
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "Epoch 1/" not in out and f"Epoch 2/{EPOCHS}" in out
    assert epochs_logged(run_dir) == [0, 1, 2]
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert len(history["loss"]) == len(history["val_mAP"]) == EPOCHS
    assert all(np.isfinite(history["loss"]))
    assert not os.path.exists(os.path.join(run_dir, "backup"))
